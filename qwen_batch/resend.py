"""``verify --resend N``: send N sampled units of a finished run again and count identical answers.

The sample is seeded by the run id, so the same output always resends the same units. Each
unit is sent once, without retries or the cache: the point is what the service answers now.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl


if TYPE_CHECKING:
    from .plan import JobPlan


@dataclass
class Resent:
    asked: int
    sent: int = 0
    identical: int = 0
    failed: int = 0
    changed_ids: list[str] = field(default_factory=list)


def resend_sample(output: Path, count: int, manifest: dict[str, Any], plan: JobPlan) -> Resent:
    """Send ``count`` sampled ok units of ``output`` again, as ``plan`` renders them, and compare the texts."""
    import anyio

    texts = pl.read_parquet(output, columns=["output_text", "status"]).with_row_index("index")
    ok = texts.filter(pl.col("status") == "ok")
    chosen = set(random.Random(manifest["run_id"]).sample(ok["index"].to_list(), min(count, ok.height)))
    recorded = dict(ok.filter(pl.col("index").is_in(chosen)).select("index", "output_text").iter_rows())
    requests = [request for request in plan.requests() if request.index in chosen]
    result = Resent(asked=count)
    anyio.run(_send_all, plan, requests, recorded, result, backend="asyncio")
    return result


async def _send_all(plan: JobPlan, requests: list[Any], recorded: dict[int, str], result: Resent) -> None:
    from .backends.base import collect
    from .errors import BadRequest, RetryableError
    from .executors.online import service_backend

    async with service_backend(plan) as backend:
        for request in requests:
            try:
                reply = await collect(backend.stream(request))
            except (RetryableError, BadRequest):
                result.failed += 1
                continue
            result.sent += 1
            if reply.text == recorded.get(request.index):
                result.identical += 1
            else:
                result.changed_ids.append(request.row_id)


def render_resend(result: Resent, out: Any) -> None:
    changed = f"; changed: {', '.join(result.changed_ids[:10])}" if result.changed_ids else ""
    failed = f", {result.failed} failed to send" if result.failed else ""
    print(f"resend: {result.identical} of {result.sent} answers identical{failed}{changed}", file=out)
