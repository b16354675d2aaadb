"""How a run ended: ``JobResult``, with the figures for the summary and the exit code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .runner import STOP_AUTH, STOP_BUDGET, STOP_CONFIGURATION, STOP_ERROR_RATE, STOP_INTERRUPTED

STOP_SUBMITTED = "submitted"
"""Batch mode with ``--no-wait``: submitted, not finished; run the same command again to collect."""
EXIT_SUBMITTED = 75  # sysexits EX_TEMPFAIL: try again later

if TYPE_CHECKING:
    from .runner import RunStatistics


@dataclass(frozen=True)
class JobResult:
    """How a run ended, with the figures for the summary."""

    statistics: RunStatistics
    summary: dict[str, Any]
    stop_reason: str | None
    stop_detail: str | None
    wrote_output: bool

    @property
    def exit_code(self) -> int:
        if self.stop_reason == STOP_INTERRUPTED:
            return 130
        if self.stop_reason == STOP_SUBMITTED:
            return EXIT_SUBMITTED
        if self.stop_reason in (STOP_AUTH, STOP_BUDGET, STOP_CONFIGURATION, STOP_ERROR_RATE):
            return 3
        return 1 if self.summary["rows"]["error"] else 0
