"""``run --mode batch --dry-run``: the job's first lines through the whole chain, free, to DashScope's
``batch-test-model`` (upload, create, poll, download, parse), writing no output.

The test model takes at most 100 lines and 1 MB a file (dashscope-protocol.md section 7.2),
at ``/v1/chat/ds-test``; each line is the job's own, only its model replaced, so a refusal
of the job's bodies shows here before anything is paid for.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from .api import BatchApi
from .endpoint import batch_endpoint
from .results import LineError, read_lines
from .shards import render_line
from .state import TERMINAL

if TYPE_CHECKING:
    from ..plan import JobPlan

TEST_MODEL = "batch-test-model"
TEST_URL = "/v1/chat/ds-test"
TEST_MAX_LINES = 100
TEST_MAX_BYTES = 1_000_000
MAX_POLL_S = 30.0


@dataclass(frozen=True)
class DryRun:
    """What the test batch said: its id and status, and how its lines fared."""

    batch_id: str
    status: str
    lines: int
    ok: int
    errors: dict[str, int]


def _write_lines(plan: JobPlan, path: Path) -> int:
    """The job's first lines (within the test model's limits) into ``path``; how many."""
    count = size = 0
    with path.open("wb") as out:
        for request in plan.requests():
            line = render_line(request, TEST_URL, model=TEST_MODEL)
            if count == TEST_MAX_LINES or size + len(line) > TEST_MAX_BYTES:
                break
            out.write(line)
            count, size = count + 1, size + len(line)
    return count


async def dry_run(plan: JobPlan, notes: Callable[[str], None], *, transport: object = None) -> DryRun:
    """Send the test batch and wait for its answer (polled with backoff, from ``poll_interval_s``)."""
    async with batch_endpoint(plan) as (base_url, key):
        api = BatchApi(base_url, key, transport=transport)  # type: ignore[arg-type]
        try:
            with tempfile.TemporaryDirectory(prefix="qwen-batch-dry-run-") as folder:
                return await _chain(plan, api, Path(folder), notes)
        finally:
            await api.aclose()


async def _chain(plan: JobPlan, api: BatchApi, folder: Path, notes: Callable[[str], None]) -> DryRun:
    path = folder / "dry-run.jsonl"
    lines = _write_lines(plan, path)
    uploaded = await api.upload(path)
    notes(f"dry run: uploaded {lines} line(s) for {TEST_MODEL} as {uploaded['id']}")
    batch = await api.create(
        str(uploaded["id"]), plan.spec.batch.completion_window, f"qwen-batch/dry-run/{plan.spec.name}"[:100],
        "qwen-batch dry run", endpoint=TEST_URL,
    )
    delay = min(plan.spec.batch.poll_interval_s, 1.0 if plan.options.emulate else MAX_POLL_S)
    while batch.get("status") not in TERMINAL:
        await anyio.sleep(delay)
        delay = min(delay * 1.5, MAX_POLL_S)
        batch = await api.retrieve(str(batch["id"]))
        notes(f"dry run: batch {batch['id']}: {batch.get('status')}")
    ok, errors = 0, dict[str, int]()
    for key in ("output_file_id", "error_file_id"):
        if batch.get(key):
            target = folder / f"{key}.jsonl"
            await api.download(str(batch[key]), target)
            for _, result in read_lines(target):
                if isinstance(result, LineError):
                    errors[result.code] = errors.get(result.code, 0) + 1
                else:
                    ok += 1
    return DryRun(str(batch["id"]), str(batch.get("status")), lines, ok, errors)
