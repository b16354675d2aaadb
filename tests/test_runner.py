"""The worker pool through its seams: a scripted backend and an in-memory sink."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import anyio
import pytest

from qwen_batch.backends.base import Completed, Event
from qwen_batch.budget import Budget
from qwen_batch.catalog import Price
from qwen_batch.errors import AuthError, BadRequest, ServerError
from qwen_batch.limits import Limits
from qwen_batch.retry import RetryPolicy
from qwen_batch.runner import STOP_AUTH, STOP_BUDGET, STOP_ERROR_RATE, Runner
from qwen_batch.types import Outcome, Reply, Request, UnitKey


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _no_sleep(_: float) -> None:
    await anyio.lowlevel.checkpoint()


def request(index: int, input_tokens: int = 10, max_tokens: int = 20) -> Request:
    return Request(index, str(index), "m", [], {"seed": 1}, f"{index:064x}", input_tokens, max_tokens, UnitKey(index))


class ScriptedBackend:
    """Answers from a script: per index, a list of exceptions to raise before a reply."""

    def __init__(self, failures: dict[int, list[Exception]] | None = None) -> None:
        self.failures = failures or {}
        self.calls: list[int] = []
        self.in_flight = 0
        self.peak_in_flight = 0

    async def stream(self, req: Request) -> AsyncIterator[Event]:
        """The Backend protocol: the scripted reply as a stream of one event."""
        yield Completed(await self.generate(req))

    async def generate(self, req: Request) -> Reply:
        self.calls.append(req.index)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await anyio.lowlevel.checkpoint()
            pending = self.failures.get(req.index)
            if pending:
                raise pending.pop(0)
            return Reply(f"reply {req.index}", "stop", req.input_tokens, 5, f"id-{req.index}")
        finally:
            self.in_flight -= 1


class ListSink:
    def __init__(self) -> None:
        self.groups: list[list[Outcome]] = []

    def write(self, outcomes: Sequence[Outcome]) -> None:
        self.groups.append(list(outcomes))

    @property
    def outcomes(self) -> list[Outcome]:
        return [outcome for group in self.groups for outcome in group]


def make_runner(backend: ScriptedBackend, sink: ListSink, rows: int, **kwargs: object) -> Runner:
    defaults: dict[str, object] = {
        "concurrency": 4,
        "limits": Limits.from_settings(None, None),
        "retry_policy": RetryPolicy(max_retries=3, sleep=_no_sleep),
        "price": Price.flat(1.0, 2.0, "CNY", "test"),
        "rows_total": rows,
    }
    defaults.update(kwargs)
    return Runner(backend, sink, **defaults)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_every_request_becomes_exactly_one_durable_outcome() -> None:
    backend, sink = ScriptedBackend(), ListSink()
    runner = make_runner(backend, sink, 50)
    stats = await runner.run(iter([[request(i) for i in range(0, 25)], [request(i) for i in range(25, 50)]]))
    assert sorted(outcome.index for outcome in sink.outcomes) == list(range(50))
    assert stats.ok == 50 and stats.rows_done == 50 and stats.errors == 0
    assert backend.peak_in_flight <= 4
    assert stats.cost == pytest.approx(50 * (10 * 1.0 + 5 * 2.0) / 1000)


@pytest.mark.anyio
async def test_retryable_failures_are_retried_and_counted() -> None:
    backend = ScriptedBackend({3: [ServerError("InternalError", "boom", status=500)] * 2})
    sink = ListSink()
    stats = await make_runner(backend, sink, 5).run(iter([[request(i) for i in range(5)]]))
    by_index = {outcome.index: outcome for outcome in sink.outcomes}
    assert by_index[3].status == "ok" and by_index[3].attempts == 3
    assert stats.retries == 2 and backend.calls.count(3) == 3


@pytest.mark.anyio
async def test_a_permanent_failure_is_the_rows_error_and_not_retried() -> None:
    backend = ScriptedBackend({1: [BadRequest("DataInspectionFailed", "no", status=400, request_id="r1")]})
    sink = ListSink()
    stats = await make_runner(backend, sink, 3).run(iter([[request(i) for i in range(3)]]))
    failed = next(outcome for outcome in sink.outcomes if outcome.index == 1)
    assert (failed.status, failed.error_code, failed.attempts, failed.retryable) == ("error", "DataInspectionFailed", 1, False)
    assert failed.request_id == "r1" and failed.cost is None
    assert stats.errors_by_code == {"DataInspectionFailed": 1}
    assert backend.calls.count(1) == 1


@pytest.mark.anyio
async def test_every_outcome_keeps_the_model_and_seed_its_request_was_sent_with() -> None:
    """Answered or failed, the record says what was sent, so the output need not assume the job's."""
    backend = ScriptedBackend({1: [BadRequest("DataInspectionFailed", "no", status=400)]})
    sink = ListSink()
    sent = [
        Request(i, str(i), f"model-{i}", [], {"seed": 100 + i}, f"{i:064x}", 10, 20, UnitKey(i)) for i in range(3)
    ]
    await make_runner(backend, sink, 3).run(iter([sent]))
    kept = sorted((o.index, o.status, o.model, o.seed) for o in sink.outcomes)
    assert kept == [(0, "ok", "model-0", 100), (1, "error", "model-1", 101), (2, "ok", "model-2", 102)]


@pytest.mark.anyio
async def test_an_auth_error_stops_the_run_at_once() -> None:
    backend = ScriptedBackend({0: [AuthError("InvalidApiKey", "Invalid API-key provided.", status=401)]})
    sink = ListSink()
    runner = make_runner(backend, sink, 100, concurrency=1)
    await runner.run(iter([[request(i) for i in range(100)]]))
    assert runner.stop_reason == STOP_AUTH
    assert backend.calls == [0]
    assert sink.outcomes == []


@pytest.mark.anyio
async def test_the_budget_stops_sending_before_it_would_be_exceeded() -> None:
    # Each request's worst case: 10 in + 20 out at 1 and 2 per 1K = 0.05; actual cost 0.02.
    backend, sink = ScriptedBackend(), ListSink()
    budget = Budget(0.2)
    runner = make_runner(backend, sink, 100, concurrency=1, budget=budget)
    await runner.run(iter([[request(i) for i in range(100)]]))
    assert runner.stop_reason == STOP_BUDGET
    spent = sum(outcome.cost or 0 for outcome in sink.outcomes)
    assert spent <= 0.2
    # It stopped only when the next worst case no longer fitted.
    assert spent + 0.05 > 0.2 - 1e-9
    assert budget.statistics().reserved == pytest.approx(0.0)


@pytest.mark.anyio
async def test_outcomes_decided_without_sending_are_written_but_not_sent() -> None:
    backend, sink = ScriptedBackend(), ListSink()
    ready = Outcome(index=0, fingerprint="", status="error", error_code="InvalidParameter", error_message="empty")
    stats = await make_runner(backend, sink, 2).run(iter([[ready, request(1)]]))
    assert backend.calls == [1]
    assert {outcome.index for outcome in sink.outcomes} == {0, 1}
    assert stats.errors == 1 and stats.ok == 1


@pytest.mark.anyio
async def test_a_worker_waits_for_its_row_to_be_durable_before_the_next_request() -> None:
    """With one worker, the sink sees each row before the backend sees the next request."""
    order: list[str] = []

    class RecordingBackend(ScriptedBackend):
        async def generate(self, req: Request) -> Reply:
            order.append(f"send {req.index}")
            return await super().generate(req)

    class RecordingSink(ListSink):
        def write(self, outcomes: Sequence[Outcome]) -> None:
            order.extend(f"durable {outcome.index}" for outcome in outcomes)
            super().write(outcomes)

    await make_runner(RecordingBackend(), RecordingSink(), 3, concurrency=1).run(iter([[request(i) for i in range(3)]]))
    assert order == ["send 0", "durable 0", "send 1", "durable 1", "send 2", "durable 2"]


class GatedBackend(ScriptedBackend):
    """A ScriptedBackend whose replies wait until ``gate`` is set (a request held in flight)."""

    def __init__(self, failures: dict[int, list[Exception]]) -> None:
        super().__init__(failures)
        self.gate = anyio.Event()
        self.waiting = anyio.Event()

    async def generate(self, req: Request) -> Reply:
        if not self.failures.get(req.index):
            self.waiting.set()
            await self.gate.wait()
        return await super().generate(req)


@pytest.mark.anyio
async def test_retries_and_requests_in_flight_show_while_the_row_is_still_going() -> None:
    """Progress reads them live: a retry counts when it begins, not when its row finishes."""
    backend = GatedBackend({0: [ServerError("InternalError", "boom", status=500)]})
    sink = ListSink()
    runner = make_runner(backend, sink, 1)
    async with anyio.create_task_group() as group:
        group.start_soon(runner.run, iter([[request(0)]]))
        with anyio.fail_after(5):
            await backend.waiting.wait()
        live = runner.statistics()
        backend.gate.set()
    final = runner.statistics()
    assert (live.retries, live.in_flight, live.rows_done) == (1, 1, 0)
    assert (final.retries, final.in_flight, final.rows_done) == (1, 0, 1)
    assert sink.outcomes[0].attempts == 2


@pytest.mark.anyio
async def test_a_cache_hit_adds_nothing_to_the_billed_tokens() -> None:
    backend, sink = ScriptedBackend(), ListSink()
    hit = Outcome.answered(request(1), Reply("stored", "stop", 10, 5), cost=0.0, attempts=0, latency_s=0.0, cached=True)
    stats = await make_runner(backend, sink, 2).run(iter([[request(0), hit]]))
    assert (stats.input_tokens, stats.output_tokens, stats.cached) == (10, 5, 1)
    assert stats.cache_saved_cost == pytest.approx((10 * 1.0 + 5 * 2.0) / 1000)


@pytest.mark.anyio
async def test_max_error_rate_stops_the_run_once_the_latest_rows_fail_too_often() -> None:
    """Rows 0-99 succeed, every row from 100 on fails: the window of the latest 200 rows goes
    over 50% failed at the 201st failed row (row 300); rows after that are not sent."""
    bad = BadRequest("InvalidParameter", "no", status=400)
    backend = ScriptedBackend({i: [bad] for i in range(100, 1000)})
    sink = ListSink()
    runner = make_runner(backend, sink, 1000, concurrency=1, max_error_rate=0.5)
    await runner.run(iter([[request(i) for i in range(1000)]]))
    assert runner.stop_reason == STOP_ERROR_RATE
    assert runner.stop_detail == "101 of the last 200 rows failed, more than execution.max_error_rate 0.5"
    assert len(sink.outcomes) == 201 and max(backend.calls) == 200


@pytest.mark.anyio
async def test_max_error_rate_lets_a_run_under_the_limit_finish() -> None:
    bad = BadRequest("InvalidParameter", "no", status=400)
    backend = ScriptedBackend({i: [bad] for i in range(0, 1000, 2)})  # exactly half fail
    sink = ListSink()
    runner = make_runner(backend, sink, 1000, concurrency=4, max_error_rate=0.5)
    stats = await runner.run(iter([[request(i) for i in range(1000)]]))
    assert runner.stop_reason is None
    assert (stats.rows_done, stats.errors) == (1000, 500)
