"""The job's global rate limit, shared by every Ray worker: one ``SharedLimits`` per (account, model),
run as an async actor, and the ``RemoteGate`` through which each worker's runner sends.

The actor holds a ``limits.Limits``, the same spaced limiters and adaptive throttle a single process
uses, so a 429 that any worker sees reaches the one throttle that paces them all. An attempt costs
one round trip: ``wait_to_send`` returns when the actor grants the slot, so the actor's clock is the
only one that decides (no time is compared across machines; a ``Retry-After`` is a pause counted
there too), and it carries the worker's answers since its last request.
No Ray import here: Ray wraps these classes when the engine starts them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from ..errors import RateLimited
from ..limits import Limits, LimitsStatistics

# What a worker reports of one attempt, in the order the runner called its gate.
SETTLE = "settle"  # (SETTLE, charged, used): any answer
SUCCESS = "ok"  # (SUCCESS,)
THROTTLED = "429"  # (THROTTLED, code, kind, retry_after)
Answer = tuple[Any, ...]
FLUSH_S = 0.05
"""Answers wait at most this long for the worker's next request to carry them."""


class SharedLimits:
    """One account's limits for one model, for every worker of a job (a Ray async actor)."""

    def __init__(
        self, requests_per_minute: float | None, tokens_per_minute: float | None, window_s: float | None = None
    ) -> None:
        self._limits = Limits.from_settings(requests_per_minute, tokens_per_minute, window_s=window_s)

    async def wait_to_send(self, tokens: int, answers: Sequence[Answer] = ()) -> LimitsStatistics:
        """Take a worker's latest ``answers``, then return once one request worth ``tokens`` may go
        out (it is charged), with a fresh snapshot."""
        self.replay(answers)
        await self._limits.wait_to_send(tokens)
        return self._limits.statistics()

    async def record(self, answers: Sequence[Answer]) -> None:
        """Answers that could not wait for the worker's next request (a 429, or a quiet worker)."""
        self.replay(answers)

    async def statistics(self) -> LimitsStatistics:
        return self._limits.statistics()

    def replay(self, answers: Sequence[Answer]) -> None:
        """Apply a worker's answers to the limits, in the order they came."""
        limits = self._limits
        for answer in answers:
            tag = answer[0]
            if tag == SETTLE:
                limits.settle(answer[1], answer[2])
            elif tag == SUCCESS:
                limits.on_success()
            else:
                limits.on_throttled(RateLimited(answer[1], "", kind=answer[2], retry_after=answer[3]))


class LimiterEndpoint(Protocol):
    """How a gate reaches its limiter: through a Ray actor handle, or (in a test) directly."""

    def wait_to_send(self, tokens: int, answers: list[Answer]) -> Awaitable[LimitsStatistics]: ...

    def record(self, answers: list[Answer]) -> None: ...


class RayEndpoint:
    """A ``SharedLimits`` actor's handle as a ``LimiterEndpoint`` (an ObjectRef is awaitable)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def wait_to_send(self, tokens: int, answers: list[Answer]) -> Awaitable[LimitsStatistics]:
        ref: Awaitable[LimitsStatistics] = self._handle.wait_to_send.remote(tokens, answers)
        return ref

    def record(self, answers: list[Answer]) -> None:
        self._handle.record.remote(answers)


class RemoteGate:
    """A ``RateGate`` whose limits live in a ``SharedLimits`` elsewhere: one round trip per attempt.

    Answers ride with the worker's next ``wait_to_send`` (which comes within milliseconds while the
    pool is busy); a 429 goes at once, since every worker must slow down before its next slot, and
    answers that wait ``FLUSH_S`` go on their own. ``statistics`` is the snapshot of the latest
    grant (``snapshot`` until the first): a progress line may be a request old, never slower.
    """

    def __init__(self, endpoint: LimiterEndpoint, snapshot: LimitsStatistics) -> None:
        self._endpoint = endpoint
        self._snapshot = snapshot
        self._answers: list[Answer] = []
        self._timer: asyncio.TimerHandle | None = None

    def send_now(self, tokens: int) -> bool:
        """Never at once: only the limiter actor may grant a slot of the job's shared limits."""
        return False

    async def wait_to_send(self, tokens: int) -> None:
        self._snapshot = await self._endpoint.wait_to_send(tokens, self._take())

    def settle(self, charged: int, used: int) -> None:
        self._report((SETTLE, charged, used))

    def on_success(self) -> None:
        self._report((SUCCESS,))

    def on_throttled(self, error: RateLimited) -> None:
        self._answers.append((THROTTLED, error.code, error.kind, error.retry_after))
        self._flush()

    def statistics(self) -> LimitsStatistics:
        return self._snapshot

    def _report(self, answer: Answer) -> None:
        self._answers.append(answer)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_S, self._flush)

    def _take(self) -> list[Answer]:
        answers, self._answers = self._answers, []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return answers

    def _flush(self) -> None:
        answers = self._take()
        if answers:
            self._endpoint.record(answers)
