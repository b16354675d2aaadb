"""One job end to end: spec -> table -> preflight -> resume state -> runner -> Parquet + summary.

``prepare_job`` does everything that can fail on the user's input before anything is sent or
overwritten (exit 2); ``execute_job`` sends, and always leaves a consistent checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from . import catalog as catalog_module
from .budget import Budget
from .cache import ResponseCache, default_cache_path
from .catalog import ModelInfo, Price
from .checkpoint import Checkpoint, CheckpointSummary, manifest_changes, set_aside, write_file_atomically
from .errors import ConfigError, InputError, QwenBatchError, StorageError
from .output import check_input_columns
from .preflight import PreflightReport, ResumeIndex, rendered, run_preflight
from .render import Renderer, RowProblem
from .runner import STOP_AUTH, STOP_BUDGET, STOP_INTERRUPTED, Runner, RunStatistics, WorkItem
from .spec import JobSpec, check_base_url, load_spec, price_for, resolve_model
from .table import Table, open_table
from .types import Outcome, Reply, Request
from .wire import DEFAULT_BASE_URL

API_KEY_ENV = "DASHSCOPE_API_KEY"
API_KEY_FILE_ENV = "DASHSCOPE_API_KEY_FILE_PATH"
BASE_URL_ENV = "DASHSCOPE_HTTP_BASE_URL"
BATCH_ROWS = 2_000
OVER_LONG_CODE = "InvalidParameter"


@dataclass(frozen=True)
class JobOptions:
    """Command-line choices that override or extend the spec."""

    emulate: bool = False
    limit: int | None = None
    concurrency: int | None = None
    output: Path | None = None
    fresh: bool = False
    retry_errors: bool = False
    no_cache: bool = False
    max_cost: float | None = None


@dataclass
class PreparedJob:
    """Everything checked and opened, nothing sent yet."""

    spec: JobSpec
    options: JobOptions
    model_info: ModelInfo | None
    price: Price | None
    table: Table
    renderer: Renderer
    rows: int
    output_path: Path
    checkpoint_dir: Path
    manifest: dict[str, Any]
    preflight: PreflightReport
    resume: ResumeIndex
    previous_cost: float
    input_identity: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def summary_path(self) -> Path:
        return self.output_path.with_name(self.output_path.name + ".summary.json")

    @property
    def max_cost(self) -> float | None:
        return self.options.max_cost if self.options.max_cost is not None else self.spec.budget.max_cost


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
        if self.stop_reason in (STOP_AUTH, STOP_BUDGET):
            return 3
        return 1 if self.summary["rows"]["error"] else 0


def checkpoint_dir_for(output_path: Path) -> Path:
    return output_path.with_name(output_path.name + ".checkpoint")


def request_manifest(spec: JobSpec, renderer: Renderer) -> dict[str, Any]:
    """The parts of a job that decide its requests; a resume refuses when they change."""
    return {
        "format": 1,
        "model": spec.model,
        "prompt": spec.prompt.model_dump(mode="json"),
        "parameters": renderer.parameters,
        "id_column": spec.input.id_column,
    }


def prepare_job(
    spec_path: Path,
    options: JobOptions,
    cache: ServiceCache | None = None,
    *,
    check_over_long: bool = True,
) -> PreparedJob:
    """Load and check the spec and the whole input; read the checkpoint. Sends nothing.

    With ``cache``, the preflight also counts the rows the response cache would answer.
    Over-long rows raise InputError when the spec's policy is ``fail``, unless
    ``check_over_long`` is false (``validate`` lists them itself).
    """
    spec = load_spec(spec_path)
    catalog = catalog_module.builtin()
    model_info = resolve_model(spec, catalog)
    warnings: list[str] = []
    if model_info is None:
        warnings.append(
            f"model {spec.model!r} is not in the built-in catalog: no input-length check, "
            "and cost is unknown unless the spec has a pricing section"
        )
    price = price_for(spec, model_info)
    if price is None and model_info is not None:
        warnings.append(f"no known price for {spec.model!r}: cost will be null (add a pricing section)")
    output_path = (options.output or spec.output.path).resolve()
    if output_path == spec.input.path.resolve():
        raise ConfigError(f"--output {output_path} is the input file; choose another output path")
    check_output_folder(output_path)
    table = open_table(spec)
    check_input_columns(table.columns)
    rows = table.num_rows if options.limit is None else min(options.limit, table.num_rows)
    renderer = Renderer(spec, model_info)
    manifest = request_manifest(spec, renderer)
    checkpoint_dir = checkpoint_dir_for(output_path)
    identity = input_identity(spec.input.path)
    resume, previous_cost = _resume_state(checkpoint_dir, manifest, rows, options, identity)
    report = run_preflight(
        rendered(renderer, table.iter_batches(batch_size=BATCH_ROWS, limit=rows), resume),
        max_input_tokens=model_info.max_input_tokens if model_info else None,
        resume=resume,
        over_long_is_error=spec.preflight.over_long == "error",
        price=price,
        cache=cache,
    )
    if report.mismatched_row_ids:
        raise InputError(
            f"{checkpoint_dir}: rows already done were sent with different requests "
            f"(row ids {', '.join(report.mismatched_row_ids)}): the input changed; "
            "re-run with --fresh to start over (old results are kept aside)"
        )
    if report.first_problem is not None and report.row_problems == report.rows:
        problem = report.first_problem
        raise InputError(
            f"{spec.input.path}: no row can be sent (row {problem.row_id}: {problem.message}); "
            f"fix the {_prompt_source(spec)} or the prompt section of {spec.path}"
        )
    if report.over_long and spec.preflight.over_long == "fail" and check_over_long:
        raise InputError(over_long_message(spec, report, listed=20))
    return PreparedJob(
        spec=spec,
        options=options,
        model_info=model_info,
        price=price,
        table=table,
        renderer=renderer,
        rows=rows,
        output_path=output_path,
        checkpoint_dir=checkpoint_dir,
        manifest=manifest,
        preflight=report,
        resume=resume,
        previous_cost=previous_cost,
        input_identity=identity,
        warnings=warnings,
    )


def check_output_folder(output_path: Path) -> None:
    """The output's folder exists or can be made, and is writable; else exit 2 before sending."""
    folder = output_path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{output_path}: cannot write there ({folder} is not a writable folder); choose another output path"
        )


def _prompt_source(spec: JobSpec) -> str:
    prompt = spec.prompt
    column = prompt.messages_column or prompt.prompt_column
    return f"column {column!r}" if column else "template's columns"


def over_long_message(spec: JobSpec, report: PreflightReport, listed: int | None = None) -> str:
    """One line naming the over-long rows by id (the first ``listed``, or all) and the fix."""
    rows = report.over_long if listed is None else report.over_long[:listed]
    names = ", ".join(f"{row.row_id} ({row.input_tokens} tokens)" for row in rows)
    more = f" and {len(report.over_long) - len(rows)} more" if len(rows) < len(report.over_long) else ""
    return (
        f"{spec.input.path}: {len(report.over_long)} row(s) exceed {spec.model}'s input limit of "
        f"{report.max_input_tokens} tokens: {names}{more}; shorten them, or set "
        "preflight.over_long: error to record them as row errors without sending them"
    )


INPUT_IDENTITY_FILE = "input.json"


def input_identity(input_path: Path) -> dict[str, Any]:
    """What the finished rows of a checkpoint were rendered from: the input's bytes and qwen-batch."""
    from . import __version__

    try:
        with input_path.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        raise InputError(f"{input_path}: cannot read the input ({exc.strerror})") from None
    return {"input_sha256": digest, "qwen_batch": __version__}


def record_input_identity(checkpoint_dir: Path, identity: dict[str, Any]) -> None:
    """Remember what this run's rows are rendered from, so a resume can trust them unchecked."""
    try:
        write_file_atomically(checkpoint_dir / INPUT_IDENTITY_FILE, json.dumps(identity).encode())
    except OSError as exc:
        raise StorageError(f"{checkpoint_dir / INPUT_IDENTITY_FILE}: cannot write ({exc.strerror})") from None


def _same_input_as_before(checkpoint_dir: Path, identity: dict[str, Any]) -> bool:
    try:
        return json.loads((checkpoint_dir / INPUT_IDENTITY_FILE).read_text(encoding="utf-8")) == identity
    except (OSError, ValueError):
        return False


def _resume_state(
    checkpoint_dir: Path, manifest: dict[str, Any], rows: int, options: JobOptions, identity: dict[str, Any]
) -> tuple[ResumeIndex, float]:
    """Rows an earlier run finished (and will not be sent again), and what they cost."""
    resume = ResumeIndex(rows)
    if options.fresh or not checkpoint_dir.exists():
        return resume, 0.0
    resume.verified = _same_input_as_before(checkpoint_dir, identity)
    checkpoint = Checkpoint.open(checkpoint_dir, manifest)
    try:
        done = checkpoint.done_frame(extra_columns=("input_tokens",))
    finally:
        checkpoint.close()
    import polars as pl

    keep = pl.col("status") == "ok"
    if not options.retry_errors:
        keep = keep | ~pl.col("retryable")
    finished = done.filter(keep & pl.col("index").is_between(0, rows - 1))
    previous_cost = float(done["cost"].fill_null(0.0).sum())
    if finished.height == 0:
        return resume, previous_cost
    # Vectorised: a Python call per finished row took seconds on a million-row resume.
    positions = finished["index"]
    prefixes = finished["fingerprint"].str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64, strict=False)
    counts = finished["input_tokens"].fill_null(0).clip(0, (1 << 32) - 1).cast(pl.UInt32)

    def spread(values: pl.Series, dtype: pl.DataType) -> list[int]:
        return pl.zeros(rows, dtype=dtype, eager=True).scatter(positions, values.fill_null(0).cast(dtype)).to_list()

    resume.finished[:] = bytes(spread(pl.repeat(1, finished.height, dtype=pl.UInt8, eager=True), pl.UInt8()))
    resume.fingerprints[:] = array("Q", spread(prefixes, pl.UInt64()))
    resume.input_tokens[:] = array("I", spread(counts, pl.UInt32()))
    return resume, previous_cost


def resolve_api(prepared: PreparedJob) -> tuple[str, str]:
    """Base URL and key for a real run; a missing key is exit 2 with how to set it."""
    spec = prepared.spec
    base_url = configured_base_url(spec)
    check_base_url(base_url, spec.api.allow_insecure_http)
    key = os.environ.get(API_KEY_ENV, "").strip()
    key_file = os.environ.get(API_KEY_FILE_ENV)
    if not key and key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{API_KEY_FILE_ENV}={key_file}: cannot read the key file ({exc.strerror})") from None
    if not key:
        raise ConfigError(
            f"no API key: export {API_KEY_ENV}=sk-... (or {API_KEY_FILE_ENV}=/path/to/key), "
            "or add --emulate to run against the built-in emulator"
        )
    return base_url, key


EMULATOR_SERVICE = "qwen-batch built-in emulator"


class ServiceCache:
    """The shared response cache seen from one service (a base URL, or the built-in emulator).

    A reply is reused only for the same request sent to the same service: the emulator's
    text must never answer a real run, nor one region's endpoint another's.
    """

    def __init__(self, cache: ResponseCache, service: str) -> None:
        self._cache = cache
        self._prefix = f"{service.rstrip('/')}\n".encode()

    def _key(self, fingerprint: str) -> str:
        return hashlib.sha256(self._prefix + fingerprint.encode()).hexdigest()

    def get_many(self, fingerprints: Sequence[str]) -> dict[str, Reply]:
        keys = {self._key(fingerprint): fingerprint for fingerprint in fingerprints}
        return {keys[key]: reply for key, reply in self._cache.get_many(list(keys)).items()}

    def put_many(self, items: Sequence[tuple[str, Reply]]) -> None:
        self._cache.put_many([(self._key(fingerprint), reply) for fingerprint, reply in items])


def configured_base_url(spec: JobSpec) -> str:
    """Where a real run sends: DASHSCOPE_HTTP_BASE_URL, else the spec's api.base_url."""
    return os.environ.get(BASE_URL_ENV) or spec.api.base_url or DEFAULT_BASE_URL


def work_items(prepared: PreparedJob, cache: ServiceCache | None) -> Iterator[list[WorkItem]]:
    """Rows to send, in input order, with rows decided without sending turned into outcomes.

    Rows an earlier run finished are skipped before rendering, and the token counts the
    preflight made are reused, so this second pass over the table is cheap.
    """
    over_long_limit = prepared.preflight.max_input_tokens
    batches = rendered(
        prepared.renderer,
        prepared.table.iter_batches(batch_size=BATCH_ROWS, limit=prepared.rows),
        prepared.resume,
        skip_finished=True,
    )
    for batch in batches:
        items: list[WorkItem] = []
        for item in batch:
            if isinstance(item, RowProblem):
                items.append(_problem_outcome(item))
            elif over_long_limit is not None and item.input_tokens > over_long_limit:
                items.append(_over_long_outcome(item, over_long_limit))
            else:
                items.append(item)
        if cache is not None:
            items = _answer_from_cache(items, cache)
        if items:
            yield items


def _problem_outcome(problem: RowProblem) -> Outcome:
    return Outcome(
        index=problem.index,
        fingerprint="",
        status="error",
        error_code=problem.code,
        error_message=problem.message,
    )


def _over_long_outcome(request: Request, limit: int) -> Outcome:
    return Outcome(
        index=request.index,
        fingerprint=request.fingerprint,
        status="error",
        input_tokens=request.input_tokens,
        error_code=OVER_LONG_CODE,
        error_message=f"Range of input length should be [1, {limit}] (not sent: {request.input_tokens} tokens)",
    )


def _answer_from_cache(items: list[WorkItem], cache: ServiceCache) -> list[WorkItem]:
    requests = [item for item in items if isinstance(item, Request)]
    if not requests:
        return items
    hits = cache.get_many([request.fingerprint for request in requests])
    if not hits:
        return items
    return [
        _cached_outcome(item, hits[item.fingerprint])
        if isinstance(item, Request) and item.fingerprint in hits
        else item
        for item in items
    ]


def _cached_outcome(request: Request, reply: Reply) -> Outcome:
    """A cache hit: the stored reply, at no cost this time."""
    return Outcome.answered(request, reply, cost=0.0, attempts=0, latency_s=0.0, cached=True)


class CheckpointAndCacheSink:
    """Group commit target: the checkpoint (durable first), then the shared cache."""

    def __init__(self, checkpoint: Checkpoint, cache: ServiceCache | None) -> None:
        self._checkpoint = checkpoint
        self._cache = cache

    def write(self, outcomes: Sequence[Outcome]) -> None:
        self._checkpoint.append(outcomes)
        if self._cache is None:
            return
        fresh = [
            (o.fingerprint, Reply(o.output_text or "", o.finish_reason or "", o.input_tokens or 0, o.output_tokens or 0, o.request_id))
            for o in outcomes
            if o.status == "ok" and not o.cached
        ]
        if fresh:
            self._cache.put_many(fresh)


async def execute_job(prepared: PreparedJob, reporter: Any) -> JobResult:
    """Send what is left of the job, write the checkpoint as rows finish, then the output.

    ``reporter`` gets ``start(prepared, runner)``, ``progress`` snapshots and ``stopping(reason)``;
    it only displays. Ctrl-C stops sending (in-flight rows finish within a few seconds);
    a second Ctrl-C abandons the rows in flight. Either way what finished is on disk.
    """
    from .backends import DashScopeBackend
    from .limits import Limits
    from .output import write_results, write_summary_json
    from .retry import RetryPolicy
    from .summary import build_summary

    spec, options = prepared.spec, prepared.options
    if options.fresh:
        set_aside([prepared.checkpoint_dir, prepared.output_path, prepared.summary_path])
    async with AsyncExitStack() as stack:
        if options.emulate:
            from .emulator import open_emulator

            emulator = await stack.enter_async_context(open_emulator())
            base_url, api_key = emulator.base_url, emulator.api_key or "sk-emulator"
        else:
            base_url, api_key = resolve_api(prepared)
        checkpoint = Checkpoint.open(prepared.checkpoint_dir, prepared.manifest)
        record_input_identity(prepared.checkpoint_dir, prepared.input_identity)
        stack.callback(checkpoint.close)
        cache = None
        if spec.cache.enabled and not options.no_cache:
            shared = ResponseCache(spec.cache.path or default_cache_path())
            stack.callback(shared.close)
            cache = ServiceCache(shared, EMULATOR_SERVICE if options.emulate else base_url)
        concurrency = options.concurrency or spec.execution.concurrency
        backend = await stack.enter_async_context(
            DashScopeBackend(
                base_url,
                api_key,
                timeout_s=spec.execution.request_timeout_s,
                max_connections=concurrency,
            )
        )
        rpm, tpm = effective_rate_limits(prepared)
        max_cost = prepared.max_cost
        runner = Runner(
            backend,
            CheckpointAndCacheSink(checkpoint, cache),
            concurrency=concurrency,
            limits=Limits.from_settings(rpm, tpm),
            retry_policy=RetryPolicy(max_retries=spec.execution.max_retries),
            price=prepared.price,
            rows_total=prepared.rows,
            budget=Budget(max_cost, spent=prepared.previous_cost) if max_cost is not None else None,
        )
        reporter.start(prepared, runner, rpm, tpm)
        try:
            async with anyio.create_task_group() as watchers:
                watchers.start_soon(_stop_on_signals, runner, reporter)
                watchers.start_soon(reporter.follow, runner)
                statistics = await runner.run(work_items(prepared, cache))
                watchers.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise sole_error(group) from None
        wrote_output = False
        # One bounded copy of the log to Parquet serves both the output and the summary.
        log_path = prepared.output_path.with_name(f".{prepared.output_path.name}.log-{os.getpid()}.parquet")
        stack.callback(log_path.unlink, missing_ok=True)
        log = await anyio.to_thread.run_sync(checkpoint.log_to_parquet, log_path)
        if runner.stop_reason in (None, STOP_BUDGET):
            missing = None
            if runner.stop_reason == STOP_BUDGET:
                missing = (
                    "BudgetExceeded",
                    f"not sent: the budget of {max_cost} would have been exceeded; "
                    "raise budget.max_cost (or --max-cost) and re-run to continue",
                )
            await anyio.to_thread.run_sync(
                lambda: write_results(
                    prepared.table.scan().head(prepared.rows),
                    log,
                    prepared.output_path,
                    model=spec.model,
                    seed=spec.parameters.seed,
                    missing=missing,
                )
            )
            wrote_output = True
        summary = build_summary(prepared, log, statistics, runner.stop_reason)
        write_summary_json(prepared.summary_path, summary)
    return JobResult(statistics, summary, runner.stop_reason, runner.stop_detail, wrote_output)


def sole_error(group: BaseExceptionGroup) -> BaseException:
    """The qwen-batch error a task group failed with (a full disk, say), else the group itself.

    Task groups wrap what their tasks raise; the user should see the error, not the wrapping.
    """
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop()
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        else:
            leaves.append(error)
    ours = [leaf for leaf in leaves if isinstance(leaf, QwenBatchError)]
    return ours[0] if ours and len(ours) == len(leaves) else group


def effective_rate_limits(prepared: PreparedJob) -> tuple[float | None, float | None]:
    """The spec's limits, else the catalog's documented defaults for the model (shared/NOTES.md)."""
    execution = prepared.spec.execution
    rpm, tpm = execution.requests_per_minute, execution.tokens_per_minute
    defaults = prepared.model_info.rate_limits if prepared.model_info else None
    if defaults is not None:
        rpm = rpm if rpm is not None else defaults.requests_per_minute
        tpm = tpm if tpm is not None else defaults.tokens_per_minute
    return rpm, tpm


async def _stop_on_signals(runner: Runner, reporter: Any) -> None:
    import signal

    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if runner.stop_reason == STOP_INTERRUPTED:
                reporter.stopping("second interrupt: abandoning the requests in flight")
                runner.cancel_now()
                return
            reporter.stopping("interrupted: finishing the requests in flight (Ctrl-C again to stop at once)")
            runner.request_stop(STOP_INTERRUPTED)


def checkpoint_status(prepared: PreparedJob) -> CheckpointSummary | None:
    """What the job's checkpoint holds, or None before the first run."""
    if not prepared.checkpoint_dir.exists():
        return None
    with Checkpoint.open_readonly(prepared.checkpoint_dir) as checkpoint:
        return checkpoint.summary()


@dataclass(frozen=True)
class JobStatus:
    """How far a job got, for ``qwen-batch status``."""

    name: str
    rows: int
    output_path: Path
    output_written: bool
    done: CheckpointSummary | None
    currency: str
    spec_changed: list[str]

    @property
    def remaining(self) -> int:
        done = self.done.rows_done if self.done else 0
        return max(self.rows - done, 0)


def job_status(spec_path: Path, options: JobOptions) -> JobStatus:
    """Read the spec, the table's size and the checkpoint; send and change nothing."""
    spec = load_spec(spec_path)
    model_info = resolve_model(spec, catalog_module.builtin())
    price = price_for(spec, model_info)
    output_path = (options.output or spec.output.path).resolve()
    table = open_table(spec)
    checkpoint_dir = checkpoint_dir_for(output_path)
    done, changed = None, []
    if checkpoint_dir.exists():
        with Checkpoint.open_readonly(checkpoint_dir) as checkpoint:
            done = checkpoint.summary()
            changed = manifest_changes(checkpoint.manifest, request_manifest(spec, Renderer(spec, model_info)))
    return JobStatus(
        name=spec.name,
        rows=table.num_rows,
        output_path=output_path,
        output_written=output_path.exists(),
        done=done,
        currency=price.currency if price else catalog_module.CURRENCY,
        spec_changed=changed,
    )
