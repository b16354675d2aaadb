"""The rows to send, in input order; rows settled without sending become outcomes here.

Row problems, over-long rows (under ``preflight.over_long: error``) and cache hits never
reach the worker pool as requests; finished rows of an earlier run are skipped. The sink
makes each group of outcomes durable, then shares the new replies through the cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from .cache import ServiceCache
from .checkpoint import Checkpoint
from .jsonmode import asks_json, refuses_rows
from .preflight import rendered
from .render import RowProblem
from .runner import WorkItem
from .structured import JSON_WORD_MISSING, has_json_word
from .types import Outcome, Reply, Request

if TYPE_CHECKING:
    from .plan import JobPlan

BATCH_ROWS = 2_000
OVER_LONG_CODE = INVALID_PARAMETER = "InvalidParameter"


def work_items(plan: JobPlan, cache: ServiceCache | None) -> Iterator[list[WorkItem]]:
    """Rows to send, in input order, with rows decided without sending turned into outcomes.

    Rows an earlier run finished are skipped before rendering, and the token counts the
    preflight made are reused, so this second pass over the table is cheap.
    """
    limit_of = plan.preflight.input_limit_of
    json_mode = asks_json(plan.spec)
    needs_json_word = refuses_rows(plan.spec, emulate=plan.options.emulate)
    batches = rendered(
        plan.renderers,
        plan.table.iter_batches(batch_size=BATCH_ROWS, limit=plan.rows),
        plan.resume,
        skip_finished=True,
        held=plan.held,
    )
    for batch in batches:
        items: list[WorkItem] = []
        for item in batch:
            if isinstance(item, RowProblem):
                items.append(_problem_outcome(item))
            elif (limit := limit_of(item.model)) is not None and item.input_tokens > limit:
                items.append(_over_long_outcome(item, limit))
            elif needs_json_word and not has_json_word(item.messages):
                items.append(_no_json_word_outcome(item))
            else:
                items.append(item)
        # JSON mode looks each attempt up itself (runner.py), the first one included.
        if cache is not None and not json_mode:
            items = _answer_from_cache(items, cache)
        if items:
            yield items


def _problem_outcome(problem: RowProblem) -> Outcome:
    return Outcome(
        index=problem.index,
        fingerprint="",
        status="error",
        error_code=problem.code,
        error_message=problem.message,
    )


def _unsent_outcome(request: Request, message: str) -> Outcome:
    """A row refused here as the service would refuse it (``InvalidParameter``), never sent."""
    return Outcome(
        index=request.index,
        fingerprint=request.fingerprint,
        status="error",
        preflight_input_tokens=request.input_tokens,
        error_code=INVALID_PARAMETER,
        error_message=message,
    )


def _over_long_outcome(request: Request, limit: int) -> Outcome:
    return _unsent_outcome(
        request, f"Range of input length should be [1, {limit}] (not sent: {request.input_tokens} tokens)"
    )


def _no_json_word_outcome(request: Request) -> Outcome:
    """A json_object row without the word "json": DashScope refuses it (jsonmode.py)."""
    return _unsent_outcome(request, f"{JSON_WORD_MISSING} (not sent: add the word JSON to this row's prompt)")


def _answer_from_cache(items: list[WorkItem], cache: ServiceCache) -> list[WorkItem]:
    requests = [item for item in items if isinstance(item, Request)]
    if not requests:
        return items
    hits = cache.get_many([request.fingerprint for request in requests])
    if not hits:
        return items
    return [
        _cached_outcome(item, hits[item.fingerprint])
        if isinstance(item, Request) and item.fingerprint in hits
        else item
        for item in items
    ]


def _cached_outcome(request: Request, reply: Reply) -> Outcome:
    """A cache hit: the stored reply, at no cost this time."""
    return Outcome.answered(request, reply, cost=0.0, attempts=0, latency_s=0.0, cached=True)


class CheckpointAndCacheSink:
    """Group commit target: the checkpoint (durable first), then the shared cache."""

    def __init__(self, checkpoint: Checkpoint, cache: ServiceCache | None) -> None:
        self._checkpoint = checkpoint
        self._cache = cache

    @property
    def cache(self) -> ServiceCache | None:
        """The shared cache, which a JSON-mode run reads and writes per attempt (runner.py)."""
        return self._cache

    def write(self, outcomes: Sequence[Outcome]) -> None:
        self._checkpoint.append(outcomes)
        if self._cache is None:
            return
        # A re-asked row's attempts were stored one by one under their own requests (runner.py).
        # An answer to keep: ok, or a JSON answer that did not parse (the service's reply all the same).
        fresh = [
            (o.fingerprint, o.stored_reply())
            for o in outcomes
            if (o.status == "ok" or o.parse_status is not None) and not o.cached and not o.reasks
        ]
        if fresh:
            self._cache.put_many(fresh)
