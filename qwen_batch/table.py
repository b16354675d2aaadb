"""Input tables: open and check one up front, then stream its rows in batches.

Everything that can be known about the input without rendering a row is checked by
``open_table`` before anything is sent, and each problem is one InputError line that names
the file and the fix: missing or unreadable file, unsupported extension, invalid UTF-8,
empty table, a missing id or prompt column (with the closest column name), null or
duplicate ids (with the first offending row).

Reading is lazy (polars ``scan_*``) and streamed (``collect_batches``), so memory follows the
batch size, not the table. Column types:

* CSV cells are read as text, all of them (no type inference): inference looks at the first
  rows only and would fail mid-run on a later row; a prompt is text anyway. Empty cells
  are null.
* JSONL/NDJSON types are inferred from the whole file, for the same reason.
* Parquet keeps its own schema.

Rows in messages count from 1, like a spreadsheet without its header; ``Request.index``
and ``RowProblem.index`` count from 0.
"""

from __future__ import annotations

import codecs
import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from .errors import InputError

if TYPE_CHECKING:
    from .spec import InputSpec, JobSpec

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "ndjson", ".ndjson": "ndjson"}
DEFAULT_BATCH_ROWS = 10_000
_UTF8_CHUNK = 1 << 20


@dataclass(frozen=True)
class Table:
    """An input table that passed every up-front check.

    ``iter_batches`` yields lists of row dicts (column name -> Python value), in table order,
    each at most about ``batch_size`` rows; the n-th row overall is the table's row n.
    """

    path: Path
    format: str
    schema: pl.Schema
    num_rows: int

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names())

    def scan(self) -> pl.LazyFrame:
        """A fresh lazy scan of the whole table (nothing is read until collected)."""
        return _scan(self.path, self.format)

    def iter_batches(
        self,
        columns: Sequence[str] | None = None,
        batch_size: int = DEFAULT_BATCH_ROWS,
        limit: int | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """Stream rows as lists of dicts; ``columns`` narrows what is read, ``limit`` stops early."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        frame = self.scan()
        if columns is not None:
            frame = frame.select(list(columns))
        if limit is not None:
            if limit <= 0:
                return
            frame = frame.head(limit)
        try:
            for chunk in frame.collect_batches(chunk_size=batch_size, maintain_order=True, lazy=True):
                if chunk.height:
                    yield chunk.to_dicts()
        except pl.exceptions.PolarsError as exc:
            # Checked up front, so this is the file changing under us or a damaged later block.
            raise InputError(f"{self.path}: reading failed: {_first_line(exc)}; check the file") from None


def open_table(source: JobSpec | InputSpec, *, columns: Sequence[str] = ()) -> Table:
    """Open the input table and check it, raising InputError with the file and the fix.

    Given a JobSpec, the prompt's columns (template fields, prompt_column, messages_column)
    must exist too; ``columns`` adds more required columns.
    """
    from .spec import JobSpec  # spec imports nothing from here; this only avoids a cycle at import

    where_spec: str | None = None
    needed: list[tuple[str, str]] = [("column", c) for c in columns]
    if isinstance(source, JobSpec):
        input_spec = source.input
        where_spec = source.where
        prompt = source.prompt
        if prompt.prompt_column is not None:
            needed.insert(0, ("prompt.prompt_column", prompt.prompt_column))
        elif prompt.messages_column is not None:
            needed.insert(0, ("prompt.messages_column", prompt.messages_column))
        else:
            needed[:0] = [("template column", c) for c in prompt.template_columns]
    else:
        input_spec = source
    path = Path(input_spec.path)
    fix_in = f" in {where_spec}" if where_spec else ""

    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"{path}: unsupported input format {path.suffix or '(no extension)'!r}; "
            f"use one of {', '.join(FORMATS)} (input.path{fix_in})"
        )
    _check_readable(path, fix_in)
    if fmt != "parquet":
        _check_utf8(path)

    frame = _scan(path, fmt)
    try:
        schema = frame.collect_schema()
        num_rows = int(frame.select(pl.len()).collect().item())
    except pl.exceptions.NoDataError:
        raise InputError(f"{path}: the table is empty; give a file with a header and at least one row") from None
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"{path}: cannot read it as {fmt}: {_first_line(exc)}; check the file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc}); check the file") from None
    if num_rows == 0:
        raise InputError(f"{path}: the table has no rows; give a file with at least one row")

    names = list(schema.names())
    for role, column in needed:
        if column not in schema:
            raise InputError(f"{path}: {role} {column!r} is not in the table ({_suggest(column, names)}){fix_in}")
    if input_spec.id_column is not None:
        _check_ids(path, frame, schema, input_spec.id_column, names, fix_in)
    return Table(path=path, format=fmt, schema=schema, num_rows=num_rows)


def _scan(path: Path, fmt: str) -> pl.LazyFrame:
    # glob=False: a file name with [ or * is a name, not a pattern.
    if fmt == "csv":
        return pl.scan_csv(path, infer_schema=False, glob=False)
    if fmt == "ndjson":
        return pl.scan_ndjson(path, infer_schema_length=None)
    return pl.scan_parquet(path, glob=False)


def _check_readable(path: Path, fix_in: str) -> None:
    from .paths import check_regular_file

    check_regular_file(path, "input file", f"input.path{fix_in} (relative to the job file)", InputError)


def _check_utf8(path: Path) -> None:
    """Find the first invalid UTF-8 byte and name its line; streamed, so any size is fine."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    lines = 1
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(_UTF8_CHUNK)
            final = not chunk
            pending = decoder.getstate()[0]  # bytes of a character split across chunks
            try:
                decoder.decode(chunk, final)
            except UnicodeDecodeError as exc:
                data = pending + chunk
                bad = offset - len(pending) + exc.start
                line = lines + data[: exc.start].count(b"\n")
                raise InputError(
                    f"{path}: not valid UTF-8 at line {line} (byte {bad}); re-save the file as UTF-8"
                ) from None
            if final:
                return
            offset += len(chunk)
            lines += chunk.count(b"\n")


def _check_ids(path: Path, frame: pl.LazyFrame, schema: pl.Schema, column: str, names: list[str], fix_in: str) -> None:
    if column not in schema:
        raise InputError(
            f"{path}: input.id_column {column!r} is not in the table ({_suggest(column, names)}){fix_in}"
        )
    if schema[column].is_nested():
        raise InputError(f"{path}: id column {column!r} holds {schema[column]} values; ids must be plain values")
    ids = pl.col(column)
    try:
        found = frame.select(
            ids.is_null().arg_true().first().alias("null_at"),
            (~ids.is_first_distinct()).arg_true().first().alias("dup_at"),
        ).collect()
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"{path}: cannot check id column {column!r}: {_first_line(exc)}") from None
    null_at, dup_at = found.row(0)
    if null_at is not None:
        raise InputError(
            f"{path}: id column {column!r} is empty at row {null_at + 1}; every row needs an id"
        )
    if dup_at is not None:
        value = frame.select(ids.slice(dup_at, 1)).collect().item()
        first = frame.select((ids == value).arg_true().first()).collect().item()
        raise InputError(
            f"{path}: id column {column!r} has duplicate value {value!r} (rows {first + 1} and {dup_at + 1}); "
            "ids must be unique"
        )


def _suggest(name: str, names: list[str]) -> str:
    same_but_case = [n for n in names if n.lower() == name.lower()]
    close = same_but_case or difflib.get_close_matches(name, names, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return f"columns: {shown}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
