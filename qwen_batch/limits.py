"""Rate limits: the configured RPM/TPM, and adapting to the limit the service really has.

aiolimiter lives here and nowhere else (pinned ``aiolimiter>=1.2,<1.4``). Three parts,
bundled by ``Limits`` so the runner has one thing to call before each attempt:

* ``RequestRateLimiter``: the configured requests per minute, spaced evenly.
* ``TokenRateLimiter``: the configured tokens per minute, charged with the worst case
  before sending and refunded with what the reply did not use.
* ``AdaptiveThrottle``: the pool as a whole backs off on 429s (a shared cool-down, then
  AIMD on the sending rate), so a service whose real limit is lower than the configured
  one sees few 429s instead of being hammered.

Each is a no-op when its limit is absent.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

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
# The adaptive throttle's ramp-up never slows below this fraction of its largest cut.
MIN_STEP_FRACTION = 0.25
# After the first cut, a 429 sets the rate this fraction under the admitted rate.
ESTIMATE_MARGIN = 0.03
# A cut made from the admitted rate is never deeper than this factor at once.
MAX_ESTIMATE_CUT = 0.5
# A cut made from the admitted rate, when that rate is at least NEAR_LIMIT of the rate the
# pool was sending at (it was pacing just over the limit), pauses the pool only this
# fraction of the usual cool-down.
ESTIMATE_COOLDOWN_FRACTION = 0.25
NEAR_LIMIT = 0.85
# Near the estimated server limit, the ramp-up probes by this fraction of it per ramp.
PROBE_FRACTION = 0.02
# The admitted rate is measured over at most this many seconds (two of the service's windows).
ADMITTED_HORIZON_S = 2 * DEFAULT_WINDOW_S


def _bucket_rate(limit: float, bucket: float, window_s: float, margin: float) -> float:
    """The leak rate (per second) so that ``bucket + rate * window_s <= limit``: a full
    bucket plus a window of steady sending never exceeds the limit in any window."""
    return max(min(limit * (1.0 - margin), limit - bucket), limit * 0.5) / window_s


class RequestRateLimiter:
    """At most ``requests_per_minute`` requests in any window, spaced evenly.

    aiolimiter's ``AsyncLimiter(rpm, 60)`` lets a whole minute's requests through at once,
    which a sliding-window server answers with 429s. Here the bucket holds 50 ms of
    requests (at least 1) and leaks at ``min(limit * 0.995, limit - bucket) / window``,
    so the start is smooth and any window of the server's length sees at most the limit.
    """

    def __init__(
        self,
        requests_per_minute: float,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        margin: float = DEFAULT_MARGIN,
    ) -> None:
        if requests_per_minute <= 0:
            raise ValueError(f"requests_per_minute must be positive, not {requests_per_minute}")
        self.requests_per_minute = requests_per_minute
        # A bucket of 50 ms of requests (at least 1) absorbs late timer wake-ups, which a
        # bucket of exactly 1 turns into lost capacity (-20% measured at 120 req/s).
        bucket = max(1.0, math.floor(requests_per_minute / window_s * BURST_S))
        self.rate_per_s = _bucket_rate(requests_per_minute, bucket, window_s, margin)
        self._limiter = AsyncLimiter(bucket, bucket / self.rate_per_s)

    def __repr__(self) -> str:
        return f"RequestRateLimiter(requests_per_minute={self.requests_per_minute})"

    async def wait(self) -> None:
        """Return when one more request may be sent."""
        await self._limiter.acquire(1)


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
        amount = min(float(max(tokens, 0)), self.bucket)
        await self._limiter.acquire(amount)
        return amount

    def refund(self, tokens: float) -> None:
        """Give back ``tokens`` charged but not used."""
        if tokens > 0:
            self._limiter.refund(tokens)


@dataclass(frozen=True, slots=True)
class ThrottleStatistics:
    """A snapshot of the adaptive throttle. Rates are per second; ``None`` is unlimited."""

    request_rate: float | None
    token_rate: float | None
    request_limit_estimate: float | None
    throttled: int
    throttled_by_kind: dict[str, int]
    cooldowns: int
    cooling_down_s: float
    decreases: int


class AdaptiveThrottle:
    """Slows the whole pool down when the service says 429, then speeds up gradually.

    * A 429 starts a shared cool-down (``Retry-After`` when sent, else
      ``default_cooldown_s``): nobody sends until it ends, and requests already waiting
      their turn queue again behind it.
    * The sending rate is cut (multiplicative decrease) at most once per cool-down, so
      the burst of 429s that answers one overshoot counts once. "requests" 429s cut the
      request rate; "tokens" 429s cut the token rate; "burst" 429s cut the request rate
      and halve the speed of the next ramp-up (smoother).
    * The throttle does not pace at all until the first 429 (the fixed limiters do);
      that 429 starts its rate from the rate observed just before it (at most the
      ceiling, ``request_rate``/``token_rate``), then cuts it by ``decrease``: the pool
      has usually burst into an empty server window, so what it got admitted so far
      says little about the server's steady limit.
    * A later "requests" 429 estimates the server's limit instead of cutting blindly:
      the rate of answers the server admitted (all answers but 429s, see ``on_answer``)
      over the last ``admitted_horizon_s`` seconds, wall time. A sliding-window server
      admits at most its limit per window, so over a horizon of a few windows that rate
      is the limit. The rate is set ``ESTIMATE_MARGIN`` under it (never below half the
      current rate at once: an idle spell in the horizon makes the estimate low). When
      the admitted rate is close to the sending rate (``NEAR_LIMIT``) the pool was pacing
      just over the limit, and the cool-down (without ``Retry-After``) is shortened to
      ``ESTIMATE_COOLDOWN_FRACTION`` of itself.
    * Each success after the cool-down raises the rate linearly in time (additive
      increase): the largest cut so far is regained per ``ramp_s`` seconds, never above
      the ceiling; at or above the estimated limit it only probes, by
      ``PROBE_FRACTION`` of the estimate per ``ramp_s``, so the pool sits just under the
      server's limit and meets a 429 rarely instead of on every saw-tooth.
    * A later 429 cuts only if the pool was really sending near the current rate
      (at least ``busy_fraction`` of it, measured over the time it was not cooling
      down). A 429 that comes while the pool sends far below its rate (few rows left,
      workers waiting out retry backoff) says the service refused for another reason
      (a burst, an overloaded node); cutting on each such 429 would ratchet the rate
      down to the floor under a steady share of 429s that do not depend on the rate.

    ``clock`` and ``sleep`` are seams: tests pass a fake clock and a sleep that advances it.
    """

    def __init__(
        self,
        *,
        request_rate: float | None = None,
        token_rate: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        decrease: float = 0.5,
        ramp_s: float = 30.0,
        default_cooldown_s: float = 1.0,
        max_cooldown_s: float = 10.0,
        min_request_rate: float = 0.05,
        observe_window_s: float = 2.0,
        busy_fraction: float = 0.5,
        admitted_horizon_s: float = ADMITTED_HORIZON_S,
    ) -> None:
        if not 0.0 < decrease < 1.0:
            raise ValueError("decrease must be in (0, 1)")
        if not 0.0 <= busy_fraction <= 1.0:
            raise ValueError("busy_fraction must be in [0, 1]")
        self._clock = clock
        self._sleep = sleep
        self._decrease = decrease
        self._ramp_s = ramp_s
        self._default_cooldown_s = default_cooldown_s
        self._max_cooldown_s = max_cooldown_s
        self._min_request_rate = min_request_rate
        self._observe_window_s = observe_window_s
        self._busy_fraction = busy_fraction
        now = clock()
        self._requests = _AimdRate(request_rate, now)
        self._tokens = _AimdRate(token_rate, now)
        self._cooldown_until = -math.inf
        # Time spent cooling down, so observed rates count only the time the pool could
        # send: finished cool-downs add up in ``_paused_before``; the current one runs
        # from ``_pause_start`` to ``_cooldown_until``.
        self._pause_start = 0.0
        self._paused_before = 0.0
        self._epoch = 0
        self._throttled = 0
        self._throttled_by_kind: dict[str, int] = {}
        self._cooldowns = 0
        self._decreases = 0
        self._successes_since_cut = 0
        self._backoff = default_cooldown_s
        # Sends counted in the current and the last finished observation window.
        self._window_start = now
        self._window_paused_at = 0.0
        self._window_sent = 0
        self._window_tokens = 0
        self._last_sent_rate: float | None = None
        self._last_token_rate: float | None = None
        self._admitted = _TrailingRate(admitted_horizon_s)

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
        self._observe(now, tokens)

    def _active(self, now: float) -> float:
        """Seconds of the current observation window not spent cooling down."""
        return (now - self._window_start) - (self._paused(now) - self._window_paused_at)

    def _observe(self, now: float, tokens: int) -> None:
        if now - self._window_start >= self._observe_window_s:
            active = self._active(now)
            if active > 0.05 * self._observe_window_s:  # a window spent cooling down says nothing
                self._last_sent_rate = self._window_sent / active
                self._last_token_rate = self._window_tokens / active
            self._window_start, self._window_sent, self._window_tokens = now, 0, 0
            self._window_paused_at = self._paused(now)
        self._window_sent += 1
        self._window_tokens += tokens

    def _observed_rates(self, now: float) -> tuple[float, float]:
        """Sends and tokens per second of sending time (cool-downs excluded)."""
        elapsed = now - self._window_start
        if self._last_sent_rate is not None and elapsed < self._observe_window_s / 2:
            return self._last_sent_rate, self._last_token_rate or 0.0
        active = max(self._active(now), 1e-3)
        return self._window_sent / active, self._window_tokens / active

    def on_answer(self) -> None:
        """An attempt got an answer, whatever it was (a 429 too: ``on_throttled`` takes it back)."""
        self._admitted.add(self._clock(), 1)

    def on_success(self) -> None:
        """A request went through: ramp the rates up (after any cool-down)."""
        self._successes_since_cut += 1
        now = self._clock()
        if now < self._cooldown_until:
            return
        self._requests.increase(now, self._ramp_s)
        self._tokens.increase(now, self._ramp_s)

    def on_throttled(self, error: RateLimited) -> None:
        """A 429: pause the pool, and cut the rate of the limit it names."""
        now = self._clock()
        self._admitted.add(now, -1)
        self._throttled += 1
        kind = error.kind
        self._throttled_by_kind[kind] = self._throttled_by_kind.get(kind, 0) + 1
        cooling = now < self._cooldown_until
        # A 429 with no success since the last cut says nothing about the new rate (the
        # server's window is still full): wait longer instead of cutting again.
        probing = not cooling and self._decreases > 0 and self._successes_since_cut == 0
        if not cooling:
            self._backoff = min(self._backoff * 2, self._max_cooldown_s) if probing else self._default_cooldown_s
        pause = error.retry_after if error.retry_after is not None else self._backoff
        if now + pause > self._cooldown_until:
            if not cooling:
                self._paused_before = self._paused(now)
                self._pause_start = now
            self._cooldown_until = now + pause
            self._epoch += 1
            # Every waiter queues again behind the cool-down (see wait_turn).
            self._requests.next_slot = self._tokens.next_slot = self._cooldown_until
        if cooling:
            return  # the 429s of one overshoot cut the rate once
        self._cooldowns += 1
        if probing:
            return
        sent_rate, token_rate = self._observed_rates(now)
        limited = self._tokens if kind == "tokens" else self._requests
        observed = token_rate if kind == "tokens" else sent_rate
        if limited.rate is not None and observed < self._busy_fraction * limited.rate:
            return  # not sending near the rate: this 429 is not about the rate
        # The first cut follows a burst into an empty server window: admitted counts
        # are not a steady rate yet. A burst 429 is about speeding up, not the limit.
        admitted = self._admitted.rate(now) if self._decreases > 0 and kind == "requests" else None
        self._decreases += 1
        self._successes_since_cut = 0
        if kind == "tokens":
            self._tokens.decrease(now, self._decrease, observed=token_rate, floor=1.0)
        else:
            slower = 2.0 if kind == "burst" else 1.0
            base = self._requests.decrease(
                now, self._decrease, observed=sent_rate, floor=self._min_request_rate, ramp_factor=slower,
                admitted=admitted,
            )
            if admitted is not None and admitted >= NEAR_LIMIT * base and error.retry_after is None:
                # A pool pacing just over the limit needs no long pause: the server's window
                # drains as steadily as it filled, and the small cut does the rest.
                self._cooldown_until = now + self._backoff * ESTIMATE_COOLDOWN_FRACTION
                self._requests.next_slot = self._tokens.next_slot = self._cooldown_until

    def statistics(self) -> ThrottleStatistics:
        """A snapshot of the current rates and 429 counts."""
        return ThrottleStatistics(
            request_limit_estimate=self._requests.knee,
            request_rate=self._requests.rate,
            token_rate=self._tokens.rate,
            throttled=self._throttled,
            throttled_by_kind=dict(self._throttled_by_kind),
            cooldowns=self._cooldowns,
            cooling_down_s=max(0.0, self._cooldown_until - self._clock()),
            decreases=self._decreases,
        )


class _TrailingRate:
    """Events per second over the last ``horizon_s`` seconds (or since the first event).

    Counts are kept per slot of ``horizon_s / slots`` seconds, so memory does not grow
    with the sending rate.
    """

    __slots__ = ("_horizon_s", "_slot_s", "_counts", "_total", "_first")

    def __init__(self, horizon_s: float, slots: int = 600) -> None:
        self._horizon_s = horizon_s
        self._slot_s = horizon_s / slots
        self._counts: deque[list[int]] = deque()  # [slot number, count], oldest first
        self._total = 0
        self._first: float | None = None

    def add(self, now: float, n: int) -> None:
        if self._first is None:
            self._first = now
        slot = int(now // self._slot_s)
        if self._counts and self._counts[-1][0] == slot:
            self._counts[-1][1] += n
        else:
            self._counts.append([slot, n])
        self._total += n

    def rate(self, now: float) -> float | None:
        """The rate over the horizon; None before any event."""
        if self._first is None or now <= self._first:
            return None
        oldest = int((now - self._horizon_s) // self._slot_s)
        while self._counts and self._counts[0][0] <= oldest:
            self._total -= self._counts.popleft()[1]
        return max(self._total, 0) / min(now - self._first, self._horizon_s)


class _AimdRate:
    """One AIMD-controlled rate (per second) with its next free slot (GCRA)."""

    __slots__ = (
        "ceiling", "rate", "next_slot", "knee", "_last_increase", "_step", "_largest_cut", "_ramp_factor"
    )

    def __init__(self, ceiling: float | None, now: float) -> None:
        self.ceiling = ceiling if ceiling is not None else math.inf
        # No pacing of our own until the first cut: the fixed limiters do the work.
        self.rate: float | None = None
        self.next_slot = -math.inf
        # The estimated server limit (from the admitted rate); None until estimated.
        self.knee: float | None = None
        self._last_increase = now
        self._step = 0.0
        self._largest_cut = 0.0
        self._ramp_factor = 1.0

    def decrease(
        self,
        now: float,
        factor: float,
        *,
        observed: float,
        floor: float,
        ramp_factor: float = 1.0,
        admitted: float | None = None,
    ) -> float:
        """Cut by ``factor``, or to just under ``admitted`` (the server's estimated limit) when
        given; return the rate cut from (the current rate, or the observed one if lower)."""
        base = self.rate if self.rate is not None else min(self.ceiling, max(observed, floor))
        if observed > 0:
            base = min(base, max(observed, floor))
        if admitted is not None and admitted > 0:
            self.knee = min(admitted, base)
            self.rate = max(floor, self.knee * (1.0 - ESTIMATE_MARGIN), base * MAX_ESTIMATE_CUT)
        else:
            self.rate = max(floor, base * factor)
        # Regain the cut over the ramp: step (per second of time) = cut / ramp, but
        # never less than a quarter of the largest cut so far. A step that shrank with
        # every cut would let a steady share of 429s that do not depend on the rate (a
        # node refusing at random) ratchet the rate down to the floor; with a floor on
        # the step, cuts and ramp balance well above it.
        self._largest_cut = max(self._largest_cut, base - self.rate)
        self._step = max(base - self.rate, self._largest_cut * MIN_STEP_FRACTION)
        self._ramp_factor = ramp_factor
        self._last_increase = now
        return base

    def increase(self, now: float, ramp_s: float) -> None:
        rate = self.rate
        if rate is None or rate >= self.ceiling:
            self._last_increase = now
            return
        # Time since the last increase, capped so an idle pause does not jump the rate.
        elapsed = min(now - self._last_increase, 1.0)
        self._last_increase = now
        if elapsed > 0:
            near = self.knee is not None and rate >= self.knee * (1.0 - ESTIMATE_MARGIN)
            step = self.knee * PROBE_FRACTION if near else self._step
            self.rate = min(self.ceiling, rate + step * elapsed / (ramp_s * self._ramp_factor))


@dataclass(frozen=True, slots=True)
class LimitsStatistics:
    """A snapshot of all limits."""

    requests_per_minute: float | None
    tokens_per_minute: float | None
    throttle: ThrottleStatistics


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
    ) -> None:
        self.requests = requests
        self.tokens = tokens
        self.throttle = throttle if throttle is not None else AdaptiveThrottle(
            request_rate=requests.rate_per_s if requests is not None else None,
            token_rate=tokens.rate_per_s if tokens is not None else None,
        )

    @classmethod
    def from_settings(
        cls, requests_per_minute: float | None = None, tokens_per_minute: float | None = None
    ) -> Limits:
        """Limits for the configured RPM and TPM (``None``: no such limit)."""
        return cls(
            requests=RequestRateLimiter(requests_per_minute) if requests_per_minute else None,
            tokens=TokenRateLimiter(tokens_per_minute) if tokens_per_minute else None,
        )

    def __repr__(self) -> str:
        return f"Limits(requests={self.requests!r}, tokens={self.tokens!r}, throttle={self.throttle!r})"

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
        self.throttle.on_answer()
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
