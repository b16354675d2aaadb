"""One shard of a job on a Ray worker: exactly what ``run --shard I/N`` runs, sending through the job's
shared limiters instead of limits of its own.

``ShardWorker`` is a plain class that the driver runs as an async actor. Its shard's checkpoint
(``<part>.checkpoint``) is on storage every node shares, so when the actor dies the driver starts a
new one that resumes the shard where the checkpoint ends: at most the dead one's requests in flight
are paid twice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ..limits import LimitsStatistics, RateGate
from ..runner import STOP_INTERRUPTED
from .ray_limiter import RayEndpoint, RemoteGate

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from ..executors import Execution, Executor
    from ..plan import JobOptions, JobPlan
    from ..runner import OutcomeSink, RunStatistics
    from ..types import Outcome


@dataclass(frozen=True)
class ShardTask:
    """What a worker needs to run its shard: small values only (Ray sends them to the actor).

    ``limiters``: each model's ``SharedLimits`` actor handle and its first snapshot; ``exit_after``:
    the test hook (``ray_engine.KILL_ENV``), this worker exits after that many durable rows.
    """

    job: Path
    options: JobOptions
    limiters: dict[str, tuple[Any, LimitsStatistics]]
    exit_after: int | None = None


@dataclass(frozen=True)
class ShardProgress:
    """A worker's figures: its runner's statistics, and the shard's rows done before this attempt."""

    statistics: RunStatistics
    done_before: int


@dataclass(frozen=True)
class ShardOutcome:
    """How a shard's attempt ended (``execute``'s ``JobResult``, less what the driver cannot use)."""

    stop_reason: str | None
    stop_detail: str | None
    exit_code: int
    statistics: RunStatistics


class ShardWorker:
    """Runs one ``ShardTask`` (a Ray async actor: ``progress`` and ``stop`` are answered while it runs)."""

    def __init__(self, task: ShardTask) -> None:
        self._task = task
        self._execution: Execution | None = None
        self._done_before = 0
        self._stop: bool | None = None  # None: not asked; False: finish what is in flight; True: at once

    async def run(self) -> ShardOutcome:
        from ..executors.online import OnlineExecutor
        from ..job import execute, prepare

        task = self._task
        plan: JobPlan = await anyio.to_thread.run_sync(prepare, task.job, task.options)
        self._done_before = plan.resume.count()
        executor: Executor = OnlineExecutor(gate_factory=self._gate)
        if task.exit_after is not None:
            executor = _ExitAfter(executor, task.exit_after)
        result = await execute(plan, executor=executor, watch=[self._follow])
        return ShardOutcome(result.stop_reason, result.stop_detail, result.exit_code, result.statistics)

    async def progress(self) -> ShardProgress | None:
        """The shard's figures now; None before it started sending."""
        if self._execution is None:
            return None
        return ShardProgress(self._execution.statistics(), self._done_before)

    async def stop(self, at_once: bool = False) -> None:
        """Ctrl-C at the driver: send nothing new (``at_once``: abandon what is in flight too)."""
        self._stop = at_once or bool(self._stop)
        if self._execution is not None:
            _stop(self._execution, at_once=self._stop)

    def _gate(self, model: str, requests_per_minute: float | None, tokens_per_minute: float | None) -> RateGate:
        """The job's limiter for ``model`` (the shard's own share of the limits is not used: the
        limiter holds the whole job's, for every worker)."""
        limiters = self._task.limiters
        handle, snapshot = limiters[model] if model in limiters else next(iter(limiters.values()))
        return RemoteGate(RayEndpoint(handle), snapshot)

    async def _follow(self, execution: Execution) -> None:
        self._execution = execution
        if self._stop is not None:
            _stop(execution, at_once=self._stop)
        await anyio.sleep_forever()


def _stop(execution: Execution, *, at_once: bool) -> None:
    if at_once:
        execution.cancel_now()
    else:
        execution.request_stop(STOP_INTERRUPTED)


class _ExitAfter:
    """The test hook: the executor's sink exits the process once ``rows`` rows are durable, as a
    machine that dies would (no clean-up, requests in flight lost after being paid)."""

    def __init__(self, executor: Executor, rows: int) -> None:
        self._executor = executor
        self._rows = rows
        self.mode = executor.mode

    def check(self, plan: JobPlan) -> None:
        self._executor.check(plan)

    def service(self, plan: JobPlan) -> str:
        return self._executor.service(plan)

    def open(self, plan: JobPlan, sink: OutcomeSink) -> AbstractAsyncContextManager[Execution]:
        return self._executor.open(plan, _ExitingSink(sink, self._rows))


class _ExitingSink:
    def __init__(self, sink: OutcomeSink, rows: int) -> None:
        self._sink = sink
        self._left = rows

    @property
    def cache(self) -> Any:
        return getattr(self._sink, "cache", None)

    def write(self, outcomes: Sequence[Outcome]) -> None:
        self._sink.write(outcomes)
        self._left -= len(outcomes)
        if self._left <= 0:
            os._exit(1)
