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
from .modes import mode_of
from .spec import load_spec, price_for, resolve_model
from .table import open_table
from .user_catalog import for_job


def checkpoint_status(plan: JobPlan) -> CheckpointSummary | None:
    """What the job's checkpoint holds, or None before the first run."""
    if not plan.checkpoint_dir.exists():
        return None
    with Checkpoint.open_readonly(plan.checkpoint_dir) as checkpoint:
        return checkpoint.summary()


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
    )
