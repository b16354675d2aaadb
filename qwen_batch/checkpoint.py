"""The durable record of finished rows: what a resume reads, what the final Parquet is built from.

A checkpoint is a directory next to the output (``out/x.parquet.checkpoint/``, mode 0700) with

* ``manifest.json`` -- the parts of the job that decide its requests, written once (temporary
  file, fsync, ``os.replace``, fsync of the directory), so a resume can refuse a changed job;
* ``rows.jsonl`` -- an append-only log of :class:`~qwen_batch.types.Outcome` records, one compact
  JSON object per line; the last record for a unit wins (a resume that retries an error
  appends a newer record instead of rewriting the old one). ``index`` is the unit's dense
  index (``types.UnitKey``; with one variant and one sample per row, the row's position),
  and ``model`` and ``seed`` are what the unit was sent with. Records written before those
  two were kept lack them; they read back as null, and the output fills in the job's.

Why a log and not one renamed file per batch: the runner group-commits, so a million-row job
makes tens of thousands of commits, and a file per commit would be tens of thousands of files
to list, open and parse on resume. An append followed by ``fsync`` gives the same guarantee as
a rename -- a record the runner was told is durable survives a kill or a power cut -- as long
as a reader never sees half a record. A write interrupted by a kill or a full disk can only
leave a torn *last* line (appends happen in order, one writer at a time, under an exclusive
lock), so opening the checkpoint cuts the tail back to the last complete, parseable line, and
a failed append truncates its own partial write before raising.

Reading uses polars' ndjson reader with an explicit schema and only the columns needed, so a
resume of a million finished rows takes about a second, not a Python loop over every line.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import polars as pl

from .errors import StorageError, UsageError
from .types import Outcome

MANIFEST_NAME = "manifest.json"
ROWS_NAME = "rows.jsonl"
CHECKPOINT_FORMAT = 1
DIR_MODE = 0o700
FILE_MODE = 0o600
# How far back from the end ``open`` looks for the last newline before giving up and
# scanning in further chunks; one record is rarely larger than this.
_TAIL_CHUNK = 1 << 16
# Bytes of log parsed at once when copying it to Parquet: bounds that copy's memory.
# 1 MB, not 8: the copy of a million-row log peaked 63 MB above its start instead of
# 128 MB, for ~0.2 s more.
_READ_CHUNK = 1 << 20
# Longest rendering of one value in a mismatch message; prompts can be pages long.
_MAX_VALUE_CHARS = 80

RECORD_SCHEMA: dict[str, pl.DataType] = {
    "index": pl.Int64(),
    "fingerprint": pl.String(),
    "status": pl.String(),
    "request_id": pl.String(),
    "output_text": pl.String(),
    "finish_reason": pl.String(),
    "input_tokens": pl.Int64(),
    "output_tokens": pl.Int64(),
    "cost": pl.Float64(),
    "error_code": pl.String(),
    "error_message": pl.String(),
    "retryable": pl.Boolean(),
    "attempts": pl.Int64(),
    "latency_s": pl.Float64(),
    "cached": pl.Boolean(),
    # Added after the first release: older logs lack them and read back as null.
    "preflight_input_tokens": pl.Int64(),
    # What the unit was sent with (issue 13); null in older logs, where the job's apply.
    "model": pl.String(),
    "seed": pl.Int64(),
    # A thinking model's reasoning and a stream's first token (issue 14); null in older logs.
    "reasoning_text": pl.String(),
    "reasoning_tokens": pl.Int64(),
    "first_token_s": pl.Float64(),
    # Who counted the tokens (issue 15): "service", or "estimated" when it reported none.
    "usage_source": pl.String(),
    # JSON mode (issue 15): the canonical answer, its parse status and error, the re-asks.
    "output_json": pl.String(),
    "parse_status": pl.String(),
    "parse_error": pl.String(),
    "reasks": pl.Int64(),
}
DONE_COLUMNS = ("index", "fingerprint", "status", "retryable", "cost", "cached")
_SUMMARY_COLUMNS = (
    "index",
    "status",
    "error_code",
    "retryable",
    "input_tokens",
    "output_tokens",
    "cost",
    "cached",
    "parse_status",
)
_FLOAT_FIELDS = frozenset(name for name, dtype in RECORD_SCHEMA.items() if dtype == pl.Float64())
_INT_FIELDS = frozenset(name for name, dtype in RECORD_SCHEMA.items() if dtype == pl.Int64())
_OUTCOME_FIELDS = tuple(f.name for f in dataclasses.fields(Outcome))
assert set(_OUTCOME_FIELDS) == set(RECORD_SCHEMA), "RECORD_SCHEMA must list every Outcome field"


class CheckpointMismatch(UsageError):
    """The checkpoint was made by a job whose requests differ from this one's."""


class CheckpointBusy(UsageError):
    """Another process is appending to this checkpoint right now."""


@dataclass(frozen=True, slots=True)
class CheckpointSummary:
    """What a checkpoint holds, counted over the latest record of each row."""

    rows_done: int
    ok: int
    errors: int
    errors_by_code: dict[str, int]
    retryable_errors: int
    input_tokens: int
    output_tokens: int
    cost: float
    cached: int


# -- records -------------------------------------------------------------------------------


def billed(prefix: str = "") -> pl.Expr:
    """True for the records whose usage was billed in this job: answered by the service.

    Errors carry no usage, except a JSON-mode row whose answers never parsed (it has a
    ``parse_status``): those were answered and paid. A cache hit was paid for when it was
    first fetched; an older log's over-long rows hold the preflight count in
    ``input_tokens``. None of them is billed. ``prefix``: of the column names, where a
    query renamed them.
    """
    answered = (pl.col(f"{prefix}status") == "ok") | pl.col(f"{prefix}parse_status").is_not_null()
    return answered & ~pl.col(f"{prefix}cached").fill_null(False)


def outcome_to_record(outcome: Outcome) -> dict[str, Any]:
    """The JSON-ready dict of one outcome, every field by name.

    Non-finite floats (NaN, inf) become null: JSON has no spelling for them, and a cost or a
    latency that is not a number carries no information worth a corrupt log.
    """
    record = {name: getattr(outcome, name) for name in _OUTCOME_FIELDS}
    for name in _FLOAT_FIELDS:
        value = record[name]
        if value is not None:
            value = float(value)
            record[name] = value if math.isfinite(value) else None
    return record


def record_to_outcome(record: dict[str, Any]) -> Outcome:
    """The outcome a record stands for; unknown keys are ignored, missing ones take defaults."""
    values = {name: record[name] for name in _OUTCOME_FIELDS if name in record}
    for name in _FLOAT_FIELDS:
        if values.get(name) is not None:
            values[name] = float(values[name])
    return Outcome(**values)


def encode_records(outcomes: Sequence[Outcome]) -> bytes:
    """The log lines for ``outcomes``: compact UTF-8 JSON, one per line, each ending in a newline."""
    return b"".join([orjson.dumps(outcome_to_record(o), option=orjson.OPT_APPEND_NEWLINE) for o in outcomes])


def _is_record_line(line: bytes) -> bool:
    try:
        value = json.loads(line)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("index"), int)


def valid_length(path: Path) -> int:
    """How many leading bytes of a log are whole records: the tail after them is torn.

    Only the last line is checked: appends are ordered and single-writer, so damage can only
    be at the end. A last line without its newline is torn; so is a complete last line that
    does not parse (a power cut can leave a zero-filled block that happens to end a line).
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        end = _end_of_last_line(f, size)
        if end == 0:
            return 0
        start = _end_of_last_line(f, end - 1)
        f.seek(start)
        last = f.read(end - start)
    return end if _is_record_line(last) else start


def _end_of_last_line(f: BinaryIO, limit: int) -> int:
    """Offset just past the last newline in the first ``limit`` bytes (0 if there is none)."""
    position = limit
    while position > 0:
        start = max(0, position - _TAIL_CHUNK)
        f.seek(start)
        chunk = f.read(position - start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


# -- manifest ------------------------------------------------------------------------------


def _normalised(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as it will read back from JSON (tuples become lists, keys strings)."""
    normalised: dict[str, Any] = json.loads(json.dumps(manifest, sort_keys=True))
    return normalised


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


_ABSENT = object()


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    if len(text) > _MAX_VALUE_CHARS:
        text = text[: _MAX_VALUE_CHARS - 1] + "…"
    return text


def manifest_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Each difference as ``dotted.key: old -> new``, in key order."""
    old_flat, new_flat = _flatten(_normalised(old)), _flatten(_normalised(new))
    changes = []
    for key in sorted(old_flat.keys() | new_flat.keys()):
        before, after = old_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT)
        if before != after or type(before) is not type(after):
            changes.append(f"{key or '(manifest)'}: {_show(before)} -> {_show(after)}")
    return changes


# -- files ---------------------------------------------------------------------------------


def release_memory() -> None:
    """Hand memory freed by an earlier phase back to the system before a memory-heavy one.

    Python's, pyarrow's and glibc's allocators keep freed memory for reuse; the final write
    and summary run after the sending phase and would otherwise stack their peak on top of
    what it left (measured: ~30 MB less resident before each step of a 1M-row final write).
    """
    import ctypes
    import gc

    gc.collect()
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(fd: int, data: bytes) -> None:
    """Write all of ``data`` at ``fd`` (an append-mode log) and fsync it; raises OSError."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def write_file_atomically(path: Path, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``data`` so a kill leaves the old file or the new one, never half.

    Raises OSError; callers turn it into a StorageError naming their own context.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _storage_error(action: str, path: Path, exc: OSError) -> StorageError:
    reason = exc.strerror or str(exc)
    hint = {
        errno.ENOSPC: "; free some space and re-run the same command to resume",
        errno.EDQUOT: "; free some space and re-run the same command to resume",
        errno.EACCES: "; check the folder's permissions",
        errno.EPERM: "; check the folder's permissions",
        errno.EROFS: "; the file system is read-only, choose another output path",
    }.get(exc.errno or 0, "")
    return StorageError(f"{path}: cannot {action} ({reason}){hint}")


# -- the checkpoint ------------------------------------------------------------------------


class Checkpoint:
    """An open checkpoint: append outcomes durably, read back what is done.

    Open it with :meth:`open` (to run: creates, checks the manifest, repairs a torn tail and
    takes an exclusive lock) or :meth:`open_readonly` (to inspect, e.g. ``qwen-batch status``,
    even while a run appends). ``append`` blocks on ``fsync``; call it from a worker thread.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], fd: int | None, size: int) -> None:
        self.directory = directory
        self.manifest = manifest
        self._fd = fd
        self._size = size

    @property
    def rows_path(self) -> Path:
        return self.directory / ROWS_NAME

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_NAME

    def __repr__(self) -> str:
        mode = "closed" if self._fd is None else "open"
        return f"Checkpoint({str(self.directory)!r}, {mode}, {self._size} bytes)"

    # opening

    @classmethod
    def open(cls, directory: Path, manifest: dict[str, Any]) -> Checkpoint:
        """Create the checkpoint, or reopen it for the same job.

        Raises CheckpointMismatch if the stored manifest differs (the message lists each
        changed key), CheckpointBusy if another process holds it, StorageError if the disk
        refuses. A torn last record is cut away.
        """
        directory = Path(directory)
        manifest = _normalised(manifest)
        manifest_path = directory / MANIFEST_NAME
        rows_path = directory / ROWS_NAME
        try:
            if not directory.exists():
                directory.mkdir(mode=DIR_MODE, parents=True)
                directory.chmod(DIR_MODE)
                fsync_dir(directory.parent)
        except OSError as exc:
            raise _storage_error("create the checkpoint folder", directory, exc) from None
        stored = _read_manifest(manifest_path)
        if stored is None:
            if rows_path.exists() and rows_path.stat().st_size > 0:
                raise StorageError(
                    f"{manifest_path}: missing, but {rows_path} has results; "
                    "re-run with --fresh to start over (old results are kept aside)"
                )
            try:
                write_file_atomically(manifest_path, _manifest_bytes(manifest))
            except OSError as exc:
                raise _storage_error("write the checkpoint manifest", manifest_path, exc) from None
        elif stored != manifest and _has_records(rows_path):
            raise _mismatch(directory, stored, manifest)
        try:
            fd = os.open(rows_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            raise _storage_error("open the checkpoint log", rows_path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointBusy(
                f"{directory}: another qwen-batch run is using this checkpoint; "
                "wait for it to finish or stop it first"
            ) from None
        if stored is not None and stored != manifest:
            # No row was recorded under the old job (a run stopped by a configuration error,
            # say): nothing to keep apart, so the changed job takes the checkpoint over.
            cls._take_over(directory, stored, manifest, fd)
        try:
            size = os.fstat(fd).st_size
            keep = valid_length(rows_path)
            if keep != size:
                os.ftruncate(fd, keep)
                os.fsync(fd)
            fsync_dir(directory)
        except OSError as exc:
            os.close(fd)
            raise _storage_error("repair the checkpoint log", rows_path, exc) from None
        return cls(directory, manifest, fd, keep)

    @staticmethod
    def _take_over(directory: Path, stored: dict[str, Any], manifest: dict[str, Any], fd: int) -> None:
        """(Lock held) record ``manifest`` in a checkpoint that holds no rows; closes ``fd`` on failure."""
        manifest_path = directory / MANIFEST_NAME
        try:
            has_rows = os.fstat(fd).st_size > 0  # a record may have arrived before the lock was ours
            if not has_rows:
                write_file_atomically(manifest_path, _manifest_bytes(manifest))
        except OSError as exc:
            os.close(fd)
            raise _storage_error("write the checkpoint manifest", manifest_path, exc) from None
        if has_rows:
            os.close(fd)
            raise _mismatch(directory, stored, manifest)

    @classmethod
    def open_readonly(cls, directory: Path) -> Checkpoint:
        """Open an existing checkpoint to read, whatever job made it; changes nothing on disk.

        Raises StorageError if it is missing or unreadable.
        """
        directory = Path(directory)
        stored = _read_manifest(directory / MANIFEST_NAME)
        if stored is None:
            raise StorageError(f"{directory}: no checkpoint here (no {MANIFEST_NAME})")
        rows_path = directory / ROWS_NAME
        try:
            size = valid_length(rows_path) if rows_path.exists() else 0
        except OSError as exc:
            raise _storage_error("read the checkpoint log", rows_path, exc) from None
        return cls(directory, stored, None, size)

    def close(self) -> None:
        """Release the file and the lock; appending afterwards is an error. Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # writing

    def append(self, outcomes: Sequence[Outcome]) -> None:
        """Make ``outcomes`` durable: one write of all their lines, then fsync.

        When this returns, the records survive a kill or a power cut. On a disk error it
        raises StorageError after cutting its own partial write away, so what was durable
        before stays readable and the log stays appendable.
        """
        if not outcomes:
            return
        if self._fd is None:
            raise StorageError(f"{self.rows_path}: the checkpoint is closed or read-only")
        data = encode_records(outcomes)
        try:
            write_durably(self._fd, data)
        except OSError as exc:
            self._cut_back()
            raise _storage_error("append to the checkpoint log", self.rows_path, exc) from None
        self._size += len(data)

    def _cut_back(self) -> None:
        # Best effort: if even the truncate fails, the next ``open`` cuts the torn tail.
        try:
            os.ftruncate(self._fd, self._size)  # type: ignore[arg-type]
        except OSError:
            pass

    # reading

    def _scan(self, columns: Sequence[str]) -> pl.LazyFrame:
        """Every record, in log order, with only ``columns``."""
        schema = {name: RECORD_SCHEMA[name] for name in columns}
        path = self.rows_path
        if self._size == 0:
            return pl.LazyFrame(schema=schema)
        try:
            actual = path.stat().st_size
        except OSError as exc:
            raise _storage_error("read the checkpoint log", path, exc) from None
        if actual == self._size:
            return pl.scan_ndjson(path, schema=schema)
        # A read-only view of a log that a run is appending to (or that has a torn tail):
        # read only the whole records we counted, so a half-written line is never parsed.
        try:
            with open(path, "rb") as f:
                data = f.read(self._size)
        except OSError as exc:
            raise _storage_error("read the checkpoint log", path, exc) from None
        return pl.scan_ndjson(data, schema=schema)

    @staticmethod
    def _latest(frame: pl.LazyFrame) -> pl.LazyFrame:
        # keep="last" keeps the record written last for each index: a resume that retried a
        # row appended a newer record after the old one.
        return frame.unique(subset="index", keep="last").sort("index")

    def _collect(self, frame: pl.LazyFrame) -> pl.DataFrame:
        try:
            return frame.collect()
        except pl.exceptions.ComputeError as exc:
            raise StorageError(
                f"{self.rows_path}: the checkpoint log is damaged ({str(exc).splitlines()[0]}); "
                "re-run with --fresh to start over (old results are kept aside)"
            ) from None

    def done_frame(self, extra_columns: Sequence[str] = ()) -> pl.DataFrame:
        """The latest record of each finished row, sorted by index.

        Columns: index (Int64), fingerprint (Utf8), status (Utf8), retryable (Boolean),
        cost (Float64), cached (Boolean), then any ``extra_columns`` (record fields).
        """
        return self._collect(self._latest(self._scan((*DONE_COLUMNS, *extra_columns))))

    def records_lazy(self) -> pl.LazyFrame:
        """Every Outcome field of the latest record of each row, sorted by index (lazy).

        The frame reads the log when collected; do not append in between.
        """
        return self._latest(self._scan(tuple(RECORD_SCHEMA)))

    def log_lazy(self) -> pl.LazyFrame:
        """Every Outcome field of every record, in the order written (lazy, not deduplicated).

        What ``output.write_results`` streams from with flat memory; the last record of an
        index is its current one.
        """
        return self._scan(tuple(RECORD_SCHEMA))

    def log_to_parquet(self, path: Path, *, chunk_bytes: int = _READ_CHUNK) -> pl.LazyFrame:
        """Copy every record, in log order, into a Parquet file at ``path``; scan that file.

        The same frame as :meth:`log_lazy`, but read from the log in bounded byte slices cut
        at line ends: polars' ndjson scan holds the whole log's bytes (600 MB for a million
        rows), and every later pass over the records (the output join, the summary) then
        reads compact, column-projected Parquet instead. The caller deletes ``path``.
        Raises StorageError if the log cannot be read or parsed, or the file not written.
        """
        import pyarrow.parquet as pq

        release_memory()
        schema = dict(RECORD_SCHEMA)
        writer: pq.ParquetWriter | None = None
        try:
            with open(self.rows_path, "rb") as f:
                remaining = self._size
                rest = b""
                while remaining > 0 or rest:
                    chunk = f.read(min(chunk_bytes, remaining)) if remaining > 0 else b""
                    remaining -= len(chunk)
                    data = rest + chunk
                    cut = data.rfind(b"\n") + 1 if remaining > 0 and chunk else len(data)
                    rest, data = data[cut:], data[:cut]
                    if not data:
                        continue
                    table = pl.read_ndjson(io.BytesIO(data), schema=schema).to_arrow()
                    if writer is None:
                        writer = pq.ParquetWriter(path, table.schema, compression="lz4")
                    writer.write_table(table)
            if writer is None:
                pl.DataFrame(schema=schema).write_parquet(path)
        except OSError as exc:
            raise _storage_error("copy the checkpoint log", path, exc) from None
        except pl.exceptions.ComputeError as exc:
            raise StorageError(
                f"{self.rows_path}: the checkpoint log is damaged ({str(exc).splitlines()[0]}); "
                "re-run with --fresh to start over (old results are kept aside)"
            ) from None
        finally:
            if writer is not None:
                writer.close()
        release_memory()
        return pl.scan_parquet(path)

    def outcomes(self) -> list[Outcome]:
        """The latest outcome of each row as Python objects; for tests and small checkpoints."""
        frame = self._collect(self.records_lazy())
        return [record_to_outcome(row) for row in frame.iter_rows(named=True)]

    def summary(self) -> CheckpointSummary:
        """Counts and totals over the latest record of each row, for ``qwen-batch status``."""
        frame = self._collect(self._latest(self._scan(_SUMMARY_COLUMNS)))
        errors = frame.filter(pl.col("status") != "ok")
        paid = frame.filter(billed())
        by_code = (
            errors.group_by(pl.col("error_code").fill_null("unknown"))
            .len()
            .sort(["len", "error_code"], descending=[True, False])
        )
        return CheckpointSummary(
            rows_done=frame.height,
            ok=frame.height - errors.height,
            errors=errors.height,
            errors_by_code=dict(zip(by_code["error_code"].to_list(), by_code["len"].to_list())),
            retryable_errors=int(errors["retryable"].fill_null(False).sum()),
            input_tokens=int(paid["input_tokens"].fill_null(0).sum()),
            output_tokens=int(paid["output_tokens"].fill_null(0).sum()),
            cost=float(frame["cost"].fill_null(0.0).sum()),
            cached=int(frame["cached"].fill_null(False).sum()),
        )


def _mismatch(directory: Path, stored: dict[str, Any], manifest: dict[str, Any]) -> CheckpointMismatch:
    changes = manifest_changes(stored, manifest)
    return CheckpointMismatch(
        f"{directory}: this checkpoint was made by a different job "
        f"({'; '.join(changes)}); re-run with --fresh to start over "
        "(old results are kept aside), or restore the previous settings to resume"
    )


def _has_records(rows_path: Path) -> bool:
    """Whether the log holds anything (a torn first record counts: it is cut away only under the lock)."""
    try:
        return rows_path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    document = {
        "checkpoint_format": CHECKPOINT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "manifest": manifest,
    }
    return (json.dumps(document, ensure_ascii=False, sort_keys=True, indent=2) + "\n").encode("utf-8")


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """The stored job manifest, or None if there is none yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _storage_error("read the checkpoint manifest", path, exc) from None
    try:
        document = json.loads(text)
        manifest = document["manifest"]
        if not isinstance(manifest, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise StorageError(
            f"{path}: the checkpoint manifest is damaged; "
            "re-run with --fresh to start over (old results are kept aside)"
        ) from None
    if document.get("checkpoint_format") != CHECKPOINT_FORMAT:
        raise StorageError(
            f"{path}: checkpoint format {document.get('checkpoint_format')!r} is not "
            f"{CHECKPOINT_FORMAT}; re-run with --fresh to start over (old results are kept aside)"
        )
    return manifest


def set_aside(paths: Iterable[Path], *, output: Path | None = None) -> Path | None:
    """Move the files of an earlier run into ``<output>.old-<YYYYmmdd-HHMMSS>/``; never delete.

    ``paths`` are the checkpoint folder and any output or summary files; those that do not
    exist are skipped, and None is returned when none does. ``output`` names the folder;
    by default it is the first path given, without a ``.checkpoint`` suffix. Raises
    StorageError if a move fails (what was moved stays in the new folder).
    """
    existing = [Path(p) for p in paths]
    if not existing:
        return None
    base = Path(output) if output is not None else existing[0]
    if output is None and base.name.endswith(".checkpoint"):
        base = base.with_name(base.name[: -len(".checkpoint")])
    existing = [p for p in existing if p.exists() or p.is_symlink()]
    if not existing:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    attempt = 0
    while True:
        suffix = f".old-{stamp}" if attempt == 0 else f".old-{stamp}-{attempt}"
        folder = base.with_name(base.name + suffix)
        try:
            folder.mkdir(mode=DIR_MODE)
            break
        except FileExistsError:
            attempt += 1
        except OSError as exc:
            raise _storage_error("create the folder for the old results", folder, exc) from None
    for path in existing:
        try:
            os.replace(path, folder / path.name)
        except OSError as exc:
            raise _storage_error(f"move {path.name} aside into {folder}", path, exc) from None
    try:
        fsync_dir(folder)
        fsync_dir(folder.parent)
    except OSError as exc:
        raise _storage_error("sync the folder for the old results", folder, exc) from None
    return folder


def replace_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Record ``manifest`` as the job of a checkpoint that keeps its rows (``run --redo``: the
    rows it does not redo were sent under the old one, redo.py records which). Raises StorageError."""
    path = Path(directory) / MANIFEST_NAME
    try:
        write_file_atomically(path, _manifest_bytes(_normalised(manifest)))
    except OSError as exc:
        raise _storage_error("write the checkpoint manifest", path, exc) from None
