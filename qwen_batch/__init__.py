"""qwen-batch: bulk prompt jobs on Qwen models through DashScope.

The library, as the CLI uses it::

    import qwen_batch

    plan = qwen_batch.prepare("jobs/translate.yaml", emulate=True)  # checks everything, sends nothing
    result = qwen_batch.run(plan)  # sends, writes the checkpoint, the output and the summary
    print(result.summary["rows"], result.exit_code)

``prepare`` raises a ``UsageError`` (``SpecError``, ``InputError``, ``ConfigError``) for what
the user must fix; a row that fails is data in the output, not an exception. Importing this
package is cheap: the modules that read tables or send are imported on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, InputError, QwenBatchError, SpecError, StorageError, UsageError
from .version import __version__

if TYPE_CHECKING:
    from .executors import Executor
    from .executors.online import OnlineExecutor
    from .plan import JobPlan
    from .result import JobResult

__all__ = [
    "ConfigError",
    "InputError",
    "JobPlan",
    "JobResult",
    "OnlineExecutor",
    "QwenBatchError",
    "SpecError",
    "StorageError",
    "UsageError",
    "__version__",
    "prepare",
    "run",
    "run_async",
]

# Public names whose modules import polars, anyio or httpx: loaded when first asked for.
_LAZY = {
    "JobPlan": "qwen_batch.plan",
    "JobResult": "qwen_batch.result",
    "OnlineExecutor": "qwen_batch.executors.online",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwen_batch' has no attribute {name!r}")


def prepare(spec_path: str | os.PathLike[str], **options: Any) -> JobPlan:
    """Load and check the job spec and its whole input, and read its checkpoint; send nothing.

    ``options`` are the command line's choices, by their ``JobOptions`` names: ``emulate``,
    ``limit``, ``concurrency``, ``output``, ``fresh``, ``retry_errors``, ``no_cache``,
    ``max_cost``. Raises ``UsageError`` for what the user must fix.
    """
    from pathlib import Path

    from .job import prepare as prepare_plan
    from .plan import JobOptions

    return prepare_plan(Path(spec_path), JobOptions(**options))


async def run_async(
    job: JobPlan | str | os.PathLike[str], *, executor: Executor | None = None, **options: Any
) -> JobResult:
    """Execute ``job`` (a plan, or a spec path prepared with ``options``) on the running event loop.

    ``executor`` defaults to the online pool (``OnlineExecutor()``); the event loop must be
    asyncio's (the rate limiter runs on asyncio only). Installs no signal handler.
    """
    from .job import execute
    from .plan import JobPlan

    if isinstance(job, JobPlan):
        if options:
            raise TypeError(f"options {sorted(options)} apply when preparing; this plan is prepared already")
        plan = job
    else:
        plan = prepare(job, **options)
    return await execute(plan, executor=executor)


def run(job: JobPlan | str | os.PathLike[str], *, executor: Executor | None = None, **options: Any) -> JobResult:
    """``run_async`` from synchronous code, on anyio's asyncio backend."""
    import functools

    import anyio

    return anyio.run(functools.partial(run_async, job, executor=executor, **options), backend="asyncio")
