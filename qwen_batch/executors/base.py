"""The executor seam: what the composition root, the reporter and the CLI need of any executor."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..catalog import Price
    from ..plan import JobPlan
    from ..runner import OutcomeSink, RunStatistics, WorkItem


class Execution(Protocol):
    """A plan being executed: the reporter reads its snapshots, the CLI asks it to stop."""

    @property
    def stop_reason(self) -> str | None: ...

    @property
    def stop_detail(self) -> str | None:
        """The one line that explains ``stop_reason`` to the user, when it needs one."""

    @property
    def rate_limits(self) -> tuple[float | None, float | None]:
        """The requests and tokens per minute this execution keeps to (None: no such limit)."""

    @property
    def price(self) -> Price | None:
        """The price this execution's rows are billed at (None: unknown, or a local server, which has none)."""

    @property
    def prices(self) -> Mapping[str, Price | None]:
        """Each model's billed price, as ``price`` is the (first) model's: a sweep's models differ."""

    def statistics(self) -> RunStatistics: ...

    def request_stop(self, reason: str) -> None:
        """Send nothing new; what is in flight finishes and is recorded."""

    def cancel_now(self) -> None:
        """Abandon what is in flight; what finished is still recorded."""

    async def run(self, items: Iterator[list[WorkItem]]) -> RunStatistics:
        """Execute ``items`` (requests to send, outcomes already settled) into the sink."""


class Executor(Protocol):
    """Opens an ``Execution`` of a plan over a sink; the sink makes every outcome durable."""

    mode: str
    """How it sends (``online`` or ``batch``), as the run's manifest records it."""

    def check(self, plan: JobPlan) -> None:
        """Raise what would stop this plan before anything is written (a missing key, say)."""

    def service(self, plan: JobPlan) -> str:
        """The service that answers this plan's requests: the response cache keeps each apart."""

    def open(self, plan: JobPlan, sink: OutcomeSink) -> AbstractAsyncContextManager[Execution]:
        """Connect (and start what the execution needs); closing releases it all."""
