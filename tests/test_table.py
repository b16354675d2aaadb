"""Input tables: checked up front with one-line InputErrors, then streamed in order."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from qwen_batch.errors import InputError
from qwen_batch.spec import InputSpec, JobSpec
from qwen_batch.table import FORMATS, open_table


def job(path: Path, *, id_column: str | None = "id", **prompt: Any) -> JobSpec:
    prompt = prompt or {"template": "Translate: {text}"}
    return JobSpec.model_validate(
        {"model": "qwen-turbo", "input": {"path": str(path), "id_column": id_column}, "prompt": prompt}
    )


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


ROWS = [{"id": f"r{i}", "text": f"句子 {i}"} for i in range(7)]


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl", ".ndjson"])
def test_each_format_streams_every_row_in_order(tmp_path: Path, suffix: str) -> None:
    """Parquet, CSV and JSONL/NDJSON give the same rows, in table order, in batches."""
    path = tmp_path / f"in{suffix}"
    frame = pl.DataFrame(ROWS)
    if suffix == ".csv":
        frame.write_csv(path)
    elif suffix == ".parquet":
        frame.write_parquet(path)
    else:
        write_jsonl(path, ROWS)
    table = open_table(job(path))
    assert table.path == path
    assert table.columns == ["id", "text"]
    assert table.num_rows == 7
    assert table.schema["text"] == pl.String
    batches = list(table.iter_batches(batch_size=3))
    assert [row for batch in batches for row in batch] == ROWS
    assert all(0 < len(batch) <= 3 for batch in batches)


def test_iter_batches_narrows_columns_and_stops_at_the_limit(tmp_path: Path) -> None:
    """columns= reads only those columns; limit= stops after that many rows."""
    path = tmp_path / "in.parquet"
    pl.DataFrame(ROWS).write_parquet(path)
    table = open_table(job(path))
    assert [row for batch in table.iter_batches(columns=["text"], limit=2) for row in batch] == [
        {"text": "句子 0"},
        {"text": "句子 1"},
    ]
    assert list(table.iter_batches(limit=0)) == []


def test_csv_cells_are_text_and_empty_cells_are_null(tmp_path: Path) -> None:
    """CSV is read without type inference: numbers stay text, empty cells are null."""
    path = tmp_path / "in.csv"
    path.write_text("id,text\n007,1.50\n8,\n", encoding="utf-8")
    rows = [row for batch in open_table(job(path)).iter_batches() for row in batch]
    assert rows == [{"id": "007", "text": "1.50"}, {"id": "8", "text": None}]


def test_a_csv_with_a_byte_order_mark_keeps_its_column_names(tmp_path: Path) -> None:
    """Excel writes a UTF-8 BOM; the first column is still found by its name."""
    path = tmp_path / "in.csv"
    path.write_bytes("\ufeffid,text\n1,a\n".encode())
    assert open_table(job(path)).columns == ["id", "text"]


def test_an_input_spec_alone_opens_without_prompt_checks(tmp_path: Path) -> None:
    """open_table also takes just the input section (then only the file and ids are checked)."""
    path = write_jsonl(tmp_path / "in.jsonl", ROWS)
    assert open_table(InputSpec(path=path)).num_rows == 7


def _csv(tmp_path: Path, text: str | bytes, name: str = "in.csv") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


BAD_INPUTS: list[tuple[str, Any, dict[str, Any], list[str]]] = [
    ("missing file", None, {}, ["input file not found", "check input.path"]),
    ("unsupported extension", ("in.xlsx", "id,text\n1,a\n"), {}, ["unsupported input format '.xlsx'", ".parquet, .csv, .jsonl, .ndjson"]),
    ("no extension", ("input", "id,text\n1,a\n"), {}, ["unsupported input format '(no extension)'"]),
    ("empty file", ("in.csv", ""), {}, ["empty"]),
    ("header only", ("in.csv", "id,text\n"), {}, ["has no rows"]),
    ("empty jsonl", ("in.jsonl", ""), {}, ["empty"]),
    ("invalid utf-8 csv", ("in.csv", b"id,text\n1,ok\n2,caf\xe9\n"), {}, ["not valid UTF-8 at line 3 (byte 18)", "re-save the file as UTF-8"]),
    ("invalid utf-8 jsonl", ("in.jsonl", b'{"id": "1", "text": "\xff"}\n'), {}, ["not valid UTF-8 at line 1", "UTF-8"]),
    ("malformed jsonl", ("in.jsonl", '{"id": "1", "text": "a"}\n{"id": \n'), {}, ["in.jsonl:2: not valid JSON", "one JSON object per line"]),
    ("id column missing", ("in.csv", "ids,text\n1,a\n"), {}, ["input.id_column 'id' is not in the table", "did you mean 'ids'?"]),
    ("id column other case", ("in.csv", "ID,text\n1,a\n"), {}, ["input.id_column 'id' is not in the table", "did you mean 'ID'?"]),
    ("duplicate id", ("in.csv", "id,text\n1,a\n2,b\n1,c\n2,d\n"), {}, ["duplicate value '1' (rows 1 and 3)", "ids must be unique"]),
    ("null id", ("in.csv", "id,text\n1,a\n,b\n"), {}, ["id column 'id' is empty at row 2", "every row needs an id"]),
    ("template column missing", ("in.csv", "id,txt\n1,a\n"), {}, ["template column 'text' is not in the table", "did you mean 'txt'?"]),
    ("template column far off", ("in.csv", "id,zzz\n1,a\n"), {}, ["template column 'text'", "columns: id, zzz"]),
    ("prompt_column missing", ("in.csv", "id,text\n1,a\n"), {"prompt_column": "texts"}, ["prompt.prompt_column 'texts' is not in the table", "did you mean 'text'?"]),
    ("messages_column missing", ("in.csv", "id,text\n1,a\n"), {"messages_column": "conversation"}, ["prompt.messages_column 'conversation'"]),
]


@pytest.mark.parametrize(("file", "prompt", "expected"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_a_bad_input_is_one_line_naming_the_file_and_the_fix(
    tmp_path: Path, file: Any, prompt: dict[str, Any], expected: list[str]
) -> None:
    """Each problem raises InputError whose single line names the file and what to do."""
    path = tmp_path / "missing.csv" if file is None else _csv(tmp_path, file[1], file[0])
    with pytest.raises(InputError) as caught:
        open_table(job(path, **prompt))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:")  # then the line, where the problem has one
    for fragment in expected:
        assert fragment in message


def test_a_folder_is_not_an_input_file(tmp_path: Path) -> None:
    """input.path naming a folder is an InputError, not an IsADirectoryError."""
    folder = tmp_path / "in.csv"
    folder.mkdir()
    with pytest.raises(InputError, match="is a folder"):
        open_table(job(folder))


def test_an_empty_parquet_file_is_an_input_error(tmp_path: Path) -> None:
    """A Parquet file with a schema but no rows is empty."""
    path = tmp_path / "in.parquet"
    pl.DataFrame({"id": [], "text": []}, schema={"id": pl.String, "text": pl.String}).write_parquet(path)
    with pytest.raises(InputError, match="has no rows"):
        open_table(job(path))


def test_a_damaged_parquet_file_is_an_input_error(tmp_path: Path) -> None:
    """Bytes that are not Parquet are an InputError naming the format, not a polars exception."""
    path = _csv(tmp_path, b"not parquet at all", "in.parquet")
    with pytest.raises(InputError, match="cannot read it as parquet"):
        open_table(job(path))


def test_integer_ids_are_checked_too(tmp_path: Path) -> None:
    """Duplicate detection works on any plain dtype, naming the value."""
    path = tmp_path / "in.parquet"
    pl.DataFrame({"id": [5, 6, 5], "text": ["a", "b", "c"]}).write_parquet(path)
    with pytest.raises(InputError, match=r"duplicate value 5 \(rows 1 and 3\)"):
        open_table(job(path))


def test_utf8_errors_across_the_read_chunk_boundary_name_the_right_byte(tmp_path: Path) -> None:
    """A bad byte far into a large file is located exactly (the check is streamed in chunks)."""
    good = ("id,text\n" + "".join(f"{i},é{i}\n" for i in range(200_000))).encode()
    path = _csv(tmp_path, good + b"x,\xff\n")
    with pytest.raises(InputError, match=f"line 200002 \\(byte {len(good) + 2}\\)"):
        open_table(job(path))


def test_a_million_rows_open_check_and_stream_in_seconds(tmp_path: Path) -> None:
    """Opening (with the duplicate-id check) and streaming 1,000,000 short rows is fast."""
    n = 1_000_000
    path = tmp_path / "big.csv"
    pl.DataFrame({"id": pl.int_range(n, eager=True).cast(pl.String), "text": pl.repeat("short text", n, eager=True)}).write_csv(path)
    started = time.perf_counter()
    table = open_table(job(path))
    opened = time.perf_counter() - started
    rows = sum(len(batch) for batch in table.iter_batches(batch_size=50_000))
    elapsed = time.perf_counter() - started
    assert table.num_rows == rows == n
    assert opened < 5, f"open_table took {opened:.1f}s"
    assert elapsed < 20, f"open + stream took {elapsed:.1f}s"


def test_supported_formats_are_exactly_the_documented_ones() -> None:
    """The issue names .parquet, .csv, .jsonl and .ndjson."""
    assert sorted(FORMATS) == [".csv", ".jsonl", ".ndjson", ".parquet"]
