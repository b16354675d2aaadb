"""The API key and the base URL are checked before anything is sent, without ever showing them.

A key no HTTP header can carry (a line break, CR/LF, a space, a control or non-ASCII
character), from the environment or from the key file, and a key file that is missing,
not a regular file, empty or not text, are exit 2 with one line naming where the key came
from; credentials in a base URL are refused the same way. Nothing is sent, no file changes,
and no output holds the key, any part of it, or the URL's password.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qwen_batch.cli import main
from qwen_batch.emulator import EmulatorConfig
from qwen_batch.testing import EmulatorThread

from .conftest import sentences_job

HEAD, TAIL = "Hd9Kq2Zx", "Tl4Wm7Vy"  # canaries around the hostile part: no message may show either


@pytest.fixture
def any_key_emulator() -> Iterator[Any]:
    """An emulator that accepts any non-empty bearer key, so only qwen-batch's own checks refuse one."""
    with EmulatorThread(EmulatorConfig(api_key=None)) as emu:
        yield emu


@pytest.fixture
def key_env(any_key_emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", any_key_emulator.base_url)
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    monkeypatch.delenv("DASHSCOPE_API_KEY_FILE_PATH", raising=False)
    monkeypatch.delenv("QWEN_BATCH_DEBUG", raising=False)
    return monkeypatch


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def header_safe(key: str) -> bool:
    return bool(key) and all("!" <= char <= "~" for char in key)


def run_job(folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    job = sentences_job(folder, ["one", "two"])
    code = main(["run", str(job), "--quiet", "--no-cache"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_one_error_line(output: str, *fragments: str) -> None:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    assert "Traceback" not in output and "internal error" not in output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def refused_run(folder: Path, capsys: pytest.CaptureFixture[str], emulator: Any, *fragments: str) -> str:
    """Run a 2-row job that must be refused: exit 2, one error line with ``fragments``, nothing sent or changed."""
    job = sentences_job(folder, ["one", "two"])
    before = snapshot(folder)
    code = main(["run", str(job), "--quiet"])
    captured = capsys.readouterr()
    assert code == 2
    assert_one_error_line(captured.err, *fragments)
    assert emulator.ledger == []
    assert snapshot(folder) == before
    return captured.out + captured.err


_hostile = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(middle=_hostile, from_file=st.booleans())
@example(middle="\n", from_file=False)
@example(middle="\r\n", from_file=True)
@example(middle="é", from_file=False)
@example(middle=" ", from_file=True)
@example(middle="\x7f", from_file=False)
@example(middle="\u2028", from_file=False)
@example(middle="-ok_123", from_file=True)
def test_a_hostile_key_is_exit_2_before_sending_and_no_output_shows_it(
    tmp_path_factory: pytest.TempPathFactory, key_env: pytest.MonkeyPatch, any_key_emulator: Any,
    capsys: pytest.CaptureFixture[str], middle: str, from_file: bool,
) -> None:
    folder = tmp_path_factory.mktemp("key")
    key = f"sk-{HEAD}{middle}{TAIL}"
    if from_file:
        (folder / "key.txt").write_bytes(key.encode("utf-8") + b"\n")
        key_env.delenv("DASHSCOPE_API_KEY", raising=False)
        key_env.setenv("DASHSCOPE_API_KEY_FILE_PATH", str(folder / "key.txt"))
    else:
        key_env.delenv("DASHSCOPE_API_KEY_FILE_PATH", raising=False)
        key_env.setenv("DASHSCOPE_API_KEY", key)
    sent_before = len(any_key_emulator.ledger)
    code, output = run_job(folder, capsys)
    for part in (key, HEAD, TAIL):
        assert part not in output
    if header_safe(key):
        assert code == 0, output
        assert len(any_key_emulator.ledger) == sent_before + 2
    else:
        assert code == 2, output
        where = "DASHSCOPE_API_KEY_FILE_PATH" if from_file else "DASHSCOPE_API_KEY"
        assert_one_error_line(output, "the API key in", where, "HTTP header")
        assert len(any_key_emulator.ledger) == sent_before
        assert not (folder / "out").exists()


def _missing(folder: Path) -> str:
    return str(folder / "no-such-key.txt")


def _folder(folder: Path) -> str:
    (folder / "keys").mkdir()
    return str(folder / "keys")


def _empty(folder: Path) -> str:
    (folder / "key.txt").write_bytes(b"")
    return str(folder / "key.txt")


def _blank(folder: Path) -> str:
    (folder / "key.txt").write_bytes(b"  \n\r\n\t\n")
    return str(folder / "key.txt")


def _fifo(folder: Path) -> str:
    os.mkfifo(folder / "key.fifo")  # nobody writes: reading it would block forever
    return str(folder / "key.fifo")


def _not_utf8(folder: Path) -> str:
    (folder / "key.txt").write_bytes(b"sk-\xff\xfe" + b"a" * 30)
    return str(folder / "key.txt")


def _huge(folder: Path) -> str:
    (folder / "key.txt").write_bytes(b"sk-" + b"a" * 200_000)
    return str(folder / "key.txt")


def _key_instead_of_path(folder: Path) -> str:
    return f"sk-{HEAD}0123456789{TAIL}"


KEY_FILES: list[tuple[str, Callable[[Path], str], str]] = [
    ("missing", _missing, "cannot open the key file"),
    ("a-folder", _folder, "not a regular file"),
    ("empty", _empty, "the key file is empty"),
    ("only-whitespace", _blank, "the key file is empty"),
    ("a-fifo", _fifo, "not a regular file"),
    ("not-utf8", _not_utf8, "not UTF-8"),
    ("too-large", _huge, "not a key file"),
    ("the-key-itself", _key_instead_of_path, "looks like a key, not a path"),
]


@pytest.mark.parametrize(("name", "make", "fragment"), KEY_FILES, ids=[case[0] for case in KEY_FILES])
def test_an_unusable_key_file_is_exit_2_with_one_line_and_nothing_sent_or_changed(
    tmp_path: Path, key_env: pytest.MonkeyPatch, any_key_emulator: Any, capsys: pytest.CaptureFixture[str],
    name: str, make: Callable[[Path], str], fragment: str,
) -> None:
    key_env.setenv("DASHSCOPE_API_KEY_FILE_PATH", make(tmp_path))
    output = refused_run(tmp_path, capsys, any_key_emulator, "DASHSCOPE_API_KEY_FILE_PATH", fragment)
    assert HEAD not in output and TAIL not in output


def test_no_key_at_all_says_how_to_set_one(
    tmp_path: Path, key_env: pytest.MonkeyPatch, any_key_emulator: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    key_env.setenv("DASHSCOPE_API_KEY", "   ")
    code, output = run_job(tmp_path, capsys)
    assert code == 2
    assert_one_error_line(output, "no API key", "export DASHSCOPE_API_KEY", "--emulate")
    assert any_key_emulator.ledger == []


# --- base URLs --------------------------------------------------------------------------------

SECRET = "pa55-Wq8Zr"


def _with_credentials(url: str) -> str:
    return url.replace("://", f"://bob:{SECRET}@", 1)


@pytest.mark.parametrize(
    ("make_url", "fragment"),
    [
        (_with_credentials, "has a user name or password in it"),
        (lambda url: url.replace("://", f"://{SECRET}@", 1), "has a user name or password in it"),
        (lambda url: url + f"?api_key={SECRET}", "has a query or fragment"),
        (lambda url: url + f"#{SECRET}", "has a query or fragment"),
        (lambda url: url + "\n", "space or control character"),
        (lambda url: url.replace("://", f"://bob:{SECRET}@", 1).replace("127.0.0.1:", "[::1"), "not a valid URL"),
    ],
    ids=["user-and-password", "user-only", "query", "fragment", "newline", "malformed-with-password"],
)
def test_a_base_url_that_could_leak_a_secret_is_refused_from_the_environment(
    tmp_path: Path, key_env: pytest.MonkeyPatch, any_key_emulator: Any, capsys: pytest.CaptureFixture[str],
    make_url: Callable[[str], str], fragment: str,
) -> None:
    key_env.setenv("DASHSCOPE_API_KEY", f"sk-{HEAD}{TAIL}")
    key_env.setenv("DASHSCOPE_HTTP_BASE_URL", make_url(any_key_emulator.base_url))
    output = refused_run(tmp_path, capsys, any_key_emulator, "DASHSCOPE_HTTP_BASE_URL", fragment)
    assert SECRET not in output and HEAD not in output


@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_base_url_with_credentials_in_the_spec_is_refused_without_showing_them(
    tmp_path: Path, key_env: pytest.MonkeyPatch, any_key_emulator: Any, capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    key_env.delenv("DASHSCOPE_HTTP_BASE_URL")
    key_env.setenv("DASHSCOPE_API_KEY", f"sk-{HEAD}{TAIL}")
    job = sentences_job(tmp_path, ["one", "two"], api={"base_url": _with_credentials(any_key_emulator.base_url)})
    before = snapshot(tmp_path)
    assert main([command, str(job)]) == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, str(job), "api.base_url", "user name or password", "***@")
    assert SECRET not in captured.err + captured.out
    assert any_key_emulator.ledger == []
    assert snapshot(tmp_path) == before
