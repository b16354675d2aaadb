"""Rate limits: even spacing, token refunds, and the pool-wide adaptive throttle."""

from __future__ import annotations

import collections

import anyio
import pytest

from qwen_batch.errors import RateLimited
from qwen_batch.limits import AdaptiveThrottle, Limits, RequestRateLimiter, TokenRateLimiter


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    """A clock and a sleep that advances it: a simulation runs exactly and instantly."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += max(delay, 0.0)


def throttle_429(kind: str = "requests", retry_after: float | None = None) -> RateLimited:
    return RateLimited("Throttling", "m", retry_after=retry_after, kind=kind)


def fake_throttle(**kwargs) -> tuple[AdaptiveThrottle, FakeClock]:
    clock = FakeClock()
    return AdaptiveThrottle(clock=clock, sleep=clock.sleep, **kwargs), clock


# -- RequestRateLimiter -------------------------------------------------------------


@pytest.mark.anyio
async def test_the_request_limiter_lets_only_a_small_bucket_through_at_once_then_spaces_evenly() -> None:
    limiter = RequestRateLimiter(120, window_s=1.0)  # at most 120 in any 1 s window
    bucket = 6  # 50 ms of requests
    times = []
    for _ in range(40):
        await limiter.wait()
        times.append(anyio.current_time())
    # aiolimiter's AsyncLimiter(120, 1) would let all 40 through at once.
    assert sum(1 for t in times if t - times[0] < 0.02) <= bucket + 0.02 * 120 + 1
    # Late timer wake-ups are caught up from the bucket, never beyond it.
    assert all(sum(1 for u in times if t <= u < t + 0.1) <= bucket + 0.1 * 120 + 1 for t in times)
    rate = (len(times) - 1 - bucket) / (times[-1] - times[bucket])
    assert 100 <= rate <= 120


@pytest.mark.anyio
async def test_the_request_limiter_holds_the_rate_in_every_window_with_concurrent_waiters() -> None:
    limiter = RequestRateLimiter(75, window_s=0.25)  # 300/s, at most 75 in any 0.25 s
    times: list[float] = []

    async def worker() -> None:
        for _ in range(20):
            await limiter.wait()
            times.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(worker)
    times.sort()
    bucket = 3
    rate = (len(times) - 1 - bucket) / (times[-1] - times[bucket])
    assert 250 <= rate <= 300
    window: collections.deque[float] = collections.deque()
    for t in times:
        window.append(t)
        while window[0] <= t - 0.25:
            window.popleft()
        assert len(window) <= 75


def test_a_non_positive_request_limit_is_refused() -> None:
    with pytest.raises(ValueError):
        RequestRateLimiter(0)


# -- TokenRateLimiter ---------------------------------------------------------------


@pytest.mark.anyio
async def test_a_refund_gives_back_capacity_at_once() -> None:
    limiter = TokenRateLimiter(1000, window_s=60.0)  # bucket of 50 tokens, ~16 tokens/s
    assert await limiter.acquire(50) == 50
    assert not limiter._limiter.has_capacity(40)
    limiter.refund(40)
    assert limiter._limiter.has_capacity(40)
    with anyio.fail_after(0.5):
        await limiter.acquire(40)


@pytest.mark.anyio
async def test_a_charge_larger_than_the_bucket_is_clamped_so_it_can_go() -> None:
    limiter = TokenRateLimiter(1000)
    with anyio.fail_after(0.5):
        assert await limiter.acquire(10_000) == limiter.bucket


@pytest.mark.anyio
async def test_limits_settle_refunds_what_the_reply_did_not_use() -> None:
    limits = Limits.from_settings(tokens_per_minute=1000)
    await limits.wait_to_send(50)
    limits.settle(50, 10)
    assert limits.tokens._limiter.has_capacity(40)


@pytest.mark.anyio
async def test_limits_without_any_limit_never_wait() -> None:
    limits = Limits.from_settings(None, None)
    with anyio.fail_after(1):
        for _ in range(10_000):
            await limits.wait_to_send(1000)
            limits.settle(1000, 10)
            limits.on_success()
    stats = limits.statistics()
    assert (stats.requests_per_minute, stats.tokens_per_minute, stats.throttle.request_rate) == (None, None, None)


# -- AdaptiveThrottle ---------------------------------------------------------------


@pytest.mark.anyio
async def test_before_any_429_the_throttle_does_not_wait() -> None:
    throttle, clock = fake_throttle(request_rate=10.0)
    for _ in range(100):
        await throttle.wait_turn()
    assert clock.now == 0.0
    assert throttle.statistics().request_rate is None


@pytest.mark.anyio
async def test_a_429_pauses_everyone_for_its_retry_after() -> None:
    throttle, clock = fake_throttle(request_rate=100.0)
    throttle.on_throttled(throttle_429(retry_after=7.0))
    assert throttle.statistics().cooling_down_s == 7.0
    await throttle.wait_turn()
    assert clock.now >= 7.0


@pytest.mark.anyio
async def test_without_retry_after_the_cooldown_is_the_short_default() -> None:
    throttle, clock = fake_throttle(request_rate=100.0, default_cooldown_s=1.5)
    throttle.on_throttled(throttle_429())
    await throttle.wait_turn()
    assert clock.now == 1.5


@pytest.mark.anyio
async def test_a_429_cuts_the_rate_multiplicatively_once_per_cooldown() -> None:
    throttle, clock = fake_throttle(request_rate=100.0, decrease=0.5)
    for _ in range(100):  # 100 sends in 1 s: observed 100/s
        await throttle.wait_turn()
        clock.now += 0.01
    for _ in range(5):  # one overshoot answered by several 429s
        throttle.on_throttled(throttle_429())
    stats = throttle.statistics()
    assert stats.request_rate == pytest.approx(50.0, rel=0.05)
    assert (stats.throttled, stats.cooldowns, stats.decreases) == (5, 1, 1)


@pytest.mark.anyio
async def test_after_the_cut_requests_are_paced_at_the_new_rate() -> None:
    throttle, clock = fake_throttle(request_rate=100.0, decrease=0.5, default_cooldown_s=1.0)
    for _ in range(100):
        await throttle.wait_turn()
        clock.now += 0.01
    throttle.on_throttled(throttle_429())
    rate = throttle.statistics().request_rate
    start = clock.now
    for _ in range(11):
        await throttle.wait_turn()
    assert clock.now - start == pytest.approx(1.0 + 10 / rate)


@pytest.mark.anyio
async def test_successes_raise_the_rate_additively_up_to_the_ceiling() -> None:
    throttle, clock = fake_throttle(request_rate=100.0, decrease=0.5, ramp_s=10.0)
    for _ in range(100):
        await throttle.wait_turn()
        clock.now += 0.01
    throttle.on_throttled(throttle_429())
    cut = throttle.statistics().request_rate  # 50: a cut of 50
    clock.now += 1.0  # the cool-down ends
    throttle.on_success()
    rates = [throttle.statistics().request_rate]
    for _ in range(5):  # 5 s of successes
        clock.now += 1.0
        throttle.on_success()
        rates.append(throttle.statistics().request_rate)
    steps = [b - a for a, b in zip(rates, rates[1:])]
    assert steps == pytest.approx([cut / 10.0] * 5)  # linear: the cut of 50 back in 10 s
    for _ in range(100):
        clock.now += 1.0
        throttle.on_success()
    assert throttle.statistics().request_rate == 100.0


@pytest.mark.anyio
async def test_with_no_configured_rate_the_first_429_starts_from_the_observed_rate() -> None:
    throttle, clock = fake_throttle(decrease=0.5)
    for _ in range(400):  # 40/s for 10 s
        await throttle.wait_turn()
        clock.now += 0.025
    assert throttle.statistics().request_rate is None
    throttle.on_throttled(throttle_429())
    assert throttle.statistics().request_rate == pytest.approx(20.0, rel=0.05)


@pytest.mark.anyio
async def test_a_tokens_429_cuts_the_token_rate_not_the_request_rate() -> None:
    throttle, clock = fake_throttle(decrease=0.5)
    for _ in range(100):  # 1000 tokens/s
        await throttle.wait_turn(100)
        clock.now += 0.1
    throttle.on_throttled(throttle_429(kind="tokens"))
    stats = throttle.statistics()
    assert stats.request_rate is None
    assert stats.token_rate == pytest.approx(500.0, rel=0.05)
    assert stats.throttled_by_kind == {"tokens": 1}


@pytest.mark.anyio
async def test_a_burst_429_ramps_back_more_slowly_than_a_requests_429() -> None:
    ramps = {}
    for kind in ("requests", "burst"):
        throttle, clock = fake_throttle(decrease=0.5, ramp_s=10.0)
        for _ in range(100):
            await throttle.wait_turn()
            clock.now += 0.01
        throttle.on_throttled(throttle_429(kind=kind))
        cut = throttle.statistics().request_rate
        clock.now += 1.0
        throttle.on_success()
        clock.now += 1.0
        throttle.on_success()
        ramps[kind] = throttle.statistics().request_rate - cut
    assert ramps["burst"] == pytest.approx(ramps["requests"] / 2)


@pytest.mark.anyio
async def test_a_429_with_no_success_since_the_cut_waits_longer_instead_of_cutting_again() -> None:
    throttle, clock = fake_throttle(request_rate=100.0, decrease=0.5, default_cooldown_s=1.0)
    await throttle.wait_turn()
    clock.now += 1.0
    throttle.on_throttled(throttle_429())
    rate = throttle.statistics().request_rate
    pauses = []
    for _ in range(4):
        start = clock.now
        await throttle.wait_turn()
        pauses.append(clock.now - start)
        throttle.on_throttled(throttle_429())
    assert throttle.statistics().request_rate == rate
    assert pauses[1:] == pytest.approx([2.0, 4.0, 8.0], abs=0.05)


@pytest.mark.anyio
@pytest.mark.parametrize(("window_s", "limit", "ceiling"), [(10.0, 100, 30.0), (60.0, 600, 30.0), (1.0, 10, 100.0)])
async def test_against_a_server_with_a_lower_limit_the_rate_converges_near_it_with_few_429s(
    window_s, limit, ceiling
) -> None:
    """A simulated sliding-window server admits ``limit`` requests per ``window_s``; the
    client is configured for ``ceiling`` per second, well above it."""
    throttle, clock = fake_throttle(request_rate=ceiling)
    admitted: collections.deque[float] = collections.deque()
    log: list[tuple[float, bool]] = []
    duration = 40 * window_s if window_s < 60 else 1200.0
    next_send = 0.0
    while clock.now < duration:
        await throttle.wait_turn()
        await clock.sleep(next_send - clock.now)  # the configured limit
        next_send = clock.now + 1.0 / ceiling
        while admitted and admitted[0] <= clock.now - window_s:
            admitted.popleft()
        ok = len(admitted) < limit
        log.append((clock.now, ok))
        throttle.on_answer()
        if ok:
            admitted.append(clock.now)
            throttle.on_success()
        else:
            throttle.on_throttled(throttle_429())
    second_half = [ok for t, ok in log if t > duration / 2]
    admitted_rate = sum(second_half) / (duration / 2)
    assert 0.85 * limit / window_s <= admitted_rate <= limit / window_s
    assert second_half.count(False) / len(second_half) < 0.005


@pytest.mark.anyio
async def test_a_later_429_sets_the_rate_just_under_the_admitted_rate_instead_of_cutting_blindly() -> None:
    """The first 429 cuts by ``decrease``; the next one estimates the server's limit from
    the answers it admitted (429s excluded) and sets the rate 3% under it."""
    throttle, clock = fake_throttle(request_rate=100.0, decrease=0.5, default_cooldown_s=1.0)
    for _ in range(100):  # 100/s for 1 s, all admitted
        await throttle.wait_turn()
        throttle.on_answer()
        throttle.on_success()
        clock.now += 0.01
    throttle.on_answer()
    throttle.on_throttled(throttle_429())
    assert throttle.statistics().request_rate == pytest.approx(50.0, rel=0.05)
    assert throttle.statistics().request_limit_estimate is None
    clock.now += 1.0  # the cool-down: 100 admitted in 2 s so far
    for _ in range(100):  # 100 more in 2 s, as paced
        await throttle.wait_turn()
        throttle.on_answer()
        throttle.on_success()
    throttle.on_answer()
    throttle.on_throttled(throttle_429())
    stats = throttle.statistics()
    admitted = 200 / clock.now
    assert stats.request_limit_estimate == pytest.approx(admitted, rel=0.02)
    assert stats.request_rate == pytest.approx(0.97 * stats.request_limit_estimate)
    assert stats.decreases == 2


@pytest.mark.anyio
async def test_near_the_estimated_limit_the_ramp_only_probes_gently() -> None:
    """At the estimate, successes raise the rate by 2% of it per ``ramp_s``, not by the cut."""
    throttle, clock = fake_throttle(request_rate=100.0, decrease=0.5, ramp_s=10.0)
    for _ in range(2):  # two overshoots, each followed by 2 s at 50/s, all admitted
        for _ in range(100):
            await throttle.wait_turn()
            throttle.on_answer()
            throttle.on_success()
            clock.now += 0.02
        throttle.on_answer()
        throttle.on_throttled(throttle_429())
        clock.now += 1.0
    estimate = throttle.statistics().request_limit_estimate
    throttle.on_success()
    start = throttle.statistics().request_rate
    for _ in range(10):  # 10 s of successes: one ramp_s
        clock.now += 1.0
        throttle.on_success()
    assert throttle.statistics().request_rate - start == pytest.approx(0.02 * estimate, rel=0.01)


@pytest.mark.anyio
async def test_the_admitted_rate_forgets_answers_older_than_its_horizon() -> None:
    throttle, clock = fake_throttle(request_rate=100.0, admitted_horizon_s=10.0)
    for _ in range(200):  # 100/s for 2 s, then 5/s for 20 s
        throttle.on_answer()
        clock.now += 0.01
    for _ in range(100):
        throttle.on_answer()
        clock.now += 0.2
    assert throttle._admitted.rate(clock.now) == pytest.approx(5.0, rel=0.05)


@pytest.mark.anyio
async def test_429s_while_the_pool_sends_far_below_its_rate_pause_it_but_do_not_cut_it() -> None:
    """After a cut from 100/s, the pool sends only 10/s (its workers wait out retry backoff)
    and every 5th answer is a 429 anyway: those pause the pool but do not ratchet the rate
    down, since the pool was nowhere near it; the rate ramps back instead."""
    throttle, clock = fake_throttle(request_rate=100.0, default_cooldown_s=0.2, decrease=0.5)
    for _ in range(200):
        await throttle.wait_turn()
        clock.now += 0.01
    throttle.on_throttled(throttle_429())
    cut = throttle.statistics().request_rate
    for n in range(500):
        await throttle.wait_turn()
        clock.now += 0.1
        if n % 5 == 4:
            throttle.on_throttled(throttle_429())
        else:
            throttle.on_success()
    stats = throttle.statistics()
    # The observation window still remembers 100/s for one more 429; then the cuts stop.
    assert stats.decreases <= 2 and stats.cooldowns == 101
    assert stats.request_rate > cut


@pytest.mark.anyio
async def test_a_429_that_arrives_while_others_wait_for_a_fixed_slot_holds_them_back_too() -> None:
    """Workers already past the throttle, queued at the fixed limiter, queue again behind a new cool-down."""
    limits = Limits(requests=RequestRateLimiter(100, window_s=1.0))  # 10 ms apart after 5
    sent: list[float] = []

    async def worker() -> None:
        await limits.wait_to_send(0)
        sent.append(anyio.current_time())

    start = anyio.current_time()
    async with anyio.create_task_group() as group:
        for _ in range(20):
            group.start_soon(worker)
        await anyio.sleep(0.02)
        limits.on_throttled(RateLimited("Throttling", "m", retry_after=0.5))
    pause_end = start + 0.02 + 0.5
    late = [t for t in sent if t > start + 0.06]
    assert late and min(late) >= pause_end - 0.01


@pytest.mark.anyio
async def test_a_429_just_over_the_estimated_limit_pauses_the_pool_only_briefly() -> None:
    """Pacing at about the admitted rate, the pool is just over the limit: a quarter of the
    cool-down, not all of it; with Retry-After the server's pause still holds."""
    pauses = {}
    for retry_after in (None, 2.0):
        throttle, clock = fake_throttle(request_rate=100.0, decrease=0.5, default_cooldown_s=1.0)
        for _ in range(2):
            for _ in range(100):
                await throttle.wait_turn()
                throttle.on_answer()
                throttle.on_success()
                clock.now += 0.02
            throttle.on_answer()
            throttle.on_throttled(throttle_429(retry_after=retry_after))
            clock.now += throttle.statistics().cooling_down_s
        for _ in range(100):
            await throttle.wait_turn()
            throttle.on_answer()
            throttle.on_success()
        throttle.on_answer()
        throttle.on_throttled(throttle_429(retry_after=retry_after))
        pauses[retry_after] = throttle.statistics().cooling_down_s
    assert pauses == {None: pytest.approx(0.25), 2.0: 2.0}
