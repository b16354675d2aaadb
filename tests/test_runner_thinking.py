"""The runner with thinking and streamed replies: the budget's worst case, the cost, the first token."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from qwen_batch import pricing
from qwen_batch.backends.base import Event, Finished, TextDelta, Usage
from qwen_batch.budget import Budget
from qwen_batch.catalog import Price, PriceTier
from qwen_batch.limits import Limits
from qwen_batch.retry import RetryPolicy
from qwen_batch.runner import STOP_BUDGET, Runner
from qwen_batch.testing import FakeBackend
from qwen_batch.types import Request, UnitKey

from .test_runner import ListSink

# Per million tokens: input 1, answer 2, reasoning 8 (qwen-plus's ratio, NOTES.md "Prices with thinking").
PRICE = Price((PriceTier(None, 1.0, 2.0, 8.0),), "CNY", "test")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _no_sleep(_: float) -> None:
    await anyio.lowlevel.checkpoint()


def thinking_request(index: int, reasoning_cap: int = 1000) -> Request:
    return Request(index, str(index), "m", [], {"seed": 1}, f"{index:064x}", 100, 50, UnitKey(index), reasoning_cap=reasoning_cap)


def runner_for(backend: object, sink: ListSink, rows: int, **options: object) -> Runner:
    settings: dict[str, object] = {
        "concurrency": 1,
        "limits": Limits.from_settings(None, None),
        "retry_policy": RetryPolicy(max_retries=2, sleep=_no_sleep),
        "price": PRICE,
        "rows_total": rows,
    }
    settings.update(options)
    return Runner(backend, sink, **settings)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_thinking_rows_cost_prices_its_reasoning_at_the_thinking_price() -> None:
    backend = FakeBackend("answer", output_tokens=300, reasoning="mull it over", reasoning_tokens=200, streamed=True)
    sink = ListSink()
    stats = await runner_for(backend, sink, 1).run(iter([[thinking_request(0)]]))
    (outcome,) = sink.outcomes
    expected = (100 * 1.0 + 100 * 2.0 + 200 * 8.0) / 1_000_000
    assert outcome.cost == pytest.approx(expected) and stats.cost == pytest.approx(expected)
    assert (outcome.output_text, outcome.reasoning_text, outcome.reasoning_tokens) == ("answer", "mull it over", 200)


@pytest.mark.anyio
async def test_the_budget_reserves_the_reasoning_cap_and_stops_before_it_would_not_fit() -> None:
    """Each row's worst case is input + max_tokens + reasoning_cap; the actual cost is far less.

    Without the cap the worst case (100 in, 50 out) would fit the budget many times over.
    """
    reserved: list[float] = []
    budget = Budget(0.03)
    fake = FakeBackend("a", output_tokens=60, reasoning="r", reasoning_tokens=10)

    class Watching:
        def stream(self, request: Request) -> AsyncIterator[Event]:
            reserved.append(budget.statistics().reserved)
            return fake.stream(request)

    sink = ListSink()
    runner = runner_for(Watching(), sink, 100, budget=budget)
    await runner.run(iter([[thinking_request(i, reasoning_cap=3000) for i in range(100)]]))
    worst = pricing.worst_case_cost(PRICE, 100, 50, 3000)
    assert worst == pytest.approx((100 * 1.0 + 50 * 2.0 + 3000 * 8.0) / 1_000_000)
    assert reserved and all(value == pytest.approx(worst) for value in reserved)
    assert runner.stop_reason == STOP_BUDGET
    spent = sum(outcome.cost or 0.0 for outcome in sink.outcomes)
    assert spent <= 0.03 and spent + worst > 0.03 - 1e-12
    assert pricing.worst_case_cost(PRICE, 100, 50) * 100 < 0.03  # the cap is what stopped it


@pytest.mark.anyio
async def test_first_token_s_runs_from_the_final_attempts_start_to_its_first_delta() -> None:
    from qwen_batch.errors import TransportError

    now = [0.0]
    attempts = 0

    class CutOnce:
        """The first attempt's first token takes 5 s and its stream is cut; the second's takes 0.5 s."""

        async def stream(self, request: Request) -> AsyncIterator[Event]:
            nonlocal attempts
            attempts += 1
            now[0] += 5.0 if attempts == 1 else 0.5
            yield TextDelta("par")
            if attempts == 1:
                raise TransportError("TruncatedReply", "cut")
            now[0] += 2.0
            yield TextDelta("tial")
            yield Usage(request.input_tokens, 2)
            yield Finished("stop", "rid")

    sink = ListSink()
    await runner_for(CutOnce(), sink, 1, clock=lambda: now[0]).run(iter([[thinking_request(0)]]))
    (outcome,) = sink.outcomes
    assert (outcome.status, outcome.attempts, outcome.output_text) == ("ok", 2, "partial")
    assert outcome.first_token_s == 0.5
    assert outcome.latency_s == 7.5


@pytest.mark.anyio
async def test_a_whole_reply_has_no_first_token_time() -> None:
    sink = ListSink()
    await runner_for(FakeBackend("whole"), sink, 1).run(iter([[thinking_request(0, reasoning_cap=0)]]))
    assert sink.outcomes[0].first_token_s is None and sink.outcomes[0].reasoning_tokens == 0


class RecordingLimits(Limits):
    """The real limits, recording what each answered attempt charged and used."""

    settled: list[tuple[int, int]]

    def settle(self, charged: int, used: int) -> None:
        self.settled.append((charged, used))
        super().settle(charged, used)


@pytest.mark.anyio
async def test_the_token_limit_is_charged_the_reasoning_cap_and_settled_with_the_real_usage() -> None:
    plain = Limits.from_settings(None, 60_000)
    limits = RecordingLimits(requests=None, tokens=plain.tokens, window_s=60.0)
    limits.settled = []
    request = thinking_request(0, reasoning_cap=500)
    backend = FakeBackend("a", output_tokens=120, reasoning="r", reasoning_tokens=100, streamed=True)
    await runner_for(backend, ListSink(), 1, limits=limits).run(iter([[request]]))
    # Charged input + max_tokens + the cap; settled with input + output (reasoning included).
    assert limits.settled == [(100 + 50 + 500, 100 + 120)]
