"""This run's counts in batch mode, as the progress line and the summary read them (``RunStatistics``)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence

from ..runner import RunStatistics
from ..types import Outcome


class Tally:
    """Counts every outcome written once; ``in_flight`` is the lines of batches not yet collected."""

    def __init__(self, rows_total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rows_total = rows_total
        self.rows_done = self.ok = self.errors = self.cached = 0
        self.input_tokens = self.output_tokens = 0
        self.cost = 0.0
        self.retries = 0
        self.in_flight = 0
        self.errors_by_code: Counter[str] = Counter()
        self._clock = clock
        self._started = clock()

    def count(self, outcomes: Sequence[Outcome]) -> None:
        for outcome in outcomes:
            self.rows_done += 1
            if outcome.status == "ok":
                self.ok += 1
                if outcome.cached:
                    self.cached += 1
                    continue
                self.input_tokens += outcome.input_tokens or 0
                self.output_tokens += outcome.output_tokens or 0
                self.cost += outcome.cost or 0.0
            else:
                self.errors += 1
                self.errors_by_code[outcome.error_code or "Unknown"] += 1

    def add(self, other: RunStatistics) -> None:
        """Add what an online run (the fallback) did."""
        self.rows_done += other.rows_done
        self.ok += other.ok
        self.errors += other.errors
        self.cached += other.cached
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost += other.cost
        self.retries += other.retries
        self.errors_by_code.update(other.errors_by_code)

    def statistics(self) -> RunStatistics:
        return RunStatistics(
            rows_total=self.rows_total,
            rows_done=self.rows_done,
            ok=self.ok,
            errors=self.errors,
            errors_by_code=dict(self.errors_by_code),
            cached=self.cached,
            cache_saved_cost=0.0,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cost=self.cost,
            retries=self.retries,
            throttled=0,
            in_flight=self.in_flight,
            elapsed_s=self._clock() - self._started,
        )
