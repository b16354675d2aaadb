"""Server-side RPM and TPM limits over a sliding window, per model, as the service enforces them.

A request is admitted if, counting it, the window holds at most ``rpm`` requests and at
most ``tpm`` tokens (input + output of admitted requests). Refused requests do not count.
Over RPM → 429 ``Throttling.RateQuota``; over TPM → 429 ``Throttling.AllocationQuota``
(reference section 8.3). The clock is injected so tests can drive it.
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
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.window_s = window_s
        self._clock = clock
        self._events: dict[str, deque[tuple[float, int]]] = {}
        self._tokens: dict[str, int] = {}

    @property
    def active(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def admit(self, model: str, tokens: int) -> str | None:
        """Record the request and return None, or return the 429 code that refuses it."""
        now = self._clock()
        events = self._events.setdefault(model, deque())
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
