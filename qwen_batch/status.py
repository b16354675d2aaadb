"""How far a job got, read from its checkpoint: ``qwen-batch status`` and the estimate's history.

Reads the spec, the table's size and the checkpoint; sends and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import catalog as catalog_module
from .checkpoint import Checkpoint, CheckpointSummary, manifest_changes
from .plan import JobOptions, JobPlan, checked_paths
from .render import Renderer
from .resume import checkpoint_dir_for, request_manifest
from .servers import dashscope_rules_bind
from .sharding import Shard
from .modes import mode_of
from .spec import JobSpec, load_spec, price_for, resolve_model
from .table import Table, open_table
from .user_catalog import for_job


def checkpoint_status(plan: JobPlan) -> CheckpointSummary | None:
    """What the job's checkpoint holds, or None before the first run."""
    if not plan.checkpoint_dir.exists():
        return None
    with Checkpoint.open_readonly(plan.checkpoint_dir) as checkpoint:
        return checkpoint.summary()


@dataclass(frozen=True)
class PartStatus:
    """How far one shard of a sharded job got (``run --shard I/N``), from its own checkpoint."""

    shard: Shard
    units: int
    done: CheckpointSummary | None
    written: bool

    @property
    def remaining(self) -> int:
        return max(self.units - (self.done.rows_done if self.done else 0), 0)

    @property
    def started(self) -> bool:
        return self.done is not None or self.written


@dataclass(frozen=True)
class JobStatus:
    """How far a job got, for ``qwen-batch status``."""

    name: str
    rows: int
    output_path: Path
    output_written: bool
    done: CheckpointSummary | None
    currency: str
    spec_changed: list[str]
    parts: tuple[PartStatus, ...] = ()  # the shards of every N started beside the output

    @property
    def remaining(self) -> int:
        done = self.done.rows_done if self.done else 0
        return max(self.rows - done, 0)


def job_status(spec_path: Path, options: JobOptions) -> JobStatus:
    """Read the spec, the table's size and the checkpoint; send and change nothing."""
    spec = load_spec(spec_path)
    model_info = resolve_model(spec, for_job(spec.catalog))
    price = price_for(spec, model_info)
    output_path = checked_paths(spec, options).output
    table = open_table(spec)
    checkpoint_dir = checkpoint_dir_for(output_path)
    done, changed = None, []
    if checkpoint_dir.exists():
        with Checkpoint.open_readonly(checkpoint_dir) as checkpoint:
            done = checkpoint.summary()
            # A checkpoint with no rows is taken over by a changed job (Checkpoint.open).
            if done.rows_done:
                mode = mode_of(spec, model_info, service_rules=dashscope_rules_bind(spec, emulate=options.emulate))
                renderer = Renderer(
                    spec, model_info, protocol=spec.api.protocol, reasoning_cap=mode.reasoning_cap, thinking=mode.thinking
                )
                changed = manifest_changes(checkpoint.manifest, request_manifest(spec, renderer))
    assert spec.name is not None  # load_spec names every spec (after its file, by default)
    return JobStatus(
        name=spec.name,
        rows=table.num_rows,
        output_path=output_path,
        output_written=output_path.exists(),
        done=done,
        currency=price.currency if price else catalog_module.CURRENCY,
        spec_changed=changed,
        parts=part_statuses(spec, table, output_path, emulate=options.emulate),
    )


def part_statuses(spec: JobSpec, table: Table, output_path: Path, *, emulate: bool) -> tuple[PartStatus, ...]:
    """Each shard of every N that was started beside the output: its units, its checkpoint, its part."""
    from .sharding import shard_counts, shard_sizes, table_row_ids
    from .variants import build_variants

    counts = shard_counts(output_path)
    if not counts:
        return ()
    variants = build_variants(spec, for_job(spec.catalog), emulate=emulate)
    slots = [(variant.id, sample) for variant in variants for sample in range(spec.samples)]
    parts: list[PartStatus] = []
    for count in counts:
        sizes = shard_sizes(table_row_ids(table, spec.input.id_column, table.num_rows), slots, count)
        for index, units in enumerate(sizes):
            shard = Shard(index, count)
            part = shard.part_path(output_path)
            parts.append(PartStatus(shard, units, _summary_of(checkpoint_dir_for(part)), part.exists()))
    return tuple(parts)


def _summary_of(checkpoint_dir: Path) -> CheckpointSummary | None:
    if not checkpoint_dir.exists():
        return None
    with Checkpoint.open_readonly(checkpoint_dir) as checkpoint:
        return checkpoint.summary()
