"""``run --engine ray`` end to end: the real CLI starts a real local Ray (loopback, logical CPUs, no
dashboard) and sends to the emulator over loopback; every figure comes from the emulator's ledger.

Each test starts one Ray (seconds on a small machine), so there are few of them, and they measure
rates over wall-clock windows: they run alone, after the parallel tests (pyproject's ``serial``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from qwen_batch.emulator import EmulatorConfig
from qwen_batch.engines.ray_engine import KILL_ENV
from qwen_batch.sharding import unit_shard
from qwen_batch.testing import EmulatorThread

from .conftest import run_subprocess, sentences_job

pytestmark = [pytest.mark.serial, pytest.mark.timeout(400)]

ROWS = 2_000
WORKERS = 4
CONCURRENCY = 8  # per worker
PER_SECOND = 200  # the job's global limit: 12,000 requests per minute
# Volatile columns: everything else must be identical between the Ray run and a single one.
VOLATILE = ["request_id", "latency_s", "first_token_s"]


def _env(emu: Any, tmp_path: Path, name: str, **extra: str) -> dict[str, str]:
    return {
        "DASHSCOPE_API_KEY": emu.api_key,
        "DASHSCOPE_HTTP_BASE_URL": emu.base_url,
        "QWEN_BATCH_CACHE_DIR": str(tmp_path / f"cache-{name}"),
        **extra,
    }


def _job(folder: Path, texts: list[str], per_second: float) -> Path:
    folder.mkdir()
    return sentences_job(
        folder, texts, execution={"concurrency": CONCURRENCY, "requests_per_minute": per_second * 60}
    )


def _single_run(tmp_path: Path, texts: list[str]) -> pl.DataFrame:
    """The same job in one process, against an emulator of its own: the output to equal."""
    job = _job(tmp_path / "single", texts, 600_000)
    with EmulatorThread(EmulatorConfig()) as emu:
        done = run_subprocess(["run", str(job), "--quiet"], _env(emu, tmp_path, "single"), timeout=120)
    assert done.returncode == 0, done.stderr
    return pl.read_parquet(tmp_path / "single" / "out" / "result.parquet").drop(VOLATILE)


def _report(text: str) -> None:
    """The figures behind the assertions, for BENCHMARKS.md (``QWEN_BATCH_BENCH_PRINT=1 pytest -s``)."""
    if os.environ.get("QWEN_BATCH_BENCH_PRINT"):
        print(f"\n{text}")


def _busiest_second(times: list[float]) -> int:
    """The most requests in any one-second window starting at a request."""
    times = sorted(times)
    most, end = 0, 0
    for start, t in enumerate(times):
        while end < len(times) and times[end] < t + 1.0:
            end += 1
        most = max(most, end - start)
    return most


def test_a_killed_worker_is_resumed_and_the_output_equals_a_single_run(tmp_path: Path) -> None:
    """The issue's judged case: 2,000 rows, 4 workers, one killed mid-shard."""
    texts = [f"row number {i}: 请把这句话翻译成英文" for i in range(ROWS)]
    reference = _single_run(tmp_path, texts)
    job = _job(tmp_path / "ray", texts, PER_SECOND)
    with EmulatorThread(EmulatorConfig()) as emu:
        env = _env(emu, tmp_path, "ray", **{KILL_ENV: "1:100"})
        done = run_subprocess(["run", str(job), "--engine", "ray", "--ray-workers", str(WORKERS)], env, timeout=300)
        ledger = emu.ledger
    assert done.returncode == 0, done.stderr
    assert "shard 1/4: worker died; resuming it from its checkpoint" in done.stderr
    paid = Counter(entry["body_sha256"] for entry in ledger if entry["status"] == 200)
    paid_twice = sum(count - 1 for count in paid.values())
    busiest = _busiest_second([entry["time"] for entry in ledger])
    span = ledger[-1]["time"] - ledger[0]["time"]
    _report(f"ray run: {len(ledger)} requests over {span:.1f} s, {paid_twice} paid twice, busiest second {busiest}")
    assert len(paid) == ROWS
    assert paid_twice <= CONCURRENCY  # the dead worker's in flight
    assert busiest <= PER_SECOND * 1.1, f"{busiest} requests in one second, limit {PER_SECOND}"
    output = pl.read_parquet(tmp_path / "ray" / "out" / "result.parquet").drop(VOLATILE)
    assert_frame_equal(output, reference)


def test_a_429_that_one_worker_sees_pauses_every_worker(tmp_path: Path) -> None:
    """Rows of shard 0 alone are refused once with ``Retry-After: 1``: the shared limiter pauses the
    whole job for that second, so no worker sends in it (limiters of their own would go on: 96
    requests in 0.6 s of it, measured). Slots granted before the 429 reached the limiter may still
    go out at its start (delivery takes up to a few hundred ms on a loaded 2-core machine), so the
    window looked at is the pause's second half."""
    rows = 1_200
    storm = [next(i for i in range(start, rows) if unit_shard(f"r{i:03d}", "", 0, WORKERS) == 0) for start in (300, 600, 900)]
    texts = [
        f"row {i} [[emu: fail=Throttling.RateQuota times=1]]" if i in storm else f"row {i}" for i in range(rows)
    ]
    job = _job(tmp_path / "storm", texts, 600_000)
    with EmulatorThread(EmulatorConfig(retry_after=1.0)) as emu:
        done = run_subprocess(
            ["run", str(job), "--engine", "ray", "--ray-workers", str(WORKERS), "--quiet"],
            _env(emu, tmp_path, "storm"),
            timeout=300,
        )
        ledger = emu.ledger
    assert done.returncode == 0, done.stderr
    refused = [entry["time"] for entry in ledger if entry["status"] == 429]
    assert len(refused) == len(storm) == 3
    for when in refused:
        during = [entry for entry in ledger if when + 0.5 < entry["time"] < when + 0.95]
        offsets = [round(entry["time"] - when, 3) for entry in during]
        assert during == [], f"{len(during)} requests went out during the pause after a 429, at +{offsets} s"
    assert Counter(entry["status"] for entry in ledger)[200] == rows


def test_ctrl_c_stops_every_worker_with_its_checkpoint_whole_and_the_same_command_resumes(tmp_path: Path) -> None:
    """SIGINT to the driver: every worker finishes its requests in flight and records them, so the
    resumed run sends each row that was paid for never again."""
    rows = 600
    job = _job(tmp_path / "stopped", [f"row {i}" for i in range(rows)], 60)
    with EmulatorThread(EmulatorConfig()) as emu:
        env = _env(emu, tmp_path, "stopped")
        command = [sys.executable, "-m", "qwen_batch", "run", str(job), "--engine", "ray", "--ray-workers", str(WORKERS)]
        driver = subprocess.Popen(command, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 200
            while emu.stats()["billable"] < 100 and driver.poll() is None and time.monotonic() < deadline:
                emu.wait_for_request(timeout=1.0)
            driver.send_signal(signal.SIGINT)
            _, stderr = driver.communicate(timeout=120)
        finally:
            driver.kill()
        assert driver.returncode == 130, stderr
        assert "interrupted: finishing the requests in flight" in stderr
        assert "resume with: qwen-batch run" in stderr and "--engine ray --ray-workers 4" in stderr
        stopped_at = len(emu.ledger)
        assert stopped_at < rows
        resumed = run_subprocess(command[3:], env, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        paid = Counter(entry["body_sha256"] for entry in emu.ledger if entry["status"] == 200)
    assert len(paid) == rows
    assert max(paid.values()) == 1  # whatever was in flight at Ctrl-C was recorded, not sent again
    assert pl.read_parquet(tmp_path / "stopped" / "out" / "result.parquet").height == rows
