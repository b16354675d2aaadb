"""The cost cap: spent cost plus the worst case of requests in flight never exceeds it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BudgetStatistics:
    max_cost: float
    spent: float
    reserved: float


class Budget:
    """Reserve a request's worst-case cost before sending it; settle to the real cost after.

    ``spent`` starts at what earlier runs of the same job already paid, so raising the
    budget and re-running continues from where the last run stopped.
    """

    def __init__(self, max_cost: float, spent: float = 0.0) -> None:
        self.max_cost = max_cost
        self._spent = spent
        self._reserved = 0.0

    def try_reserve(self, worst_case: float) -> bool:
        """Reserve ``worst_case`` if it fits under the cap; False means: stop sending."""
        if self._spent + self._reserved + worst_case > self.max_cost:
            return False
        self._reserved += worst_case
        return True

    def settle(self, reserved: float, actual: float) -> None:
        """Replace a reservation by what the request really cost (0 for a failed one)."""
        self._reserved = max(0.0, self._reserved - reserved)
        self._spent += actual

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(self.max_cost, self._spent, self._reserved)
