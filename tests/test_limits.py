"""Rate limits: even spacing, token refunds, and the pool-wide adaptive throttle."""

from __future__ import annotations

import collections

import anyio
import pytest

from qwen_batch.errors import RateLimited
from qwen_batch.limits import (
    ESTIMATE_MARGIN,
    PAST_PEAK_SPEEDUP,
    RECONFIRM_FLOOR,
    SAMPLE_ANSWERS,
    AdaptiveThrottle,
    Limits,
    RequestRateLimiter,
    TokenRateLimiter,
)


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
# The cases of issue 12 run against a modelled server in tests/test_throttle_sim.py; these
# pin the controller's single moves.

WINDOW_S = 60.0


async def send(throttle: AdaptiveThrottle, clock: FakeClock, n: int, *, every: int = 0, seconds: float,
               kind: str = "requests", tokens: int = 0) -> None:
    """``n`` attempts spread over ``seconds``; every ``every``-th answer is a 429 of ``kind``
    (0: none), the others succeed."""
    for i in range(1, n + 1):
        await throttle.wait_turn(tokens)
        clock.now += seconds / n
        throttle.on_answer(tokens)
        if every and i % every == 0:
            throttle.on_throttled(throttle_429(kind=kind))
        else:
            throttle.on_success()


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
async def test_a_lone_429_without_retry_after_neither_pauses_the_pool_nor_cuts_its_rate() -> None:
    """One 429 is no evidence that the rate caused it: the request's own retry backs off."""
    throttle, clock = fake_throttle(request_rate=100.0)
    await send(throttle, clock, 100, seconds=1.0)
    throttle.on_answer()
    throttle.on_throttled(throttle_429())
    stats = throttle.statistics()
    assert (stats.cooling_down_s, stats.request_rate, stats.decreases, stats.throttled) == (0.0, None, 0, 1)


@pytest.mark.anyio
async def test_a_sample_with_excess_429s_cuts_once_to_what_got_through_and_pauses_the_pool() -> None:
    """10/s with every 5th answer a 429 (20%): cut to 97% of the 8/s that got through."""
    throttle, clock = fake_throttle(request_rate=10.0, window_s=WINDOW_S, default_cooldown_s=1.0)
    await send(throttle, clock, 51, every=5, seconds=5.1)
    stats = throttle.statistics()
    assert stats.decreases == 1
    assert stats.request_rate == pytest.approx(0.97 * 8.0, rel=0.03)
    assert stats.cooling_down_s == pytest.approx(1.0, abs=0.02)


@pytest.mark.anyio
async def test_the_pools_own_cool_down_does_not_lower_the_estimate_a_cut_goes_to() -> None:
    """10/s through, a 5 s Retry-After, then 10/s with a quarter refused: at least 7.5/s got
    through per second the pool could send. Counting the pause (half the 10 s window) as
    sending time would make it about 4.6/s and cut the rate that low."""
    throttle, clock = fake_throttle(request_rate=10.0, window_s=10.0, decrease=0.1)
    await send(throttle, clock, 50, seconds=5.0)
    throttle.on_throttled(throttle_429(retry_after=5.0))
    await send(throttle, clock, 30, every=4, seconds=3.0)
    stats = throttle.statistics()
    assert stats.decreases == 1
    assert stats.request_rate is not None and stats.request_rate >= 0.97 * 7.5


@pytest.mark.anyio
async def test_429s_that_appear_at_a_steady_rate_get_the_whole_decrease_at_once() -> None:
    """Quiet at 100/s, then a fifth refused at the same rate (another client took part of the
    quota): the window is still full of ours, so what got through (80/s) says too little; half."""
    throttle, clock = fake_throttle(request_rate=100.0, window_s=WINDOW_S)
    await send(throttle, clock, 600, seconds=6.0)
    await send(throttle, clock, 60, every=5, seconds=0.6)
    stats = throttle.statistics()
    assert stats.decreases == 1
    assert stats.request_rate == pytest.approx(50.0, rel=0.02)


@pytest.mark.anyio
async def test_a_shallow_cut_that_does_not_move_an_appeared_share_cuts_deeper_before_learning_it() -> None:
    """Quiet, a Retry-After, then a fifth refused: the cut goes to the estimate (78/s); the share
    stays, so a full cut (50/s) is tried before those 429s are learned as rate-independent."""
    throttle, clock = fake_throttle(request_rate=100.0, window_s=WINDOW_S)
    await send(throttle, clock, 600, seconds=6.0)
    throttle.on_throttled(throttle_429(retry_after=1.0))
    await send(throttle, clock, 60, every=5, seconds=0.6)
    stats = throttle.statistics()
    assert stats.decreases == 1 and stats.request_rate == pytest.approx(0.97 * 80.0, rel=0.03)
    await send(throttle, clock, 6000, every=5, seconds=1.2 * WINDOW_S)
    stats = throttle.statistics()
    assert (stats.decreases, stats.restores) == (2, 0) and stats.baseline_share < 0.01  # not learned yet
    assert stats.request_rate == pytest.approx(50.0, rel=0.02)
    await send(throttle, clock, 6000, every=5, seconds=1.2 * WINDOW_S)
    stats = throttle.statistics()
    assert (stats.decreases, stats.restores, stats.request_rate) == (2, 1, None)
    assert stats.baseline_share == pytest.approx(0.2, abs=0.01)


@pytest.mark.anyio
async def test_at_most_one_cut_per_reaction_window() -> None:
    throttle, clock = fake_throttle(request_rate=100.0, window_s=WINDOW_S)
    await send(throttle, clock, 60, every=2, seconds=0.6)  # half refused: cut by half
    rate = throttle.statistics().request_rate
    await send(throttle, clock, 500, every=2, seconds=0.3 * WINDOW_S)  # still half refused
    stats = throttle.statistics()
    assert (stats.decreases, stats.request_rate) == (1, rate)


@pytest.mark.anyio
async def test_a_cut_that_does_not_lower_the_429_share_is_undone_and_the_share_is_learned() -> None:
    """20% refused before the cut and still 20% a window later: those 429s are not ours."""
    throttle, clock = fake_throttle(request_rate=100.0, window_s=WINDOW_S)
    await send(throttle, clock, 60, every=5, seconds=0.6)
    assert throttle.statistics().decreases == 1
    await send(throttle, clock, 6000, every=5, seconds=1.2 * WINDOW_S)
    stats = throttle.statistics()
    assert stats.restores == 1
    assert stats.request_rate is None  # back to not pacing, as before the cut
    assert stats.baseline_share == pytest.approx(0.2, abs=0.01)
    # The learned share is no evidence any more: 20% refused cuts nothing.
    await send(throttle, clock, 6000, every=5, seconds=WINDOW_S)
    assert throttle.statistics().decreases == 1


@pytest.mark.anyio
async def test_a_cut_that_lowers_the_429_share_stays_and_marks_the_limit() -> None:
    throttle, clock = fake_throttle(request_rate=100.0, window_s=WINDOW_S)
    await send(throttle, clock, 60, every=2, seconds=0.6)
    rate = throttle.statistics().request_rate
    clock.now += 1.0
    await send(throttle, clock, int(rate * WINDOW_S), seconds=WINDOW_S)  # no 429s at the new rate
    stats = throttle.statistics()
    assert stats.restores == 0
    assert stats.request_limit_estimate == pytest.approx(rate)


@pytest.mark.anyio
async def test_a_cut_that_lowers_the_share_but_leaves_it_in_excess_learns_what_is_left_after_a_window() -> None:
    """Half refused at 100/s, a cut to 50/s, then a quarter refused there: lower, but still in
    excess of nothing learned. Judged only a whole window after the cut (nothing from before it
    left to blame), right, and the quarter is learned at once: a quarter refused at the knee then
    cuts nothing (left at 0, the next sample would cut again and be judged right against its own
    chance-high share)."""
    throttle, clock = fake_throttle(request_rate=100.0, window_s=WINDOW_S)
    await send(throttle, clock, 60, every=2, seconds=0.6)
    cut_at, n = clock.now, 0
    clock.now += 1.0
    while throttle.statistics().request_limit_estimate is None:
        await answer_one(throttle, clock, refused=n % 4 == 3)
        n += 1
    stats = throttle.statistics()
    assert clock.now - cut_at >= WINDOW_S
    assert (stats.decreases, stats.restores, stats.request_limit_estimate) == (1, 0, pytest.approx(50.0))
    assert stats.baseline_share == pytest.approx(0.25, abs=0.01)
    await send(throttle, clock, 3000, every=4, seconds=WINDOW_S)
    assert throttle.statistics().decreases == 1


@pytest.mark.anyio
async def test_after_the_429s_stop_the_rate_returns_to_the_configured_rate_in_bounded_time() -> None:
    """Once the cut proved right, successes raise the rate additively back to the ceiling:
    slowly just above the limit it found, faster the longer no 429 comes."""
    throttle, clock = fake_throttle(request_rate=100.0, window_s=WINDOW_S, ramp_s=30.0)
    await send(throttle, clock, 60, every=2, seconds=0.6)
    clock.now += 1.0
    await send(throttle, clock, 1500, seconds=0.5 * WINDOW_S)  # the verdict: right
    assert throttle.statistics().request_limit_estimate is not None
    rates = []
    for _ in range(120):  # 2 minutes without a 429
        await send(throttle, clock, 10, seconds=1.0)
        rates.append(throttle.statistics().request_rate)
    assert rates == sorted(rates)
    assert rates[-1] == 100.0
    assert rates.index(100.0) < 100  # within 100 s


async def answer_one(throttle: AdaptiveThrottle, clock: FakeClock, *, refused: bool = False) -> None:
    await send(throttle, clock, 1, every=1 if refused else 0, seconds=0.0)


async def knee_at_half(throttle: AdaptiveThrottle, clock: FakeClock) -> float:
    """Half of 100/s refused: a cut to 50/s, then clean answers, one at a time, until the verdict
    (right) marks the knee. The next sample starts with the answer after it."""
    await send(throttle, clock, 60, every=2, seconds=0.6)
    clock.now += 1.0
    while throttle.statistics().request_limit_estimate is None:
        await answer_one(throttle, clock)
    knee = throttle.statistics().request_limit_estimate
    assert knee == pytest.approx(50.0)
    return knee


@pytest.mark.anyio
async def test_a_probe_at_the_knee_ends_its_sample_at_the_first_two_429s_far_in_excess() -> None:
    """Each further answer at a rate the window refuses is one more 429: no waiting for 50."""
    throttle, clock = fake_throttle(request_rate=100.0, window_s=WINDOW_S)
    await knee_at_half(throttle, clock)
    for i in range(22):
        await answer_one(throttle, clock, refused=i >= 20)
    assert throttle.statistics().decreases == 1
    await answer_one(throttle, clock)  # the 23rd answer of the sample ends it
    assert throttle.statistics().decreases == 2


async def probe_cut_back_to_the_knee(throttle: AdaptiveThrottle, clock: FakeClock) -> tuple[float, float]:
    """From the knee (50/s), clean answers until the probe is 8% above it, then a 429 every tenth
    answer until the cut: back to the knee's neighbourhood. Returns (knee, rate after the cut)."""
    knee = await knee_at_half(throttle, clock)
    while (throttle.statistics().request_rate or 0.0) < 1.08 * knee:
        await answer_one(throttle, clock)
    decreases, n = throttle.statistics().decreases, 0
    while throttle.statistics().decreases == decreases:
        await answer_one(throttle, clock, refused=n % 10 == 9)
        n += 1
    assert n <= SAMPLE_ANSWERS // 2  # the sample ended at its second 429 far in excess
    rate = throttle.statistics().request_rate
    assert rate is not None and RECONFIRM_FLOOR * knee <= rate < knee
    return knee, rate


@pytest.mark.anyio
async def test_a_cut_back_to_the_knee_is_reconfirmed_by_one_clean_sample() -> None:
    """A probe met the limit it found before: one whole sample without excess at the knee ends the
    trial (the rate ramps again at once, from the new knee), instead of a third of a window."""
    throttle, clock = fake_throttle(request_rate=100.0, window_s=WINDOW_S)
    _, rate = await probe_cut_back_to_the_knee(throttle, clock)
    cut_at, n = clock.now, 0
    while throttle.statistics().request_rate == rate:
        await answer_one(throttle, clock)
        n += 1
    assert n <= SAMPLE_ANSWERS + 1 and clock.now - cut_at < 0.1 * WINDOW_S
    assert throttle.statistics().request_limit_estimate == rate


@pytest.mark.anyio
async def test_a_probe_past_the_rate_it_was_cut_from_climbs_to_the_ceiling_fast() -> None:
    """Past the peak (plus ESTIMATE_MARGIN) without excess 429s there is room no probe found at
    this knee (another client stopped): the full ramp-up, PAST_PEAK_SPEEDUP times faster (30 s /
    3 for all of the cut), where the probe's own pace from there takes several times as long."""
    throttle, clock = fake_throttle(request_rate=100.0, window_s=WINDOW_S, ramp_s=30.0)
    knee, _ = await probe_cut_back_to_the_knee(throttle, clock)
    while (throttle.statistics().request_rate or 0.0) <= 1.08 * knee * (1.0 + ESTIMATE_MARGIN):
        await answer_one(throttle, clock)
    passed = clock.now
    while throttle.statistics().request_rate != 100.0:
        await answer_one(throttle, clock)
    assert clock.now - passed <= 30.0 / PAST_PEAK_SPEEDUP + 1.0


@pytest.mark.anyio
async def test_429s_while_the_pool_sends_far_below_its_rate_cut_nothing() -> None:
    """After a cut to 50/s the pool sends only 10/s (its workers wait out retry backoff) and a
    fifth of the answers are 429s: those are not about the rate."""
    throttle, clock = fake_throttle(request_rate=100.0, window_s=WINDOW_S)
    await send(throttle, clock, 60, every=2, seconds=0.6)
    clock.now += WINDOW_S
    await send(throttle, clock, 1500, seconds=0.5 * WINDOW_S)  # right: the trial ends
    decreases = throttle.statistics().decreases
    await send(throttle, clock, 600, every=5, seconds=60.0)
    assert throttle.statistics().decreases == decreases


@pytest.mark.anyio
async def test_with_no_configured_rate_the_first_cut_starts_from_the_observed_rate() -> None:
    throttle, clock = fake_throttle(decrease=0.5, window_s=WINDOW_S)
    await send(throttle, clock, 400, seconds=10.0)  # 40/s
    assert throttle.statistics().request_rate is None
    await send(throttle, clock, 21, every=1, seconds=0.525)  # 40/s, all refused: a sample of 20 cuts
    assert throttle.statistics().request_rate == pytest.approx(20.0, rel=0.05)


@pytest.mark.anyio
async def test_a_tokens_429_cuts_the_token_rate_not_the_request_rate() -> None:
    throttle, clock = fake_throttle(decrease=0.5, window_s=WINDOW_S)
    await send(throttle, clock, 21, every=1, seconds=2.1, kind="tokens", tokens=100)  # 1000 tokens/s
    stats = throttle.statistics()
    assert stats.request_rate is None
    assert stats.token_rate == pytest.approx(500.0, rel=0.05)
    assert stats.throttled_by_kind == {"tokens": 21}


@pytest.mark.anyio
async def test_a_burst_429_ramps_back_more_slowly_than_a_requests_429() -> None:
    ramps = {}
    for kind in ("requests", "burst"):
        throttle, clock = fake_throttle(request_rate=100.0, decrease=0.5, ramp_s=10.0, window_s=WINDOW_S)
        await send(throttle, clock, 21, every=1, seconds=0.21, kind=kind)
        clock.now += 1.0
        await send(throttle, clock, 1500, seconds=0.5 * WINDOW_S)  # right
        throttle._requests.knee = None  # compare the plain ramp, not the probe near the knee
        cut = throttle.statistics().request_rate
        await send(throttle, clock, 2, seconds=2.0)
        ramps[kind] = throttle.statistics().request_rate - cut
    assert ramps["burst"] == pytest.approx(ramps["requests"] / 2, rel=0.05)


@pytest.mark.anyio
async def test_a_429_after_a_cut_before_any_success_waits_longer_each_time() -> None:
    """The server's window is still full of what we sent before the cut: pause 2, 4, 8 s."""
    throttle, clock = fake_throttle(request_rate=100.0, window_s=WINDOW_S, default_cooldown_s=1.0)
    await send(throttle, clock, 21, every=1, seconds=0.21)
    rate = throttle.statistics().request_rate
    pauses = []
    for _ in range(4):
        start = clock.now
        await throttle.wait_turn()
        pauses.append(clock.now - start)
        throttle.on_answer()
        throttle.on_throttled(throttle_429())
    assert throttle.statistics().request_rate == rate
    assert pauses == pytest.approx([1.0, 2.0, 4.0, 8.0], abs=0.05)


def test_the_reaction_window_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen_batch.limits import RATE_WINDOW_ENV, rate_window_s

    monkeypatch.delenv(RATE_WINDOW_ENV, raising=False)
    assert rate_window_s() == 60.0
    for text, expected in (("2.5", 2.5), ("0", 60.0), ("-1", 60.0), ("nan", 60.0), ("soon", 60.0)):
        monkeypatch.setenv(RATE_WINDOW_ENV, text)
        assert rate_window_s() == expected
    monkeypatch.setenv(RATE_WINDOW_ENV, "2")
    assert Limits.from_settings(600).throttle._window_s == 2.0


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


