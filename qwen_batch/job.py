"""The composition root: ``prepare`` checks a job into a ``JobPlan``; ``execute`` runs it.

``prepare`` does everything that can fail on the user's input before anything is sent or
overwritten (exit 2). ``execute`` opens the durable sink (checkpoint, then the response
cache), hands the plan's work items to an executor (the online pool unless told otherwise),
and writes the output and the summary from the checkpoint: whatever stops it, what finished
is on disk. Stopping on a signal is the caller's (the CLI's) business, through ``watch``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .cache import ResponseCache, ServiceCache, default_cache_path
from .checkpoint import Checkpoint, set_aside
from .endpoint import base_url_key, configured_base_url
from .catalog import ModelInfo
from .errors import InputError, QwenBatchError, SpecError
from .output import check_input_columns
from .plan import JobOptions, JobPlan, checked_paths
from .preflight import PreflightReport, rendered, run_preflight
from .result import JobResult
from .resume import checkpoint_dir_for, input_identity, record_input_identity, request_manifest, resume_state
from .runner import STOP_BUDGET
from .spec import JobSpec, check_base_url, load_spec
from .table import Table, open_table
from .user_catalog import for_job
from .variants import Variant, all_renderers, build_variants, model_prices
from .work import BATCH_ROWS, CheckpointAndCacheSink, work_items

if TYPE_CHECKING:
    from .executors import Execution, Executor
    from .sharding import Shard
    from .output import UnitSlot

# Started beside a running execution, cancelled when it ends (the CLI's signal handler is one).
Watcher = Callable[["Execution"], Coroutine[Any, Any, None]]


def prepare(
    spec_path: Path,
    options: JobOptions,
    cache: ServiceCache | None = None,
    *,
    check_over_long: bool = True,
    render: bool = True,
) -> JobPlan:
    """Load and check the spec and the whole input; read the checkpoint. Sends nothing.

    With ``cache``, the preflight also counts the rows the response cache would answer.
    Over-long rows raise InputError when the spec's policy is ``fail``, unless
    ``check_over_long`` is false (``validate`` lists them itself). With ``render`` false no
    row is rendered and no checkpoint read (``merge`` writes from the parts, which did that).
    """
    from .configuration import check_native_path

    spec = load_spec(spec_path)
    if options.shard is not None:
        spec = spec.for_shard(options.shard.index, options.shard.count)
    catalog = for_job(spec.catalog)
    if not options.emulate:
        # The URL is checked for secrets and shape before any message quotes it.
        base_url, source = configured_base_url(spec), base_url_key(spec)
        check_base_url(base_url, spec.api.allow_insecure_http, source=source)
        if spec.api.protocol == "dashscope":
            check_native_path(base_url, source)
    variants = build_variants(spec, catalog, emulate=options.emulate)
    first = variants[0]
    model_info, mode, price = first.model_info, first.mode, first.price
    warnings = _model_warnings(spec, variants)
    paths = checked_paths(spec, options)
    output_path = paths.output
    table = open_table(spec)
    check_input_columns(table.columns)
    rows = table.num_rows if options.limit is None else min(options.limit, table.num_rows)
    renderer = first.renderers[0]
    renderers = all_renderers(variants)
    if spec.api.protocol == "openai" and spec.api.server != "auto":
        from .servers import check_dialect

        for variant in variants:
            check_dialect(spec.where, spec.api.server, variant.parameters)
    manifest = request_manifest(spec, renderer, variants)
    checkpoint_dir = checkpoint_dir_for(output_path)
    identity = input_identity(spec.input.path)
    units = rows * len(renderers)
    held = _shard_units(spec, table, rows, variants, options.shard) if options.shard is not None else None
    redo = None
    if options.redo is not None:
        from .redo import prepare_redo

        resume, previous_cost, redo = prepare_redo(
            spec, checkpoint_dir, output_path, options.redo, units, len(renderers), identity,
            output_units=held.count(1) if held is not None else None,
        )
    else:
        resume, previous_cost = resume_state(
            checkpoint_dir, manifest, units if render else 0, identity, fresh=options.fresh or not render,
            retry_errors=options.retry_errors,
        )
    batches = table.iter_batches(batch_size=BATCH_ROWS, limit=rows) if render else iter(())
    report = run_preflight(
        rendered(renderers, batches, resume, skip_finished=resume.verified, held=held),
        max_input_tokens=_input_limit(variants),
        input_limits=_input_limits(variants),
        resume=resume,
        over_long_is_error=spec.preflight.over_long == "error",
        price=price,
        prices=model_prices(variants),
        cache=cache,
        max_tokens=renderer.max_tokens,
        reasoning_cap=mode.reasoning_cap,
        **_reask_bounds(spec),
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
    plan = JobPlan(
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
        mode=mode,
        variants=variants,
        samples=spec.samples,
        redo=redo,
        held=held,
    )
    _check_json_mode(plan)
    return plan


def _shard_units(spec: JobSpec, table: Table, rows: int, variants: tuple[Variant, ...], shard: Shard) -> bytearray:
    """Which units ``run --shard`` sends: one pass over the row ids, never over the prompts."""
    from .sharding import shard_mask, table_row_ids

    slots = [(variant.id, sample) for variant in variants for sample in range(spec.samples)]
    return shard_mask(table_row_ids(table, spec.input.id_column, rows), slots, shard)


def _model_warnings(spec: JobSpec, variants: tuple[Variant, ...]) -> list[str]:
    """One warning per model of the job that is unknown or unpriced, and one for a local server."""
    warnings: list[str] = []
    seen: set[str] = set()
    for variant in variants:
        model, info = variant.model, variant.model_info
        if model in seen:
            continue
        seen.add(model)
        if info is None:
            warnings.append(
                f"model {model!r} is not in the catalog: no input-length check, "
                "and cost is unknown unless the spec has a pricing section"
            )
        elif variant.price is None and not spec.api.names_local_server:
            warnings.append(f"no known price for {model!r}: cost will be null (add a pricing section)")
    if spec.api.names_local_server:
        # A server the user runs has no price: one note, and null costs (no warning per row).
        warnings.append(f"a {spec.api.server} server has no price: cost will be null")
    return warnings


def _input_limit(variants: tuple[Variant, ...]) -> int | None:
    """The smallest input limit of the job's models (None if unknown)."""
    limits = [limit for limit in _input_limits(variants).values() if limit]
    return min(limits) if limits else None


def _input_limits(variants: tuple[Variant, ...]) -> dict[str, int | None]:
    """Each model's input limit: a unit is checked against its own model's."""
    return {v.model: v.model_info.max_input_tokens if v.model_info else None for v in variants}


def _reask_bounds(spec: JobSpec) -> dict[str, int]:
    """The preflight's JSON-mode arguments: a row's re-asks and what each adds besides its answer."""
    from .jsonmode import asks_json

    if not asks_json(spec) or spec.output.json_retries == 0:
        return {}
    from .structured import reask_frame_tokens

    return {"reasks": spec.output.json_retries, "reask_frame": reask_frame_tokens(spec.model)}


def _check_json_mode(plan: JobPlan) -> None:
    """DashScope's refusals of a json mode, where the job is known to speak to it (jsonmode.py)."""
    from .jsonmode import asks_json, refusal

    if asks_json(plan.spec):
        problem = refusal(plan)
        if problem is not None:
            raise SpecError(problem)


def _prompt_source(spec: JobSpec) -> str:
    prompt = spec.prompt
    column = prompt.messages_column or prompt.prompt_column
    return f"column {column!r}" if column else "template's columns"


def over_long_message(spec: JobSpec, report: PreflightReport, listed: int | None = None) -> str:
    """One line naming the over-long rows by id (the first ``listed``, or all) and the fix."""
    rows = report.over_long if listed is None else report.over_long[:listed]
    models = {row.model for row in report.over_long if row.model}
    if len(models) > 1:  # a sweep: each row against its own model's limit
        names = ", ".join(f"{row.row_id} ({row.input_tokens} tokens, {row.model}: {row.limit})" for row in rows)
        exceed = "exceed their model's input limit"
    else:
        model = next(iter(models), spec.model)
        limit = max((row.limit for row in report.over_long), default=0) or report.max_input_tokens
        names = ", ".join(f"{row.row_id} ({row.input_tokens} tokens)" for row in rows)
        exceed = f"exceed {model}'s input limit of {limit} tokens"
    more = f" and {len(report.over_long) - len(rows)} more" if len(rows) < len(report.over_long) else ""
    return (
        f"{spec.input.path}: {len(report.over_long)} row(s) {exceed}: {names}{more}; shorten them, or set "
        "preflight.over_long: error to record them as row errors without sending them"
    )


class Silent:
    """A reporter that shows nothing: the default for library callers."""

    def start(self, plan: JobPlan, rpm: float | None, tpm: float | None) -> None:
        pass

    async def follow(self, execution: Execution) -> None:
        pass

    def stopping(self, message: str) -> None:
        pass


async def execute(
    plan: JobPlan,
    *,
    executor: Executor | None = None,
    reporter: Any = None,
    watch: Sequence[Watcher] = (),
) -> JobResult:
    """Send what is left of the job, write the checkpoint as rows finish, then the output.

    ``executor`` defaults to the online pool. ``reporter`` gets ``start(plan, rpm, tpm)``,
    ``follow(execution)`` and ``stopping(message)``; it only displays. Each of ``watch`` is
    started with the running execution beside it and cancelled when it ends (the CLI's
    signal handler asks it to stop from there). Whatever stops it, what finished is on disk.
    """
    from .manifest import new_run_id, utc_now
    from .output import write_results, write_summary_json
    from .summary import build_summary

    started = utc_now()

    if executor is None:
        from .executors.online import OnlineExecutor

        executor = OnlineExecutor()
    reporter = reporter if reporter is not None else Silent()
    executor.check(plan)
    if plan.options.fresh:
        set_aside([plan.checkpoint_dir, plan.output_path, plan.summary_path])
    async with AsyncExitStack() as stack:
        if plan.redo is not None:
            from .redo import record_redo

            record_redo(plan.checkpoint_dir, plan.spec, plan.manifest, plan.redo)
        checkpoint = Checkpoint.open(plan.checkpoint_dir, plan.manifest)
        record_input_identity(plan.checkpoint_dir, plan.input_identity)
        stack.callback(checkpoint.close)
        cache = None
        if plan.uses_cache:
            shared = ResponseCache(plan.cache_path or default_cache_path())
            stack.callback(shared.close)
            cache = ServiceCache(shared, executor.service(plan))
        execution = await stack.enter_async_context(executor.open(plan, CheckpointAndCacheSink(checkpoint, cache)))
        reporter.start(plan, *execution.rate_limits)
        try:
            async with anyio.create_task_group() as watchers:
                for watcher in watch:
                    watchers.start_soon(watcher, execution)
                watchers.start_soon(reporter.follow, execution)
                statistics = await execution.run(work_items(plan, cache))
                watchers.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise sole_error(group) from None
        wrote_output = False
        # One bounded copy of the log to Parquet serves both the output and the summary.
        log_path = plan.output_path.with_name(f".{plan.output_path.name}.log-{os.getpid()}.parquet")
        stack.callback(log_path.unlink, missing_ok=True)
        log = await anyio.to_thread.run_sync(checkpoint.log_to_parquet, log_path)
        stop_reason = execution.stop_reason
        if stop_reason in (None, STOP_BUDGET):
            missing = None
            if stop_reason == STOP_BUDGET:
                missing = (
                    "BudgetExceeded",
                    f"not sent: the budget of {plan.max_cost} would have been exceeded; "
                    "raise budget.max_cost (or --max-cost) and re-run to continue",
                )
            await anyio.to_thread.run_sync(
                lambda: write_results(
                    plan.table.scan().head(plan.rows),
                    log,
                    plan.output_path,
                    model=plan.spec.model,
                    seed=plan.spec.parameters.seed,
                    missing=missing,
                    slots=unit_slots(plan),
                    held=plan.held,
                )
            )
            wrote_output = True
        billed = _as_billed(plan, execution)
        summary = build_summary(billed, log, statistics, stop_reason)
        write_summary_json(plan.summary_path, summary)
        if wrote_output:
            _write_run_manifest(billed, new_run_id(started), started, executor.mode)
    return JobResult(statistics, summary, stop_reason, execution.stop_detail, wrote_output)


def _as_billed(plan: JobPlan, execution: Execution) -> JobPlan:
    """The plan priced as its execution billed it, each model of a sweep apart: a local server
    has no price (the summary's cost is null, not the catalog's), the Batch API half."""
    variants = tuple(dataclasses.replace(v, price=execution.prices.get(v.model, v.price)) for v in plan.variants)
    return dataclasses.replace(plan, price=execution.price, variants=variants)


def _write_run_manifest(plan: JobPlan, run_id: str, started: Any, mode: str) -> None:
    """``<output>.manifest.json`` beside the output it describes (manifest.py)."""
    from .manifest import build_manifest, utc_now, write_manifest

    manifest = build_manifest(plan, run_id=run_id, started=started, ended=utc_now(), execution_mode=mode)
    write_manifest(plan.output_path, manifest)


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


def unit_slots(plan: JobPlan) -> list[UnitSlot]:
    """Each unit of a row as the output names it: variant id, sample, and what it is sent with."""
    from .output import UnitSlot

    return [
        UnitSlot(variant.id, sample, variant.model, variant.seed + sample)
        for variant in plan.variants
        for sample in range(plan.samples)
    ]
