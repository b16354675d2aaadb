"""One job end to end: spec -> table -> preflight -> resume state -> runner -> Parquet + summary.

``prepare_job`` does everything that can fail on the user's input before anything is sent or
overwritten (exit 2); ``execute_job`` sends, and always leaves a consistent checkpoint behind.
"""

from __future__ import annotations

import os
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from . import catalog as catalog_module
from .apikey import API_KEY_ENV, API_KEY_FILE_ENV, read_api_key  # noqa: F401 - the names job.py always offered
from .budget import Budget
from .cache import ResponseCache, default_cache_path
from .catalog import ModelInfo, Price
from .checkpoint import Checkpoint, CheckpointSummary, manifest_changes, set_aside
from .errors import ConfigError, ConfigurationRefused, InputError, QwenBatchError
from .output import check_input_columns
from .paths import JobPaths, job_paths
from .preflight import PreflightReport, ResumeIndex, rendered, run_preflight
from .resume import checkpoint_dir_for, input_identity, record_input_identity, request_manifest, resume_state
from .render import Renderer
from .runner import (
    STOP_AUTH,
    STOP_BUDGET,
    STOP_CONFIGURATION,
    STOP_ERROR_RATE,
    STOP_INTERRUPTED,
    Runner,
    RunStatistics,
)
from .spec import JobSpec, check_base_url, load_spec, price_for, resolve_model
from .table import Table, open_table
from .wire import DEFAULT_BASE_URL
from .work import BATCH_ROWS, EMULATOR_SERVICE, CheckpointAndCacheSink, ServiceCache, work_items

BASE_URL_ENV = "DASHSCOPE_HTTP_BASE_URL"


@dataclass(frozen=True)
class JobOptions:
    """Command-line choices that override or extend the spec."""

    emulate: bool = False
    limit: int | None = None
    concurrency: int | None = None
    output: str | Path | None = None  # as typed: a trailing "/" means a folder
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
    cache_path: Path | None = None  # the response cache this run reads and writes, None when off

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
        if self.stop_reason in (STOP_AUTH, STOP_BUDGET, STOP_CONFIGURATION, STOP_ERROR_RATE):
            return 3
        return 1 if self.summary["rows"]["error"] else 0


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
    from .configuration import check_model_known, check_native_path

    spec = load_spec(spec_path)
    catalog = catalog_module.builtin()
    check_model_known(spec, catalog)
    if not options.emulate:
        # The URL is checked for secrets and shape before any message quotes it.
        base_url, source = configured_base_url(spec), base_url_key(spec)
        check_base_url(base_url, spec.api.allow_insecure_http, source=source)
        check_native_path(base_url, source)
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
    paths = checked_paths(spec, options)
    output_path = paths.output
    table = open_table(spec)
    check_input_columns(table.columns)
    rows = table.num_rows if options.limit is None else min(options.limit, table.num_rows)
    renderer = Renderer(spec, model_info)
    manifest = request_manifest(spec, renderer)
    checkpoint_dir = checkpoint_dir_for(output_path)
    identity = input_identity(spec.input.path)
    resume, previous_cost = resume_state(
        checkpoint_dir, manifest, rows, identity, fresh=options.fresh, retry_errors=options.retry_errors
    )
    batches = table.iter_batches(batch_size=BATCH_ROWS, limit=rows)
    report = run_preflight(
        rendered(renderer, batches, resume, skip_finished=resume.verified),
        max_input_tokens=model_info.max_input_tokens if model_info else None,
        resume=resume,
        over_long_is_error=spec.preflight.over_long == "error",
        price=price,
        cache=cache,
        max_tokens=renderer.max_tokens,
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
        cache_path=paths.cache,
    )


def checked_paths(spec: JobSpec, options: JobOptions) -> JobPaths:
    """The job's paths with the command line's choices (``--output``, the cache), checked as a set."""
    cache = None
    label = "cache.path"
    if spec.cache.enabled and not options.no_cache:
        cache = spec.cache.path
        if cache is None:
            cache, label = default_cache_path(), "the response cache"
    return job_paths(spec, options.output, cache=cache, cache_label=label)


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


def resolve_api(prepared: PreparedJob) -> tuple[str, str]:
    """Base URL and key for a real run; a missing or unsendable key is exit 2 with how to fix it."""
    spec = prepared.spec
    base_url = configured_base_url(spec)
    source = base_url_key(spec)
    check_base_url(base_url, spec.api.allow_insecure_http, source=source)
    return base_url, read_api_key().value


def configured_base_url(spec: JobSpec) -> str:
    """Where a real run sends: DASHSCOPE_HTTP_BASE_URL, else the spec's api.base_url."""
    return os.environ.get(BASE_URL_ENV) or spec.api.base_url or DEFAULT_BASE_URL


async def execute_job(prepared: PreparedJob, reporter: Any) -> JobResult:
    """Send what is left of the job, write the checkpoint as rows finish, then the output.

    ``reporter`` gets ``start(prepared, rpm, tpm)``, ``follow(runner)`` and ``stopping(message)``;
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
            shared = ResponseCache(prepared.cache_path or default_cache_path())
            stack.callback(shared.close)
            cache = ServiceCache(shared, EMULATOR_SERVICE if options.emulate else base_url)
        concurrency = worker_count(prepared)
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
            max_error_rate=spec.execution.max_error_rate,
        )
        reporter.start(prepared, rpm, tpm)
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
    detail = runner.stop_detail
    if runner.stop_error is not None:
        detail = _explain_stop(prepared, runner.stop_error, base_url)
    return JobResult(statistics, summary, runner.stop_reason, detail, wrote_output)


def _explain_stop(prepared: PreparedJob, error: ConfigurationRefused, base_url: str) -> str:
    """The one line for a run stopped by a configuration error, naming where the setting came from."""
    from .configuration import explain

    spec = prepared.spec
    return explain(
        error,
        spec=spec,
        catalog=catalog_module.builtin(),
        base_url=base_url,
        base_url_key="the emulator's base URL" if prepared.options.emulate else base_url_key(spec),
        parameters=prepared.renderer.parameters,
    )


def base_url_key(spec: JobSpec) -> str:
    """Where a real run's base URL comes from, as a message names it."""
    return BASE_URL_ENV if os.environ.get(BASE_URL_ENV) else f"api.base_url in {spec.where}"


def worker_count(prepared: PreparedJob) -> int:
    """The concurrency asked for, but never more workers (and connections) than rows to send."""
    asked = prepared.options.concurrency or prepared.spec.execution.concurrency
    return min(asked, max(1, prepared.preflight.to_send))


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
    output_path = checked_paths(spec, options).output
    table = open_table(spec)
    checkpoint_dir = checkpoint_dir_for(output_path)
    done, changed = None, []
    if checkpoint_dir.exists():
        with Checkpoint.open_readonly(checkpoint_dir) as checkpoint:
            done = checkpoint.summary()
            # A checkpoint with no rows is taken over by a changed job (Checkpoint.open).
            if done.rows_done:
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
