"""The ``qwen-batch`` command: parse, call the library, render, return an exit code.

Exit codes: 0 every row ok; 1 finished with failed rows; 2 bad spec, input, arguments or
configuration (nothing sent, nothing overwritten); 3 aborted (key refused, the job's
configuration refused by the service, budget reached); 75 batch mode with ``--no-wait``:
submitted, not finished (run the same command again to collect);
70 internal error (a bug; ``QWEN_BATCH_DEBUG=1`` prints its traceback, key scrubbed);
130 interrupted.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .argtypes import ArgumentParser, number, whole_number
from .errors import ConfigError, QwenBatchError, UsageError
from .sharding import MAX_SHARDS
from .spec import MAX_CONCURRENCY

if TYPE_CHECKING:
    from .executors import Execution
    from .plan import JobPlan
    from .report import Reporter
    from .sharding import Shard

EXIT_USAGE = 2
EXIT_INTERNAL = 70  # sysexits EX_SOFTWARE: a bug, not the user's input nor the service
EXIT_INTERRUPTED = 130
DEBUG_ENV = "QWEN_BATCH_DEBUG"  # read by main() when it runs, never at import
positive_int = whole_number(1)


def cmd_run(args: argparse.Namespace) -> int:
    """Run a job: every input row becomes one result row in Parquet.

    example: qwen-batch run jobs/translate.yaml --emulate
    """
    import functools

    import anyio

    from .job import execute, prepare
    from .plan import JobOptions
    from .report import Reporter

    options = JobOptions(
        emulate=args.emulate,
        limit=args.limit,
        concurrency=args.concurrency,
        output=args.output,
        fresh=args.fresh,
        retry_errors=args.retry_errors,
        no_cache=args.no_cache,
        max_cost=args.max_cost,
        redo=args.redo,
        shard=_shard(args),
    )
    reporter = Reporter(quiet=args.quiet)
    _check_engine(args)
    plan = prepare(Path(args.job), options)
    mode = args.mode or plan.spec.execution.mode
    if mode != "batch" and (args.no_wait or args.dry_run):
        flag = "--no-wait" if args.no_wait else "--dry-run"
        raise ConfigError(f"{flag} is for batch mode: add --mode batch (or set execution.mode: batch in {args.job})")
    if args.dry_run:
        return _dry_run(plan, reporter)
    if args.engine == "ray":
        return _run_on_ray(args, plan, reporter, mode)
    executor = None
    if mode == "batch":
        from .executors.batch import BatchExecutor

        executor = BatchExecutor(wait=not args.no_wait, notes=reporter.note)
    run = functools.partial(
        execute, plan, executor=executor, reporter=reporter, watch=[functools.partial(_stop_on_signals, reporter=reporter)]
    )
    result = anyio.run(run, backend="asyncio")
    reporter.finish(result, plan, _resume_command(args))
    if args.report and result.wrote_output:
        from .run_report.command import write_report

        write_report(plan.output_path, quiet=args.quiet)
    return result.exit_code


def _check_engine(args: argparse.Namespace) -> None:
    """The Ray flags go with ``--engine ray``, which runs the online pool on every shard, resumably."""
    if args.engine != "ray":
        flag = "--ray-address" if args.ray_address else "--ray-workers" if args.ray_workers else None
        if flag:
            raise ConfigError(f"{flag} is for the Ray engine: add --engine ray")
        return
    refused = [flag for flag, given in (("--redo", args.redo), ("--mode batch", args.mode == "batch"),
                                        ("--no-wait", args.no_wait), ("--dry-run", args.dry_run),
                                        ("--shard", args.shard)) if given]
    if refused:
        raise ConfigError(f"--engine ray runs the online pool on each shard it plans: drop {refused[0]}")


def _run_on_ray(args: argparse.Namespace, plan: JobPlan, reporter: Reporter, mode: str) -> int:
    """``run --engine ray``: the shards on Ray workers, then the job's output from their parts."""
    from .engines.ray_engine import run_on_ray

    if mode == "batch":
        raise ConfigError(f"--engine ray runs the online pool on each shard: set execution.mode: online in {args.job}")
    code = run_on_ray(
        Path(args.job), plan, address=args.ray_address, workers=args.ray_workers, reporter=reporter,
        command=_resume_command(args),
    )
    if args.report and code in (0, 1):
        from .run_report.command import write_report

        write_report(plan.output_path, quiet=args.quiet)
    return code


def _shard(args: argparse.Namespace) -> Shard | None:
    """``--shard I/N`` as a Shard; a bad value is exit 2 with Shard.parse's one line."""
    from .sharding import Shard, ShardError

    if args.shard is None:
        return None
    try:
        return Shard.parse(args.shard)
    except ShardError as error:
        raise ConfigError(str(error)) from None


def _dry_run(plan: JobPlan, reporter: Reporter) -> int:
    """The batch chain through the free test model; 0 when every line came back answered."""
    import anyio

    from .batch.dryrun import dry_run

    for warning in plan.warnings:
        reporter.warn(warning)
    result = anyio.run(dry_run, plan, reporter.note, backend="asyncio")
    errors = ", ".join(f"{count} {code}" for code, count in sorted(result.errors.items())) or "none"
    print(
        f"dry run: batch {result.batch_id} {result.status}: {result.lines} line(s) sent to batch-test-model, "
        f"{result.ok} answered, errors: {errors}; nothing was written"
    )
    return 0 if result.ok == result.lines and result.status == "completed" else 1


async def _stop_on_signals(execution: Execution, reporter: Reporter) -> None:
    """Ctrl-C (or SIGTERM) stops sending and lets the rows in flight finish; a second one stops at once."""
    import signal

    import anyio

    from .runner import STOP_INTERRUPTED

    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if execution.stop_reason == STOP_INTERRUPTED:
                reporter.stopping("second interrupt: abandoning the requests in flight")
                execution.cancel_now()
                return
            reporter.stopping("interrupted: finishing the requests in flight (Ctrl-C again to stop at once)")
            execution.request_stop(STOP_INTERRUPTED)


def _resume_command(args: argparse.Namespace) -> str:
    argv = ["qwen-batch", "run", args.job]
    if args.emulate:
        argv.append("--emulate")
    if args.output:
        argv += ["--output", args.output]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    if args.shard:
        argv += ["--shard", args.shard]
    if args.mode:
        argv += ["--mode", args.mode]
    if args.no_wait:
        argv.append("--no-wait")
    if args.engine == "ray":
        argv += ["--engine", "ray"]
        if args.ray_address:
            argv += ["--ray-address", args.ray_address]
        if args.ray_workers:
            argv += ["--ray-workers", str(args.ray_workers)]
    return shlex.join(argv)


def cmd_report(args: argparse.Namespace) -> int:
    """Report on a finished run: tables, report.json and a self-contained HTML page; sends nothing.

    report.json is written next to the output (<output>.report.json); the page needs the
    report extra (pip install 'qwen-batch[report]').
    example: qwen-batch report out/translations.parquet --html report.html
    """
    from .run_report.command import write_report

    return write_report(Path(args.output), html=Path(args.html) if args.html else None, as_json=args.json)


def cmd_validate(args: argparse.Namespace) -> int:
    """Check the spec and the whole input table; send nothing.

    example: qwen-batch validate jobs/translate.yaml
    """
    from .job import over_long_message, prepare
    from .plan import JobOptions

    plan = prepare(Path(args.job), JobOptions(limit=args.limit, shard=_shard(args)), check_over_long=False)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    report = plan.preflight
    if report.over_long and plan.spec.preflight.over_long == "fail":
        print(f"error: {over_long_message(plan.spec, report)}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"{plan.spec.path}: ok: {report.rows} rows, {report.requests} requests, "
        f"{report.input_tokens} input tokens, {report.row_problems} rows with problems"
    )
    mode = plan.mode
    if mode.stream or mode.thinking or mode.path != "text":
        thinking = f"thinking up to {mode.reasoning_cap} reasoning tokens a row" if mode.thinking else "no thinking"
        sent = "streamed" if mode.stream else "not streamed"
        print(f"  requests: {sent}, {thinking}, on the {mode.path}-generation path")
    if report.over_long:
        ids = ", ".join(row.row_id for row in report.over_long)
        print(
            f"warning: {len(report.over_long)} over-long row(s) will be recorded as row errors "
            f"without being sent (preflight.over_long: error): {ids}",
            file=sys.stderr,
        )
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    """Estimate tokens, cost and time before running; sends nothing.

    Input tokens are exact; output tokens and cost are given as min / expected / max.
    example: qwen-batch estimate jobs/translate.yaml --json
    """
    import json

    from .cache import EMULATOR_SERVICE, ResponseCache, ServiceCache, default_cache_path
    from .endpoint import configured_base_url
    from .estimate import build_estimate
    from .job import prepare
    from .status import checkpoint_status
    from .plan import JobOptions
    from .spec import load_spec

    options = JobOptions(limit=args.limit, output=args.output, no_cache=args.no_cache, shard=_shard(args))
    spec = load_spec(Path(args.job))
    shared = None
    if spec.cache.enabled and not args.no_cache:
        path = spec.cache.path or default_cache_path()
        shared = ResponseCache(path) if path.exists() else None
    try:
        service = EMULATOR_SERVICE if args.emulate else configured_base_url(spec)
        cache = ServiceCache(shared, service) if shared is not None else None
        plan = prepare(Path(args.job), options, cache=cache)
    finally:
        if shared is not None:
            shared.close()
    done = checkpoint_status(plan)
    mean_output = done.output_tokens / done.ok if done is not None and done.ok else None
    rpm, tpm = plan.rate_limits
    estimate = build_estimate(
        plan,
        done_mean_output=mean_output,
        done_rows=done.ok if done is not None else 0,
        requests_per_minute=rpm,
        tokens_per_minute=tpm,
    )
    if args.json:
        print(json.dumps(estimate, ensure_ascii=False, indent=2))
    else:
        from .report import render_estimate

        render_estimate(estimate, sys.stdout)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Join the parts of a sharded job (run --shard I/N) into the job's output, summary and manifest.

    Every unit must be in exactly one part; sends nothing.
    example: qwen-batch merge jobs/translate.yaml
    """
    from .job import prepare
    from .merge import merge_parts, part_count
    from .plan import JobOptions

    plan = prepare(Path(args.job), JobOptions(limit=args.limit, output=args.output), render=False)
    result = merge_parts(plan, part_count(plan))
    print(
        f"{result.output_path}: {result.units} rows merged from {len(result.parts)} parts "
        f"({result.ok} ok, {result.errors} errors)"
    )
    return 1 if result.errors else 0


def cmd_status(args: argparse.Namespace) -> int:
    """Show how far a job got (done, errors, remaining, cost so far); sends nothing.

    example: qwen-batch status jobs/translate.yaml
    """
    from .status import job_status
    from .plan import JobOptions

    status = job_status(Path(args.job), JobOptions(output=args.output))
    from .batch.commands import recorded_batches, render_batches
    from .report import render_status
    from .resume import checkpoint_dir_for

    render_status(status, sys.stdout)
    render_batches(recorded_batches(checkpoint_dir_for(status.output_path)), sys.stdout)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel the job's unfinished batches (batch mode); rows already answered are kept.

    The next run collects what each batch finished and sends the rest again.
    example: qwen-batch cancel jobs/nightly-batch.yaml
    """
    import anyio

    from .batch.commands import cancel_batches
    from .job import prepare
    from .plan import JobOptions

    plan = prepare(Path(args.job), JobOptions(output=args.output))
    anyio.run(cancel_batches, plan, sys.stdout, backend="asyncio")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List the model catalog: thinking mode, native path, limits, prices, rate limits, with sources.

    QWEN_BATCH_CATALOG (and --catalog, on top of it) name user catalog files merged in.
    example: qwen-batch models qwen3.5-plus --json
    """
    import json

    from .models_list import catalog_for_listing, listing, render_listing

    data = listing(catalog_for_listing(Path(args.catalog) if args.catalog else None), args.names)
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        render_listing(data, sys.stdout)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check a finished output against the spec and input its manifest names; sends nothing.

    Exit 0 everything matches, 1 differences (listed), 2 bad input.
    example: qwen-batch verify jobs/out/eval.parquet
    """
    from .job import prepare
    from .manifest import read_manifest
    from .verify import job_of, render_verification, rendering_options, verify_output

    output = Path(args.output)
    manifest = read_manifest(output)
    job = job_of(manifest, output)
    plan = prepare(job, rendering_options(manifest, output), check_over_long=False)
    report = verify_output(output, manifest, plan)
    render_verification(report, sys.stdout)
    if args.resend:
        from .resend import render_resend, resend_sample

        sending = prepare(job, rendering_options(manifest, output, emulate=args.emulate), check_over_long=False)
        render_resend(resend_sample(output, args.resend, manifest, sending), sys.stdout)
    return report.exit_code


def cmd_diff(args: argparse.Namespace) -> int:
    """Compare two runs: the verdict from their manifests, then rows aligned by id, variant and sample.

    Exit 0 no changed outputs, 1 differences, 2 not comparable or bad input.
    example: qwen-batch diff last-week.parquet today.parquet --score correct
    """
    import json

    from .diff import diff_outputs, exit_code
    from .diff_report import render_diff, write_html

    report = diff_outputs(Path(args.a), Path(args.b), score=args.score)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        render_diff(report, sys.stdout)
    if args.html:
        write_html(report, Path(args.html))
    return exit_code(report)


def cmd_emulate(args: argparse.Namespace) -> int:
    """Serve the offline DashScope emulator on loopback until Ctrl-C.

    example: qwen-batch emulate --port 8089 --p-rate-quota 0.1
    """
    from .emulator import cli as emulator_cli

    return emulator_cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="qwen-batch",
        description="Run bulk prompt jobs on Qwen models through DashScope.",
        epilog=(
            "Exit codes: 0 all rows ok, 1 some rows failed, 2 bad input, 3 aborted, "
            "75 submitted, not finished (batch --no-wait), 70 internal error, 130 interrupted."
        ),
    )
    parser.add_argument("--version", action="version", version=f"qwen-batch {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        doc = (handler.__doc__ or "").strip()
        summary = doc.splitlines()[0]
        sub = commands.add_parser(
            name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sub.set_defaults(handler=handler)
        return sub

    run = add("run", cmd_run)
    run.add_argument("job", help="the job spec (YAML)")
    run.add_argument("--emulate", action="store_true", help="run against the built-in emulator (no key needed)")
    run.add_argument("--limit", type=positive_int, help="only the first N rows")
    run.add_argument("--concurrency", type=whole_number(1, MAX_CONCURRENCY),
                     help=f"requests in flight, 1 to {MAX_CONCURRENCY} (overrides execution.concurrency)")
    run.add_argument("--output", help="output Parquet path (overrides output.path)")
    run.add_argument("--quiet", action="store_true", help="no progress or notes")
    restart = run.add_mutually_exclusive_group()
    restart.add_argument("--fresh", action="store_true", help="start over; earlier results are moved aside, not deleted")
    restart.add_argument("--redo", metavar="WHERE",
                         help="send again, with the current spec, the rows of the previous output this SQL filter "
                         "selects (e.g. \"finish_reason = 'length'\"); keep every other row")
    run.add_argument("--retry-errors", action="store_true", help="on resume, send rows that failed permanently again")
    run.add_argument("--no-cache", action="store_true", help="neither read nor write the response cache")
    run.add_argument("--max-cost", type=number(0, low_open=True),
                     help="budget cap in the price currency, > 0 (overrides budget.max_cost)")
    run.add_argument("--shard", metavar="I/N", help="only shard I of N (0 <= I < N): the units whose row id hashes there; writes <output>.parts/part-I-of-N.parquet")
    run.add_argument("--report", action="store_true", help="write the run report (as `qwen-batch report`) when the run ends")
    run.add_argument("--mode", choices=("online", "batch"),
                     help="online: the worker pool; batch: DashScope's Batch API at half price (overrides execution.mode)")
    run.add_argument("--no-wait", action="store_true",
                     help="batch mode: submit and exit 75; run the same command again to collect")
    run.add_argument("--dry-run", action="store_true",
                     help="batch mode: send up to 100 lines to the free batch-test-model through the whole chain; write nothing")
    run.add_argument("--engine", choices=("local", "ray"), default="local",
                     help="local: this process (default); ray: the job's shards on Ray workers, one shared rate limit "
                     "(pip install 'qwen-batch[ray]')")
    run.add_argument("--ray-address", metavar="ADDRESS",
                     help="--engine ray: join this Ray cluster (e.g. 10.0.0.5:6379, or auto) instead of starting a local Ray")
    run.add_argument("--ray-workers", type=whole_number(1, MAX_SHARDS), metavar="K",
                     help="--engine ray: shards, one worker each (default: the spec's shards: list, else 2); keep the same K to resume")

    validate = add("validate", cmd_validate)
    validate.add_argument("job", help="the job spec (YAML)")
    validate.add_argument("--limit", type=positive_int, help="only the first N rows")
    validate.add_argument("--shard", metavar="I/N", help="only shard I of N's units (as run --shard)")

    estimate = add("estimate", cmd_estimate)
    estimate.add_argument("job", help="the job spec (YAML)")
    estimate.add_argument("--json", action="store_true", help="print JSON for scripts")
    estimate.add_argument("--emulate", action="store_true", help="count cached replies of the built-in emulator")
    estimate.add_argument("--limit", type=positive_int, help="only the first N rows")
    estimate.add_argument("--output", help="output Parquet path (overrides output.path)")
    estimate.add_argument("--no-cache", action="store_true", help="do not count rows the cache would answer")
    estimate.add_argument("--shard", metavar="I/N", help="only shard I of N's units, at its share of the limits")

    merge = add("merge", cmd_merge)
    merge.add_argument("job", help="the job spec (YAML)")
    merge.add_argument("--output", help="output Parquet path (overrides output.path); the parts are beside it")
    merge.add_argument("--limit", type=positive_int, help="only the first N rows (as the shards ran with --limit)")

    status = add("status", cmd_status)
    status.add_argument("job", help="the job spec (YAML)")
    status.add_argument("--output", help="output Parquet path (overrides output.path)")

    report = add("report", cmd_report)
    report.add_argument("output", metavar="OUTPUT.parquet", help="the output Parquet of a run")
    report.add_argument("--html", metavar="PATH", help="where the page goes (default: <output>.report.html)")
    report.add_argument("--json", action="store_true", help="print report.json instead of the tables")
    cancel = add("cancel", cmd_cancel)
    cancel.add_argument("job", help="the job spec (YAML)")
    cancel.add_argument("--output", help="output Parquet path (overrides output.path)")

    models = add("models", cmd_models)
    models.add_argument("names", nargs="*", metavar="MODEL", help="only these models (default: all)")
    models.add_argument("--json", action="store_true", help="print JSON for scripts")
    models.add_argument("--catalog", help="a user catalog file to merge in (over QWEN_BATCH_CATALOG's)")

    verify = add("verify", cmd_verify)
    verify.add_argument("output", help="an output Parquet written by qwen-batch run")
    verify.add_argument("--resend", type=positive_int, metavar="N",
                        help="also send N sampled rows again and count identical answers")
    verify.add_argument("--emulate", action="store_true", help="resend to the built-in emulator (no key needed)")

    diff = add("diff", cmd_diff)
    diff.add_argument("a", help="the earlier output Parquet (A)")
    diff.add_argument("b", help="the later output Parquet (B)")
    diff.add_argument("--score", metavar="COLUMN", help="a 0/1 or numeric column in both outputs: a paired test of B - A")
    diff.add_argument("--json", action="store_true", help="print JSON for scripts")
    diff.add_argument("--html", metavar="PATH", help="also write the report as one HTML page")

    emulate = add("emulate", cmd_emulate)
    from .emulator import cli as emulator_cli

    emulator_cli.add_arguments(emulate)
    return parser


def _version() -> str:
    """The installed distribution's version (what pip shows), else the source tree's."""
    from importlib import metadata

    try:
        return metadata.version("qwen-batch")
    except metadata.PackageNotFoundError:
        from .version import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        handler: Callable[[argparse.Namespace], int] = args.handler  # set by add(); Namespace's fields are Any
        return handler(args)
    except UsageError as error:
        print(f"error: {_scrubbed(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except QwenBatchError as error:
        print(f"error: {_scrubbed(str(error))}", file=sys.stderr)
        return getattr(error, "exit_code", 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the one place a bug becomes a message, not a key leak
        return _internal_error(error)


def _internal_error(error: BaseException) -> int:
    """A bug: one line (or, with QWEN_BATCH_DEBUG=1, the whole traceback), the API key scrubbed.

    The traceback is printed here rather than re-raised, because Python's own hook would
    print exception texts (which may quote a request and its key) unscrubbed.
    """
    import os
    import traceback

    if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
        text = "".join(traceback.format_exception(error))
        print(_scrubbed(text), end="", file=sys.stderr)
    else:
        first = (str(error).strip().splitlines() or [""])[0][:300]
        print(
            f"error: internal error ({type(error).__name__}: {_scrubbed(first)}); this is a bug in qwen-batch: "
            f"re-run with {DEBUG_ENV}=1 for the traceback and report it",
            file=sys.stderr,
        )
    return EXIT_INTERNAL


def _scrubbed(text: str) -> str:
    """``text`` without the API key of the environment (or key file), whatever quoted it."""
    from .apikey import keys_to_scrub

    for key in keys_to_scrub():
        if len(key) >= 8 and key in text:
            text = text.replace(key, "sk-***")
    return text
