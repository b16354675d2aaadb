"""The response cache: replies by fingerprint, shared across runs and processes."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_batch.cache import ResponseCache, default_cache_path
from qwen_batch.errors import StorageError
from qwen_batch.types import Reply


def reply(text: str, request_id: str | None = "req-1") -> Reply:
    return Reply(text=text, finish_reason="stop", input_tokens=12, output_tokens=3, request_id=request_id)


def test_replies_survive_into_another_instance(tmp_path: Path) -> None:
    """What one run stores, a later run (another connection, as another process would) reads."""
    path = tmp_path / "cache" / "responses.sqlite3"
    with ResponseCache(path) as first:
        first.put_many([("fp-a", reply("你好")), ("fp-b", reply("b", request_id=None))])
    with ResponseCache(path) as second:
        assert second.get_many(["fp-a", "fp-b", "fp-missing"]) == {
            "fp-a": reply("你好"),
            "fp-b": reply("b", request_id=None),
        }
        assert len(second) == 2


def test_two_open_instances_see_each_others_writes(tmp_path: Path) -> None:
    """Two runs at once share the file (WAL): a commit by one is visible to the other."""
    path = tmp_path / "responses.sqlite3"
    with ResponseCache(path) as one, ResponseCache(path) as two:
        one.put_many([("fp", reply("x"))])
        assert two.get_many(["fp"]) == {"fp": reply("x")}
        two.put_many([("fp2", reply("y"))])
        assert len(one) == 2


def test_the_first_reply_for_a_fingerprint_is_kept(tmp_path: Path) -> None:
    """Every job reading the cache sees the same answer for the same request."""
    with ResponseCache(tmp_path / "c.sqlite3") as cache:
        cache.put_many([("fp", reply("first"))])
        cache.put_many([("fp", reply("second"))])
        assert cache.get_many(["fp"])["fp"].text == "first"


def test_many_fingerprints_at_once(tmp_path: Path) -> None:
    """Lookups larger than SQLite's parameter limit, with duplicates, still work."""
    items = [(f"fp{i}", reply(f"t{i}")) for i in range(2500)]
    with ResponseCache(tmp_path / "c.sqlite3") as cache:
        cache.put_many(items)
        wanted = [f"fp{i}" for i in range(0, 3000, 2)] + ["fp0", "fp2"]
        found = cache.get_many(wanted)
    assert len(found) == 1250
    assert found["fp2498"].text == "t2498"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=20),
        st.builds(
            Reply,
            text=st.text(max_size=50),
            finish_reason=st.sampled_from(["stop", "length"]),
            input_tokens=st.integers(0, 2**40),
            output_tokens=st.integers(0, 2**40),
            request_id=st.one_of(st.none(), st.text(max_size=10)),
            usage_source=st.sampled_from(["service", "estimated"]),
        ),
        max_size=10,
    )
)
def test_any_replies_round_trip(tmp_path_factory: pytest.TempPathFactory, replies: dict[str, Reply]) -> None:
    """Any text (non-ASCII, empty) and any token counts come back exactly."""
    path = tmp_path_factory.mktemp("cache") / "c.sqlite3"
    with ResponseCache(path) as cache:
        cache.put_many(list(replies.items()))
        assert cache.get_many(list(replies)) == replies


def test_file_modes_are_private(tmp_path: Path) -> None:
    """Replies may be confidential: a new cache folder is 0700 and the file 0600."""
    path = tmp_path / "new" / "qwen-batch" / "responses.sqlite3"
    with ResponseCache(path) as cache:
        cache.put_many([("fp", reply("x"))])
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_corrupt_file_is_a_storage_error_with_the_fix(tmp_path: Path) -> None:
    """A damaged cache stops with the path and what to do, not a traceback."""
    path = tmp_path / "responses.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError) as caught:
        ResponseCache(path)
    message = str(caught.value)
    assert str(path) in message and "--no-cache" in message and "delete" in message


def test_a_foreign_database_is_a_storage_error(tmp_path: Path) -> None:
    """A SQLite file with another table called replies is not mistaken for a cache."""
    import sqlite3

    path = tmp_path / "responses.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE replies (something TEXT)")
    db.close()
    with pytest.raises(StorageError, match="--no-cache"):
        ResponseCache(path)


def test_an_uncreatable_location_is_a_storage_error(tmp_path: Path) -> None:
    """A cache folder under a file cannot exist; the error names the path."""
    (tmp_path / "blocker").write_text("file")
    with pytest.raises(StorageError, match="blocker"):
        ResponseCache(tmp_path / "blocker" / "responses.sqlite3")


def test_default_path_reads_the_environment_when_called(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """QWEN_BATCH_CACHE_DIR wins, then XDG_CACHE_HOME, then ~/.cache."""
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == tmp_path / "explicit" / "responses.sqlite3"
    monkeypatch.delenv("QWEN_BATCH_CACHE_DIR")
    assert default_cache_path() == tmp_path / "xdg" / "qwen-batch" / "responses.sqlite3"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_path() == tmp_path / "home" / ".cache" / "qwen-batch" / "responses.sqlite3"


def test_one_writer_thread_and_one_reader_thread(tmp_path: Path) -> None:
    """The runner's writer thread stores while the producer thread looks up; neither breaks."""
    errors: list[BaseException] = []
    with ResponseCache(tmp_path / "c.sqlite3") as cache:

        def write() -> None:
            try:
                for batch in range(50):
                    cache.put_many([(f"fp{batch}-{i}", reply("x")) for i in range(20)])
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        seen = 0
        while writer.is_alive():
            seen = max(seen, len(cache.get_many([f"fp{b}-0" for b in range(50)])))
        writer.join()
        assert not errors
        assert len(cache) == 1000
        assert len(cache.get_many([f"fp{b}-0" for b in range(50)])) == 50


def test_processes_that_open_a_new_cache_at_the_same_moment_all_get_it(tmp_path: Path) -> None:
    """Shards or Ray workers started together open the same new cache: the folder one of them
    makes between another's look and its mkdir is not an error."""
    import threading

    for round_ in range(30):
        path = tmp_path / f"round-{round_}" / "nested" / "responses.sqlite3"
        barrier = threading.Barrier(8)
        errors: list[BaseException] = []

        def open_it() -> None:
            barrier.wait(timeout=10)
            try:
                ResponseCache(path).close()
            except BaseException as exc:  # noqa: BLE001 - the test collects every failure
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert errors == []
