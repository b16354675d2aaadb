"""``Limits.send_now``, the runner's way to charge a request without a coroutine: it charges what
``wait_to_send`` would, and nothing at all when a limit has no room."""

from __future__ import annotations

import pytest

from qwen_batch.limits import Limits


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_send_now_charges_what_waiting_would_and_nothing_once_a_limit_is_full() -> None:
    # 2,000 tokens a minute: a bucket of 100 tokens, so three requests of 30 fit and a fourth does not.
    fast, waited = Limits.from_settings(None, 2_000), Limits.from_settings(None, 2_000)
    sent = 0
    while fast.send_now(30):
        await waited.wait_to_send(30)
        sent += 1
        assert sent <= 3
    assert sent == 3
    for limits in (fast, waited):
        assert limits.tokens is not None
        assert limits.tokens.has_room(10) and not limits.tokens.has_room(11)
    # The refused request charged nothing: the room left is still there, and a refund makes more.
    assert not fast.send_now(30) and fast.tokens is not None and fast.tokens.has_room(10)
    fast.settle(30, 0)
    assert fast.send_now(30)


@pytest.mark.anyio
async def test_send_now_refuses_a_full_request_bucket_and_the_throttles_cool_down() -> None:
    from qwen_batch.errors import RateLimited

    one_at_a_time = Limits.from_settings(60, None)  # a bucket of one request
    assert one_at_a_time.send_now(0) and not one_at_a_time.send_now(0)
    cooling = Limits.from_settings(None, None)
    assert cooling.send_now(0)
    cooling.on_throttled(RateLimited("Throttling.RateQuota", "slow down", status=429, retry_after=30.0))
    assert cooling.throttle.statistics().cooling_down_s > 0
    assert not cooling.send_now(0)
