"""``status`` and ``cancel`` for a job's batches, read from (and kept in) its ``batch.sqlite``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .state import STATE_NAME, TERMINAL, BatchState, ShardRecord

if TYPE_CHECKING:
    from ..plan import JobPlan


def recorded_batches(checkpoint_dir: Path) -> list[ShardRecord]:
    """Every shard of the job as last seen (none when it never ran in batch mode); sends nothing."""
    state = BatchState.open_readonly(checkpoint_dir)
    if state is None:
        return []
    try:
        return state.shards()
    finally:
        state.close()


def still_running(checkpoint_dir: Path) -> list[ShardRecord]:
    """The job's batches last seen neither finished nor asked to cancel: they may still bill."""
    return [
        shard
        for shard in recorded_batches(checkpoint_dir)
        if shard.batch_id is not None and not shard.collected and shard.status not in TERMINAL | {"cancelling"}
    ]


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds is not None else "-"


def render_batches(shards: list[ShardRecord], out: TextIO) -> None:
    """One line per batch: shard, id, status, counts, created, deadline (created + window)."""
    if not shards:
        return
    print(f"  batches:   {len(shards)} ({sum(not s.collected for s in shards)} not collected yet)", file=out)
    for shard in shards:
        counts = f"{shard.completed or 0}/{shard.total if shard.total is not None else shard.lines} done, {shard.failed or 0} failed"
        print(
            f"    {shard.name} {shard.batch_id or '(not created)'}: {shard.status}, {counts}, "
            f"created {_when(shard.created_at)}, deadline {_when(shard.deadline)}"
            + (", collected" if shard.collected else ""),
            file=out,
        )


async def cancel_batches(plan: JobPlan, out: TextIO) -> int:
    """Cancel every batch of the job that has not finished; answered rows stay in the checkpoint.

    The number of batches asked to cancel. The next ``run`` collects what each finished and
    sends the rest again.
    """
    from ..errors import BadRequest
    from .api import BatchApi
    from .endpoint import batch_endpoint

    state = BatchState.open(plan.checkpoint_dir) if (plan.checkpoint_dir / STATE_NAME).exists() else None
    if state is None:
        print(f"{plan.spec.name}: no batches (the job never ran in batch mode)", file=out)
        return 0
    cancelled = 0
    try:
        async with batch_endpoint(plan) as (base_url, key):
            api = BatchApi(base_url, key)
            try:
                for shard in state.shards(uncollected_only=True):
                    if shard.batch_id is None or shard.status in TERMINAL:
                        continue
                    try:
                        batch = await api.cancel(shard.batch_id)
                    except BadRequest:  # it finished since it was last seen: nothing to cancel
                        batch = await api.retrieve(shard.batch_id)
                    status = str(batch.get("status"))
                    state.set_status(shard.name, status, (shard.total, shard.completed, shard.failed))
                    print(f"  {shard.name} {shard.batch_id}: {status}", file=out)
                    cancelled += status in ("cancelling", "cancelled")
            finally:
                await api.aclose()
    finally:
        state.close()
    print(
        f"{plan.spec.name}: asked {cancelled} batch(es) to cancel; answered rows are kept, "
        "and the next run collects what finished",
        file=out,
    )
    return cancelled
