"""``run --redo "WHERE"``: which units a run sends again, and the record of what was redone.

The filter is SQL over the previous output (polars' SQL context, the table named ``output``):
the units whose rows it selects are sent again with the current spec, which may have changed
(a higher ``max_tokens``, another template); every other unit keeps its result. The kept
units were sent under the old spec, so they are not checked against the new one; the input
must be the same file (else ``--fresh``).

Each redo appends one JSON line to ``<checkpoint>/redo.jsonl`` (``REDO_FILE``) before
anything is sent::

    {"at": "2026-12-01T16:30:00Z", "where": "finish_reason = 'length'",
     "spec_sha256": "<sha256 of the job file's bytes>", "request_manifest": {...},
     "units": [{"row_id": "q1", "variant": "model=qwen-plus", "sample": 0}, ...]}

``request_manifest`` is the checkpoint's manifest the units were redone under (resume.py's
``request_manifest``); ``units`` name each unit as ``variants.unit_key`` does. The run
manifest (manifest.py) lists these records as the redone units.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError, StorageError

if TYPE_CHECKING:
    from .resume import ResumeIndex
    from .spec import JobSpec

REDO_FILE = "redo.jsonl"
_UNIT = "__qwen_batch_unit__"


@dataclass(frozen=True)
class Redo:
    """The units a ``--redo`` run sends again: the filter, and each unit's dense index and name."""

    where: str
    indexes: tuple[int, ...]
    units: tuple[dict[str, Any], ...]


def read_redo_log(checkpoint_dir: Path) -> list[dict[str, Any]]:
    """Every redo record of a checkpoint, oldest first; ``[]`` when none was made."""
    try:
        text = (checkpoint_dir / REDO_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def prepare_redo(
    spec: JobSpec,
    checkpoint_dir: Path,
    output_path: Path,
    where: str,
    units: int,
    per_row: int,
    identity: dict[str, Any],
    *,
    output_units: int | None = None,
) -> tuple[ResumeIndex, float, Redo]:
    """What the earlier run finished, less the units ``where`` selects; sends and writes nothing.

    Raises InputError (exit 2) when there is no earlier run to redo, when the input changed,
    when the output does not hold this job's units, or when the filter is not valid SQL over
    the output's columns.
    """
    from .checkpoint import Checkpoint
    from .resume import resume_state, same_input_as_before

    if not output_path.is_file() or not checkpoint_dir.is_dir():
        raise InputError(
            f"--redo: {output_path}: no earlier output of this job to redo rows of; run it without --redo first"
        )
    if not same_input_as_before(checkpoint_dir, identity):
        raise InputError(
            f"--redo: {spec.input.path} changed since {output_path} was written: the rows kept would not match it; "
            "run with --fresh to start over (old results are kept aside)"
        )
    redo = select_units(spec, output_path, where, units if output_units is None else output_units, per_row)
    old_manifest = Checkpoint.open_readonly(checkpoint_dir).manifest
    resume, previous_cost = resume_state(
        checkpoint_dir, old_manifest, units, identity, fresh=False, retry_errors=False
    )
    # The kept units were sent under the old spec: trusted as they are, never re-rendered.
    resume.verified = True
    for index in redo.indexes:
        resume.finished[index] = 0
    return resume, previous_cost, redo


def select_units(spec: JobSpec, output_path: Path, where: str, units: int, per_row: int) -> Redo:
    """The units of ``output_path`` whose rows ``where`` selects (SQL; the table is ``output``)."""
    import polars as pl

    frame = pl.scan_parquet(output_path)
    height = frame.select(pl.len()).collect().item()
    if height != units:
        raise InputError(
            f"--redo: {output_path} has {height} rows, but this job has {units} units (rows x variants x "
            "samples): the sweep, samples or input changed; run with --fresh to start over"
        )
    names = frame.collect_schema().names()
    id_column = spec.input.id_column
    # A shard's part names each of its units' dense index in this column (sharding.py).
    numbered = frame if _UNIT in names else frame.with_row_index(_UNIT)
    context = pl.SQLContext(output=numbered, eager=False)
    try:
        chosen = context.execute(f"SELECT * FROM output WHERE {where}").collect()
    except (pl.exceptions.PolarsError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"--redo: {where!r} is not a filter over {output_path}'s columns ({first_line}); "
            "write a SQL condition such as \"finish_reason = 'length'\" or \"status = 'error'\""
        ) from None
    indexes = tuple(int(i) for i in chosen[_UNIT].to_list())
    row_ids = (
        [str(v) for v in chosen[id_column].to_list()]
        if id_column in chosen.columns
        else [str(index // per_row) for index in indexes]
    )
    variants = chosen["variant"].to_list() if "variant" in names else [""] * len(indexes)
    samples = chosen["sample"].to_list() if "sample" in names else [0] * len(indexes)
    named = tuple(
        {"row_id": row_id, "variant": variant or "", "sample": int(sample or 0)}
        for row_id, variant, sample in zip(row_ids, variants, samples, strict=True)
    )
    return Redo(where, indexes, named)


def record_redo(checkpoint_dir: Path, spec: JobSpec, manifest: dict[str, Any], redo: Redo) -> None:
    """Append the redo's record (REDO_FILE), fsynced, and make the new spec the checkpoint's job.

    Called just before the redone units are sent, so the record never lists units the
    checkpoint does not go on to hold under this manifest. Raises StorageError.
    """
    from .checkpoint import replace_manifest

    spec_bytes = spec.path.read_bytes() if spec.path is not None else b""
    record = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "where": redo.where,
        "spec_sha256": hashlib.sha256(spec_bytes).hexdigest(),
        "request_manifest": manifest,
        "units": list(redo.units),
    }
    path = checkpoint_dir / REDO_FILE
    try:
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise StorageError(f"{path}: cannot record the redo ({exc.strerror or exc})") from None
    replace_manifest(checkpoint_dir, manifest)
