"""Input tables: open and check one up front, then stream its rows in batches.

Everything that can be known about the input without rendering a row is checked by
``open_table`` before anything is sent, and each problem is one InputError line that names
the file and the fix: missing or unreadable file, unsupported extension, invalid UTF-8,
empty table, a missing id or prompt column (with the closest column name), null or
duplicate ids (with the first offending row).

Reading is lazy (polars ``scan_*``) and streamed (``collect_batches``), so memory follows the
batch size, not the table. Column types:

* CSV cells are read as text, all of them (no type inference): inference looks at the first
  rows only and would fail mid-run on a later row, and would turn ``007`` into 7 or ``1e3``
  into 1000.0; a prompt is text anyway. Empty cells are null. Every record must have the
  header's number of fields, and the header must not name a column twice.
* JSONL/NDJSON rows are read for rendering by Python's ``json`` with each value as the line
  holds it: an integer stays an integer even where another row of that key holds 6.5
  (polars would unify the column to Float64 and send ``5.0``), a number with a fraction or
  exponent keeps its text (:class:`JsonNumber`), a lone surrogate (``"\ud800"``) stays in the
  string so the renderer makes it that row's error, and a key written twice is refused.
  polars still gives the schema, the row count, the id checks and the output's columns.
* Parquet keeps its own schema.

Read errors name the file's line (1-based, as an editor shows it): ``in.jsonl:7: ...``.

Rows in messages count from 1, like a spreadsheet without its header; ``Request.index``
and ``RowProblem.index`` count from 0.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

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
    schema_override: pl.Schema | None = None  # JSONL whose types polars cannot unify: all text


    @property
    def columns(self) -> list[str]:
        return list(self.schema.names())

    def scan(self) -> pl.LazyFrame:
        """A fresh lazy scan of the whole table (nothing is read until collected)."""
        return _scan(self.path, self.format, self.schema_override)

    def iter_batches(
        self,
        columns: Sequence[str] | None = None,
        batch_size: int = DEFAULT_BATCH_ROWS,
        limit: int | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """Stream rows as lists of dicts; ``columns`` narrows what is read, ``limit`` stops early."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.format == "ndjson":
            yield from _jsonl_batches(self.path, self.num_rows, columns, batch_size, limit)
            return
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

    _check_readable(path, fix_in)  # first: a pipe or a device is refused whatever its name
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"{path}: unsupported input format {path.suffix or '(no extension)'!r}; "
            f"use one of {', '.join(FORMATS)} (input.path{fix_in})"
        )
    if fmt != "parquet":
        _check_utf8(path)
    if fmt == "csv":
        _check_csv_shape(path)

    try:
        frame, schema, num_rows, override = _read_shape(path, fmt)
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
    return Table(path=path, format=fmt, schema=schema, num_rows=num_rows, schema_override=override)


def _scan(path: Path, fmt: str, schema: pl.Schema | None = None) -> pl.LazyFrame:
    # glob=False: a file name with [ or * is a name, not a pattern.
    if fmt == "csv":
        return pl.scan_csv(path, infer_schema=False, glob=False)
    if fmt == "ndjson":
        return pl.scan_ndjson(path, schema=schema, infer_schema_length=None)
    return pl.scan_parquet(path, glob=False)


def _read_shape(path: Path, fmt: str) -> tuple[pl.LazyFrame, pl.Schema, int, pl.Schema | None]:
    """The scan, its schema and row count, and the schema it was forced to (None: polars' own).

    JSONL that is valid but that polars cannot type (``true`` in one row and 5 in another) is
    read with every column as text, for the output; prompts are rendered from the lines
    anyway. A bad line is named by a Python pass, as polars does not say which line it is.
    """
    frame = _scan(path, fmt)
    try:
        return (frame, *_shape(frame, fmt), None)
    except pl.exceptions.PolarsError as exc:
        if fmt != "ndjson" or isinstance(exc, pl.exceptions.NoDataError):
            raise
    keys = _jsonl_keys(path)  # raises InputError naming a bad line
    if not keys:
        raise pl.exceptions.NoDataError("no objects")
    override = pl.Schema({key: pl.String() for key in keys})
    frame = _scan(path, fmt, override)
    try:
        return (frame, *_shape(frame, fmt), override)
    except pl.exceptions.PolarsError:
        _check_jsonl_lines(path, _RANGE_DECODER)  # a number beyond a float: polars cannot read it even as text
        raise


def _shape(frame: pl.LazyFrame, fmt: str) -> tuple[pl.Schema, int]:
    """Schema and row count; for JSONL every value is parsed too, as polars parses lazily and
    would otherwise fail on a value it cannot type only when the output is written."""
    schema = frame.collect_schema()
    if fmt == "ndjson":
        frame.select(pl.all().null_count()).collect(engine="streaming")
    return schema, int(frame.select(pl.len()).collect().item())


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


# --- CSV: the shape of every record, with its line --------------------------------------


def _check_csv_shape(path: Path) -> None:
    """Refuse a repeated column name, a record with more or fewer fields than the header, a
    blank line, or a quote never closed, naming the line (polars pads short records with
    nulls and renames a repeated column, silently).

    Python's strict csv reader agrees with polars' on quoting; it runs at C speed.
    """
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, strict=True)
        start = 1
        try:
            header = next(reader, None)
            if header is None:
                return  # empty: open_table says so
            _check_header(path, header)
            width = len(header)
            start = reader.line_num + 1
            for record in reader:
                if len(record) != width and not (width == 1 and not record):
                    raise InputError(f"{path}:{start}: {_shape_problem(record, width)}")
                start = reader.line_num + 1
        except csv.Error as exc:
            problem = "a quoted field is never closed" if "end of data" in str(exc) else f"bad quoting ({exc})"
            raise InputError(
                f"{path}:{start}: {problem}; a field with a quote, comma or line break must be quoted "
                'whole, with inner quotes doubled ("say ""hi""")'
            ) from None


def _check_header(path: Path, header: list[str]) -> None:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise InputError(f"{path}:1: column {name!r} appears twice in the header; rename or remove one")
        seen.add(name)


def _shape_problem(record: list[str], width: int) -> str:
    if not record:
        return "the line is blank; remove blank lines (every row needs its fields)"
    return (
        f"{len(record)} field(s) where the header has {width}; quote a field that holds a comma, "
        "and give every row the header's columns"
    )


# --- JSONL: one object per line, each value as written -----------------------------------


class JsonNumber(float):
    """A JSON number with a fraction or exponent that prints as the file writes it (``1.50``, ``1e3``).

    It is still a float (so a messages cell holding one is still "not a string"); only its
    text is kept, so a prompt gets ``1.50`` and not ``1.5``.
    """

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> JsonNumber:
        number = super().__new__(cls, text)
        number.text = text
        return number

    def __str__(self) -> str:
        return self.text


class _LineProblem(ValueError):
    """Internal: what is wrong with one JSONL line, and the fix."""


def _no_constants(name: str) -> NoReturn:
    raise _LineProblem(f"{name} is not JSON; write null, or the value as a string")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    row = dict(pairs)
    if len(row) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _LineProblem(f"key {key!r} appears twice in one object; remove one")
            seen.add(key)
    return row


def _json_int(text: str) -> int | JsonNumber:
    return int(text) if text != "-0" else JsonNumber(text)  # an int has no -0; keep what the file wrote


def _finite_float(text: str) -> JsonNumber:
    number = JsonNumber(text)
    if math.isinf(number):
        raise _LineProblem(f"the number {text} is beyond the range of a float; write it as a string (\"{text}\")")
    return number


_DECODER = json.JSONDecoder(
    parse_float=JsonNumber, parse_int=_json_int, parse_constant=_no_constants, object_pairs_hook=_unique_keys
)
_RANGE_DECODER = json.JSONDecoder(
    parse_float=_finite_float, parse_int=_json_int, parse_constant=_no_constants, object_pairs_hook=_unique_keys
)


def _jsonl_rows(path: Path, decoder: json.JSONDecoder = _DECODER) -> Iterator[dict[str, Any]]:
    """Each non-blank line's object; InputError naming the line otherwise. Per row: one decode."""
    decode = decoder.decode
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    row = decode(raw.decode("utf-8"))
                except (_LineProblem, UnicodeDecodeError) as exc:
                    raise InputError(f"{path}:{number}: {exc}") from None
                except json.JSONDecodeError:
                    if not raw.strip():
                        continue  # polars skips blank lines too, so positions agree
                    raise InputError(f"{path}:{number}: {_json_problem(raw)}") from None
                if type(row) is not dict:
                    raise InputError(
                        f"{path}:{number}: {_json_kind(row)} where a JSON object was expected; "
                        "write one {...} object per line"
                    )
                yield row
    except OSError as exc:
        raise InputError(f"{path}: reading failed ({exc.strerror or exc}); check the file") from None


def _json_problem(raw: bytes) -> str:
    """What is wrong with a line that did not parse, its column counted without the line break."""
    text = raw.decode("utf-8").rstrip("\r\n")
    if text.startswith("\ufeff"):
        return "the file starts with a byte-order mark; re-save it as UTF-8 without BOM"
    try:
        _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno}); fix the line, one JSON object per line"
    except _LineProblem as exc:
        return str(exc)
    return "not valid JSON; fix the line, one JSON object per line"


_JSON_KINDS: dict[type, str] = {str: "a string", list: "an array"}  # the rest are numbers


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return _JSON_KINDS.get(type(value), "a number")


def _check_jsonl_lines(path: Path, decoder: json.JSONDecoder = _DECODER) -> None:
    for _ in _jsonl_rows(path, decoder):
        pass


def _jsonl_keys(path: Path) -> list[str]:
    """Every key of the file's objects, in order of first appearance; InputError naming a bad line."""
    keys: dict[str, None] = {}
    for row in _jsonl_rows(path):
        keys.update(dict.fromkeys(row))
    return list(keys)


def _jsonl_batches(
    path: Path, num_rows: int, columns: Sequence[str] | None, batch_size: int, limit: int | None
) -> Iterator[list[dict[str, Any]]]:
    wanted = num_rows if limit is None else min(limit, num_rows)
    if wanted <= 0:
        return
    batch: list[dict[str, Any]] = []
    count = 0
    for row in _jsonl_rows(path):
        batch.append(row if columns is None else {column: row.get(column) for column in columns})
        count += 1
        if count == wanted:
            break
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
    if count < wanted:
        raise InputError(f"{path}: has {count} rows now, {num_rows} when it was opened; the file changed, re-run")


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
