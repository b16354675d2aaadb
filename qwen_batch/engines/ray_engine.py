"""``run JOB.yaml --engine ray``: the driver that spreads a job's shards over Ray workers.

The driver plans K shards (``Shard(i, K)``), starts one ``SharedLimits`` actor per (account, model)
with the job's whole RPM/TPM, and K ``ShardWorker`` async actors, each running what
``run --shard i/K`` runs with its checkpoint in the job's output folder. Ray never retries on its
own (``max_restarts=0``, ``max_task_retries=0``: a blind retry pays every row of the shard again);
when a worker dies, the driver starts a new one that resumes the shard from its checkpoint. When
every shard is done, ``merge``'s code writes the job's output. Progress and Ctrl-C are the driver's:
an interrupt asks every worker to finish what it has in flight, so every checkpoint stays whole.

A Ray started here binds to loopback only (Ray 2.60 turns ``127.0.0.1`` into the machine's own
address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), with usage stats off; ``--ray-address``
joins an existing cluster instead, whose nodes must share the output folder and hold the API key.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, RunAborted
from ..report import PLAIN_REFRESH_S, TTY_REFRESH_S
from ..runner import STOP_INTERRUPTED, RunStatistics
from ..sharding import Shard
from .ray_limiter import SharedLimits
from .ray_worker import ShardOutcome, ShardProgress, ShardTask, ShardWorker

if TYPE_CHECKING:
    from ..limits import LimitsStatistics
    from ..plan import JobPlan
    from ..report import Reporter
    from ..spec import JobSpec
    from ..variants import Variant

DEFAULT_WORKERS = 2
"""Workers when ``--ray-workers`` is not given: one machine's single process already fills an
account's limits, so a laptop gains nothing from more; a cluster is told how many it has."""
WORKER_CPUS = 0.25
"""Ray's CPU share per worker: an I/O-bound pool needs little, and a whole CPU each would stall
a small machine (research-next-phase.md A.4)."""
MAX_ATTEMPTS = 4
"""A shard whose worker died this many times stops the run (the machine, not the row, is at fault)."""
OBJECT_STORE_BYTES = 128 * 1024 * 1024
"""A local Ray's object store: the driver and workers pass small values only."""
LOCAL_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Set before Ray is imported: no usage report, and every server bound to loopback."""
KILL_ENV = "QWEN_BATCH_RAY_KILL"
"""Test hook ``I:N``: shard I's first worker exits (``os._exit``) once N of its rows are durable."""
NAMESPACE = "qwen-batch"
PROGRESS_S = 0.5
"""How often the driver asks every worker for its figures."""
WAIT_S = 0.25


def run_on_ray(
    job: Path, plan: JobPlan, *, address: str | None, workers: int | None, reporter: Reporter, command: str
) -> int:
    """Run every shard of ``plan`` (prepared from ``job``) on Ray, then write the job's output;
    the exit code of ``run``. ``workers``: the shards (default: the spec's ``shards:``, else 2)."""
    count = workers if workers is not None else len(plan.spec.shards or ()) or DEFAULT_WORKERS
    check_shard_count(plan, count)
    accounts, limits = account_limits(plan, count)  # a shards: list of another length is exit 2 here
    if plan.options.fresh:
        from ..checkpoint import set_aside
        from ..manifest import manifest_path_for

        # As a single run's --fresh does; each worker sets its own shard's files aside.
        set_aside([plan.output_path, plan.summary_path, manifest_path_for(plan.output_path)])
    ray = start_ray(address, count)
    try:
        limiters = start_limiters(ray, limits, plan)
        tasks = shard_tasks(job, plan, count, [_of_account(limiters, account) for account in accounts])
        reporter.start(plan, *plan.variants[0].rate_limits)
        driver = ShardDriver(ray, tasks, reporter, rows_total=plan.units)
        outcomes = driver.run()
    finally:
        ray.shutdown()
    return finish(plan, outcomes, count, driver.statistics(), reporter, command)


def check_shard_count(plan: JobPlan, count: int) -> None:
    """Refuse another K than an earlier run's: its shards would start over, every row paid again."""
    from ..sharding import parts_dir, shard_counts

    earlier = [n for n in shard_counts(plan.output_path) if n != count]
    if earlier and not plan.options.fresh:
        raise ConfigError(
            f"{parts_dir(plan.output_path)}: an earlier run has {earlier[0]} shards; resume with --ray-workers "
            f"{earlier[0]} ({count} shards would send every row again), or start over with --fresh"
        )


def start_ray(address: str | None, workers: int) -> Any:
    """Ray, connected: to ``address``, or to a local Ray started here on loopback."""
    if address is None:
        os.environ.update(LOCAL_RAY_ENV)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        # Typed as Any: Ray's own annotations are partial (``ray.nodes`` has none).
        ray: Any = importlib.import_module("ray")
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'qwen-batch[ray]'") from None
    if address is not None:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, namespace=NAMESPACE)
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise ConfigError(f"--ray-address {address}: cannot join that Ray cluster ({error})") from None
        return ray
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=max(os.cpu_count() or 1, math.ceil(workers * WORKER_CPUS) + 1),
        object_store_memory=OBJECT_STORE_BYTES,
        log_to_driver=False,
        # Ray's notes on a Ray of our own (its token auth, say) are not the user's business.
        logging_level=logging.ERROR,
        namespace=NAMESPACE,
    )
    addresses = {node["NodeManagerAddress"] for node in ray.nodes()}
    if addresses != {"127.0.0.1"}:
        ray.shutdown()
        raise ConfigError(
            f"the local Ray bound to {', '.join(sorted(addresses))}, not loopback: "
            "Ray was imported before qwen-batch could set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
        )
    return ray


Account = tuple[str, str | None]
"""Whose quota a request spends: the base URL and the name of the key's variable (never the key)."""
Rates = tuple[float | None, float | None]


def account_limits(plan: JobPlan, count: int) -> tuple[list[Account], dict[tuple[Account, str], Rates]]:
    """Each shard's account, and each (account, model)'s RPM and TPM: what the shards that spend that
    quota would keep to together as ``run --shard I/count`` processes (the job's whole limits when
    the spec has no ``shards:``; with one, each entry's own, added up per account)."""
    specs = [plan.spec.for_shard(index, count) for index in range(count)]
    accounts = [_account(spec, plan.options.emulate) for spec in specs]
    models = {variant.model: variant for variant in plan.variants}
    # Without shards: every shard spends the one quota whose limits the job gives.
    spending = list(zip(specs, accounts, strict=True)) if plan.spec.shards else [(specs[0], accounts[0])]
    limits: dict[tuple[Account, str], Rates] = {}
    for spec, account in spending:
        for model, variant in models.items():
            key = (account, model)
            rates = _rates(spec, variant)
            limits[key] = _sum(limits[key], rates) if key in limits else rates
    return accounts, limits


def _account(spec: JobSpec, emulate: bool) -> Account:
    from ..endpoint import configured_base_url

    return ("emulator", None) if emulate else (configured_base_url(spec), spec.api.key_env)


def _rates(spec: JobSpec, variant: Variant) -> Rates:
    """One shard's RPM and TPM for a variant's model (a local server has only the spec's own)."""
    from ..variants import rate_limits_for

    execution = spec.execution
    if spec.api.names_local_server:
        return execution.requests_per_minute, execution.tokens_per_minute
    return rate_limits_for(spec, variant.model_info)


def _sum(a: Rates, b: Rates) -> Rates:
    """Two shards' limits on one quota; None (no limit) wins."""

    def add(x: float | None, y: float | None) -> float | None:
        return x + y if x is not None and y is not None else None

    return add(a[0], b[0]), add(a[1], b[1])


def start_limiters(
    ray: Any, limits: dict[tuple[Account, str], Rates], plan: JobPlan
) -> dict[tuple[Account, str], tuple[Any, LimitsStatistics]]:
    """One ``SharedLimits`` actor per (account, model), with its first snapshot."""
    from ..limits import rate_window_s

    actor = ray.remote(SharedLimits).options(
        num_cpus=0,
        # A limiter holds no row: restarted, it only forgets the pace for a moment.
        max_restarts=-1,
        max_task_retries=-1,
        max_concurrency=max(1000, 4 * plan.workers * plan.units_per_row),
    )
    window_s = rate_window_s()
    handles = {key: actor.remote(rpm, tpm, window_s) for key, (rpm, tpm) in limits.items()}
    snapshots = ray.get([handle.statistics.remote() for handle in handles.values()])
    return {key: (handle, snapshot) for (key, handle), snapshot in zip(handles.items(), snapshots, strict=True)}


def _of_account(
    limiters: dict[tuple[Account, str], tuple[Any, LimitsStatistics]], account: Account
) -> dict[str, tuple[Any, LimitsStatistics]]:
    """The limiters a shard sends through: its account's, by model."""
    return {model: limiter for (owner, model), limiter in limiters.items() if owner == account}


def shard_tasks(
    job: Path, plan: JobPlan, count: int, limiters: Sequence[dict[str, tuple[Any, LimitsStatistics]]]
) -> list[ShardTask]:
    """Shard i's task for i in 0..count-1 (``limiters[i]``: its account's), each with absolute paths
    (a worker's working folder is its own) and the kill hook for the shard it names."""
    output = plan.output_path.resolve()
    kill_shard, kill_after = _kill_hook()
    return [
        ShardTask(
            job.resolve(),
            dataclasses.replace(plan.options, output=output, shard=Shard(index, count)),
            limiters[index],
            exit_after=kill_after if index == kill_shard else None,
        )
        for index in range(count)
    ]


def _kill_hook() -> tuple[int | None, int | None]:
    text = os.environ.get(KILL_ENV, "")
    shard, _, rows = text.partition(":")
    if not (shard.isdigit() and rows.isdigit()):
        return None, None
    return int(shard), int(rows)


def resumed(task: ShardTask) -> ShardTask:
    """The task that resumes a shard from its checkpoint: never fresh again, and no second kill."""
    return dataclasses.replace(task, options=dataclasses.replace(task.options, fresh=False), exit_after=None)


class ShardDriver:
    """Starts a worker per shard, replaces the ones that die, shows progress, passes Ctrl-C on."""

    def __init__(self, ray: Any, tasks: Sequence[ShardTask], reporter: Reporter, *, rows_total: int) -> None:
        self._ray = ray
        self._tasks = list(tasks)
        self._reporter = reporter
        self._rows_total = rows_total
        self._actor = ray.remote(ShardWorker).options(
            num_cpus=WORKER_CPUS, max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD"
        )
        self._workers: dict[int, Any] = {}
        self._pending: dict[Any, int] = {}
        self._attempts = [0] * len(tasks)
        self._outcomes: dict[int, ShardOutcome] = {}
        self._progress: dict[int, ShardProgress] = {}
        self._errors: list[BaseException] = []
        self._interrupts = 0
        self._passed = 0
        self._started = time.monotonic()
        self._draw_every = TTY_REFRESH_S if reporter.interactive else PLAIN_REFRESH_S

    def run(self) -> dict[int, ShardOutcome]:
        """Each shard's outcome by shard index; a shard whose worker died while the run was
        stopping has none (its checkpoint holds what it finished)."""
        with self._signals():
            for index in range(len(self._tasks)):
                self._start(index)
            polled = drawn = 0.0
            while self._pending:
                self._collect()
                self._pass_interrupts()
                now = time.monotonic()
                if now - polled >= PROGRESS_S:
                    self._poll_progress()
                    polled = now
                if not self._reporter.quiet and now - drawn >= self._draw_every:
                    self._reporter.draw(self.statistics())
                    drawn = now
        if self._errors:
            raise self._errors[0]
        return self._outcomes

    def statistics(self) -> RunStatistics:
        """The whole job's figures from the workers' latest reports."""
        return combined(list(self._progress.values()), self._rows_total, time.monotonic() - self._started)

    def _start(self, index: int) -> None:
        worker = self._actor.remote(self._tasks[index])
        self._attempts[index] += 1
        self._workers[index] = worker
        self._pending[worker.run.remote()] = index

    def _collect(self) -> None:
        ready, _ = self._ray.wait(list(self._pending), num_returns=1, timeout=WAIT_S)
        for ref in ready:
            index = self._pending.pop(ref)
            try:
                self._outcomes[index] = self._ray.get(ref)
            except self._ray.exceptions.RayActorError:
                self._died(index)
            except self._ray.exceptions.RayTaskError as error:
                self._failed(error.cause if isinstance(error.cause, BaseException) else error)
            else:
                self._workers.pop(index, None)

    def _died(self, index: int) -> None:
        """Shard ``index``'s worker died: a new one resumes it, unless the run is stopping."""
        self._workers.pop(index, None)
        last = self._progress.get(index)
        if last is not None:  # its rows stay counted (the next worker resumes after them); none in flight
            self._progress[index] = dataclasses.replace(
                last, statistics=dataclasses.replace(last.statistics, in_flight=0)
            )
        attempts = self._attempts[index]
        if self._interrupts or self._errors:
            return
        if attempts >= MAX_ATTEMPTS:
            self._failed(RunAborted(
                f"shard {index}/{len(self._tasks)}: its worker died {attempts} times; "
                "finished rows are saved, re-run the same command to resume"
            ))
            return
        self._reporter.note(f"shard {index}/{len(self._tasks)}: worker died; resuming it from its checkpoint")
        self._tasks[index] = resumed(self._tasks[index])
        self._start(index)

    def _failed(self, error: BaseException) -> None:
        """A worker raised (a full disk, say): stop the others cleanly, then raise it."""
        if not self._errors:
            self._stop_all(at_once=False)
        self._errors.append(error)

    def _poll_progress(self) -> None:
        refs = {worker.progress.remote(): index for index, worker in self._workers.items()}
        ready, _ = self._ray.wait(list(refs), num_returns=len(refs), timeout=WAIT_S)
        for ref in ready:
            try:
                report = self._ray.get(ref)
            except self._ray.exceptions.RayError:
                continue  # that worker died: _collect sees it
            if report is not None:
                self._progress[refs[ref]] = report

    def _stop_all(self, *, at_once: bool) -> None:
        for worker in self._workers.values():
            worker.stop.remote(at_once)

    def _interrupted(self, signum: int, frame: Any) -> None:
        # Counted only: Ray is called from the loop, never from inside a signal handler.
        self._interrupts += 1

    def _pass_interrupts(self) -> None:
        """Ctrl-C: every worker finishes what it has in flight; a second one: abandons it."""
        if self._interrupts == self._passed:
            return
        self._passed = self._interrupts
        if self._passed == 1:
            self._reporter.stopping("interrupted: finishing the requests in flight (Ctrl-C again to stop at once)")
        else:
            self._reporter.stopping("second interrupt: abandoning the requests in flight")
        self._stop_all(at_once=self._passed > 1)

    @contextmanager
    def _signals(self) -> Iterator[None]:
        """Ctrl-C and SIGTERM reach the workers through the driver, as in a single run."""
        previous = {signum: signal.signal(signum, self._interrupted) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def combined(parts: Sequence[ShardProgress], rows_total: int, elapsed_s: float) -> RunStatistics:
    """One ``RunStatistics`` for the whole job from each shard's latest; rows done count every row
    each shard has finished, in this run or before it."""
    errors: Counter[str] = Counter()
    for part in parts:
        errors.update(part.statistics.errors_by_code)

    def total(name: str) -> Any:
        return sum(getattr(part.statistics, name) for part in parts)

    return RunStatistics(
        rows_total=rows_total,
        rows_done=sum(part.done_before + part.statistics.rows_done for part in parts),
        ok=total("ok"),
        errors=total("errors"),
        errors_by_code=dict(errors),
        cached=total("cached"),
        cache_saved_cost=total("cache_saved_cost"),
        input_tokens=total("input_tokens"),
        output_tokens=total("output_tokens"),
        cost=total("cost"),
        retries=total("retries"),
        throttled=total("throttled"),
        in_flight=total("in_flight"),
        elapsed_s=elapsed_s,
        cooling_down_s=max((part.statistics.cooling_down_s for part in parts), default=0.0),
        reasks=total("reasks"),
    )


def finish(
    plan: JobPlan, outcomes: dict[int, ShardOutcome], count: int, statistics: RunStatistics, reporter: Reporter,
    command: str,
) -> int:
    """Write the job's output when every shard finished; the exit code either way."""
    from ..result import JobResult

    stopped = [outcome for outcome in outcomes.values() if outcome.stop_reason is not None]
    if not reporter.quiet and (stopped or len(outcomes) < count):
        reporter.draw(statistics, final=True)
    if len(outcomes) < count or any(outcome.stop_reason == STOP_INTERRUPTED for outcome in stopped):
        print(f"interrupted: finished rows are saved; resume with: {command}", file=sys.stderr, flush=True)
        return 130
    if stopped:
        first = stopped[0]
        print(f"stopped: {first.stop_detail or first.stop_reason}; re-run to continue: {command}", file=sys.stderr)
        return first.exit_code
    summary = write_output(plan, count)
    result = JobResult(statistics, summary, None, None, wrote_output=True)
    reporter.finish(result, plan, command)
    return result.exit_code


def write_output(plan: JobPlan, count: int) -> dict[str, Any]:
    """THE LAST STEP: the job's output, summary and manifest from the shards' parts, by ``merge``'s
    code (``merge_parts``); the summary it wrote."""
    from ..merge import merge_parts

    return merge_parts(plan, count).summary
