"""The final Parquet: every input row, in input order, followed by its result columns.

The result is joined from the input table and the checkpoint's records on the unit index
(one unit per input row today, so the row position).
The records are first copied (streaming) into a temporary Parquet file whose row groups cover
narrow index ranges; then each batch of input rows is joined with just the records of its
range and handed to a pyarrow ``ParquetWriter``. Neither the input, the records nor the
output is ever whole in memory. The output is written to a temporary file in the output's folder that is fsynced and then
``os.replace``'d over the output: a kill during the write leaves the previous file or the
complete new one, never a torn one.

The result columns have fixed Arrow types (:data:`RESULT_SCHEMA`) whatever the data, so a
column that is null in every row is still ``string`` or ``int64``, and readers can rely on
them; polars would otherwise write ``large_string`` and, for an all-null column, ``null``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .checkpoint import RECORD_SCHEMA, billed as billed_records, fsync_dir, release_memory, write_file_atomically
from .errors import InputError, StorageError

_RESULT_FIELDS: list[pa.Field[pa.DataType]] = [
    pa.field("request_id", pa.string()),
    pa.field("output_text", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("input_tokens", pa.int64()),
    pa.field("output_tokens", pa.int64()),
    pa.field("total_tokens", pa.int64()),
    pa.field("cost", pa.float64()),
    pa.field("status", pa.string()),
    pa.field("error_code", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("attempts", pa.int64()),
    pa.field("latency_s", pa.float64()),
    pa.field("model", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("preflight_input_tokens", pa.int64()),
    # Issue 14, after the older columns so that their positions stay.
    pa.field("reasoning_text", pa.string()),
    pa.field("reasoning_tokens", pa.int64()),
    pa.field("first_token_s", pa.float64()),
    # Issue 15: who counted the tokens ("service", or "estimated" when the server sent none).
    pa.field("usage_source", pa.string()),
    # Issue 15, JSON mode: the answer as canonical JSON, its parse status and error (null otherwise).
    pa.field("output_json", pa.string()),
    pa.field("parse_status", pa.string()),
    pa.field("parse_error", pa.string()),
    # Issue 17 (variants.py): the unit's variant ("" without a sweep) and sample, and the
    # sha256 of its exact request (the fingerprint the cache keys on; null if never rendered).
    pa.field("variant", pa.string()),
    pa.field("sample", pa.int64()),
    pa.field("request_sha256", pa.string()),
]
RESULT_SCHEMA = pa.schema(_RESULT_FIELDS)
RESULT_COLUMNS: tuple[str, ...] = tuple(RESULT_SCHEMA.names)
# Rows per batch pulled from the query and per Parquet row group: large enough for good
# compression and fast scans, small enough that a batch of long texts stays a few MB.
# 10,000, not 50,000: the peak RSS of a 100,000-row write fell from 387 MB to 240 MB
# (polars' buffers for the window join grow with the batch) for a few % more time.
BATCH_ROWS = 10_000
COMPRESSION: Final = "zstd"
# Input rows read at once for the join: polars' ``collect_batches`` reads ahead of a slow
# consumer (the whole input, ~85 MB for a million short rows), a slice of the scan does not.
READ_ROWS = 100_000
# Row group size of the staged records: small, so a window's range filter reads little.
STAGE_ROW_GROUP = 20_000

# A shard's part holds some of the job's units: this column gives each its dense index in the job.
PART_UNIT = "__qwen_batch_unit__"
_ROW = "__qwen_batch_row__"
_MISSING = "__qwen_batch_missing__"
_PREFIX = "__qwen_batch_rec_"
_SLOT = "__qwen_batch_slot__"
_VARIANT = "__qwen_batch_variant__"
_SAMPLE = "__qwen_batch_sample__"
_SLOT_MODEL = "__qwen_batch_slot_model__"
_SLOT_SEED = "__qwen_batch_slot_seed__"


@dataclass(frozen=True, slots=True)
class UnitSlot:
    """One unit of every row (variants.py): its variant id and sample, and the model and seed
    it is sent with (for a unit without a record, or one written before they were kept)."""

    variant: str
    sample: int
    model: str
    seed: int | None


def _slot_frame(slots: list[UnitSlot]) -> pl.LazyFrame:
    return pl.LazyFrame(
        {
            _SLOT: list(range(len(slots))),
            _VARIANT: [slot.variant for slot in slots],
            _SAMPLE: [slot.sample for slot in slots],
            _SLOT_MODEL: [slot.model for slot in slots],
            _SLOT_SEED: [slot.seed for slot in slots],
        },
        schema={_SLOT: pl.Int64, _VARIANT: pl.String, _SAMPLE: pl.Int64, _SLOT_MODEL: pl.String, _SLOT_SEED: pl.Int64},
    )
_RECORD_COLUMNS = (
    "request_id",
    "output_text",
    "finish_reason",
    "input_tokens",
    "output_tokens",
    "cost",
    "status",
    "error_code",
    "error_message",
    "attempts",
    "latency_s",
    "cached",
    "preflight_input_tokens",
    "model",
    "seed",
    "reasoning_text",
    "reasoning_tokens",
    "first_token_s",
    "usage_source",
    "output_json",
    "parse_status",
    "parse_error",
    "fingerprint",
)


@dataclass(frozen=True, slots=True)
class WriteStats:
    """What ``write_results`` wrote: rows in total, ok, error, and how many had no record."""

    path: Path
    rows: int
    ok: int
    errors: int
    missing: int
    bytes: int


def check_input_columns(names: Iterable[str]) -> None:
    """Refuse an input whose column names clash with the result columns (InputError).

    Call it before sending anything: ``write_results`` would otherwise fail at the very end.
    """
    clashes = [name for name in names if name in RESULT_COLUMNS or name.startswith("__qwen_batch_")]
    if clashes:
        raise InputError(
            f"input column(s) {', '.join(repr(c) for c in clashes)} clash with the result columns "
            f"qwen-batch adds ({', '.join(RESULT_COLUMNS)}); rename them in the input"
        )


def _plain_type(dtype: pa.DataType) -> pa.DataType:
    """The common Arrow type for what polars exports as large/view variants.

    polars has one string type and exports it as ``large_string``; Parquet files made by
    pandas, pyarrow, DuckDB or Spark say ``string``. Batches are bounded, so 32-bit offsets
    always suffice.
    """
    if pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return pa.string()
    if pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype):
        return pa.binary()
    if pa.types.is_large_list(dtype) or pa.types.is_list_view(dtype) or pa.types.is_large_list_view(dtype):
        return pa.list_(_plain_field(dtype.value_field))
    if pa.types.is_list(dtype):
        return pa.list_(_plain_field(dtype.value_field))
    if pa.types.is_fixed_size_list(dtype):
        size: int = dtype.list_size  # Any in the stubs, which then match list_'s overloads ambiguously
        return pa.list_(_plain_field(dtype.value_field), size)
    if pa.types.is_struct(dtype):
        return pa.struct([_plain_field(dtype.field(i)) for i in range(dtype.num_fields)])
    if pa.types.is_dictionary(dtype):
        # pyarrow-stubs 20 take only basic value types here; Arrow takes any (a dictionary of lists).
        return pa.dictionary(dtype.index_type, _plain_type(dtype.value_type), dtype.ordered)  # type: ignore[call-overload, no-any-return]
    return dtype


def _plain_field(field: pa.Field[pa.DataType]) -> pa.Field[pa.DataType]:
    return field.with_type(_plain_type(field.type))


def output_schema(input_schema: pl.Schema) -> pa.Schema:
    """The Arrow schema of the output: the input's columns as they are, then RESULT_SCHEMA."""
    exported = pl.DataFrame(schema=input_schema).to_arrow().schema
    return pa.schema([_plain_field(f) for f in exported] + list(RESULT_SCHEMA))


def _stage_records(records: pl.LazyFrame, staged: Path) -> pl.LazyFrame:
    """Copy the records, streaming, into a Parquet file that can be read by index range.

    The checkpoint log is in finishing order, which is input order give or take the
    concurrency (and a resume's retries, appended in input order at the end), so the row
    groups of this file each span a narrow range of indexes and a range filter reads only
    the one or two that overlap it. That is what keeps memory flat: neither the records nor
    a hash table over all of them are ever whole in memory.
    """
    query = records.select(
        pl.col("index").cast(pl.Int64).alias(_ROW),
        *(pl.col(name).cast(RECORD_SCHEMA[name]).alias(_PREFIX + name) for name in _RECORD_COLUMNS),
    )
    query.sink_parquet(staged, compression="lz4", row_group_size=STAGE_ROW_GROUP, statistics=True)
    return pl.scan_parquet(staged)


def _window(staged: pl.LazyFrame, start: int, end: int) -> pl.LazyFrame:
    """The latest record of each index in ``[start, end)``: the one written last wins.

    The scan keeps file order, which is log order, so no sequence column or sort is needed.
    """
    return staged.filter(pl.col(_ROW).is_between(start, end - 1)).filter(pl.col(_ROW).is_last_distinct())


def _input_batches(input_frame: pl.LazyFrame, batch_rows: int) -> Iterator[pl.DataFrame]:
    """The input in order, ``batch_rows`` at a time, reading a bounded slice of it at once."""
    read_rows = max(batch_rows, READ_ROWS // batch_rows * batch_rows)
    offset = 0
    while True:
        chunk = input_frame.slice(offset, read_rows).collect()
        yield from chunk.iter_slices(batch_rows)
        offset += chunk.height
        if chunk.height < read_rows:
            return


def _result_columns(input_columns: list[str], *, missing: tuple[str, str] | None) -> list[pl.Expr]:
    def rec_col(name: str) -> pl.Expr:
        return pl.col(_PREFIX + name)

    is_missing = rec_col("status").is_null()
    code, message = missing if missing is not None else (None, None)
    is_billed = billed_records(_PREFIX)

    def billed(name: str) -> pl.Expr:
        return pl.when(is_billed).then(rec_col(name))
    return [
        *(pl.col(name) for name in input_columns),
        rec_col("request_id").alias("request_id"),
        rec_col("output_text").alias("output_text"),
        rec_col("finish_reason").alias("finish_reason"),
        billed("input_tokens").alias("input_tokens"),
        billed("output_tokens").alias("output_tokens"),
        billed("input_tokens").add(rec_col("output_tokens")).alias("total_tokens"),
        rec_col("cost").alias("cost"),
        pl.when(is_missing).then(pl.lit("error")).otherwise(rec_col("status")).alias("status"),
        pl.when(is_missing).then(pl.lit(code, dtype=pl.String)).otherwise(rec_col("error_code")).alias("error_code"),
        pl.when(is_missing)
        .then(pl.lit(message, dtype=pl.String))
        .otherwise(rec_col("error_message"))
        .alias("error_message"),
        pl.when(is_missing).then(pl.lit(0, dtype=pl.Int64)).otherwise(rec_col("attempts")).alias("attempts"),
        rec_col("latency_s").alias("latency_s"),
        # What each unit was sent with; the job's where the record predates them or is missing.
        rec_col("model").fill_null(pl.col(_SLOT_MODEL)).alias("model"),
        rec_col("seed").fill_null(pl.col(_SLOT_SEED)).alias("seed"),
        # An older log's over-long rows kept the preflight count in input_tokens.
        rec_col("preflight_input_tokens")
        .fill_null(pl.when(~is_billed).then(rec_col("input_tokens")))
        .alias("preflight_input_tokens"),
        rec_col("reasoning_text").alias("reasoning_text"),
        # Every answer has a count, 0 without reasoning (an older log's answers too); errors have none.
        pl.when(rec_col("status") == "ok")
        .then(rec_col("reasoning_tokens").fill_null(0))
        .alias("reasoning_tokens"),
        rec_col("first_token_s").alias("first_token_s"),
        # An answer in an older log was counted by the service (the only source then); a JSON
        # row whose answers never parsed was answered too.
        pl.when((rec_col("status") == "ok") | rec_col("parse_status").is_not_null())
        .then(rec_col("usage_source").fill_null(pl.lit("service", dtype=pl.String)))
        .alias("usage_source"),
        rec_col("output_json").alias("output_json"),
        rec_col("parse_status").alias("parse_status"),
        rec_col("parse_error").alias("parse_error"),
        pl.col(_VARIANT).alias("variant"),
        pl.col(_SAMPLE).alias("sample"),
        pl.when(rec_col("fingerprint") != "").then(rec_col("fingerprint")).alias("request_sha256"),
        is_missing.alias(_MISSING),
    ]


def write_results(
    input_frame: pl.LazyFrame,
    records: pl.LazyFrame,
    out_path: Path,
    *,
    model: str,
    seed: int | None,
    missing: tuple[str, str] | None = None,
    batch_rows: int = BATCH_ROWS,
    slots: list[UnitSlot] | None = None,
    held: bytearray | None = None,
) -> WriteStats:
    """Write one output row per input row, in input order, atomically replacing ``out_path``.

    ``records`` holds Outcome fields by ``index``, the unit's dense index (one unit per row
    today, so the row position); when an index has
    several records, the last one in frame order wins, so both ``Checkpoint.log_lazy()``
    (the raw log; memory stays flat) and ``Checkpoint.records_lazy()`` (already deduplicated)
    work. ``model`` and ``seed`` come from each record; the ones given here are the job's,
    for records written before they were kept and for rows without a record. A row with
    no record gets status "error" with ``missing=(code, message)``; without
    ``missing`` it raises ValueError and the previous output is left as it was. Raises
    InputError if an input column is named like a result column, StorageError if the disk
    refuses. ``slots`` are the units of each row (variants x samples, in output order; unit
    ``j`` of row ``r`` has index ``r * len(slots) + j``); one, ``("", 0)``, by default.
    ``held`` (``run --shard``) keeps only the units it marks, each with its dense index in
    a last column, PART_UNIT, from which ``merge`` puts the parts back in order.
    """
    out_path = Path(out_path)
    input_columns = input_frame.collect_schema().names()
    check_input_columns(input_columns)
    schema = output_schema(input_frame.collect_schema())
    columns = _result_columns(input_columns, missing=missing)
    if held is not None:
        schema = schema.append(pa.field(PART_UNIT, pa.int64()))
        columns.insert(-1, pl.col(_ROW).alias(PART_UNIT))
    slots = slots or [UnitSlot("", 0, model, seed)]
    per_row = len(slots)
    slot_frame = _slot_frame(slots)
    staged_path = out_path.with_name(f".{out_path.name}.records-{os.getpid()}.parquet")
    units = rows = ok = missing_rows = 0
    with atomic_parquet(out_path, schema, "results") as writer:
        try:
            staged = _stage_records(records, staged_path)
            release_memory()
            for batch in _input_batches(input_frame, batch_rows):
                start, end = units, units + batch.height * per_row
                joined = (
                    batch.lazy()
                    .with_row_index(_ROW, offset=start // per_row)
                    .join(slot_frame, how="cross", maintain_order="left_right")
                    .with_columns((pl.col(_ROW).cast(pl.Int64) * per_row + pl.col(_SLOT)).alias(_ROW))
                    # maintain_order="left" keeps the input order: a hash join may not.
                    .join(_window(staged, start, end), on=_ROW, how="left", maintain_order="left", validate="m:1")
                    .select(columns)
                    .collect()
                )
                units = end
                if held is not None:
                    joined = joined.filter(_held_window(held, start, end))
                batch_missing = int(joined[_MISSING].sum())
                if batch_missing and missing is None:
                    first = start + int(joined[_MISSING].arg_true()[0])
                    raise ValueError(
                        f"{batch_missing} row(s) from row {first} on have no result in the "
                        "checkpoint, and no 'missing' status was given for them"
                    )
                table = joined.drop(_MISSING).to_arrow().cast(schema)
                writer.write_table(table, row_group_size=max(batch_rows, table.num_rows))
                rows += table.num_rows
                ok += int((joined["status"] == "ok").sum())
                missing_rows += batch_missing
        finally:
            staged_path.unlink(missing_ok=True)
    release_memory()
    size = out_path.stat().st_size
    return WriteStats(path=out_path, rows=rows, ok=ok, errors=rows - ok, missing=missing_rows, bytes=size)


def _held_window(held: bytearray, start: int, end: int) -> pl.Series:
    """Which units of ``[start, end)`` a shard holds, as a boolean mask (no Python loop over them)."""
    window = pa.Array.from_buffers(pa.uint8(), end - start, [None, pa.py_buffer(bytes(held[start:end]))])
    return pl.Series(window).cast(pl.Boolean)


@contextmanager
def atomic_parquet(out_path: Path, schema: pa.Schema, what: str) -> Iterator[pq.ParquetWriter]:
    """A Parquet writer whose file replaces ``out_path`` only once complete: written to a
    temporary file beside it, fsynced, then ``os.replace``'d; removed if anything fails.

    A kill at any moment leaves the previous file or the complete new one. Raises
    StorageError (naming ``what`` is written) if the disk refuses.
    """
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{out_path.parent}: cannot create the output folder ({exc.strerror})") from None
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            with pq.ParquetWriter(f, schema, compression=COMPRESSION) as writer:
                yield writer
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"{out_path}: cannot write the {what} ({exc.strerror or exc})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out_path.parent)


def write_summary_json(path: Path, summary: dict[str, Any]) -> None:
    """Write the run summary as indented JSON, atomically (temporary file, fsync, replace).

    Raises StorageError if the disk refuses.
    """
    path = Path(path)
    data = (json.dumps(summary, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(path, data, mode=0o666)
    except OSError as exc:
        raise StorageError(f"{path}: cannot write the summary ({exc.strerror or exc})") from None
