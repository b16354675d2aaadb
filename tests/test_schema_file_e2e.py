"""A JSON Schema kept in its own file: ``parameters.response_format.json_schema.schema`` given as a
path, relative to the job file, read at validate; the real CLI over loopback against the emulator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from qwen_batch.cli import main

from .conftest import sentences_job
from .refusal import refused

KEY = "parameters.response_format.json_schema.schema"
SCHEMA = {
    "type": "object",
    "properties": {"topic": {"type": "string"}, "score": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["topic", "score"],
}
TEXTS = ["lakes", "rivers [[emu: bad_schema]]", "hills"]


def _job(folder: Path, schema: Any, texts: list[str] = TEXTS) -> Path:
    """A json_schema job in ``folder`` whose schema is ``schema`` (an object, or a path string)."""
    folder.mkdir(parents=True, exist_ok=True)
    fmt = {"type": "json_schema", "json_schema": {"name": "topic", "schema": schema, "strict": True}}
    return sentences_job(
        folder,
        texts,
        prompt={"system": "Answer in JSON.", "template": "Rate the topic of: {text}"},
        parameters={"seed": 7, "max_tokens": 200, "response_format": fmt},
        cache={"enabled": False},  # each run sends: the two jobs' requests are compared on the wire
    )


def _rows(folder: Path) -> list[dict[str, Any]]:
    frame = pl.read_parquet(folder / "out" / "result.parquet")
    return [
        {key: row[key] for key in ("id", "status", "output_json", "parse_status", "attempts")}
        for row in frame.sort("id").iter_rows(named=True)
    ]


def test_a_schema_file_beside_the_job_is_sent_and_checked_as_the_same_schema_inline(
    tmp_path: Path, job_env: dict, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    inline = _job(tmp_path / "inline", SCHEMA)
    from_file = _job(tmp_path / "from-file", "schemas/topic.json")
    (tmp_path / "from-file" / "schemas").mkdir()
    (tmp_path / "from-file" / "schemas" / "topic.json").write_text(json.dumps(SCHEMA, indent=2), encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the job file, not to the working directory

    assert main(["validate", str(from_file)]) == 0
    assert main(["run", str(inline)]) == 0
    sent_inline = [entry["body_sha256"] for entry in emulator.ledger]
    assert main(["run", str(from_file)]) == 0
    sent_from_file = [entry["body_sha256"] for entry in emulator.ledger][len(sent_inline):]

    # The same requests on the wire (the schema's content, not its path, is sent and fingerprinted) ...
    assert sorted(sent_from_file) == sorted(sent_inline) and len(sent_inline) == len(TEXTS) + 1
    rows = _rows(tmp_path / "from-file")
    assert rows == _rows(tmp_path / "inline")
    # ... and the answers are checked against it: the row whose first answer breaks it was asked again.
    assert [(row["parse_status"], row["attempts"]) for row in rows] == [("ok", 1), ("ok", 2), ("ok", 1)]
    assert all(set(json.loads(row["output_json"])) == {"topic", "score"} for row in rows)


@pytest.mark.parametrize(
    ("write", "why"),
    [
        (None, "schema file not found"),
        ("folder", "is a folder"),
        (b'{"type": "object",', "not valid JSON (Expecting property name"),
        (b"[1, 2]", "holds an array, not an object"),
        (b'{"type": "objekt"}', "not a valid JSON Schema"),
        (b'{"title": "caf\xe9"}', "not UTF-8 text"),
    ],
    ids=["missing", "folder", "not-json", "array", "not-a-schema", "not-utf8"],
)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_bad_schema_file_is_refused_naming_the_key_and_the_file(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str],
    write: bytes | str | None, why: str, command: str,
) -> None:
    job = _job(tmp_path, "schema.json")
    schema_file = tmp_path / "schema.json"
    if write == "folder":
        schema_file.mkdir()
    elif isinstance(write, bytes):
        schema_file.write_bytes(write)
    line = refused([command, str(job)], tmp_path, emulator, capsys)
    assert line.startswith(f"error: {job}: {KEY}: ") and str(schema_file) in line and why in line, line
