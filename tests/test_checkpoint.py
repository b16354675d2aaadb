"""The checkpoint: durable appends, torn tails, resume reads, manifest checks, setting aside."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_batch.checkpoint import (
    Checkpoint,
    CheckpointBusy,
    CheckpointMismatch,
    encode_records,
    outcome_to_record,
    record_to_outcome,
    set_aside,
)
from qwen_batch.errors import StorageError, UsageError
from qwen_batch.types import Outcome

MANIFEST = {"format": 1, "model": "qwen-plus", "parameters": {"temperature": 0.7, "seed": 1234}}

texts = st.one_of(st.none(), st.text(max_size=40))
ints = st.one_of(st.none(), st.integers(min_value=0, max_value=2**62))
floats = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False))
outcomes = st.builds(
    Outcome,
    index=st.integers(min_value=0, max_value=50),
    fingerprint=st.text(max_size=20),
    status=st.sampled_from(["ok", "error"]),
    request_id=texts,
    output_text=texts,
    finish_reason=texts,
    input_tokens=ints,
    output_tokens=ints,
    cost=floats,
    error_code=texts,
    error_message=texts,
    retryable=st.booleans(),
    attempts=st.integers(min_value=0, max_value=100),
    latency_s=floats,
    cached=st.booleans(),
)
fast = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def ok(index: int, text: str = "done", **fields: object) -> Outcome:
    return Outcome(index=index, fingerprint=f"fp{index}", status="ok", output_text=text, **fields)  # type: ignore[arg-type]


def failed(index: int, code: str = "Throttling", retryable: bool = True) -> Outcome:
    return Outcome(index=index, fingerprint=f"fp{index}", status="error", error_code=code, retryable=retryable)


def latest(sequence: list[Outcome]) -> list[Outcome]:
    by_index: dict[int, Outcome] = {}
    for outcome in sequence:
        by_index[outcome.index] = outcome
    return [by_index[i] for i in sorted(by_index)]


@given(outcomes)
def test_record_round_trip_is_exact(outcome: Outcome) -> None:
    """Any outcome survives outcome_to_record -> JSON -> record_to_outcome unchanged."""
    import json

    line = encode_records([outcome])
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert record_to_outcome(json.loads(line)) == outcome
    assert record_to_outcome(outcome_to_record(outcome)) == outcome


@fast
@given(st.lists(outcomes, max_size=25))
def test_any_sequence_reads_back_as_latest_per_index(tmp_path_factory: pytest.TempPathFactory, sequence: list[Outcome]) -> None:
    """Whatever is appended, reading back gives the last outcome of each index, exactly."""
    directory = tmp_path_factory.mktemp("ck") / "x.checkpoint"
    with Checkpoint.open(directory, MANIFEST) as checkpoint:
        for start in range(0, len(sequence), 7):
            checkpoint.append(sequence[start : start + 7])
        assert checkpoint.outcomes() == latest(sequence)
        done = checkpoint.done_frame()
    assert done["index"].to_list() == [o.index for o in latest(sequence)]
    assert done["fingerprint"].to_list() == [o.fingerprint for o in latest(sequence)]


def test_non_ascii_and_none_values_round_trip_through_the_file(tmp_path: Path) -> None:
    """Chinese text, emoji, newlines and None fields come back as written."""
    outcome = Outcome(index=3, fingerprint="f", status="ok", output_text="你好，世界 🌏\n第二行", cost=None, latency_s=0.25)
    with Checkpoint.open(tmp_path / "c", MANIFEST) as checkpoint:
        checkpoint.append([outcome])
    with Checkpoint.open(tmp_path / "c", MANIFEST) as checkpoint:
        assert checkpoint.outcomes() == [outcome]
    assert "你好".encode() in (tmp_path / "c" / "rows.jsonl").read_bytes()


def test_non_finite_floats_are_stored_as_null(tmp_path: Path) -> None:
    """A NaN cost cannot be written as JSON; it is recorded as unknown instead of breaking the log."""
    with Checkpoint.open(tmp_path / "c", MANIFEST) as checkpoint:
        checkpoint.append([ok(0, cost=float("nan"), latency_s=float("inf"))])
        assert checkpoint.outcomes()[0].cost is None
        assert checkpoint.outcomes()[0].latency_s is None


@fast
@given(st.lists(outcomes, min_size=1, max_size=6))
def test_replaying_the_same_outcomes_is_idempotent(tmp_path_factory: pytest.TempPathFactory, sequence: list[Outcome]) -> None:
    """Appending the same outcomes again (a resume that re-records them) changes nothing read back."""
    directory = tmp_path_factory.mktemp("ck") / "c"
    with Checkpoint.open(directory, MANIFEST) as checkpoint:
        checkpoint.append(sequence)
        once = checkpoint.done_frame()
        records_once = checkpoint.records_lazy().collect()
        checkpoint.append(sequence)
        assert checkpoint.done_frame().equals(once)
        assert checkpoint.records_lazy().collect().equals(records_once)


def test_last_record_per_index_wins(tmp_path: Path) -> None:
    """A row retried on resume appends a newer record, and that newer record is the row's state."""
    with Checkpoint.open(tmp_path / "c", MANIFEST) as checkpoint:
        checkpoint.append([failed(0), ok(1), failed(2, code="InternalError")])
        checkpoint.append([ok(0, text="second try"), failed(1, code="Late", retryable=False)])
        done = checkpoint.done_frame()
        assert done.to_dicts() == [
            {"index": 0, "fingerprint": "fp0", "status": "ok", "retryable": False, "cost": None, "cached": False},
            {"index": 1, "fingerprint": "fp1", "status": "error", "retryable": False, "cost": None, "cached": False},
            {"index": 2, "fingerprint": "fp2", "status": "error", "retryable": True, "cost": None, "cached": False},
        ]
        assert checkpoint.outcomes()[0].output_text == "second try"


def test_done_frame_has_the_documented_schema_even_when_empty(tmp_path: Path) -> None:
    """Resume code can rely on the column types, also before anything was written."""
    expected = {
        "index": pl.Int64,
        "fingerprint": pl.String,
        "status": pl.String,
        "retryable": pl.Boolean,
        "cost": pl.Float64,
        "cached": pl.Boolean,
    }
    with Checkpoint.open(tmp_path / "c", MANIFEST) as checkpoint:
        assert dict(checkpoint.done_frame().schema) == expected
        checkpoint.append([ok(5, cost=0.5, cached=True)])
        assert dict(checkpoint.done_frame().schema) == expected


@fast
@given(st.data())
def test_a_torn_last_record_is_cut_away_at_any_byte(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    """A kill mid-write leaves part of the last line; opening keeps every whole record and no partial one."""
    directory = tmp_path_factory.mktemp("ck") / "c"
    whole = [ok(0, "零一二"), failed(1), ok(2, "trois")]
    last = ok(3, "the record being written when the process died — 最后")
    with Checkpoint.open(directory, MANIFEST) as checkpoint:
        checkpoint.append(whole)
    rows = directory / "rows.jsonl"
    durable = rows.stat().st_size
    torn = encode_records([last])
    cut = data.draw(st.integers(min_value=1, max_value=len(torn) - 1), label="cut")
    with open(rows, "ab") as f:
        f.write(torn[:cut])
    with Checkpoint.open(directory, MANIFEST) as checkpoint:
        assert rows.stat().st_size == durable
        assert checkpoint.outcomes() == whole
        checkpoint.append([last])
        assert checkpoint.outcomes() == [*whole, last]


@pytest.mark.parametrize(
    "tail",
    [b"\x00" * 300, b"\x00" * 40 + b"\n", b'{"index":3,"fingerpr\n', b"not json\n"],
    ids=["zeros", "zeros-newline", "cut-json-newline", "garbage-line"],
)
def test_a_damaged_last_line_is_cut_away(tmp_path: Path, tail: bytes) -> None:
    """A power cut can leave zeros or a half line ending in a newline; only whole records are kept."""
    with Checkpoint.open(tmp_path / "c", MANIFEST) as checkpoint:
        checkpoint.append([ok(0), ok(1)])
    with open(tmp_path / "c" / "rows.jsonl", "ab") as f:
        f.write(tail)
    with Checkpoint.open(tmp_path / "c", MANIFEST) as checkpoint:
        assert [o.index for o in checkpoint.outcomes()] == [0, 1]


def test_a_torn_first_record_leaves_an_empty_log(tmp_path: Path) -> None:
    """Even the very first record may be torn; the log is then empty, not unreadable."""
    Checkpoint.open(tmp_path / "c", MANIFEST).close()
    (tmp_path / "c" / "rows.jsonl").write_bytes(b'{"index":0,"fi')
    with Checkpoint.open(tmp_path / "c", MANIFEST) as checkpoint:
        assert checkpoint.done_frame().height == 0
    assert (tmp_path / "c" / "rows.jsonl").stat().st_size == 0


def test_read_only_open_skips_a_torn_tail_without_touching_the_file(tmp_path: Path) -> None:
    """`status` may look while a run appends: it reads whole records and writes nothing."""
    with Checkpoint.open(tmp_path / "c", MANIFEST) as checkpoint:
        checkpoint.append([ok(0, cost=0.25), failed(1)])
    rows = tmp_path / "c" / "rows.jsonl"
    with open(rows, "ab") as f:
        f.write(b'{"index":2,"status":"o')
    size = rows.stat().st_size
    reader = Checkpoint.open_readonly(tmp_path / "c")
    assert reader.manifest == MANIFEST
    assert reader.done_frame()["index"].to_list() == [0, 1]
    assert reader.summary().rows_done == 2
    assert rows.stat().st_size == size
    with pytest.raises(StorageError):
        reader.append([ok(5)])


def test_a_damaged_middle_line_is_a_storage_error(tmp_path: Path) -> None:
    """Damage before the tail is not a torn write; it is reported, not silently skipped."""
    with Checkpoint.open(tmp_path / "c", MANIFEST) as checkpoint:
        checkpoint.append([ok(0)])
    rows = tmp_path / "c" / "rows.jsonl"
    rows.write_bytes(rows.read_bytes() + b"garbage\n" + encode_records([ok(1)]))
    with Checkpoint.open(tmp_path / "c", MANIFEST) as checkpoint:
        with pytest.raises(StorageError, match="damaged"):
            checkpoint.done_frame()


def test_summary_counts_the_latest_record_of_each_row(tmp_path: Path) -> None:
    """Status figures: superseded records do not count twice."""
    with Checkpoint.open(tmp_path / "c", MANIFEST) as checkpoint:
        checkpoint.append(
            [
                ok(0, input_tokens=10, output_tokens=5, cost=0.5),
                failed(1, code="Throttling"),
                failed(2, code="InvalidParameter", retryable=False),
                # An over-long row as an older version recorded it: the preflight count in input_tokens.
                Outcome(index=3, fingerprint="x", status="error", input_tokens=7000),
                ok(4, input_tokens=1, output_tokens=1, cost=0.0, cached=True),
            ]
        )
        checkpoint.append([ok(1, input_tokens=2, output_tokens=3, cost=0.25)])
        summary = checkpoint.summary()
    assert summary.rows_done == 5
    assert (summary.ok, summary.errors, summary.retryable_errors, summary.cached) == (3, 2, 0, 1)
    assert summary.errors_by_code == {"InvalidParameter": 1, "unknown": 1}
    # Billed usage only: not the cache hit's (paid for before), not the unsent row's count.
    assert (summary.input_tokens, summary.output_tokens) == (12, 8)
    assert summary.cost == pytest.approx(0.75)


def test_files_are_private(tmp_path: Path) -> None:
    """Responses may be confidential: folder 0700, files 0600."""
    with Checkpoint.open(tmp_path / "out" / "x.parquet.checkpoint", MANIFEST) as checkpoint:
        checkpoint.append([ok(0)])
    directory = tmp_path / "out" / "x.parquet.checkpoint"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "rows.jsonl").stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / "manifest.json").stat().st_mode) == 0o600


def test_manifest_mismatch_lists_each_changed_key(tmp_path: Path) -> None:
    """A changed job is refused with what changed, as dotted keys with old -> new, and how to start over."""
    with Checkpoint.open(tmp_path / "c", MANIFEST) as checkpoint:
        checkpoint.append([ok(0)])
    changed = {"format": 1, "model": "qwen-max", "parameters": {"temperature": 0.9, "seed": 1234, "top_p": 0.8}}
    with pytest.raises(CheckpointMismatch) as caught:
        Checkpoint.open(tmp_path / "c", changed)
    message = str(caught.value)
    assert "parameters.temperature: 0.7 -> 0.9" in message
    assert 'model: "qwen-plus" -> "qwen-max"' in message
    assert "parameters.top_p: (absent) -> 0.8" in message
    assert "seed" not in message
    assert "--fresh" in message
    assert isinstance(caught.value, UsageError)


def test_a_changed_job_takes_over_a_checkpoint_with_no_rows(tmp_path: Path) -> None:
    """Nothing recorded under the old job (a run stopped by a configuration error): the fixed job
    resumes in the same checkpoint, which then holds the new manifest."""
    Checkpoint.open(tmp_path / "c", MANIFEST).close()
    changed = {**MANIFEST, "model": "qwen-max"}
    with Checkpoint.open(tmp_path / "c", changed) as checkpoint:
        checkpoint.append([ok(0)])
    with pytest.raises(CheckpointMismatch):
        Checkpoint.open(tmp_path / "c", MANIFEST)
    with Checkpoint.open(tmp_path / "c", changed) as checkpoint:
        assert checkpoint.done_frame().height == 1


def test_a_changed_job_does_not_take_over_a_checkpoint_in_use(tmp_path: Path) -> None:
    """The manifest of a run that holds the checkpoint is never rewritten under it."""
    with Checkpoint.open(tmp_path / "c", MANIFEST):
        with pytest.raises(CheckpointBusy):
            Checkpoint.open(tmp_path / "c", {**MANIFEST, "model": "qwen-max"})
    with Checkpoint.open_readonly(tmp_path / "c") as checkpoint:
        assert checkpoint.manifest == json.loads(json.dumps(MANIFEST))


def test_the_same_manifest_reopens(tmp_path: Path) -> None:
    """Equal manifests (tuples and lists alike, any key order) resume."""
    manifest = {"b": (1, 2), "a": {"y": None, "x": "é"}}
    with Checkpoint.open(tmp_path / "c", manifest) as checkpoint:
        checkpoint.append([ok(0)])
    with Checkpoint.open(tmp_path / "c", {"a": {"x": "é", "y": None}, "b": [1, 2]}) as checkpoint:
        assert checkpoint.done_frame().height == 1


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    """Two runs appending to one log would interleave records; the second is told to wait."""
    with Checkpoint.open(tmp_path / "c", MANIFEST):
        with pytest.raises(CheckpointBusy):
            Checkpoint.open(tmp_path / "c", MANIFEST)
    Checkpoint.open(tmp_path / "c", MANIFEST).close()


def test_open_under_a_file_is_a_storage_error(tmp_path: Path) -> None:
    """A folder that cannot be created is a one-line StorageError naming it."""
    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(StorageError, match="blocker"):
        Checkpoint.open(tmp_path / "blocker" / "x.checkpoint", MANIFEST)


def test_a_failed_append_keeps_what_was_durable(tmp_path: Path) -> None:
    """A full disk (ENOSPC) raises StorageError with the path; earlier records stay readable."""
    checkpoint = Checkpoint.open(tmp_path / "c", MANIFEST)
    checkpoint.append([ok(0), ok(1)])
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, checkpoint._fd)  # the seam: the log's descriptor now hits a full device
    os.close(full)
    with pytest.raises(StorageError, match=r"rows\.jsonl.*free some space"):
        checkpoint.append([ok(2)])
    checkpoint.close()
    with Checkpoint.open(tmp_path / "c", MANIFEST) as reopened:
        assert [o.index for o in reopened.outcomes()] == [0, 1]


def test_append_after_close_is_a_storage_error(tmp_path: Path) -> None:
    """A closed checkpoint refuses appends instead of losing them."""
    checkpoint = Checkpoint.open(tmp_path / "c", MANIFEST)
    checkpoint.close()
    checkpoint.close()
    with pytest.raises(StorageError):
        checkpoint.append([ok(0)])


def test_a_damaged_manifest_is_a_storage_error(tmp_path: Path) -> None:
    """An unreadable manifest is reported with the way out, not a traceback."""
    Checkpoint.open(tmp_path / "c", MANIFEST).close()
    (tmp_path / "c" / "manifest.json").write_text("{not json")
    with pytest.raises(StorageError, match="--fresh"):
        Checkpoint.open(tmp_path / "c", MANIFEST)


def test_set_aside_moves_everything_and_deletes_nothing(tmp_path: Path) -> None:
    """--fresh keeps the old run: checkpoint, output and summary move into <output>.old-<stamp>/."""
    output = tmp_path / "out.parquet"
    summary = tmp_path / "out.parquet.summary.json"
    checkpoint_dir = tmp_path / "out.parquet.checkpoint"
    with Checkpoint.open(checkpoint_dir, MANIFEST) as checkpoint:
        checkpoint.append([ok(0)])
    output.write_bytes(b"PAR1")
    summary.write_text("{}")
    folder = set_aside([checkpoint_dir, output, summary])
    assert folder is not None and folder.parent == tmp_path
    assert folder.name.startswith("out.parquet.old-")
    assert sorted(p.name for p in folder.iterdir()) == sorted([checkpoint_dir.name, output.name, summary.name])
    assert (folder / output.name).read_bytes() == b"PAR1"
    assert not checkpoint_dir.exists() and not output.exists()
    with Checkpoint.open(folder / checkpoint_dir.name, MANIFEST) as old:
        assert old.done_frame().height == 1
    output.write_bytes(b"again")
    second = set_aside([checkpoint_dir, output], output=output)
    assert second is not None and second != folder and (second / output.name).read_bytes() == b"again"


def test_set_aside_with_nothing_there_returns_none(tmp_path: Path) -> None:
    """A first run with --fresh has nothing to move and creates no folder."""
    assert set_aside([tmp_path / "x.checkpoint", tmp_path / "x"]) is None
    assert list(tmp_path.iterdir()) == []
