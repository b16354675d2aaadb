"""``qwen-batch merge``: a sharded job's parts joined into the output one run would have written.

``run --shard I/N`` writes ``<output>.parts/part-I-of-N.parquet`` with the shard's units only,
each with its dense index in the job (``output.PART_UNIT``), and a summary and manifest beside
it. ``merge_parts`` checks that all N parts are there and are of the same job and input, then
writes the job's output window by window of unit indexes: each part is sorted by index, so a
window's filter reads only the row groups that overlap it, and neither the parts nor the output
are ever whole in memory. Every unit must come exactly once; the output replaces an existing
one through the same atomic write a run uses, so a refused merge leaves it as it was.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError
from .sharding import Shard, found_parts, parts_dir, unit_shard

if TYPE_CHECKING:
    import polars as pl

    from .plan import JobPlan

# Units per window: each is a concat and sort of this many rows at most. 10,000, as output.py's
# batches: merging 200,000 units from 4 parts peaked at 330 MB and stayed flat, where windows of
# 50,000 grew polars' buffers to 560 MB and took twice as long.
MERGE_WINDOW = 10_000
_PART = "__qwen_batch_part__"


@dataclass(frozen=True)
class MergeResult:
    """What ``merge_parts`` wrote: the job's output, summary and manifest, from these parts."""

    output_path: Path
    summary_path: Path
    manifest_path: Path
    parts: tuple[Path, ...]
    units: int
    ok: int
    errors: int
    summary: dict[str, Any]


def part_name(shard: Shard) -> str:
    return f"part-{shard.index}-of-{shard.count}"


def part_count(plan: JobPlan) -> int:
    """N of the parts found beside the job's output; InputError when there are none, or when
    parts of different N are there (naming those that differ from the most common N)."""
    found = found_parts(plan.output_path)
    if not found:
        raise InputError(
            f"{parts_dir(plan.output_path)}: no parts of this job; run `qwen-batch run {plan.spec.where} "
            "--shard I/N` for I = 0 to N-1 first"
        )
    counts = Counter(shard.count for shard in found)
    count = max(counts, key=lambda n: (counts[n], n))
    others = [part_name(shard) for shard in found if shard.count != count]
    if others:
        raise InputError(
            f"{parts_dir(plan.output_path)}: {', '.join(others)} {'is' if len(others) == 1 else 'are'} not of "
            f"{count} shards like the others; remove the parts of the other run and merge again"
        )
    return count


def merge_parts(plan: JobPlan, count: int) -> MergeResult:
    """Write the job's output, summary and manifest from its ``count`` parts, in input order.

    ``plan`` is the job's (prepared without ``--shard``). Raises InputError (exit 2), before
    anything is written, naming every missing part, a part of another job, input or N; and,
    with the previous output left as it was, naming a unit that is missing or in two parts.
    """
    from .manifest import new_run_id, utc_now

    started = utc_now()
    shards = [Shard(index, count) for index in range(count)]
    paths = [shard.part_path(plan.output_path) for shard in shards]
    missing = [part_name(shard) for shard, path in zip(shards, paths, strict=True) if not path.is_file()]
    if missing:
        raise InputError(
            f"{parts_dir(plan.output_path)}: missing {', '.join(missing)}; run `qwen-batch run {plan.spec.where} "
            f"--shard I/{count}` for each, then merge again"
        )
    manifests = [_checked_manifest(plan, shard, path) for shard, path in zip(shards, paths, strict=True)]
    summaries = [_part_summary(path) for path in paths]
    ok = _write_merged(plan, shards, paths)
    summary = combined_summary(plan, summaries)
    from .output import write_summary_json

    write_summary_json(plan.summary_path, summary)
    manifest_path = _write_merged_manifest(plan, manifests, paths, new_run_id(started), started, utc_now())
    return MergeResult(
        output_path=plan.output_path,
        summary_path=plan.summary_path,
        manifest_path=manifest_path,
        parts=tuple(paths),
        units=plan.units,
        ok=ok,
        errors=plan.units - ok,
        summary=summary,
    )


def _checked_manifest(plan: JobPlan, shard: Shard, path: Path) -> dict[str, Any]:
    """The part's manifest, refused unless it is this shard's of this job, input and row count."""
    from .manifest import job_spec_sha256, read_manifest

    name = part_name(shard)
    manifest = read_manifest(path)
    recorded = manifest.get("shard") or {}
    if (recorded.get("index"), recorded.get("count")) != (shard.index, shard.count):
        raise InputError(f"{path}: its manifest says it is not {name}; rerun `qwen-batch run --shard {shard}`")
    if recorded.get("job_spec_sha256") != job_spec_sha256(plan.spec):
        raise InputError(
            f"{path}: {name} was written from another version of {plan.spec.where} (the spec's sha256 differs); "
            f"rerun that shard with the current spec (`qwen-batch run {plan.spec.where} --shard {shard}`)"
        )
    if manifest.get("input", {}).get("sha256") != plan.input_identity.get("input_sha256"):
        raise InputError(f"{path}: {name} was written from another input than {plan.spec.input.path}; rerun that shard")
    rows = manifest.get("input", {}).get("rows")
    if rows != plan.rows:
        raise InputError(
            f"{path}: {name} covers {rows} input rows, this merge {plan.rows}; "
            "merge with the --limit the shards ran with (or run every shard without it)"
        )
    return manifest


def _part_summary(path: Path) -> dict[str, Any]:
    summary_path = path.with_name(path.name + ".summary.json")
    try:
        data: object = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{summary_path}: cannot read the part's summary ({exc}); rerun that shard") from None
    if not isinstance(data, dict):
        raise InputError(f"{summary_path}: not a run summary; rerun that shard")
    return data


def _write_merged(plan: JobPlan, shards: list[Shard], paths: list[Path]) -> int:
    """Write the output from the parts, window by window of unit indexes; the number of ok units."""
    import polars as pl

    from .output import PART_UNIT, atomic_parquet, output_schema

    schema = output_schema(plan.table.scan().collect_schema())
    scans = [pl.scan_parquet(path).with_columns(pl.lit(i, dtype=pl.Int64).alias(_PART)) for i, path in enumerate(paths)]
    ok = 0
    with atomic_parquet(plan.output_path, schema, "merged results") as writer:
        for start in range(0, plan.units, MERGE_WINDOW):
            end = min(start + MERGE_WINDOW, plan.units)
            window = _window(scans, start, end)
            _check_window(plan, shards, window, start, end)
            table = window.drop(PART_UNIT, _PART).to_arrow().cast(schema)
            writer.write_table(table, row_group_size=table.num_rows)
            ok += int((window["status"] == "ok").sum())
    return ok


def _window(scans: list[pl.LazyFrame], start: int, end: int) -> pl.DataFrame:
    """The units ``[start, end)`` of every part, in unit order."""
    import polars as pl

    from .output import PART_UNIT

    pieces = [scan.filter(pl.col(PART_UNIT).is_between(start, end - 1)) for scan in scans]
    try:
        return pl.concat(pieces, how="vertical").sort(PART_UNIT, maintain_order=True).collect()
    except pl.exceptions.PolarsError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"the parts cannot be read together ({first}); rerun the shards with --fresh") from None


def _check_window(plan: JobPlan, shards: list[Shard], window: pl.DataFrame, start: int, end: int) -> None:
    """Every unit of ``[start, end)`` exactly once; else InputError naming the first that is not."""
    import polars as pl

    from .output import PART_UNIT

    units = window[PART_UNIT]
    expected = pl.int_range(start, end, dtype=pl.Int64, eager=True)
    if window.height == end - start and units.cast(pl.Int64).equals(expected):
        return
    doubled = window.filter(units.is_duplicated())
    if doubled.height:
        index = int(doubled[PART_UNIT][0])
        holders = doubled.filter(pl.col(PART_UNIT) == index)[_PART].to_list()
        parts = " and ".join(part_name(shards[int(p)]) for p in holders)
        raise InputError(
            f"{_unit_name(plan, index)} is in {parts}: the parts are not of one run; "
            "rerun those shards with --fresh and merge again"
        )
    index = int(expected.filter(~expected.is_in(units.cast(pl.Int64)))[0])
    row_id, variant, sample = _unit_key(plan, index)
    shard = shards[unit_shard(row_id, variant, sample, len(shards))]
    raise InputError(
        f"{_unit_name(plan, index)} is missing from {part_name(shard)}: rerun "
        f"`qwen-batch run {plan.spec.where} --shard {shard}` and merge again"
    )


def _unit_key(plan: JobPlan, index: int) -> tuple[str, str, int]:
    """(row id, variant id, sample) of the unit at dense ``index``, the row id read from the input."""
    import polars as pl

    per_row = plan.units_per_row
    position, slot = divmod(index, per_row)
    variant = plan.variants[slot // plan.samples].id if plan.variants else ""
    id_column = plan.spec.input.id_column
    row_id = str(position)
    if id_column is not None:
        row_id = str(plan.table.scan().select(pl.col(id_column).slice(position, 1)).collect().item())
    return row_id, variant, slot % plan.samples


def _unit_name(plan: JobPlan, index: int) -> str:
    row_id, variant, sample = _unit_key(plan, index)
    unit = f" (variant {variant!r}, sample {sample})" if plan.units_per_row > 1 else ""
    return f"row id {row_id!r}{unit}"


def combined_summary(plan: JobPlan, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The job's summary from its parts': counts, tokens and costs summed, as one run reports them.

    The wall time is the longest part's (the shards run side by side), the rate over it.
    """
    summary: dict[str, Any] = _summed(summaries)
    summary["output"] = str(plan.output_path)
    wall = max(float(s.get("wall_time_s") or 0.0) for s in summaries)
    summary["wall_time_s"] = round(wall, 3)
    this_run = summary.get("this_run", {})
    this_run["wall_time_s"] = round(wall, 3)
    rate = round(this_run.get("rows", 0) / wall, 2) if wall > 0 else 0.0
    this_run["rows_per_second"] = summary["rows_per_second"] = rate
    return summary


def _summed(values: list[Any]) -> Any:
    """Numbers summed (None if any is None: an unknown cost stays unknown), dicts key by key,
    anything else the first part's."""
    from .summary import COST_DECIMALS

    first = values[0]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(key for value in values if isinstance(value, dict) for key in value))
        return {key: _summed([value[key] for value in values if isinstance(value, dict) and key in value]) for key in keys}
    numbers = [value for value in values if isinstance(value, (int, float)) and not isinstance(value, bool)]
    if numbers and len(numbers) == len(values):
        total = sum(numbers)
        return round(total, COST_DECIMALS) if isinstance(total, float) else total
    if numbers:
        return None
    return next((value for value in values if value is not None), None)


def _write_merged_manifest(
    plan: JobPlan, manifests: list[dict[str, Any]], paths: list[Path], run_id: str, started: Any, ended: Any
) -> Path:
    """The job's manifest as one run writes it, listing the parts it was merged from."""
    from .manifest import build_manifest, write_manifest

    manifest = build_manifest(plan, run_id=run_id, started=started, ended=ended)
    # How and at what price the parts were sent is theirs (online or batch), not the plan's.
    manifest["service"] = manifests[0].get("service", manifest["service"])
    manifest["catalog"] = manifests[0].get("catalog", manifest["catalog"])
    manifest["redone"] = [record for part in manifests for record in part.get("redone") or []]
    manifest["parts"] = [
        {
            "path": str(path.resolve()),
            "run_id": part.get("run_id"),
            "started_at": part.get("started_at"),
            "ended_at": part.get("ended_at"),
            "shard": part.get("shard"),
            "service": part.get("service"),
        }
        for path, part in zip(paths, manifests, strict=True)
    ]
    return write_manifest(plan.output_path, manifest)
