"""The batch executor: the job's rows as JSONL shards through DashScope's Batch API, at half price.

``run`` goes in three steps, each durable before the next (``batch.state``):

1. shard: every row to send that no open batch already holds is written into a shard file;
   a sealed shard is recorded with its rows before anything is uploaded. Rows settled
   without sending (row problems, cache hits, lines too long) go to the sink at once.
2. submit: each recorded shard without a batch is looked up by its ``ds_name`` (a kill
   after ``create`` is recovered, not repaid), else uploaded (again, when the saved file is
   gone) and created; the id is saved right after.
3. collect: batches are polled with backoff; a finished one's output and error files are
   downloaded and read into the sink by ``custom_id``. A row that failed in a way that may
   pass goes into a new batch, up to ``execution.max_retries`` times, or online once
   ``batch.online_after`` has passed since its first submission (its batch is cancelled
   first, so no row is ever answered twice); a refused row is the row's error, as online.

``wait=False`` (``--no-wait``) stops after submitting and one look at the batches: the stop
reason ``submitted`` (exit 75) says to run the same command again to collect.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from .. import pricing
from ..catalog import batch_price
from ..errors import AuthError, BackendError
from ..result import STOP_SUBMITTED
from ..runner import STOP_AUTH, STOP_BUDGET, STOP_CONFIGURATION, STOP_INTERRUPTED
from ..types import Outcome, Reply, Request, UnitKey
from ..batch.api import BatchApi
from ..batch.ids import dense_index_of, ds_name
from ..batch.results import REFUSAL_CODES, LineError, read_lines
from ..batch.shards import LineTooLarge, Shard, ShardWriter, render_line, unit_line
from ..batch.state import TERMINAL, BatchState, ShardRecord, UnitRecord, unit_lines
from ..batch.tally import Tally

if TYPE_CHECKING:
    from ..catalog import Price
    from ..plan import JobPlan
    from ..runner import OutcomeSink, RunStatistics, WorkItem

KILL_ENV = "QWEN_BATCH_KILL_AT"
"""Test hook: the process kills itself (SIGKILL) at the named step, to prove every step resumable."""
LINE_TOO_LARGE = "BatchLineTooLarge"
MAX_POLL_FACTOR = 4
"""Polling backs off from ``poll_interval_s`` to this many times it while nothing changes."""
MAX_POLL_S = 600.0
EMULATED_POLL_S = 0.5
"""Under ``--emulate`` the emulator's batches take seconds: polled this often, whatever the spec says."""
_WRITE_ROWS = 2_000


def _kill_point(step: str) -> None:
    if os.environ.get(KILL_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


class BatchExecutor:
    """Executes a plan through the Batch API. ``wait``: collect until done (else submit and stop);
    ``notes``: where status lines go; ``transport``: an ``httpx`` transport for the API (a test seam)."""

    mode = "batch"

    def __init__(self, *, wait: bool = True, notes: Callable[[str], None] | None = None, transport: Any = None) -> None:
        self._wait = wait
        self._notes = notes or (lambda message: None)
        self._transport = transport

    def __repr__(self) -> str:
        return f"BatchExecutor(wait={self._wait})"

    def check(self, plan: JobPlan) -> None:
        from ..batch.commands import still_running
        from .online import OnlineExecutor

        OnlineExecutor().check(plan)
        if plan.options.fresh and (running := still_running(plan.checkpoint_dir)):
            from ..errors import ConfigError

            listed = ", ".join(shard.batch_id or shard.name for shard in running[:5])
            more = f" and {len(running) - 5} more" if len(running) > 5 else ""
            raise ConfigError(
                f"{plan.checkpoint_dir}: --fresh would leave {len(running)} batch(es) of the previous run "
                f"running and billing ({listed}{more}); run `qwen-batch cancel {plan.spec.where}` first, then --fresh"
            )

    def service(self, plan: JobPlan) -> str:
        # A batch answer is the model's answer to the same request: shared with online runs.
        from .online import OnlineExecutor

        return OnlineExecutor().service(plan)

    @asynccontextmanager
    async def open(self, plan: JobPlan, sink: OutcomeSink) -> AsyncIterator[BatchExecution]:
        from ..batch.endpoint import batch_endpoint

        async with AsyncExitStack() as stack:
            base_url, key = await stack.enter_async_context(batch_endpoint(plan))
            api = BatchApi(base_url, key, transport=self._transport)
            stack.push_async_callback(api.aclose)
            state = BatchState.open(plan.checkpoint_dir)
            stack.callback(state.close)
            yield BatchExecution(plan, api, state, sink, wait=self._wait, notes=self._notes)


class BatchExecution:
    """One run of a plan through the Batch API (see the module docstring)."""

    def __init__(
        self,
        plan: JobPlan,
        api: BatchApi,
        state: BatchState,
        sink: OutcomeSink,
        *,
        wait: bool,
        notes: Callable[[str], None],
    ) -> None:
        self._plan = plan
        self._api = api
        self._state = state
        self._sink = sink
        self._wait = wait
        self._notes = notes
        self._spec = plan.spec.batch
        self.price: Price | None = _batch_price_or_none(plan.price)
        # A sweep's models each have their price and mode; a unit's variant names them.
        self.prices = {variant.model: _batch_price_or_none(variant.price) for variant in plan.variants}
        self._thinking = tuple(variant.mode.thinking for variant in plan.variants) or (plan.mode.thinking,)
        self._units_per_row = (max(1, len(plan.variants)), plan.samples)
        self.rate_limits: tuple[float | None, float | None] = (None, None)  # the real-time limits do not apply
        self._tally = Tally(plan.units)
        self._stop_reason: str | None = None
        self._stop_detail: str | None = None
        self._retry: dict[str, set[int]] = {}  # shard -> rows to send again in a new batch
        self._online: set[int] = set()
        self._cancelled: set[str] = set()
        self._shown: dict[str, tuple[Any, ...]] = {}
        self._reserved = plan.previous_cost
        self._wake = anyio.Event()  # set by a stop: the wait between polls ends at once
        poll = self._spec.poll_interval_s
        self._poll_s = min(poll, EMULATED_POLL_S) if plan.options.emulate else poll
        self._max_poll_s = max(self._poll_s, min(self._poll_s * MAX_POLL_FACTOR, MAX_POLL_S))

    # -- the Execution protocol ------------------------------------------------------------

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    @property
    def stop_detail(self) -> str | None:
        return self._stop_detail

    def statistics(self) -> RunStatistics:
        return self._tally.statistics()

    def request_stop(self, reason: str) -> None:
        """Stop waiting: submitted batches keep running at the service, and a rerun collects them."""
        self._stop(reason)

    def cancel_now(self) -> None:
        self._stop(STOP_INTERRUPTED)

    def _stop(self, reason: str, detail: str | None = None) -> None:
        if self._stop_reason is None:
            self._stop_reason, self._stop_detail = reason, detail
        self._wake.set()

    async def run(self, items: Iterator[list[WorkItem]]) -> RunStatistics:
        try:
            await anyio.to_thread.run_sync(self._shard_all, items)
            await self._drive()
            self._state.shrink()  # the output that follows is the run's largest step
            if self._stop_reason is None:
                _kill_point("before_output")
        except AuthError as error:
            self._stop(STOP_AUTH, f"{error.code}: {error.message}")
        except BackendError as error:
            self._stop(STOP_CONFIGURATION, f"the Batch API refused a call ({error.code}: {error.message})")
        return self.statistics()

    # -- 1. shards ---------------------------------------------------------------------

    def _writer(self) -> ShardWriter:
        spec = self._spec
        state = self._state

        def sealed(shard: Shard) -> None:
            state.record_shard(shard, ds_name(state.job_id, shard.name), spec.window_s)

        return ShardWriter(
            state.folder,
            max_lines=spec.max_requests_per_file,
            max_file_bytes=spec.max_file_bytes,
            max_line_bytes=spec.max_line_bytes,
            next_name=state.next_shard_name,
            on_sealed=sealed,
            on_units=state.stage,
        )

    def _shard_all(self, items: Iterator[list[WorkItem]]) -> None:
        """(Thread) every row not yet done nor in an open batch into sealed, recorded shards."""
        writer = self._writer()
        try:
            for batch in items:
                settled = [item for item in batch if isinstance(item, Outcome)]
                requests = [item for item in batch if isinstance(item, Request)]
                held = self._state.in_open_shards([request.index for request in requests])
                for request in requests:
                    if request.index in held:
                        continue
                    if not self._within_budget(request):
                        self._stop(STOP_BUDGET)
                        break
                    try:
                        writer.add(render_line(request), unit_line(request), thinking=self._thinks(request.index))
                    except LineTooLarge as error:
                        settled.append(self._too_large(request, int(str(error))))
                self._write(settled)
                if self._stop_reason is not None:
                    break
        finally:
            writer.close()

    def _within_budget(self, request: Request) -> bool:
        """Reserve the request's worst case at the batch price; False when the budget would be passed."""
        limit = self._plan.max_cost
        if limit is None:
            return True
        worst = pricing.worst_case_cost(self._price_of(request.model), request.input_tokens, request.max_tokens, request.reasoning_cap) or 0.0
        if self._reserved + worst > limit:
            return False
        self._reserved += worst
        return True

    def _too_large(self, request: Request, size: int) -> Outcome:
        return Outcome(
            index=request.index,
            fingerprint=request.fingerprint,
            status="error",
            error_code=LINE_TOO_LARGE,
            error_message=(
                f"not sent: the batch line is {size} bytes, over batch.max_line_bytes "
                f"{self._spec.max_line_bytes}; shorten the row or send it online"
            ),
            preflight_input_tokens=request.input_tokens,
            model=request.model,
            seed=request.seed,
        )

    def _write(self, outcomes: Sequence[Outcome]) -> None:
        """(Thread) make ``outcomes`` durable, then count them."""
        if outcomes:
            self._sink.write(outcomes)
            self._tally.count(outcomes)

    # -- 2. submit, 3. collect ---------------------------------------------------------

    async def _drive(self) -> None:
        delay = self._poll_s
        while True:
            if self._retry:
                await anyio.to_thread.run_sync(self._resubmit)
            for shard in self._state.shards(uncollected_only=True):
                if self._stopping:
                    return
                if shard.batch_id is None:
                    await self._submit(shard)
            if self._online and not self._stopping:
                await self._send_online()
            open_shards = self._state.shards(uncollected_only=True)
            self._tally.in_flight = sum(shard.lines for shard in open_shards)
            if not open_shards or self._stopping:
                return
            changed, collected = await self._poll(open_shards)
            if not self._wait and not self._retry and not self._online and self._state.shards(uncollected_only=True):
                self._stop(STOP_SUBMITTED, "submitted, not finished: run the same command again to collect")
                return
            if collected:  # rows to send again, or the end: no wait
                continue
            delay = self._poll_s if changed else min(delay * 1.5, self._max_poll_s)
            with anyio.move_on_after(delay):
                await self._wake.wait()

    @property
    def _stopping(self) -> bool:
        """Stopped by something other than the budget (which stops new rows, not collecting)."""
        return self._stop_reason is not None and self._stop_reason != STOP_BUDGET

    async def _submit(self, shard: ShardRecord) -> None:
        """Create the shard's batch, once: adopt the one a killed run created, else upload and create."""
        # Without a saved file id no batch can exist yet (create needs the file): no list call.
        found = await self._api.find(shard.ds_name) if shard.file_id is not None else None
        if found is None:
            file_id = shard.file_id
            if file_id is None or await self._api.file(file_id) is None:
                uploaded = await self._api.upload(shard.path)
                file_id = str(uploaded["id"])
                self._state.set_file(shard.name, file_id)
                _kill_point("after_upload")
            found = await self._api.create(
                file_id, self._spec.completion_window, shard.ds_name, f"qwen-batch {self._plan.spec.name}: {shard.lines} rows"
            )
            _kill_point("after_create")
        self._state.set_batch(shard.name, str(found["id"]), str(found.get("status") or "validating"), _number(found.get("created_at")))

    async def _poll(self, shards: list[ShardRecord]) -> tuple[bool, bool]:
        """Look at each open batch once and collect the finished ones: whether any status or count
        changed, and whether any batch was collected."""
        _kill_point("polling")
        changed = collected = False
        for shard in shards:
            assert shard.batch_id is not None
            batch = await self._api.retrieve(shard.batch_id)
            status = str(batch.get("status"))
            counts = batch.get("request_counts") or {}
            figures = (counts.get("total"), counts.get("completed"), counts.get("failed"))
            self._state.set_status(shard.name, status, figures)
            if self._shown.get(shard.name) != (status, *figures):
                self._shown[shard.name] = (status, *figures)
                changed = True
                self._notes(_status_line(shard, status, figures))
            if status in TERMINAL:
                await self._collect(shard, batch, status)
                collected = True
            elif self._past_online_after(shard) and shard.name not in self._cancelled:
                self._notes(f"batch {shard.name}: batch.online_after passed; cancelling it to send its rest online")
                await self._api.cancel(shard.batch_id)
                self._cancelled.add(shard.name)
        return changed, collected

    def _past_online_after(self, shard: ShardRecord) -> bool:
        after = self._spec.online_after_s
        return after is not None and shard.created_at is not None and time.time() >= shard.created_at + after

    async def _collect(self, shard: ShardRecord, batch: dict[str, Any], status: str) -> None:
        """Download the finished batch's files and read every line of the shard into the sink."""
        files = []
        for key in ("output_file_id", "error_file_id"):
            file_id = batch.get(key)
            if file_id:  # either may hold either kind of line: never judged by its prefix
                target = shard.path.with_name(f"{shard.name}.{key.removesuffix('_file_id')}.jsonl")
                await self._api.download(str(file_id), target)
                files.append(target)
        _kill_point("downloading")
        await anyio.to_thread.run_sync(self._read_results, shard, batch, status, files)
        self._state.set_collected(shard.name)

    def _read_results(self, shard: ShardRecord, batch: dict[str, Any], status: str, files: list[Path]) -> None:
        """(Thread) each line's outcome into the sink; rows the files do not answer decided as failures."""
        resume = self._plan.resume
        latency = _batch_latency(batch)
        seen: set[int] = set()
        pending: list[tuple[int, Reply | LineError]] = []

        def flush() -> None:
            units = self._state.units(index for index, _ in pending)
            outcomes = [self._decide(units[i], result, shard, latency) for i, result in pending if i in units]
            self._write([outcome for outcome in outcomes if outcome is not None])
            pending.clear()

        for path in files:
            for index, result in read_lines(path, self._units_per_row, estimate=self._estimate):
                if index in seen or resume.is_finished(index):
                    continue
                seen.add(index)
                pending.append((index, result))
                if len(pending) >= _WRITE_ROWS:
                    flush()
        missing = _missing_error(batch, status)
        for unit in self._state.units_of_shard(shard.name):
            if unit.index not in seen and not resume.is_finished(unit.index):
                pending.append((unit.index, missing))
                if len(pending) >= _WRITE_ROWS:
                    flush()
        flush()

    def _decide(self, unit: UnitRecord, result: Reply | LineError, shard: ShardRecord, latency: float | None) -> Outcome | None:
        """The row's outcome, or None when it goes into a new batch or online."""
        if isinstance(result, Reply):
            cost = pricing.cost(self._price_of(unit.model), result.input_tokens, result.output_tokens, result.reasoning_tokens or 0)
            return _answered(unit, result, cost, latency)
        if result.retryable:
            if self._past_online_after_unit(unit):
                self._online.add(unit.index)
                return None
            if unit.batches <= self._plan.spec.execution.max_retries:
                self._retry.setdefault(shard.name, set()).add(unit.index)
                self._tally.retries += 1
                return None
        return Outcome(
            status="error",
            request_id=result.request_id,
            error_code=result.code,
            error_message=result.message,
            retryable=result.retryable,
            **_unit_fields(unit, latency),
        )

    def _price_of(self, model: str) -> Price | None:
        """The batch price of a unit's model (the job's, without a sweep)."""
        return self.prices.get(model, self.price)

    def _thinks(self, index: int) -> bool:
        """Whether the unit's variant runs in thinking mode (its shard key: one mode per file)."""
        variants, samples = self._units_per_row
        return self._thinking[UnitKey.of_dense_index(index, variants, samples).variant]

    def _past_online_after_unit(self, unit: UnitRecord) -> bool:
        after = self._spec.online_after_s
        return after is not None and unit.first_sent is not None and time.time() >= unit.first_sent + after

    def _estimate(self, index: int, text: str, reasoning: str | None) -> tuple[int, int, int | None]:
        """Usage for an answer that reported none: the exact input count, the answer counted here."""
        from ..tokens import count_text

        unit = self._state.units([index]).get(index)
        model = unit.model if unit is not None else self._plan.spec.model
        reasoning_tokens = count_text(reasoning, model) if reasoning else None
        return (unit.input_tokens if unit else 0), count_text(text, model) + (reasoning_tokens or 0), reasoning_tokens

    # -- sending again -----------------------------------------------------------------

    def _resubmit(self) -> None:
        """(Thread) the rows to send again, copied line for line from their shards into new ones."""
        retry, self._retry = self._retry, {}
        writer = self._writer()
        try:
            for name, indices in sorted(retry.items()):
                units = self._state.units(indices)
                for line in _lines_of(self._state.folder / f"{name}.jsonl", indices, self._units_per_row):
                    index, raw = line
                    writer.add(raw, unit_lines([units[index]])[0], thinking=self._thinks(index))
        finally:
            writer.close()

    async def _send_online(self) -> None:
        """The rows past ``batch.online_after``, through the online executor (the real-time price)."""
        from .online import OnlineExecutor

        wanted, self._online = self._online, set()
        self._notes(f"sending {len(wanted)} row(s) online: batch.online_after passed before they were answered")
        requests: list[WorkItem] = [request for request in self._plan.requests() if request.index in wanted]
        async with OnlineExecutor().open(self._plan, self._sink) as online:
            statistics = await online.run(iter([requests]))
            if online.stop_reason is not None:
                self._stop(online.stop_reason, online.stop_detail)
        self._tally.add(statistics)


def _lines_of(path: Path, indices: set[int], units_per_row: tuple[int, int]) -> Iterator[tuple[int, bytes]]:
    """The lines of a shard file whose unit is in ``indices`` (dense, over ``(variants, samples)``)."""
    with path.open("rb") as handle:
        for raw in handle:
            index = dense_index_of(str(orjson.loads(raw).get("custom_id")), units_per_row)
            if index is not None and index in indices:
                yield index, raw


def _batch_price_or_none(price: Price | None) -> Price | None:
    return batch_price(price) if price is not None else None


def _unit_fields(unit: UnitRecord, latency: float | None) -> dict[str, Any]:
    """The outcome fields a row's record gives, answered or not: ``attempts`` is its batches."""
    return {
        "index": unit.index,
        "fingerprint": unit.fingerprint,
        "attempts": unit.batches,
        "latency_s": latency,
        "preflight_input_tokens": unit.input_tokens,
        "model": unit.model,
        "seed": unit.seed,
    }


def _answered(unit: UnitRecord, reply: Reply, cost: float | None, latency: float | None) -> Outcome:
    return Outcome.of_reply(reply, cost=cost, **_unit_fields(unit, latency))


def _missing_error(batch: dict[str, Any], status: str) -> LineError:
    """The failure of a row a finished batch gave no line for (expired, cancelled, or a failed file)."""
    errors = ((batch.get("errors") or {}).get("data") or [{}])[0] if isinstance(batch.get("errors"), dict) else {}
    code = str(errors.get("code") or f"Batch{status.capitalize()}")
    message = str(errors.get("message") or f"the batch ended {status} before answering this row")
    return LineError(code, message, code not in REFUSAL_CODES)


def _batch_latency(batch: dict[str, Any]) -> float | None:
    """Seconds from the batch's creation to its end: how long each of its rows waited."""
    created = _number(batch.get("created_at"))
    ended = next(
        (value for key in ("completed_at", "expired_at", "cancelled_at", "failed_at") if (value := _number(batch.get(key)))),
        None,
    )
    return ended - created if created is not None and ended is not None else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _status_line(shard: ShardRecord, status: str, figures: tuple[Any, ...]) -> str:
    total, completed, failed = (value if value is not None else "?" for value in figures)
    return f"batch {shard.name} ({shard.batch_id}): {status}, {completed}/{total} done, {failed} failed"
