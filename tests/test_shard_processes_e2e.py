"""Shards as separate processes, as a scheduler starts them: together under one account's
limit, and killed mid-run. The real CLI over loopback against one emulator.

The rate test scales DashScope's minute down to a 2 s window (``QWEN_BATCH_RATE_WINDOW_S``,
as tests/test_throttle_e2e.py does) with the emulator enforcing exactly the job's limit: four
shards at a quarter of it each must never be refused, where four at the whole limit would be.
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

from qwen_batch.cli import main
from qwen_batch.emulator import EmulatorConfig
from qwen_batch.limits import RATE_WINDOW_ENV
from qwen_batch.sharding import Shard
from qwen_batch.testing import EmulatorThread

from .conftest import read_summary, sentences_job

VOLATILE = ["request_id", "latency_s", "first_token_s"]
SHARDS = 4
WINDOW_S = 2.0


def texts(n: int) -> list[str]:
    return [f"row {i}: 请把这句话翻译成英文 {i}" for i in range(n)]


def env_for(emu: Any, cache: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DASHSCOPE_API_KEY": emu.api_key,
        "DASHSCOPE_HTTP_BASE_URL": emu.base_url,
        "QWEN_BATCH_CACHE_DIR": str(cache),
        **extra,
    }


def start_shard(job: Path, shard: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "qwen_batch", "run", str(job), "--quiet", "--shard", shard],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def reference_output(tmp_path: Path, rows: int, **overrides: Any) -> pl.DataFrame:
    """One process, one run of the same job (no limits on the emulator): what the merge must equal."""
    folder = tmp_path / "single"
    folder.mkdir()
    job = sentences_job(folder, texts(rows), **overrides)
    with EmulatorThread(EmulatorConfig(latency_s=0.002)) as emu:
        done = subprocess.run([sys.executable, "-m", "qwen_batch", "run", str(job), "--quiet", "--no-cache"],
                              env=env_for(emu, tmp_path / "cache-single"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return pl.read_parquet(folder / "out" / "result.parquet").drop(VOLATILE)


def merged_output(job: Path) -> pl.DataFrame:
    assert main(["merge", str(job)]) == 0
    return pl.read_parquet(job.parent / "out" / "result.parquet").drop(VOLATILE)


def most_in_any_window(times: list[float], window_s: float) -> int:
    """The most requests any sliding window of ``window_s`` holds (the emulator's own count)."""
    most, start = 0, 0
    for end, moment in enumerate(times):
        while times[start] <= moment - window_s:
            start += 1
        most = max(most, end - start + 1)
    return most


@pytest.mark.serial
def test_four_shard_processes_together_stay_under_the_jobs_limit_and_merge_into_one_run(tmp_path: Path) -> None:
    rows, per_second = 240, 50.0
    limit = int(per_second * WINDOW_S)  # the emulator refuses the request past this many in any window
    execution = {"concurrency": 8, "requests_per_minute": per_second * 60, "max_retries": 5}
    reference = reference_output(tmp_path, rows, execution=execution)
    folder = tmp_path / "sharded"
    folder.mkdir()
    job = sentences_job(folder, texts(rows), execution=execution)
    config = EmulatorConfig(latency_s=0.002, rpm_limit=limit, rate_window_s=WINDOW_S)
    with EmulatorThread(config) as emu:
        processes = [
            start_shard(job, f"{index}/{SHARDS}", env_for(emu, tmp_path / f"cache-{index}", **{RATE_WINDOW_ENV: str(WINDOW_S)}))
            for index in range(SHARDS)
        ]
        for process in processes:
            _, stderr = process.communicate(timeout=120)
            assert process.returncode == 0, stderr
        ledger = [entry for entry in emu.ledger if entry["endpoint"] != "tokenizer"]
    statuses = Counter(entry["status"] for entry in ledger)
    assert statuses == {200: rows}, statuses  # not one 429: each shard kept to its quarter
    times = sorted(entry["time"] for entry in ledger)
    busiest = most_in_any_window(times, WINDOW_S)
    assert busiest <= limit
    if os.environ.get("QWEN_BATCH_BENCH_PRINT"):
        span = times[-1] - times[0]
        print(f"\n4 shards: {rows} requests in {span:.2f} s ({rows / span:.1f}/s; limit {per_second:g}/s), "
              f"busiest {WINDOW_S:g} s window {busiest} of {limit}")
    for index in range(SHARDS):
        part = Shard(index, SHARDS).part_path(job.parent / "out" / "result.parquet")
        assert read_summary(part)["throttled"] == 0
    assert_frame_equal(merged_output(job), reference)


def test_a_shard_killed_mid_run_resumes_paying_at_most_its_concurrency_twice(tmp_path: Path) -> None:
    rows, concurrency, killed = 300, 8, Shard(1, SHARDS)
    execution = {"concurrency": concurrency}
    reference = reference_output(tmp_path, rows, execution=execution)
    folder = tmp_path / "sharded"
    folder.mkdir()
    job = sentences_job(folder, texts(rows), execution=execution)
    held = {f"r{i:03d}" for i in range(rows) if killed.holds(f"r{i:03d}")}
    with EmulatorThread(EmulatorConfig(latency_s=0.002)) as emu:
        env = env_for(emu, tmp_path / "cache")
        process = start_shard(job, str(killed), env)
        deadline = time.monotonic() + 60
        while emu.stats()["billable"] < 20 and process.poll() is None:
            assert time.monotonic() < deadline, "the shard never got going"
            emu.wait_for_request(timeout=1.0)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        assert emu.stats()["billable"] < len(held), "killed after it finished: nothing to resume"
        rerun = subprocess.run([sys.executable, "-m", "qwen_batch", "run", str(job), "--quiet", "--shard", str(killed)],
                               env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        paid = Counter(entry["body_sha256"] for entry in emu.ledger if entry["status"] == 200)
        assert len(paid) == len(held)  # the killed shard's units, and none of another shard's
        assert sum(count - 1 for count in paid.values()) <= concurrency
        for index in range(SHARDS):
            if index != killed.index:
                other = subprocess.run(
                    [sys.executable, "-m", "qwen_batch", "run", str(job), "--quiet", "--shard", f"{index}/{SHARDS}"],
                    env=env, capture_output=True, text=True, timeout=120,
                )
                assert other.returncode == 0, other.stderr
    assert_frame_equal(merged_output(job), reference)
