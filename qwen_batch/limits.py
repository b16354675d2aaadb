"""Rate limits: the configured RPM/TPM, and adapting to the limit the service really has.

aiolimiter lives here and nowhere else (pinned ``aiolimiter>=1.2,<1.4``). Three parts,
bundled by ``Limits`` so the runner has one thing to call before each attempt:

* ``RequestRateLimiter``: the configured requests per minute, spaced evenly.
* ``TokenRateLimiter``: the configured tokens per minute, charged with the worst case
  before sending and refunded with what the reply did not use.
* ``AdaptiveThrottle``: the pool as a whole backs off on 429s that its own rate causes
  (a shared cool-down, then AIMD on the sending rate, each cut checked and undone when it
  did not help), so a service whose real limit is lower than the configured one sees few
  429s, and 429s that do not depend on the rate do not slow the run.

Each is a no-op when its limit is absent.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
from aiolimiter import AsyncLimiter

from .errors import RateLimited

# The service counts requests and tokens per model over one minute (reference section 8.3).
DEFAULT_WINDOW_S = 60.0
# Stay this fraction under a configured limit, for clock drift between us and the server.
DEFAULT_MARGIN = 0.005
# The request bucket holds this many seconds of requests.
BURST_S = 0.05
# The token bucket holds this fraction of a minute's tokens, so one ordinary request fits.
DEFAULT_TOKEN_BURST_FRACTION = 0.05
# The environment variable that tells the throttle the service's rate-limit window, when
# it is not DashScope's minute (an emulator run with --rate-window, say).
RATE_WINDOW_ENV = "QWEN_BATCH_RATE_WINDOW_S"
# The adaptive throttle's ramp-up never slows below this fraction of its largest cut.
MIN_STEP_FRACTION = 0.25
# A cut made from the estimated limit sets the rate this fraction under it.
ESTIMATE_MARGIN = 0.03
# Near the estimated server limit, the ramp-up probes by this fraction of it per ramp_s at
# first, doubling every PROBE_DOUBLING of the reaction window while no cut comes.
PROBE_FRACTION = 0.02
PROBE_DOUBLING = 0.15
# The rate-independent share is never taken to be more than this (nearly every request
# refused whatever the rate is an outage of its own, left to the retries).
MAX_BASELINE = 0.9
# A cut is judged right as soon as, from this fraction of the reaction window after it (the
# server's window has forgotten much of what we sent before), the 429 share is clearly lower.
EARLY_VERDICT = 0.35
# Outside trials, at a rate that proved right, each sample moves the rate-independent share
# this fraction of the way to its own share.
BASELINE_LEARNING = 0.05
# A sample of the 429 share ends after this many answers, or after SAMPLE_TIME of the
# reaction window with at least MIN_SAMPLE_ANSWERS answers (a slow pool), or early when at
# least MIN_SAMPLE_ANSWERS answers are mostly 429s (a full server window: react at once).
SAMPLE_ANSWERS = 50
MIN_SAMPLE_ANSWERS = 20
SAMPLE_TIME = 1 / 6
# A sample's 429 share is excess (ours) when it is above the rate-independent share by at
# least MIN_EXCESS and by EXCESS_SIGMAS standard deviations of that share over the sample.
MIN_EXCESS = 0.03
EXCESS_SIGMAS = 3.0
# 429s that appear at a steady rate take the whole decrease only when this many standard
# deviations above the expected share (twice the evidence a cut needs: 16 of 50 answers at a
# learned 15% are 3 deviations, and come by chance about once in a few hundred samples).
STEADY_EXCESS_SIGMAS = 6.0
# A sample refused at least this much met a full server window: what the window let through of
# ours over its whole length is then exactly what is left for us, even early in a run.
FULL_WINDOW_SHARE = 0.75
# While probing at or above the knee, a sample ends as soon as it holds this many 429s in excess
# by STEADY_EXCESS_SIGMAS: the probe has met the limit again, and each further answer at that
# rate would be one more 429 in the saw-tooth.
FAST_END_REFUSED = 2
# A cut that lands at no less than this fraction of the knee (twice ESTIMATE_MARGIN under it)
# went back to a limit already found: a reconfirmation, judged on one sample (see _follow_trial).
RECONFIRM_FLOOR = (1.0 - ESTIMATE_MARGIN) ** 2
# A probe past the peak (see _past_peak) ramps this many times faster than the ordinary ramp-up:
# room that no probe at this knee found before is another client gone (a choice, not derived:
# 3 brought case 5's climb back within a minute for seeds 0-49, BENCHMARKS.md).
PAST_PEAK_SPEEDUP = 3.0


def rate_window_s() -> float:
    """The service's rate-limit window: ``QWEN_BATCH_RATE_WINDOW_S`` when set to a positive
    number of seconds, else DashScope's minute. Read when called."""
    text = os.environ.get(RATE_WINDOW_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_WINDOW_S
    except ValueError:
        return DEFAULT_WINDOW_S
    return value if math.isfinite(value) and value > 0 else DEFAULT_WINDOW_S


def _bucket_rate(limit: float, bucket: float, window_s: float, margin: float) -> float:
    """The leak rate (per second) so that ``bucket + rate * window_s <= limit``: a full
    bucket plus a window of steady sending never exceeds the limit in any window."""
    return max(min(limit * (1.0 - margin), limit - bucket), limit * 0.5) / window_s


class RequestRateLimiter:
    """At most ``requests_per_minute`` requests in any window, spaced evenly.

    aiolimiter's ``AsyncLimiter(rpm, 60)`` lets a whole minute's requests through at once,
    which a sliding-window server answers with 429s. Here the bucket holds 50 ms of
    requests (at least 1) and leaks at ``(limit * 0.995 - bucket) / window``,
    so the start is smooth and any window of the server's length sees at most the limit.
    ``server_window_s``: the server's window when it is not ``window_s`` (a scaled-down
    emulator): the bucket then has to fit under that window's share of the limit.
    """

    def __init__(
        self,
        requests_per_minute: float,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        margin: float = DEFAULT_MARGIN,
        server_window_s: float | None = None,
    ) -> None:
        if requests_per_minute <= 0:
            raise ValueError(f"requests_per_minute must be positive, not {requests_per_minute}")
        self.requests_per_minute = requests_per_minute
        # A bucket of 50 ms of requests (at least 1) absorbs late timer wake-ups, which a
        # bucket of exactly 1 turns into lost capacity (-20% measured at 120 req/s).
        bucket = max(1.0, math.floor(requests_per_minute / window_s * BURST_S))
        span = server_window_s or window_s
        limit = requests_per_minute * span / window_s
        # The margin for clock drift comes on top of the bucket: at hundreds of requests per
        # second in a window of seconds, a bucket as large as the margin left no room for jitter.
        self.rate_per_s = _bucket_rate(limit, bucket + limit * margin, span, 0.0)
        self._limiter = AsyncLimiter(bucket, bucket / self.rate_per_s)

    def __repr__(self) -> str:
        return f"RequestRateLimiter(requests_per_minute={self.requests_per_minute})"

    async def wait(self) -> None:
        """Return when one more request may be sent."""
        await self._limiter.acquire(1)

    def has_room(self) -> bool:
        """Whether one more request may be sent now, without waiting."""
        return self._limiter.has_capacity(1)

    def take(self) -> None:
        """Charge one request now; only right after ``has_room`` said yes."""
        _charge(self._limiter, 1.0)


def _charge(limiter: AsyncLimiter, amount: float) -> None:
    """What ``AsyncLimiter.acquire`` does once it has capacity, without its coroutine: the
    hot path charges every request, nearly always with room to spare. ``_level`` and
    ``_wake_next`` as in ``_RefundableLimiter``."""
    limiter._level += amount
    limiter._wake_next()


class _RefundableLimiter(AsyncLimiter):
    """An AsyncLimiter that can give capacity back.

    aiolimiter has no refund; ``refund`` lowers the private ``_level`` after leaking it
    to now, then wakes waiters. ``_level``, ``_leak`` and ``_wake_next`` exist with these
    meanings in aiolimiter 1.2 and 1.3, the versions pyproject allows.
    """

    def refund(self, amount: float) -> None:
        self._leak()
        self._level = max(0.0, self._level - amount)
        self._wake_next()


class TokenRateLimiter:
    """At most ``tokens_per_minute`` tokens charged per window.

    ``acquire(tokens)`` charges the worst case (input + max_tokens) before sending; a
    charge larger than the bucket (5% of the minute's tokens) is clamped to the bucket so
    it can still go. ``refund(tokens)`` gives back what the reply did not use; capacity
    that has already leaked away is not given back twice.
    """

    def __init__(
        self,
        tokens_per_minute: float,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        margin: float = DEFAULT_MARGIN,
        burst_fraction: float = DEFAULT_TOKEN_BURST_FRACTION,
    ) -> None:
        if tokens_per_minute <= 0:
            raise ValueError(f"tokens_per_minute must be positive, not {tokens_per_minute}")
        self.tokens_per_minute = tokens_per_minute
        self.bucket = max(1.0, tokens_per_minute * burst_fraction)
        self.rate_per_s = _bucket_rate(tokens_per_minute, self.bucket, window_s, margin)
        self._limiter = _RefundableLimiter(self.bucket, self.bucket / self.rate_per_s)

    def __repr__(self) -> str:
        return f"TokenRateLimiter(tokens_per_minute={self.tokens_per_minute})"

    async def acquire(self, tokens: int) -> float:
        """Wait until ``tokens`` may be charged, charge them; return the amount charged."""
        amount = self.charge_of(tokens)
        await self._limiter.acquire(amount)
        return amount

    def charge_of(self, tokens: int) -> float:
        """What ``acquire(tokens)`` charges (clamped to the bucket)."""
        return min(float(max(tokens, 0)), self.bucket)

    def has_room(self, tokens: int) -> bool:
        """Whether ``tokens`` may be charged now, without waiting."""
        return self._limiter.has_capacity(self.charge_of(tokens))

    def take(self, tokens: int) -> float:
        """Charge ``tokens`` now and return the amount; only right after ``has_room`` said yes."""
        amount = self.charge_of(tokens)
        _charge(self._limiter, amount)
        return amount

    def refund(self, tokens: float) -> None:
        """Give back ``tokens`` charged but not used."""
        if tokens > 0:
            self._limiter.refund(tokens)


@dataclass(frozen=True, slots=True)
class ThrottleStatistics:
    """A snapshot of the adaptive throttle. Rates are per second; ``None`` is unlimited.

    ``baseline_share`` is the share of 429s the throttle has learned not to blame on its own
    rate (requests); ``restores`` counts cuts that were undone because they did not help.
    """

    request_rate: float | None
    token_rate: float | None
    request_limit_estimate: float | None
    throttled: int
    throttled_by_kind: dict[str, int]
    cooldowns: int
    cooling_down_s: float
    decreases: int
    restores: int = 0
    baseline_share: float = 0.0


class AdaptiveThrottle:
    """Slows the whole pool down when the evidence says the service's 429s are ours.

    A 429 does not say whose fault it is. Ours are the ones our rate causes: a server
    window full of our requests (``Throttling.RateQuota``, kind "requests"), of our tokens
    (``Throttling.AllocationQuota``, "tokens"), or a burst (``Throttling.BurstRate``,
    "burst"). Not ours: a node refusing at random, or another client taking part of the
    quota (DashScope's limits are per account and model, summed over all keys). Cutting on
    every 429 collapses a run under a steady share of 429s that do not depend on the rate,
    so the throttle acts only on evidence, and checks that what it did helped.

    State, kept apart for requests (requests and burst 429s) and tokens (tokens 429s):

    * ``rate``: the sending rate it paces at; ``None`` (no pacing of its own: the fixed
      limiters do it) until the first cut. Never above the ceiling (the configured rate).
    * ``baseline``: the 429 share it has learned to expect whatever the rate (0 at first).
    * ``knee``: the last rate a cut proved right, the estimate of the limit left for us.
    * a *trial*: after a cut, the rate before it and the 429 share that caused it.
    * the *peak*: the highest rate cut from at this knee (see the ramp-up below).

    What moves it:

    * Answers are counted in *samples* (``SAMPLE_ANSWERS`` answers; fewer when the pool is
      slow or nearly everything is refused, or when a probe at or above the knee meets
      ``FAST_END_REFUSED`` 429s far in excess, ``STEADY_EXCESS_SIGMAS``: the limit found again,
      where each further answer would be one more 429). A sample whose 429 share is above ``baseline``
      by more than its noise (``MIN_EXCESS`` and ``EXCESS_SIGMAS`` standard deviations),
      while the pool was really sending near its rate, is evidence: the rate is cut
      (multiplicative decrease), at most by ``decrease``, to 3% under the estimated limit.
      That estimate is the lower of two rates of answers that were not refused, each per
      second the pool could send (its own cool-downs do not count, so backoff never drags
      the estimate down): over the service's window, and over the sample (which sees a
      newcomer taking part of a window we had filled alone). Both are divided by
      ``1 - baseline``: the share refused at random needs sending too. A
      sample refused ``FULL_WINDOW_SHARE`` or more met a full window: the sample's own rate
      then says nothing (about zero got through), and the window's count is taken over its
      whole length even early in a run (the start's burst filled it faster than it empties).
      429s that *appear* at a steady rate (after a sample without excess at no lower rate,
      no cool-down between) and far above the noise (``STEADY_EXCESS_SIGMAS``) were not
      caused by the rate: a newcomer taking part of the quota may have, and what it takes
      does not show yet in a window still full of ours, so that cut takes the whole
      ``decrease``.
    * A cut starts a trial; no other cut until it ends, so at most one per reaction window
      (``window_s``: the service's rate-limit window, the time a sliding window needs to
      forget what we sent before the cut). From ``EARLY_VERDICT`` of the window on, a
      429 share clearly lower than the one that caused the cut and no longer in excess ends
      it: the cut was right and its rate is the ``knee``. Otherwise the verdict waits a whole
      window (a share still in excess is judged only once nothing we sent before the cut can
      have caused it), until the server's window holds nothing from before the cut: lower still,
      right (and a share still in excess there is what the lower rate could not remove:
      refused whatever the rate, so it becomes the ``baseline`` at once; with nothing
      learned yet, the sample that caused the cut was often just high by chance, and the
      next ordinary one would otherwise cut and be judged right the same way); no different,
      the cut was wrong: the rate before it is restored and that share (over all the
      trial's answers) becomes the ``baseline`` (429s that do not depend on the rate thus
      cost one cut for one window, and can never push the rate to a floor); higher, the cut
      was too shallow and the next sample with excess 429s cuts again. One exception: a
      share that appeared after quiet samples, that a cut shallower than ``decrease`` did
      not move and that is still in excess may be larger than that cut, so the whole
      ``decrease`` is tried for another trial before the share is learned (a cut judged
      right lowers ``baseline`` only as far as its answers show: a share learned low by
      chance would make random 429s look like excess). A *reconfirmation*, a cut that lands
      back at the knee or above it (no lower than ``RECONFIRM_FLOOR`` of it: typically a probe
      above it met the limit again), needs less: the first whole sample after it without excess 429s shows the
      knee still holds and ends the trial (waiting for the early verdict held the rate at the
      knee a third of a window each saw-tooth, the main delay in seeing another client stop).
    * Outside a trial, each success raises the rate linearly in time (additive increase),
      back to the ceiling within ``ramp_s``. At or above the ``knee`` it first probes at
      ``PROBE_FRACTION`` of the knee per ``ramp_s``, doubling every ``PROBE_DOUBLING``
      window without a cut: gently near a real limit (few 429s per saw-tooth), quickly back
      when another client stops. A whole window at or above the knee without a cut raises
      the knee to the rate. At a rate that proved right, the share still refused is
      learned into ``baseline`` slowly (``BASELINE_LEARNING`` per sample). The *peak* is the
      highest rate a cut came from since the last cut that was not a reconfirmation: as far as
      a probe gets at this knee before the window refuses it. A probe that passes the peak by
      ``ESTIMATE_MARGIN`` with no excess 429s since the verdict has found room no probe found
      before (another client stopped, say): it ramps ``PAST_PEAK_SPEEDUP`` times the full
      speed of the ramp-up, not the probe's.
    * The pool pauses as a whole (a shared cool-down: nobody sends, and requests already
      waiting their turn queue again behind it) on a ``Retry-After`` (always honoured), on a
      cut (``default_cooldown_s``), and on a 429 during a trial before any success since
      the cut (the server's window is still full: the pause doubles each time, up to
      ``max_cooldown_s``). No other 429 pauses anybody: that request's own retry backs
      off, so a random 429 does not stall the pool.

    Errors that are not 429s (5xx, resets, timeouts) are answers like any other: an outage
    neither cuts the rate nor counts as evidence. ``ramp_s``, ``default_cooldown_s`` and
    ``max_cooldown_s`` default to 30 s, 1 s and 10 s for a one-minute window and scale
    with ``window_s``. ``clock`` and ``sleep`` are seams: tests pass a fake clock and a
    sleep that advances it (tests/throttle_sim.py drives the pool against a modelled server).
    """

    def __init__(
        self,
        *,
        request_rate: float | None = None,
        token_rate: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        decrease: float = 0.5,
        ramp_s: float | None = None,
        default_cooldown_s: float | None = None,
        max_cooldown_s: float | None = None,
        min_request_rate: float = 0.05,
        busy_fraction: float = 0.5,
        window_s: float = DEFAULT_WINDOW_S,
    ) -> None:
        if not 0.0 < decrease < 1.0:
            raise ValueError("decrease must be in (0, 1)")
        if not 0.0 <= busy_fraction <= 1.0:
            raise ValueError("busy_fraction must be in [0, 1]")
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self._clock = clock
        self._sleep = sleep
        # Unless given, the time constants scale with the window (30 s, 1 s, 10 s for a minute).
        scale = window_s / DEFAULT_WINDOW_S
        self._ramp_s = ramp_s if ramp_s is not None else 30.0 * scale
        self._default_cooldown_s = default_cooldown_s if default_cooldown_s is not None else 1.0 * scale
        self._max_cooldown_s = max_cooldown_s if max_cooldown_s is not None else 10.0 * scale
        self._busy_fraction = busy_fraction
        self._window_s = window_s
        now = clock()
        self._requests = _RateController(request_rate, now, decrease=decrease, floor=min_request_rate, window_s=window_s)
        self._tokens = _RateController(token_rate, now, decrease=decrease, floor=1.0, window_s=window_s)
        self._cooldown_until = -math.inf
        # Time spent cooling down, so observed rates count only the time the pool could
        # send: finished cool-downs add up in ``_paused_before``; the current one runs
        # from ``_pause_start`` to ``_cooldown_until``.
        self._pause_start = 0.0
        self._paused_before = 0.0
        # The cool-downs of the last window, [start, end] oldest first, for the estimate of the
        # server's limit (what got through per second the pool could send).
        self._pauses: deque[list[float]] = deque()
        self._epoch = 0
        self._throttled = 0
        self._throttled_by_kind: dict[str, int] = {}
        self._cooldowns = 0
        self._successes_since_cut = 0
        self._backoff = self._default_cooldown_s
        self._sample = _Sample(now, 0.0)

    def __repr__(self) -> str:
        return f"AdaptiveThrottle(request_rate={self._requests.rate}, token_rate={self._tokens.rate})"

    @property
    def epoch(self) -> int:
        """Changes whenever a cool-down starts or grows: a slot granted before it is stale."""
        return self._epoch

    def _paused(self, now: float) -> float:
        """Seconds spent cooling down up to ``now``."""
        current = min(now, self._cooldown_until) - self._pause_start
        return self._paused_before + (current if current > 0 else 0.0)

    async def wait_turn(self, tokens: int = 0) -> None:
        """Wait out any cool-down and this request's slot at the current rates."""
        clock = self._clock
        now = clock()
        while True:
            start = max(now, self._cooldown_until)
            requests, token_rate = self._requests, self._tokens
            if requests.rate is not None:
                start = max(start, requests.next_slot)
                requests.next_slot = start + 1.0 / requests.rate
            if token_rate.rate is not None and tokens > 0:
                start = max(start, token_rate.next_slot)
                token_rate.next_slot = start + tokens / token_rate.rate
            if start <= now:
                break
            epoch = self._epoch
            await self._sleep(start - now)
            now = clock()
            if epoch == self._epoch and now >= self._cooldown_until:
                break
            # A 429 arrived while we waited: our slot was planned at the old rate.
        self._count_sent(now, tokens)

    def turn_now(self, tokens: int = 0) -> bool:
        """``wait_turn`` when it would not wait (no cool-down, no paced slot ahead), without its
        coroutine: True when the turn was taken, False (nothing changed) when it must wait."""
        now = self._clock()
        if now < self._cooldown_until:
            return False
        requests, token_rate = self._requests, self._tokens
        paces_tokens = token_rate.rate is not None and tokens > 0
        if (requests.rate is not None and requests.next_slot > now) or (paces_tokens and token_rate.next_slot > now):
            return False
        if requests.rate is not None:
            requests.next_slot = now + 1.0 / requests.rate
        if paces_tokens:
            token_rate.next_slot = now + tokens / token_rate.rate  # type: ignore[operator]
        self._count_sent(now, tokens)
        return True

    def _count_sent(self, now: float, tokens: int) -> None:
        sample = self._sample
        if sample.sent == 0 and sample.answers == 0:
            # A sample's sending time starts with its first request: the first one's would
            # otherwise count the run's start-up before it (and cut from a rate never tried).
            sample.start = now
        sample.sent += 1
        sample.sent_tokens += tokens

    def on_answer(self, tokens_used: int = 0) -> None:
        """An attempt got an answer, whatever it was (a 429 is then also told to ``on_throttled``);
        ``tokens_used``: the tokens the service counted for it."""
        now = self._clock()
        if tokens_used > 0:
            self._tokens.admitted(now, tokens_used)
        sample = self._sample
        if sample.answers >= MIN_SAMPLE_ANSWERS and (
            sample.answers >= SAMPLE_ANSWERS
            or now - sample.start >= SAMPLE_TIME * self._window_s
            or (sample.refused_requests + sample.refused_tokens) * 4 > sample.answers * 3
            or (sample.refused_requests >= FAST_END_REFUSED  # cheap first: this runs on every answer
                and self._requests.overshoots(sample.answers, sample.refused_requests))
        ):
            self._end_sample(now)
        self._sample.answers += 1

    def _paused_since(self, start: float, now: float) -> float:
        """Seconds spent cooling down between ``start`` and ``now``."""
        pauses = self._pauses
        while pauses and pauses[0][1] <= now - self._window_s:
            pauses.popleft()
        return sum(max(0.0, min(end, now) - max(begin, start)) for begin, end in pauses)

    def _end_sample(self, now: float) -> None:
        sample = self._sample
        paused = self._paused(now)
        active = max(now - sample.start - (paused - sample.paused_at_start), 1e-3)
        busy = self._busy_fraction
        paused_in = paused > sample.paused_at_start
        cut = self._requests.judge(
            now, sample.answers, sample.refused_requests, sample.sent / active, busy, self._paused_since,
            ramp_factor=2.0 if sample.refused_bursts * 2 > sample.refused_requests else 1.0, paused_in=paused_in,
        )
        cut = self._tokens.judge(
            now, sample.answers, sample.refused_tokens, sample.sent_tokens / active, busy, self._paused_since,
            paused_in=paused_in,
        ) or cut
        self._sample = _Sample(now, paused)
        if cut:
            self._successes_since_cut = 0
            self._backoff = self._default_cooldown_s
            self._cooldowns += 1
            self._pause(now, self._default_cooldown_s)

    def on_success(self) -> None:
        """A request went through: ramp the rates up (after any cool-down, outside a trial)."""
        self._successes_since_cut += 1
        now = self._clock()
        self._requests.admitted(now, 1)
        if now < self._cooldown_until:
            return
        self._requests.increase(now, self._ramp_s)
        self._tokens.increase(now, self._ramp_s)

    def on_throttled(self, error: RateLimited) -> None:
        """A 429: count it as evidence; pause the pool only when the server asks or its window is full."""
        now = self._clock()
        self._throttled += 1
        kind = error.kind
        self._throttled_by_kind[kind] = self._throttled_by_kind.get(kind, 0) + 1
        sample = self._sample
        if kind == "tokens":
            sample.refused_tokens += 1
        else:
            sample.refused_requests += 1
            sample.refused_bursts += kind == "burst"
        cooling = now < self._cooldown_until
        if error.retry_after is not None:
            if not cooling:
                self._cooldowns += 1
            self._pause(now, error.retry_after)
            return
        in_trial = self._tokens.in_trial if kind == "tokens" else self._requests.in_trial
        if cooling or not in_trial or self._successes_since_cut > 0:
            return
        # After a cut and before any success: the server's window is still full of what we
        # sent before it. Wait longer each time instead of sending into it.
        self._backoff = min(self._backoff * 2, self._max_cooldown_s)
        self._cooldowns += 1
        self._pause(now, self._backoff)

    def _pause(self, now: float, pause: float) -> None:
        """Make nobody send before ``now + pause`` (a longer cool-down already running stays)."""
        if now + pause <= self._cooldown_until:
            return
        if now >= self._cooldown_until:
            self._paused_before = self._paused(now)
            self._pause_start = now
            self._pauses.append([now, now + pause])
        else:
            self._pauses[-1][1] = now + pause
        self._cooldown_until = now + pause
        self._epoch += 1
        # Every waiter queues again behind the cool-down (see wait_turn).
        self._requests.next_slot = self._tokens.next_slot = self._cooldown_until

    def statistics(self) -> ThrottleStatistics:
        """A snapshot of the current rates and 429 counts."""
        requests, tokens = self._requests, self._tokens
        return ThrottleStatistics(
            request_limit_estimate=requests.knee,
            request_rate=requests.rate,
            token_rate=tokens.rate,
            throttled=self._throttled,
            throttled_by_kind=dict(self._throttled_by_kind),
            cooldowns=self._cooldowns,
            cooling_down_s=max(0.0, self._cooldown_until - self._clock()),
            decreases=requests.decreases + tokens.decreases,
            restores=requests.restores + tokens.restores,
            baseline_share=requests.baseline,
        )


@dataclass(slots=True)
class _Sample:
    """Answers, 429s and sends counted since ``start`` (the pool's pause time then: ``paused_at_start``)."""

    start: float
    paused_at_start: float
    answers: int = 0
    refused_requests: int = 0  # "requests" and "burst" 429s
    refused_bursts: int = 0
    refused_tokens: int = 0
    sent: int = 0
    sent_tokens: int = 0


@dataclass(slots=True)
class _Trial:
    """A cut under test: what it replaced, what caused it, and the 429s seen since."""

    rate_before: float | None
    share_before: float  # of the sample that caused the cut
    answers_before: int
    early_from: float  # EARLY_VERDICT of a window after the cut
    clean_from: float  # a whole window after the cut
    base: float  # the rate the cut was made from
    appeared: bool  # the 429s came after a sample without excess: something changed
    reconfirm: bool = False  # the cut went back to the knee (see RECONFIRM_FLOOR)
    deep: bool = False  # the second, deeper cut of an appeared share that a shallow cut did not move
    answers: int = 0  # since early_from
    refused: int = 0
    clean_answers: int = 0  # since a whole window after the cut
    clean_refused: int = 0


def _excess(share: float, baseline: float, answers: int, sigmas: float = EXCESS_SIGMAS) -> bool:
    """Whether ``share`` over ``answers`` answers is above ``baseline`` by more than its noise
    (``MIN_EXCESS``, or ``sigmas`` standard deviations of the share over that many answers)."""
    noise = sigmas * math.sqrt(baseline * (1.0 - baseline) / answers)
    return share > baseline + max(MIN_EXCESS, noise)


def _differs(before: float, n_before: int, after: float, n_after: int) -> int:
    """-1 when the share ``after`` is lower than ``before`` by more than two standard errors
    (of the pooled share, which holds for few 429s too), 1 when it is higher by as much, else 0."""
    pooled = (before * n_before + after * n_after) / (n_before + n_after)
    noise = max(MIN_EXCESS / 2, 2.0 * math.sqrt(pooled * (1.0 - pooled) * (1.0 / n_before + 1.0 / n_after)))
    return -1 if after < before - noise else 1 if after > before + noise else 0


class _TrailingCount:
    """How much was added over the last ``horizon_s`` seconds, kept per slot of
    ``horizon_s / slots`` seconds so memory does not grow with the rate."""

    __slots__ = ("_horizon_s", "_slot_s", "_counts", "_total", "first")

    def __init__(self, horizon_s: float, slots: int = 240) -> None:
        self._horizon_s = horizon_s
        self._slot_s = horizon_s / slots
        self._counts: deque[list[int]] = deque()  # [slot number, count], oldest first
        self._total = 0
        self.first: float | None = None  # when the first was added

    def add(self, now: float, n: int) -> None:
        if self.first is None:
            self.first = now
        slot = int(now // self._slot_s)
        counts = self._counts
        if counts and counts[-1][0] == slot:
            counts[-1][1] += n
        else:
            counts.append([slot, n])
        self._total += n

    def count(self, now: float) -> int:
        oldest = int((now - self._horizon_s) // self._slot_s)
        counts = self._counts
        while counts and counts[0][0] <= oldest:
            self._total -= counts.popleft()[1]
        return self._total


class _RateController:
    """One rate (per second) the throttle controls, with its evidence and next free slot (GCRA)."""

    __slots__ = (
        "ceiling", "rate", "next_slot", "knee", "baseline", "decreases", "restores", "_decrease", "_floor",
        "_window_s", "_trial", "_admitted", "_last_increase", "_probe_start", "_knee_since", "_step", "_largest_cut",
        "_ramp_factor", "_quiet", "_steady_rate", "_peak_rate", "_excess_since_verdict",
    )

    def __init__(self, ceiling: float | None, now: float, *, decrease: float, floor: float, window_s: float) -> None:
        self.ceiling = ceiling if ceiling is not None else math.inf
        self.rate: float | None = None  # no pacing of our own until the first cut
        self.next_slot = -math.inf
        self.knee: float | None = None  # the estimated server limit, once a cut proved right
        self.baseline = 0.0
        self.decreases = 0
        self.restores = 0
        self._decrease = decrease
        self._floor = floor
        self._window_s = window_s
        self._trial: _Trial | None = None
        self._admitted = _TrailingCount(window_s)  # successes (requests, or tokens) over the window
        self._last_increase = now
        self._probe_start = now  # the probe's doubling counts from the last verdict
        self._knee_since = now
        self._step = 0.0
        self._largest_cut = 0.0
        self._ramp_factor = 1.0
        self._quiet = False  # a sample without excess 429s since the start or the last restore
        # The rate of the last such sample when no cool-down came since (else None).
        self._steady_rate: float | None = None
        # The highest rate cut from since the last cut that was not a reconfirmation (None before
        # a knee): as far as a probe gets at this knee before the window refuses it.
        self._peak_rate: float | None = None
        self._excess_since_verdict = False  # a sample with excess 429s since the last verdict

    @property
    def in_trial(self) -> bool:
        return self._trial is not None

    def admitted(self, now: float, amount: int) -> None:
        """``amount`` (one request, or its tokens) went through the server's window."""
        self._admitted.add(now, amount)

    def overshoots(self, answers: int, refused: int) -> bool:
        """Whether a probe at or above the knee has met the limit again: ``refused`` of ``answers``
        so far are ``FAST_END_REFUSED`` or more and far in excess (``STEADY_EXCESS_SIGMAS``)."""
        knee, rate = self.knee, self.rate
        return (refused >= FAST_END_REFUSED and self._trial is None and knee is not None and rate is not None
                and rate >= knee * (1.0 - ESTIMATE_MARGIN)
                and _excess(refused / answers, self.baseline, answers, STEADY_EXCESS_SIGMAS))

    def judge(
        self, now: float, answers: int, refused: int, sent_rate: float, busy_fraction: float,
        paused_since: Callable[[float, float], float], *, ramp_factor: float = 1.0, paused_in: bool = False,
    ) -> bool:
        """One finished sample (``sent_rate``: per second of sending time in it, cool-downs
        excluded; ``paused_since(start, now)``: the pool's cool-downs in between; ``paused_in``:
        it spans one): feed the trial, or cut on excess 429s. True when it cut."""
        if answers <= 0:
            return False
        if paused_in:
            self._steady_rate = None
        trial = self._trial
        if trial is not None:
            return self._follow_trial(now, trial, answers, refused)
        share = refused / answers
        if refused < 2 or not _excess(share, self.baseline, answers):
            self._quiet = True
            if not paused_in:
                self._steady_rate = self.rate if self.rate is not None else self.ceiling
            if self.rate is None or (self.knee is not None and self.rate <= self.knee):
                # At a rate that proved right (or not pacing at all), what is still refused
                # is refused whatever the rate: learn it, slowly.
                self.baseline += BASELINE_LEARNING * (min(share, MAX_BASELINE) - self.baseline)
            return False
        self._excess_since_verdict = True
        if self.rate is not None and sent_rate < busy_fraction * self.rate:
            return False  # not sending near the rate: these 429s are not about the rate
        self._cut(now, share, answers, sent_rate, paused_since, ramp_factor)
        return True

    def _cut(
        self, now: float, share: float, answers: int, sent_rate: float,
        paused_since: Callable[[float, float], float], ramp_factor: float,
    ) -> None:
        before = self.rate
        base = min(before if before is not None else self.ceiling, max(sent_rate, self._floor))
        # A window that refuses nearly everything is full: what it let through of ours over
        # its whole length is what is left for us, however we paced or paused inside it.
        # Otherwise it may not be full (429s at random): what got through per second the pool
        # could send (neither an idle start nor our own cool-downs count), and the sample's
        # own rate, which sees a newcomer taking part of a window we had filled alone. Each
        # alone can be too high, so the lower; and send more by the share refused at random.
        if share >= FULL_WINDOW_SHARE:
            estimate = self._admitted.count(now) / self._window_s
        else:
            first = self._admitted.first
            start = max(now - self._window_s, first if first is not None else now)
            sending_s = now - start - paused_since(start, now)
            estimate = min(self._admitted.count(now) / max(sending_s, self._window_s / 60.0), sent_rate * (1.0 - share))
        estimate /= 1.0 - self.baseline
        target = min(base, estimate) * (1.0 - ESTIMATE_MARGIN)
        steady = self._steady_rate
        trial = _Trial(before, share, answers, 0.0, 0.0, base, appeared=self._quiet)
        rate = max(self._floor, base * self._decrease, target)
        if (steady is not None and (before if before is not None else self.ceiling) <= steady
                and _excess(share, self.baseline, answers, STEADY_EXCESS_SIGMAS)):
            # 429s that appeared at a rate that had none, without a pause between, and far above
            # the noise (a chance-high sample is judged "right" by the next, which is lower by
            # chance: a half cut on one would cost a window): the rate did not cause them, a
            # newcomer taking part of the quota may have. What it takes does not show yet (the
            # window is still full of ours), so cut by the whole decrease; a verdict of no change
            # restores. (Across a pause the window's count does show it.)
            rate, trial.deep = max(self._floor, base * self._decrease), True
        knee = self.knee
        trial.reconfirm = knee is not None and before is not None and rate >= knee * RECONFIRM_FLOOR
        if knee is None or before is None:
            self._peak_rate = None
        elif trial.reconfirm and self._peak_rate is not None:
            self._peak_rate = max(self._peak_rate, base)
        else:
            self._peak_rate = base
        self._start_trial(now, trial, rate, ramp_factor)

    def _start_trial(self, now: float, trial: _Trial, rate: float, ramp_factor: float) -> None:
        """Cut to ``rate`` and judge it from now on."""
        base = trial.base
        self.rate = rate
        self.next_slot = max(self.next_slot, now)
        self.decreases += 1
        trial.early_from, trial.clean_from = now + EARLY_VERDICT * self._window_s, now + self._window_s
        self._trial = trial
        # Regain the cut over the ramp, never slower than a quarter of the largest cut so far,
        # nor than what gets back to the ceiling in one ramp.
        self._largest_cut = max(self._largest_cut, base - self.rate)
        self._step = max(base - self.rate, self._largest_cut * MIN_STEP_FRACTION)
        if self.ceiling < math.inf:
            self._step = max(self._step, self.ceiling - self.rate)
        self._ramp_factor = ramp_factor

    def _follow_trial(self, now: float, trial: _Trial, answers: int, refused: int) -> bool:
        """Judge the cut under test. From ``EARLY_VERDICT`` of a window after it (the server's window
        has forgotten much of what we sent before): right as soon as the 429 share is clearly
        lower and no longer in excess. Anything else is judged from a whole window after it (nothing from before is
        left there): still lower is right, no change is wrong, higher was too shallow. That
        verdict takes ``2 * SAMPLE_ANSWERS`` answers, or a second window when fewer come: a
        short window holds few answers, and a verdict on 20 of them restores too many cuts
        that were right (and learns their 429s as the rate-independent share). True when it cut
        deeper (see ``_end_trial``). A reconfirmation needs less: the first whole sample without
        excess 429s shows that the knee holds (the 429s that caused it were the probe's overshoot,
        as every time before at this knee)."""
        if trial.reconfirm and answers >= SAMPLE_ANSWERS and not _excess(refused / answers, self.baseline, answers):
            self.knee = self.rate
            self._close_trial(now)
            return False
        if now <= trial.early_from:
            return False
        before, n_before = trial.share_before, trial.answers_before
        trial.answers += answers
        trial.refused += refused
        share = trial.refused / trial.answers
        if (trial.answers >= 2 * SAMPLE_ANSWERS and _differs(before, n_before, share, trial.answers) < 0
                and not _excess(share, self.baseline, trial.answers)):
            return self._end_trial(now, -1, share)
        if now <= trial.clean_from:
            return False
        trial.clean_answers += answers
        trial.clean_refused += refused
        if trial.clean_answers >= 2 * SAMPLE_ANSWERS or (
            trial.clean_answers >= MIN_SAMPLE_ANSWERS and now > trial.clean_from + self._window_s
        ):
            after = trial.clean_refused / trial.clean_answers
            return self._end_trial(now, _differs(before, n_before, after, trial.clean_answers), after)
        return False

    def _end_trial(self, now: float, verdict: int, after: float) -> bool:
        """Act on a verdict; True when it cut deeper instead of ending the trial."""
        trial = self._trial
        assert trial is not None and self.rate is not None
        if verdict < 0:
            self.knee = self.rate
            answers = trial.clean_answers or trial.answers
            if _excess(after, self.baseline, answers):
                # Lower, but still in excess a whole window after the cut (nothing from before it is
                # left in the server's window): what a rate that lowered the share still has refused
                # is refused whatever the rate. Learn it at once, from every answer of the trial as a
                # restore does: left at the old share, the next ordinary sample would be excess again,
                # cut, and be judged right against its own chance-high share (the winner's curse).
                self.baseline = min(trial.refused / trial.answers, MAX_BASELINE)
            else:
                # Lower the rate-independent share only as far as the verdict's answers show it lower:
                # a chance low share would make the next sample's random 429s look like excess.
                self.baseline = min(self.baseline, after + 2.0 * math.sqrt(after * (1.0 - after) / answers))
        elif (verdict == 0 and trial.appeared and not trial.deep and self.rate > trial.base * self._decrease
              and _excess(after, self.baseline, trial.clean_answers or trial.answers)):
            # 429s that appeared at a rate that had none (another client started, say), that a
            # shallow cut did not move and that are still in excess are no evidence of randomness:
            # the excess may be larger than the cut. Cut by the whole decrease first; only if that
            # does not help either are they learned as the rate-independent share. (Not in excess
            # any more: the sample that caused the cut was high by chance.)
            trial.deep, trial.answers, trial.refused, trial.clean_answers, trial.clean_refused = True, 0, 0, 0, 0
            self._start_trial(now, trial, max(self._floor, trial.base * self._decrease), self._ramp_factor)
            return True
        elif verdict == 0:
            # The share did not change with the rate: those 429s are not ours. Undo the cut.
            self.rate = trial.rate_before
            self.restores += 1
            # Learned from every answer since the verdict could start, not only the last ones: a
            # share learned low by chance makes later random 429s look like excess.
            self.baseline = min(trial.refused / trial.answers, MAX_BASELINE)
            self._quiet, self._steady_rate = False, None  # the share learned is the one to be quiet against now
        # else the share rose though the rate fell: the cut was not deep enough (the window
        # was still filling). Keep it; the next sample with excess 429s cuts again.
        self._close_trial(now)
        return False

    def _close_trial(self, now: float) -> None:
        """End the trial: the ramp-up and the probe's doubling start again from now."""
        self._trial = None
        self._last_increase = self._knee_since = self._probe_start = now
        self._excess_since_verdict = False

    def increase(self, now: float, ramp_s: float) -> None:
        rate = self.rate
        if rate is None or rate >= self.ceiling or self._trial is not None:
            self._last_increase = now
            return
        # Time since the last increase, capped (a second of a minute's window) so an idle pause
        # does not jump the rate.
        elapsed = min(now - self._last_increase, self._window_s / 60.0)
        self._last_increase = now
        if elapsed <= 0:
            return
        step = self._step
        knee = self.knee
        if knee is not None and rate >= knee * (1.0 - ESTIMATE_MARGIN):
            if now - self._knee_since >= self._window_s:
                # A whole window since the knee was set, without a cut: the server takes this rate.
                self.knee, self._knee_since = rate, now
            if self._past_peak(rate):
                ramp_s /= PAST_PEAK_SPEEDUP
            else:
                doublings = (now - self._probe_start) / (PROBE_DOUBLING * self._window_s)
                step = min(step, knee * PROBE_FRACTION * 2.0 ** min(doublings, 30.0))
        self.rate = min(self.ceiling, rate + step * elapsed / (ramp_s * self._ramp_factor))

    def _past_peak(self, rate: float) -> bool:
        """Whether a probe has passed, by ``ESTIMATE_MARGIN``, the highest rate it was cut from at
        this knee without excess 429s since the verdict: there is room no probe found before
        (another client stopped, say), so the ramp-up goes ``PAST_PEAK_SPEEDUP`` times its full speed."""
        peak = self._peak_rate
        return peak is not None and not self._excess_since_verdict and rate > peak * (1.0 + ESTIMATE_MARGIN)


@dataclass(frozen=True, slots=True)
class LimitsStatistics:
    """A snapshot of all limits."""

    requests_per_minute: float | None
    tokens_per_minute: float | None
    throttle: ThrottleStatistics


class RateGate(Protocol):
    """What the runner calls on its limits, once per attempt: ``Limits`` in one process, or a gate
    that forwards to limits held elsewhere (the Ray engine's limiter actor, shared by every worker).

    The runner's hot path calls these methods directly, so ``Limits`` meets the protocol as it is:
    the local path pays nothing for the seam.
    """

    def send_now(self, tokens: int) -> bool:
        """Charge one request worth ``tokens`` at once if it may go now (no coroutine); False,
        with nothing charged, when the runner must ``await wait_to_send``."""

    async def wait_to_send(self, tokens: int) -> None:
        """Wait until one request worth ``tokens`` may be sent, and charge it."""

    def settle(self, charged: int, used: int) -> None:
        """The attempt got an answer (any answer) that used ``used`` of the ``charged`` tokens."""

    def on_success(self) -> None:
        """The attempt was answered successfully."""

    def on_throttled(self, error: RateLimited) -> None:
        """The attempt was answered 429."""

    def statistics(self) -> LimitsStatistics:
        """A snapshot (for progress lines and the run report; may be a moment old)."""


GateFactory = Callable[[str, float | None, float | None], RateGate]
"""The gate for one model's requests, from the model and the run's RPM and TPM for it (None: no such
limit). The online executor's default builds ``Limits``; the Ray engine hands out its limiter's gate."""


def local_gate(model: str, requests_per_minute: float | None, tokens_per_minute: float | None) -> Limits:
    """The default ``GateFactory``: this process's own ``Limits``."""
    return Limits.from_settings(requests_per_minute, tokens_per_minute)


class Limits:
    """The configured limits and the adaptive throttle, behind one call per attempt.

    Before each attempt: ``await wait_to_send(tokens)`` (tokens = input + max_tokens);
    after the request: ``settle(charged, used)`` refunds what it did not use, and
    ``on_success()`` / ``on_throttled(error)`` feed the throttle.
    """

    def __init__(
        self,
        *,
        requests: RequestRateLimiter | None = None,
        tokens: TokenRateLimiter | None = None,
        throttle: AdaptiveThrottle | None = None,
        window_s: float = DEFAULT_WINDOW_S,
    ) -> None:
        self.requests = requests
        self.tokens = tokens
        self.throttle = throttle if throttle is not None else AdaptiveThrottle(
            request_rate=requests.rate_per_s if requests is not None else None,
            token_rate=tokens.rate_per_s if tokens is not None else None,
            window_s=window_s,
        )

    @classmethod
    def from_settings(
        cls,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        *,
        window_s: float | None = None,
    ) -> Limits:
        """Limits for the configured RPM and TPM (``None``: no such limit); the throttle reacts
        over ``window_s``, by default the service's window (``rate_window_s()``), and the
        request limiter's burst fits under that window's share of the RPM."""
        window_s = window_s if window_s is not None else rate_window_s()
        return cls(
            requests=RequestRateLimiter(requests_per_minute, server_window_s=window_s) if requests_per_minute else None,
            tokens=TokenRateLimiter(tokens_per_minute) if tokens_per_minute else None,
            window_s=window_s,
        )

    def __repr__(self) -> str:
        return f"Limits(requests={self.requests!r}, tokens={self.tokens!r}, throttle={self.throttle!r})"

    def send_now(self, tokens: int) -> bool:
        """Charge one request worth ``tokens`` if every limit has room now (the common case,
        without a coroutine); False, with nothing charged, when it must ``wait_to_send``."""
        requests, token_limit = self.requests, self.tokens
        if requests is not None and not requests.has_room():
            return False
        if token_limit is not None and not token_limit.has_room(tokens):
            return False
        if not self.throttle.turn_now(tokens):
            return False
        # No await since the checks: the room they saw is still there.
        if requests is not None:
            requests.take()
        if token_limit is not None:
            token_limit.take(tokens)
        return True

    async def wait_to_send(self, tokens: int) -> None:
        """Wait until one request worth ``tokens`` may be sent, and charge it."""
        # The throttle first, the fixed limits last: a fixed limit's guarantee holds only
        # if the request goes out right after it granted the slot. A 429 that arrives
        # while we wait for a fixed slot starts a cool-down this request must honour too
        # (else every worker already queued there would still go out into the 429s): it
        # gives its slot back where it can and queues again behind the cool-down.
        while True:
            epoch = self.throttle.epoch
            await self.throttle.wait_turn(tokens)
            if self.requests is not None:
                await self.requests.wait()
            charged = await self.tokens.acquire(tokens) if self.tokens is not None else 0.0
            if self.throttle.epoch == epoch or self.throttle.statistics().cooling_down_s <= 0:
                return
            if self.tokens is not None:
                self.tokens.refund(charged)

    def settle(self, charged: int, used: int) -> None:
        """The attempt charged ``charged`` tokens, got an answer and used ``used``: refund the rest.

        Called once per answered attempt (the runner does, failures and 429s included),
        so it also counts the answer for the throttle's estimate of the server's limit.
        """
        self.throttle.on_answer(used)
        if self.tokens is not None and charged > used:
            self.tokens.refund(min(charged, self.tokens.bucket) - max(used, 0))

    def on_success(self) -> None:
        self.throttle.on_success()

    def on_throttled(self, error: RateLimited) -> None:
        self.throttle.on_throttled(error)

    def statistics(self) -> LimitsStatistics:
        """A snapshot of all limits."""
        return LimitsStatistics(
            requests_per_minute=self.requests.requests_per_minute if self.requests is not None else None,
            tokens_per_minute=self.tokens.tokens_per_minute if self.tokens is not None else None,
            throttle=self.throttle.statistics(),
        )
