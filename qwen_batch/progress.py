"""The recent rate of a run and the ETA it implies, from timestamped counts of rows done.

The whole-run average hides a slowdown (a run that fell from 40 to 2 rows/s still shows
a high average for minutes), so progress shows the rate over a trailing window instead.
Pure: the caller passes the time with every observation, so tests drive it exactly.
"""

from __future__ import annotations

from collections import deque

RECENT_WINDOW_S = 10.0
"""How far back the recent rate looks: long enough to smooth a burst of group commits,
short enough that a slowdown shows within seconds."""


class RecentRate:
    """Rows per second over the last ``window_s`` seconds of observations."""

    __slots__ = ("_window_s", "_samples")

    def __init__(self, window_s: float = RECENT_WINDOW_S, *, start: float = 0.0, done: int = 0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, not {window_s}")
        self._window_s = window_s
        self._samples: deque[tuple[float, int]] = deque([(start, done)])

    def observe(self, now: float, done: int) -> None:
        """Record that ``done`` rows were finished at time ``now`` (seconds).

        An observation older than the last one is ignored: progress must never fail a run.
        """
        samples = self._samples
        if now < samples[-1][0]:
            return
        samples.append((now, done))
        # Keep one sample at or before the window's start, so the window is always whole.
        while len(samples) > 2 and samples[1][0] <= now - self._window_s:
            samples.popleft()

    def rate(self) -> float | None:
        """Rows per second over the window (or since the start, if shorter); None before any time passed."""
        (then, before), (now, done) = self._samples[0], self._samples[-1]
        if now <= then:
            return None
        return (done - before) / (now - then)

    def eta_s(self, remaining: int) -> float | None:
        """Seconds to finish ``remaining`` rows at the recent rate; None when it cannot be told."""
        if remaining <= 0:
            return 0.0
        rate = self.rate()
        if not rate:
            return None
        return remaining / rate
