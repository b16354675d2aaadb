"""The worker pool: producer -> bounded stream -> N workers -> one group-committing writer.

Every seam is an argument (backend, limits, retry policy, sink, budget, clock), so tests
drive it exactly and instantly. Durability is part of the flow: a worker hands its finished
row to the writer and does not take another request until that row is on disk, so a kill at
any instant loses at most ``concurrency`` paid requests (shared/NOTES.md, "Crash safety").
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import anyio
from anyio.abc import ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream

from . import collector, pricing
from .backends.base import Backend, collect
from .budget import Budget
from .catalog import Price
from .errors import AuthError, BackendError, ConfigurationRefused, RateLimited
from .limits import RateGate
from .retry import RetryPolicy, call_with_retries
from .run_events import RunEvents
from .types import Outcome, Reply, Request

if TYPE_CHECKING:
    from .structured import JsonMode, Parsed

WorkItem = Request | Outcome
"""A row to send, or a row already decided without sending (row problem, cache hit, over-long)."""

STOP_BUDGET = "budget"
STOP_AUTH = "auth"
STOP_CONFIGURATION = "configuration"
STOP_INTERRUPTED = "interrupted"
STOP_ERROR_RATE = "error_rate"
# ``execution.max_error_rate`` is judged over this many of the latest finished rows.
ERROR_WINDOW_ROWS = 200


class OutcomeSink(Protocol):
    """Makes outcomes durable; blocking, called from a worker thread, one call per group."""

    def write(self, outcomes: Sequence[Outcome]) -> None: ...


class ReplyStore(Protocol):
    """The response cache as JSON mode reads and writes it, one attempt at a time (blocking)."""

    def get_many(self, fingerprints: Sequence[str]) -> dict[str, Reply]: ...

    def put_many(self, items: Sequence[tuple[str, Reply]]) -> None: ...


class EventSink(Protocol):
    """Appends event-log lines (``run_events``); blocking, called in the same thread call as ``OutcomeSink.write``."""

    def append(self, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class RunStatistics:
    """A snapshot of a run for progress lines and the summary."""

    rows_total: int
    rows_done: int
    ok: int
    errors: int
    errors_by_code: dict[str, int]
    cached: int
    cache_saved_cost: float
    input_tokens: int
    output_tokens: int
    cost: float
    retries: int
    throttled: int
    in_flight: int
    elapsed_s: float
    cooling_down_s: float = 0.0
    """Seconds until the pool may send again after a 429 (0: not cooling down)."""
    reasks: int = 0
    """JSON mode: requests that asked again after an answer that did not parse."""

    @property
    def rows_per_second(self) -> float:
        return self.rows_done / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class _Counters:
    rows_done: int = 0
    ok: int = 0
    errors: int = 0
    errors_by_code: Counter[str] = field(default_factory=Counter)
    cached: int = 0
    cache_saved_cost: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    retries: int = 0
    throttled: int = 0
    in_flight: int = 0
    reasks: int = 0


class Runner:
    """Sends every request of a job once, within the limits, and makes each outcome durable."""

    def __init__(
        self,
        backend: Backend,
        sink: OutcomeSink,
        *,
        concurrency: int,
        limits: RateGate,
        retry_policy: RetryPolicy,
        price: Price | None,
        rows_total: int,
        budget: Budget | None = None,
        clock: Callable[[], float] = time.monotonic,
        drain_timeout_s: float = 5.0,
        max_error_rate: float | None = None,
        json_mode: JsonMode | None = None,
        replies: ReplyStore | None = None,
        events: RunEvents | None = None,
        event_sink: EventSink | None = None,
        prices: Mapping[str, Price | None] | None = None,
        limits_by_model: Mapping[str, RateGate] | None = None,
    ) -> None:
        self._backend = backend
        # JSON mode parses every answer and asks again (structured.py); ``replies`` is the
        # cache each of its attempts is looked up in and stored to (work.py leaves it to us).
        self._json_mode = json_mode
        self._replies = replies
        # The run report's per-second counters, written with each group commit (both or neither).
        self._events = events if event_sink is not None else None
        self._event_sink = event_sink
        self._sink = sink
        self._concurrency = concurrency
        self._limits = limits
        # A sweep's models each have their own quota (variants.py); ``limits`` is for any other.
        self._limits_by_model = limits_by_model
        self._retry_policy = retry_policy
        self._price = price
        # A sweep's models each cost their own (variants.py); ``price`` is for any other.
        self._prices = prices
        self._budget = budget
        self._clock = clock
        self._drain_timeout_s = drain_timeout_s
        self._rows_total = rows_total
        self._counters = _Counters()
        self._started = clock()
        self._stopping = False
        self.stop_reason: str | None = None
        self.stop_detail: str | None = None
        # The answer that stopped the run, for STOP_CONFIGURATION (the caller explains it).
        self.stop_error: ConfigurationRefused | None = None
        self._send_scope: anyio.CancelScope | None = None
        self._error_rate = _TrailingErrorRate(max_error_rate) if max_error_rate is not None else None

    # -- control ---------------------------------------------------------------

    def request_stop(self, reason: str, detail: str | None = None) -> None:
        """Stop taking new rows; rows in flight finish (within the drain timeout for an interrupt)."""
        if self.stop_reason is None:
            self.stop_reason, self.stop_detail = reason, detail
        self._stopping = True
        if reason == STOP_INTERRUPTED and self._send_scope is not None:
            self._send_scope.deadline = min(self._send_scope.deadline, anyio.current_time() + self._drain_timeout_s)

    def cancel_now(self) -> None:
        """Stop at once: requests in flight are abandoned, finished rows are still written."""
        self._stopping = True
        if self._send_scope is not None:
            self._send_scope.cancel()

    def statistics(self) -> RunStatistics:
        c = self._counters
        return RunStatistics(
            rows_total=self._rows_total,
            rows_done=c.rows_done,
            ok=c.ok,
            errors=c.errors,
            errors_by_code=dict(c.errors_by_code),
            cached=c.cached,
            cache_saved_cost=c.cache_saved_cost,
            input_tokens=c.input_tokens,
            output_tokens=c.output_tokens,
            cost=c.cost,
            retries=c.retries,
            throttled=c.throttled,
            in_flight=c.in_flight,
            elapsed_s=self._clock() - self._started,
            cooling_down_s=self._cooling_down_s(),
            reasks=c.reasks,
        )

    # -- the pool --------------------------------------------------------------

    async def run(self, batches: Iterator[Sequence[WorkItem]]) -> RunStatistics:
        """Send every work item of ``batches`` (read in a thread) and return the final statistics."""
        self._started = self._clock()
        # The stream carries whole batches (at most one waiting, one being taken apart by the
        # workers, one being read), so the per-row cost is a ``next()``, not a stream hand-off.
        batch_send, batch_receive = anyio.create_memory_object_stream[Sequence[WorkItem]](1)
        feed = _Feed(batch_receive, workers=self._concurrency)
        commits = _GroupCommit()
        with collector.sending_phase():
            await self._run_pool(batches, batch_send, feed, commits)
        if self._events is not None and self._event_sink is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._event_sink.append, self._events.finish())
        return self.statistics()

    async def _run_pool(self, batches: Iterator[Sequence[WorkItem]], batch_send: ObjectSendStream[Sequence[WorkItem]],
                        feed: _Feed, commits: _GroupCommit) -> None:
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._write_outcomes, commits)
            try:
                with anyio.CancelScope() as self._send_scope:
                    async with anyio.create_task_group() as pool:
                        pool.start_soon(self._produce, batches, batch_send)
                        for _ in range(self._concurrency):
                            pool.start_soon(self._work, feed, commits)
            finally:
                feed.close()
                commits.close()

    async def _produce(self, batches: Iterator[Sequence[WorkItem]], send: ObjectSendStream[Sequence[WorkItem]]) -> None:
        async with send:
            while not self._stopping:
                batch = await anyio.to_thread.run_sync(next, batches, None)
                if batch is None:
                    return
                try:
                    await send.send(batch)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return

    async def _work(self, feed: _Feed, commits: _GroupCommit) -> None:
        try:
            while not self._stopping:
                item = await feed.next()
                if item is None or self._stopping:
                    return
                if isinstance(item, Outcome):
                    outcome = item
                else:
                    sent = await (
                        self._send_within_budget(item) if self._json_mode is None else self._answer_as_json(item)
                    )
                    if sent is None:
                        return
                    outcome = sent
                # Not a new request until this row is on disk (shared/NOTES.md, "Crash safety").
                await commits.wait_durable(outcome)
        finally:
            feed.worker_done()

    async def _answer_as_json(self, request: Request) -> Outcome | None:
        """JSON mode: the row's attempts until its answer parses or the re-asks run out.

        The re-asks are part of the row: it is recorded once, when its last attempt is in.
        An answer cut by ``max_tokens`` is not asked again (the re-ask would be cut too).
        None when the key or the configuration was refused (nothing is recorded).
        """
        from .structured import settle

        json_mode = self._json_mode
        assert json_mode is not None
        attempt = await self._attempt(request)
        if attempt is None or not attempt.ok:
            return attempt
        attempts = [attempt]
        current = request
        while True:
            parsed = json_mode.check(attempt.output_text or "")
            last = attempts[-1]
            if parsed.ok or last.finish_reason == "length" or len(attempts) > json_mode.retries:
                break
            current = json_mode.follow_up(current, last.output_text or "", parsed)
            if len(attempts) == 1:
                await self._remember(request, last)
            following = await self._attempt(current)
            if following is None:
                return self._cut_short(request, attempts, parsed)
            self._counters.reasks += 1
            attempts.append(following)
            if not following.ok:
                break
            await self._remember(current, following)
            attempt = following
        return settle(request, attempts, parsed)

    def _cut_short(self, request: Request, attempts: list[Outcome], parsed: Parsed) -> Outcome | None:
        """A row whose re-ask was not sent: the budget kept the answers so far (a resume asks
        again, from the cache); a refused key or configuration records nothing."""
        from .structured import settle

        if self.stop_reason != STOP_BUDGET:
            return None
        outcome = settle(request, attempts, parsed)
        return dataclasses.replace(outcome, retryable=True)

    async def _attempt(self, request: Request) -> Outcome | None:
        """One attempt of a JSON-mode row: from the cache when it holds this request, else sent."""
        if self._replies is not None:
            hits = await anyio.to_thread.run_sync(self._replies.get_many, [request.fingerprint])
            reply = hits.get(request.fingerprint)
            if reply is not None:
                return Outcome.answered(request, reply, cost=0.0, attempts=0, latency_s=0.0, cached=True)
        return await self._send_within_budget(request)

    async def _remember(self, request: Request, attempt: Outcome) -> None:
        """Store one attempt of a re-asked row under its own request (the sink stores a row
        under its first request only, which for a re-asked row is not the last answer)."""
        if self._replies is None or attempt.cached:
            return
        await anyio.to_thread.run_sync(self._replies.put_many, [(request.fingerprint, attempt.stored_reply())])

    async def _send_within_budget(self, request: Request) -> Outcome | None:
        worst = 0.0
        if self._budget is not None:
            worst = (
                pricing.worst_case_cost(self._price_of(request.model), request.input_tokens, request.max_tokens, request.reasoning_cap)
                or 0.0
            )
            if not self._budget.try_reserve(worst):
                self.request_stop(STOP_BUDGET)
                return None
        outcome = await self._send(request)
        if self._budget is not None:
            self._budget.settle(worst, (outcome.cost or 0.0) if outcome else 0.0)
        return outcome

    async def _send(self, request: Request) -> Outcome | None:
        """Send one request with retries; None when the key or the configuration was refused.

        A refused key abandons the requests in flight (they would fail too); a configuration
        error lets them finish, so a reply already paid for is kept. Either way the row is
        not recorded, and a resume sends it.
        """
        counters = self._counters
        limits = self._limits if self._limits_by_model is None else self._limits_by_model.get(request.model, self._limits)
        charge = request.worst_case_tokens
        events = self._events
        begun = 0
        on_wire = False

        async def before_attempt() -> None:
            # Retries are counted as they begin, so the progress line shows them live.
            nonlocal begun, on_wire
            begun += 1
            if begun > 1:
                counters.retries += 1
            if not limits.send_now(charge):
                await limits.wait_to_send(charge)
            if events is not None:
                events.attempt_started()
                on_wire = True

        def on_error(error: BackendError, attempt: int) -> None:
            nonlocal on_wire
            limits.settle(charge, 0)
            if isinstance(error, RateLimited):
                counters.throttled += 1
                limits.on_throttled(error)
            if on_wire and events is not None:
                events.attempt_failed(error.code, error.kind if isinstance(error, RateLimited) else None)
                on_wire = False

        clock = self._clock
        started = clock()
        counters.in_flight += 1
        try:
            reply, attempts = await call_with_retries(
                # Each attempt's own clock start: a streamed reply's first_token_s is the final one's.
                lambda: collect(self._backend.stream(request), clock=clock),
                self._retry_policy,
                before_attempt=before_attempt,
                on_error=on_error,
            )
        except AuthError as error:
            self.request_stop(STOP_AUTH, f"{error.code}: {error.message}")
            self.cancel_now()
            return None
        except ConfigurationRefused as error:
            if self.stop_reason is None:
                self.stop_error = error
            self.request_stop(STOP_CONFIGURATION, f"{error.code}: {error.message}")
            return None
        except BackendError as error:
            attempts = error.attempts
            return Outcome(
                index=request.index,
                fingerprint=request.fingerprint,
                status="error",
                request_id=error.request_id,
                error_code=error.code,
                error_message=error.message,
                retryable=error.retryable,
                attempts=attempts,
                latency_s=self._clock() - started,
                preflight_input_tokens=request.input_tokens,
                model=request.model,
                seed=request.seed,
            )
        else:
            if on_wire and events is not None:
                events.attempt_answered(reply.input_tokens, reply.output_tokens)
                on_wire = False
        finally:
            counters.in_flight -= 1
            if on_wire and events is not None:
                events.attempt_abandoned()  # cancelled on the wire
        limits.settle(charge, reply.total_tokens)
        limits.on_success()
        return Outcome.answered(
            request,
            reply,
            cost=pricing.cost(
                self._price_of(request.model), reply.input_tokens, reply.output_tokens, reply.reasoning_tokens or 0
            ),
            attempts=attempts,
            latency_s=self._clock() - started,
        )

    def _cooling_down_s(self) -> float:
        """The longest cool-down of any model's limiter (a sweep's models each have one)."""
        every = [self._limits, *(self._limits_by_model or {}).values()]
        return max(limits.statistics().throttle.cooling_down_s for limits in every)

    def _price_of(self, model: str | None) -> Price | None:
        prices = self._prices
        if prices is None or model is None:
            return self._price
        return prices.get(model, self._price)

    async def _write_outcomes(self, commits: _GroupCommit) -> None:
        """Group commit: write every outcome waiting, once, then release their workers."""
        try:
            while True:
                if not commits.pending:
                    if commits.closed:
                        return
                    await commits.wait_for_work()
                    continue
                group, durable = commits.take()
                await self._commit(group)
                durable.set()
        finally:
            with anyio.CancelScope(shield=True):
                if commits.pending:
                    group, durable = commits.take()
                    await self._commit(group)
                    durable.set()

    async def _commit(self, outcomes: list[Outcome]) -> None:
        lines = self._events.take() if self._events is not None else b""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._write, outcomes, lines)
        self._count(outcomes)

    def _write(self, outcomes: list[Outcome], event_lines: bytes) -> None:
        """(Worker thread) the rows first, durable; then any closed buckets of the event log."""
        self._sink.write(outcomes)
        if event_lines and self._event_sink is not None:
            self._event_sink.append(event_lines)

    def _count(self, outcomes: Sequence[Outcome]) -> None:
        c = self._counters
        for outcome in outcomes:
            c.rows_done += 1
            if outcome.status == "ok":
                c.ok += 1
                if outcome.cached:
                    c.cached += 1
                    c.cache_saved_cost += (
                        pricing.cost(
                            self._price_of(outcome.model),
                            outcome.input_tokens or 0,
                            outcome.output_tokens or 0,
                            outcome.reasoning_tokens or 0,
                        )
                        or 0.0
                    )
                else:
                    c.input_tokens += outcome.input_tokens or 0
                    c.output_tokens += outcome.output_tokens or 0
                    c.cost += outcome.cost or 0.0
            else:
                c.errors += 1
                c.errors_by_code[outcome.error_code or "Unknown"] += 1
                if outcome.parse_status is not None and not outcome.cached:
                    # A JSON answer that never parsed was paid for all the same.
                    c.input_tokens += outcome.input_tokens or 0
                    c.output_tokens += outcome.output_tokens or 0
                    c.cost += outcome.cost or 0.0
        if self._error_rate is not None and self._error_rate.add(outcomes) and not self._stopping:
            self.request_stop(STOP_ERROR_RATE, self._error_rate.describe())


class _TrailingErrorRate:
    """The share of failed rows among the latest ``ERROR_WINDOW_ROWS`` finished, against a limit."""

    __slots__ = ("limit", "_window", "_failed")

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._window: deque[bool] = deque(maxlen=ERROR_WINDOW_ROWS)
        self._failed = 0

    def add(self, outcomes: Sequence[Outcome]) -> bool:
        """Count a group of finished rows; True when the window is full and over the limit."""
        window = self._window
        for outcome in outcomes:
            failed = outcome.status != "ok"
            if len(window) == ERROR_WINDOW_ROWS:
                self._failed -= window[0]
            window.append(failed)
            self._failed += failed
        return len(window) == ERROR_WINDOW_ROWS and self._failed > self.limit * ERROR_WINDOW_ROWS

    def describe(self) -> str:
        return (
            f"{self._failed} of the last {ERROR_WINDOW_ROWS} rows failed, more than "
            f"execution.max_error_rate {self.limit:g}"
        )


class _Feed:
    """The workers' shared view of the batch stream: one item at a time, in input order.

    Taking the next item is a plain ``next()`` on the current batch; only at a batch's end
    does a worker (one at a time, under the lock) wait for the next batch. When the last
    worker leaves, the stream is closed so a producer blocked on a full stream stops.
    """

    def __init__(self, receive: MemoryObjectReceiveStream[Sequence[WorkItem]], *, workers: int) -> None:
        self._receive = receive
        self._items: Iterator[WorkItem] = iter(())
        self._lock = anyio.Lock()
        self._exhausted = False
        self._workers = workers

    async def next(self) -> WorkItem | None:
        """The next item, or None when there are no more."""
        item = next(self._items, None)
        if item is not None:
            return item
        async with self._lock:
            while not self._exhausted:
                item = next(self._items, None)
                if item is not None:
                    return item
                try:
                    self._items = iter(await self._receive.receive())
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    self._exhausted = True
        return None

    def worker_done(self) -> None:
        self._workers -= 1
        if self._workers == 0:
            self.close()

    def close(self) -> None:
        self._exhausted = True
        self._receive.close()


class _GroupCommit:
    """Outcomes waiting to be made durable, and one Event per group that says they are.

    Workers add an outcome and wait for the Event of the group it joined; the writer takes
    every pending outcome at once, writes them, and sets that group's Event. One Event per
    group, not per row, and no stream hand-off per row.
    """

    def __init__(self) -> None:
        self.pending: list[Outcome] = []
        self.closed = False
        self._durable = anyio.Event()
        self._work = anyio.Event()

    async def wait_durable(self, outcome: Outcome) -> None:
        """Add ``outcome`` to the next group and return once that group is on disk."""
        self.pending.append(outcome)
        durable = self._durable
        self._work.set()
        await durable.wait()

    async def wait_for_work(self) -> None:
        """(Writer) wait until an outcome is pending or the pool has finished."""
        await self._work.wait()
        self._work = anyio.Event()

    def take(self) -> tuple[list[Outcome], anyio.Event]:
        """(Writer) every pending outcome, and the Event to set once they are durable."""
        group, durable = self.pending, self._durable
        self.pending, self._durable = [], anyio.Event()
        return group, durable

    def close(self) -> None:
        """No more outcomes will come: the writer finishes what is pending and returns."""
        self.closed = True
        self._work.set()
