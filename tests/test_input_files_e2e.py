"""Nothing hangs on input, and read errors name the line: through the real CLI.

Only regular files are read as the input or the job spec (a FIFO, a device or a socket is
exit 2 at once), a symbolic link loop is named, a job file is bounded in size, and a bad
JSONL or CSV line is ``error: <file>:<line>: ...``. Each case: exit 2, one error line,
nothing sent to the emulator, every existing file byte-identical.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import write_csv, write_job
from .refusal import refused, spec

SPEC = spec("inputs")
COMMANDS = {"run": ["run", "--quiet"], "validate": ["validate"], "estimate": ["estimate"], "status": ["status"]}


def earlier_results(folder: Path) -> None:
    (folder / "out").mkdir(exist_ok=True)
    (folder / "out" / "result.parquet").write_bytes(b"earlier output")


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    opened: list[socket.socket] = []

    def make(path: Path) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        opened.append(server)

    yield make
    for server in opened:
        server.close()


def _special(kind: str, path: Path, unix_socket: Callable[[Path], None]) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "char-device":
        path.symlink_to("/dev/zero")  # reading it never ends
    elif kind == "socket":
        unix_socket(path)
    elif kind == "link-loop":
        path.symlink_to(path.name + ".other")
        path.with_name(path.name + ".other").symlink_to(path.name)


KINDS = {
    "fifo": "FIFO (named pipe)", "char-device": "character device", "socket": "socket", "link-loop": "symbolic link loop",
}


@pytest.mark.timeout(30)  # the bug this guards against is a hang: fail, do not wait
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_an_input_that_is_not_a_regular_file_is_refused_at_once(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str],
    unix_socket: Callable[[Path], None], kind: str, command: str,
) -> None:
    earlier_results(tmp_path)
    _special(kind, tmp_path / "in.csv", unix_socket)
    job = write_job(tmp_path, SPEC)
    line = refused([COMMANDS[command][0], str(job), *COMMANDS[command][1:]], tmp_path, emulator, capsys)
    # A link is named by where it leads (/dev/zero), a loop by the link itself.
    assert ("in.csv" in line or "/dev/zero" in line) and "input.path" in line and KINDS[kind] in line, line


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_job_file_that_is_not_a_regular_file_is_refused_at_once(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str],
    unix_socket: Callable[[Path], None], kind: str, command: str,
) -> None:
    write_csv(tmp_path / "in.csv", ["id", "text"], [["a", "one"]])
    job = tmp_path / "job.yaml"
    _special(kind, job, unix_socket)
    line = refused([COMMANDS[command][0], str(job), *COMMANDS[command][1:]], tmp_path, emulator, capsys)
    assert "job.yaml" in line and KINDS[kind] in line, line


def test_a_job_file_over_the_size_limit_is_refused_unparsed(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    write_csv(tmp_path / "in.csv", ["id", "text"], [["a", "one"]])
    job = write_job(tmp_path, SPEC)
    with job.open("a", encoding="utf-8") as handle:
        handle.write("# padding\n" * (11 * 1024 * 1024 // 10))
    line = refused(["validate", str(job)], tmp_path, emulator, capsys)
    assert "job.yaml" in line and "more than the 10,485,760" in line


# -- read errors name the file's line -------------------------------------------------------

LINE_CASES: list[tuple[str, str, bytes, list[str]]] = [
    ("jsonl-bad-json", "in.jsonl", b'{"id": "a", "text": "x"}\n\n{"id": "b", "text": \n', ["in.jsonl:3:", "not valid JSON"]),
    ("jsonl-not-an-object", "in.jsonl", b'{"id": "a", "text": "x"}\n[1, 2]\n', ["in.jsonl:2:", "an array", "one {...} object per line"]),
    ("jsonl-null-line", "in.jsonl", b'{"id": "a", "text": "x"}\nnull\n', ["in.jsonl:2:", "null where a JSON object"]),
    ("jsonl-nan", "in.jsonl", b'{"id": "a", "text": NaN}\n', ["in.jsonl:1:", "NaN is not JSON"]),
    ("jsonl-repeated-key", "in.jsonl", b'{"id": "a", "text": "x"}\n{"id": "b", "text": "y", "text": "z"}\n', ["in.jsonl:2:", "'text' appears twice"]),
    ("jsonl-bom", "in.jsonl", b'\xef\xbb\xbf{"id": "a", "text": "x"}\n', ["in.jsonl:1:", "byte-order mark"]),
    ("csv-long-row", "in.csv", b"id,text\na,x\nb,y,z\n", ["in.csv:3:", "3 field(s) where the header has 2"]),
    ("csv-short-row", "in.csv", b"id,text\na,x\nb\n", ["in.csv:3:", "1 field(s) where the header has 2"]),
    ("csv-unclosed-quote", "in.csv", b'id,text\na,x\nb,"never closed\nc,z\n', ["in.csv:3:", "quoted field is never closed"]),
    ("csv-text-after-quote", "in.csv", b'id,text\na,"x"y\n', ["in.csv:2:", "bad quoting"]),
    ("csv-blank-line", "in.csv", b"id,text\na,x\n\nb,y\n", ["in.csv:3:", "blank"]),
    ("csv-repeated-column", "in.csv", b"id,text,text\na,x,y\n", ["in.csv:1:", "column 'text' appears twice"]),
    ("csv-row-after-multiline-cell", "in.csv", b'id,text\na,"two\nlines"\nb,y,extra\n', ["in.csv:4:", "3 field(s)"]),
]


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize(("name", "data", "fragments"), [c[1:] for c in LINE_CASES], ids=[c[0] for c in LINE_CASES])
def test_a_read_error_names_the_files_line(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str],
    name: str, data: bytes, fragments: list[str], command: str,
) -> None:
    earlier_results(tmp_path)
    (tmp_path / name).write_bytes(data)
    job = write_job(tmp_path, {**SPEC, "input": {"path": name, "id_column": "id"}})
    line = refused([COMMANDS[command][0], str(job), *COMMANDS[command][1:]], tmp_path, emulator, capsys)
    assert line.startswith(f"error: {tmp_path / name}:"), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
