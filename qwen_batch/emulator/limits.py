"""Server-side RPM and TPM limits over a sliding window, per model, as the service enforces them.

A request is admitted if, counting it, the window holds at most ``rpm`` requests and at
most ``tpm`` tokens (input + output of admitted requests). Refused requests do not count.
Over RPM → 429 ``Throttling.RateQuota``; over TPM → 429 ``Throttling.AllocationQuota``
(reference section 8.3). The limits are per account and model, summed over every key, so
``other_load`` models other clients of the account: requests at a steady rate between two
times (seconds since the first ``admit``), each counted if the window has room then.
The clock is injected so tests can drive it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class WindowLimiter:
    """Sliding-window request and token counts per model."""

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        other_load: tuple[float, float, float] | tuple[()] = (),
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.window_s = window_s
        self._clock = clock
        self._events: dict[str, deque[tuple[float, int]]] = {}
        self._tokens: dict[str, int] = {}
        self._other_load = other_load
        self._started: float | None = None
        self._other_next: dict[str, float] = {}  # per model: when the other clients send next
        self.other_admitted = 0

    @property
    def active(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def admit(self, model: str, tokens: int) -> str | None:
        """Record the request and return None, or return the 429 code that refuses it."""
        now = self._clock()
        if self._started is None:
            self._started = now
        events = self._events.setdefault(model, deque())
        if self._other_load:
            self._run_other_clients(model, events, now)
        used = self._tokens.get(model, 0)
        horizon = now - self.window_s
        while events and events[0][0] <= horizon:
            used -= events.popleft()[1]
        self._tokens[model] = used
        if self.rpm is not None and len(events) + 1 > self.rpm:
            return "Throttling.RateQuota"
        if self.tpm is not None and used + tokens > self.tpm:
            return "Throttling.AllocationQuota"
        events.append((now, tokens))
        self._tokens[model] = used + tokens
        return None

    def _run_other_clients(self, model: str, events: deque[tuple[float, int]], now: float) -> None:
        """The other clients' requests up to ``now`` (no tokens: they count against RPM)."""
        rate, start, end = self._other_load  # type: ignore[misc]
        assert self._started is not None
        first, last = self._started + start, min(now, self._started + end)
        t = self._other_next.get(model, first)
        while t <= last:
            while events and events[0][0] <= t - self.window_s:
                self._tokens[model] = self._tokens.get(model, 0) - events.popleft()[1]
            if self.rpm is None or len(events) < self.rpm:
                events.append((t, 0))
                self.other_admitted += 1
            t += 1.0 / rate
        self._other_next[model] = t
