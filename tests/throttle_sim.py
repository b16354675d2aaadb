"""A discrete-event simulation of the worker pool against a modelled server, on a fake clock.

The real ``AdaptiveThrottle`` paces ``concurrency`` simulated workers; the fixed request
limiter is modelled as even spacing at the configured rate (what ``RequestRateLimiter`` does),
and the retry policy as full-jitter exponential backoff (what ``RetryPolicy`` does). The
server (``Server``) decides each attempt when it arrives: an outage answers 503; a random
429 (rate-independent, not counted in any window, as the emulator does); then a sliding
window of ``limit`` requests per ``window_s`` shared with an optional second client.

Workers are plain coroutines driven by ``Simulation.run``: the throttle's ``sleep`` seam
yields the delay to the loop, which resumes the earliest sleeper after moving the clock. So
a simulated hour runs in a second and every run with the same seed is the same.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any

from qwen_batch.errors import RateLimited
from qwen_batch.limits import AdaptiveThrottle


class _Delay:
    """An awaitable that hands ``seconds`` to the simulation loop."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __await__(self) -> Generator[float, None, None]:
        yield self.seconds


@dataclass
class Server:
    """The modelled service: an outage, random 429s, a sliding-window limit, a second client."""

    limit: int | None = None  # requests per window, for every client together
    window_s: float = 60.0
    p_random_429: float = 0.0
    p_other_fault: float = 0.0  # 5xx or connection errors, at random
    outage: tuple[float, float] | None = None  # (start, end): every attempt 503
    other_rate: float = 0.0  # the second client's requests per second ...
    other_during: tuple[float, float] = (0.0, 0.0)  # ... between these times
    seed: int = 0
    _admitted: deque[float] = field(default_factory=deque)
    _other_next: float = 0.0
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._other_next = self.other_during[0]

    def _expire(self, now: float) -> None:
        while self._admitted and self._admitted[0] <= now - self.window_s:
            self._admitted.popleft()

    def _run_other_client(self, now: float) -> None:
        """The second client's requests up to ``now``, each admitted if the window has room."""
        if self.other_rate <= 0:
            return
        start, end = self.other_during
        while self._other_next <= min(now, end):
            t = self._other_next
            self._expire(t)
            if self.limit is None or len(self._admitted) < self.limit:
                self._admitted.append(t)
            self._other_next = t + 1.0 / self.other_rate

    def answer(self, now: float) -> str:
        """``"ok"``, ``"429"`` (the window is full), ``"random429"`` or ``"fault"``."""
        if self.outage is not None and self.outage[0] <= now < self.outage[1]:
            return "fault"
        draw = self._rng.random()
        if draw < self.p_random_429:
            return "random429"
        if draw < self.p_random_429 + self.p_other_fault:
            return "fault"
        self._run_other_client(now)
        self._expire(now)
        if self.limit is not None and len(self._admitted) >= self.limit:
            return "429"
        self._admitted.append(now)
        return "ok"


def scaled_to(window_s: float) -> dict[str, float]:
    """``Simulation`` options for a run whose window is ``window_s`` instead of DashScope's minute:
    the latency (0.2 s) and the retry backoff (0.5 s to 30 s) scale with it, as the CLI's do
    under ``QWEN_BATCH_RATE_WINDOW_S`` (the throttle's own constants scale with its window_s)."""
    scale = window_s / 60.0
    return {"latency_s": 0.2 * scale, "base_delay_s": 0.5 * scale, "max_delay_s": 30.0 * scale}


@dataclass
class Attempt:
    time: float
    answer: str


class Simulation:
    """The pool (``concurrency`` workers, ``rows`` rows or until ``duration_s``) against ``server``."""

    def __init__(
        self,
        server: Server,
        *,
        configured_rate: float | None,
        concurrency: int = 16,
        latency_s: float = 0.2,
        duration_s: float = 600.0,
        rows: int | None = None,
        max_retries: int = 1000,
        base_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        seed: int = 0,
        **throttle_options: Any,
    ) -> None:
        self.now = 0.0
        self.server = server
        self.configured_rate = configured_rate
        self.concurrency = concurrency
        self.latency_s = latency_s
        self.duration_s = duration_s
        self.rows_left = rows if rows is not None else math.inf
        self.max_retries = max_retries
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self._rng = random.Random(seed + 1)
        self._next_send = 0.0
        self.throttle = AdaptiveThrottle(
            request_rate=configured_rate, clock=self.clock, sleep=self.sleep, **throttle_options
        )
        self.attempts: list[Attempt] = []
        self.rows_done: list[float] = []  # finish time of each row
        self.rates: list[tuple[float, float | None]] = []  # (time, throttle rate) at each attempt
        self._queue: list[tuple[float, int, Coroutine[Any, Any, None]]] = []
        self._seq = 0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> _Delay:
        return _Delay(max(seconds, 0.0))

    async def _attempt(self) -> str:
        await self.throttle.wait_turn()
        if self.configured_rate is not None:  # the fixed limiter: even spacing
            start = max(self.now, self._next_send)
            self._next_send = start + 1.0 / self.configured_rate
            await self.sleep(start - self.now)
        sent = self.now
        answer = self.server.answer(sent)
        self.attempts.append(Attempt(sent, answer))
        self.rates.append((sent, self.throttle.statistics().request_rate))
        await self.sleep(self.latency_s)
        self.throttle.on_answer()
        if answer == "ok":
            self.throttle.on_success()
        elif answer in ("429", "random429"):
            self.throttle.on_throttled(RateLimited("Throttling.RateQuota", "m", kind="requests"))
        return answer

    async def _worker(self) -> None:
        while self.rows_left > 0 and self.now < self.duration_s:
            self.rows_left -= 1
            for attempt in range(1, self.max_retries + 2):
                if await self._attempt() == "ok" or attempt > self.max_retries:
                    break
                cap = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
                await self.sleep(self._rng.uniform(0.0, cap))
            self.rows_done.append(self.now)

    def run(self) -> Simulation:
        for _ in range(self.concurrency):
            self._schedule(0.0, self._worker())
        while self._queue:
            when, _, coroutine = heapq.heappop(self._queue)
            self.now = max(self.now, when)
            try:
                delay = coroutine.send(None)
            except StopIteration:
                continue
            self._schedule(self.now + delay, coroutine)
        return self

    def _schedule(self, when: float, coroutine: Coroutine[Any, Any, None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, coroutine))

    # -- figures --------------------------------------------------------------------

    def between(self, start: float, end: float) -> list[Attempt]:
        return [a for a in self.attempts if start <= a.time < end]

    def attempt_rate(self, start: float, end: float) -> float:
        return len(self.between(start, end)) / (end - start)

    def admitted_rate(self, start: float, end: float) -> float:
        """Answers the window admitted ("ok") per second."""
        return sum(1 for a in self.between(start, end) if a.answer == "ok") / (end - start)

    def refused_share(self, start: float, end: float, answers: tuple[str, ...] = ("429", "random429")) -> float:
        attempts = self.between(start, end)
        return sum(1 for a in attempts if a.answer in answers) / max(len(attempts), 1)

    def first_time_at(self, rate: float, after: float, span_s: float = 5.0) -> float | None:
        """The first time after ``after`` from which the attempt rate over ``span_s`` is >= ``rate``."""
        t = after
        while t + span_s <= self.now:
            if self.attempt_rate(t, t + span_s) >= rate:
                return t
            t += 1.0
        return None
