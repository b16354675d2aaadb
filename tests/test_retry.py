"""The retry policy: what is retried, how often, and how long it waits."""

from __future__ import annotations

import pytest

from qwen_batch.errors import AuthError, BackendError, BadRequest, RateLimited, ServerError, TransportError
from qwen_batch.retry import RetryPolicy, call_with_retries


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Sleeps:
    """A sleep that records its delays and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def failing(*errors: BaseException, result: str = "ok"):
    """A call that raises ``errors`` in turn, then returns ``result``; counts its calls."""
    pending = list(errors)

    async def fn() -> str:
        fn.calls += 1
        if pending:
            raise pending.pop(0)
        return result

    fn.calls = 0
    return fn


def policy(max_retries: int = 3, sleeps: Sleeps | None = None, **kwargs) -> RetryPolicy:
    return RetryPolicy(max_retries, sleep=sleeps or Sleeps(), **kwargs)


@pytest.mark.anyio
async def test_success_at_once_is_one_attempt_without_sleeping() -> None:
    sleeps = Sleeps()
    assert await call_with_retries(failing(), policy(sleeps=sleeps)) == ("ok", 1)
    assert sleeps.delays == []


@pytest.mark.anyio
async def test_retryable_errors_are_retried_then_succeed_with_the_attempt_count() -> None:
    fn = failing(ServerError("InternalError", "m"), TransportError("Timeout", "m"), RateLimited("Throttling", "m"))
    sleeps = Sleeps()
    assert await call_with_retries(fn, policy(3, sleeps)) == ("ok", 4)
    assert fn.calls == 4 and len(sleeps.delays) == 3


@pytest.mark.anyio
@pytest.mark.parametrize("error", [BadRequest("InvalidParameter", "m"), AuthError("InvalidApiKey", "m")])
async def test_permanent_errors_are_not_retried(error) -> None:
    fn = failing(error)
    sleeps = Sleeps()
    with pytest.raises(type(error)) as info:
        await call_with_retries(fn, policy(5, sleeps))
    assert info.value is error and info.value.attempts == 1
    assert fn.calls == 1 and sleeps.delays == []


@pytest.mark.anyio
async def test_other_exceptions_propagate_untouched() -> None:
    fn = failing(KeyError("bug"))
    with pytest.raises(KeyError):
        await call_with_retries(fn, policy(5))
    assert fn.calls == 1


@pytest.mark.anyio
async def test_exhausted_retries_raise_the_last_error_with_attempts() -> None:
    errors = [ServerError("InternalError", str(n)) for n in range(5)]
    fn = failing(*errors)
    with pytest.raises(ServerError) as info:
        await call_with_retries(fn, policy(2))
    assert info.value is errors[2] and info.value.attempts == 3
    assert fn.calls == 3


@pytest.mark.anyio
async def test_zero_retries_sends_once() -> None:
    fn = failing(ServerError("InternalError", "m"))
    with pytest.raises(ServerError) as info:
        await call_with_retries(fn, policy(0))
    assert info.value.attempts == 1 and fn.calls == 1


@pytest.mark.anyio
async def test_retry_after_is_the_minimum_delay() -> None:
    errors = [RateLimited("Throttling", "m", retry_after=12.5) for _ in range(3)]
    sleeps = Sleeps()
    await call_with_retries(failing(*errors), policy(3, sleeps, base_delay_s=0.1, max_delay_s=1.0))
    assert len(sleeps.delays) == 3 and all(delay == 12.5 for delay in sleeps.delays)


@pytest.mark.anyio
async def test_backoff_is_full_jitter_exponential_and_capped() -> None:
    errors = [ServerError("InternalError", "m") for _ in range(8)]
    sleeps = Sleeps()
    await call_with_retries(failing(*errors), policy(8, sleeps, base_delay_s=0.5, max_delay_s=4.0))
    bounds = [min(4.0, 0.5 * 2**n) for n in range(8)]
    assert all(0.0 <= delay <= bound for delay, bound in zip(sleeps.delays, bounds, strict=True))


def test_the_policy_delay_grows_on_average_and_never_passes_the_cap() -> None:
    policy_ = RetryPolicy(10, base_delay_s=1.0, max_delay_s=8.0)
    draws = {attempt: [policy_.delay(attempt) for _ in range(300)] for attempt in (1, 4, 10)}
    assert max(draws[1]) <= 1.0 and max(draws[4]) <= 8.0 and max(draws[10]) <= 8.0
    assert sum(draws[1]) < sum(draws[4])


@pytest.mark.anyio
async def test_before_attempt_runs_before_every_attempt_and_on_error_after_each_failure() -> None:
    events: list[str] = []

    async def before() -> None:
        events.append("wait")

    def on_error(error: BackendError, attempt: int) -> None:
        events.append(f"{error.code}#{attempt}")

    fn = failing(RateLimited("Throttling", "m"), BadRequest("InvalidParameter", "m"))
    with pytest.raises(BadRequest):
        await call_with_retries(fn, policy(3), before_attempt=before, on_error=on_error)
    assert events == ["wait", "Throttling#1", "wait", "InvalidParameter#2"]


def test_the_policy_repr_is_readable() -> None:
    assert repr(RetryPolicy(3)) == "RetryPolicy(max_retries=3, base_delay_s=0.5, max_delay_s=30.0)"


def test_a_negative_retry_count_is_refused() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(-1)
