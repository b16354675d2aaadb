"""Streamed jobs end to end: the output columns, the cache, and the crash bound when killed mid-stream.

A job streams with ``parameters.stream: true``; the crash test runs the real CLI in a
subprocess, killed with SIGKILL while its streams are open.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import qwen_batch
from qwen_batch.emulator import EmulatorConfig
from qwen_batch.testing import EmulatorThread, FakeBackend

from .conftest import sentences_job
from .test_resume_e2e import _env, _start, _texts

STREAM = {"seed": 7, "max_tokens": 200, "stream": True}
PARAMETERS = {"qwen-turbo": STREAM, "qwq-plus": {"seed": 7, "max_tokens": 60, "thinking_budget": 60}}
ROWS = 120
CONCURRENCY = 8
VOLATILE = ["request_id", "latency_s", "attempts", "first_token_s"]


def test_reasoning_columns_are_written_and_a_cache_hit_keeps_them(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = sentences_job(tmp_path, ["one", "two", "three"])
    fake = FakeBackend("the answer", output_tokens=9, reasoning="first, think", reasoning_tokens=5, streamed=True)
    result = qwen_batch.run(job, executor=qwen_batch.OnlineExecutor(fake))
    assert result.exit_code == 0 and fake.sent == 3
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["output_text"].to_list() == ["the answer"] * 3
    assert frame["reasoning_text"].to_list() == ["first, think"] * 3
    assert frame["reasoning_tokens"].to_list() == [5] * 3
    assert all(value is not None and value >= 0 for value in frame["first_token_s"].to_list())
    assert frame.schema["reasoning_tokens"] == pl.Int64 and frame.schema["first_token_s"] == pl.Float64
    # Again from scratch: every row is a cache hit that keeps its reasoning; nothing was streamed.
    again = qwen_batch.run(job, executor=qwen_batch.OnlineExecutor(fake), fresh=True)
    assert again.summary["cache"]["hits"] == 3 and fake.sent == 3
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["reasoning_text"].to_list() == ["first, think"] * 3
    assert frame["reasoning_tokens"].to_list() == [5] * 3
    assert frame["first_token_s"].to_list() == [None] * 3


def test_rows_without_reasoning_have_null_text_zero_tokens_and_errors_have_neither(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = sentences_job(tmp_path, ["fine", "[[emu: always=DataInspectionFailed]]"])
    assert qwen_batch.run(job).exit_code == 1
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["status"].to_list() == ["ok", "error"]
    assert frame["reasoning_text"].to_list() == [None, None]
    assert frame["reasoning_tokens"].to_list() == [0, None]
    assert frame["first_token_s"].to_list() == [None, None]


def test_a_streamed_job_over_the_emulator_writes_what_the_whole_replies_would(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    texts = [f"sentence {i} about rivers" for i in range(12)]
    whole_folder, streamed_folder = tmp_path / "whole", tmp_path / "streamed"
    whole_folder.mkdir()
    streamed_folder.mkdir()
    assert qwen_batch.run(sentences_job(whole_folder, texts), no_cache=True).exit_code == 0
    assert qwen_batch.run(sentences_job(streamed_folder, texts, parameters=STREAM), no_cache=True).exit_code == 0
    assert [entry["stream"] for entry in emulator.ledger] == [False] * 12 + [True] * 12
    whole = pl.read_parquet(whole_folder / "out" / "result.parquet")
    streamed = pl.read_parquet(streamed_folder / "out" / "result.parquet")
    assert_frame_equal(streamed.drop(VOLATILE), whole.drop(VOLATILE))
    assert whole["first_token_s"].null_count() == 12
    assert streamed["first_token_s"].null_count() == 0
    assert all(0 <= first <= latency for first, latency in zip(streamed["first_token_s"], streamed["latency_s"]))


def _wait_for_open_streams(emu: Any, done: int, process: subprocess.Popen[str], timeout: float = 60) -> None:
    """Block until ``done`` streams have finished and others are open (or the run ended)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        stats = emu.stats()
        if stats["billable"] >= done and stats["in_flight"] > 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"emulator stats {stats}")
        emu.wait_for_request(timeout=1.0)


@pytest.mark.parametrize(
    ("model", "kill_after"),
    [("qwen-turbo", 1), ("qwen-turbo", ROWS // 2), ("qwq-plus", ROWS // 2)],  # qwq-plus: killed mid-thought too
)
def test_sigkill_mid_stream_then_resume_loses_at_most_concurrency_paid_requests(
    tmp_path: Path, model: str, kill_after: int
) -> None:
    # Each event waits a little, so a stream is open for a while: the kill lands mid-stream.
    config = EmulatorConfig(latency_per_token_s=0.001)
    reference_folder, folder = tmp_path / "reference", tmp_path / "killed"
    reference_folder.mkdir()
    folder.mkdir()
    with EmulatorThread(config) as emu:
        reference_job = sentences_job(
            reference_folder, _texts(ROWS), model=model, parameters=PARAMETERS[model], execution={"concurrency": CONCURRENCY}
        )
        done = _start(reference_job, _env(emu, tmp_path, "reference"))
        assert done.wait(timeout=120) == 0, done.communicate()[1]
    reference = pl.read_parquet(reference_folder / "out" / "result.parquet").drop(VOLATILE)
    with EmulatorThread(config) as emu:
        env = _env(emu, tmp_path, "killed")
        job = sentences_job(
            folder, _texts(ROWS), model=model, parameters=PARAMETERS[model], execution={"concurrency": CONCURRENCY}
        )
        process = _start(job, env)
        _wait_for_open_streams(emu, kill_after, process)
        assert process.poll() is None, "the run ended before the kill"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        resumed = _start(job, env)
        assert resumed.wait(timeout=120) == 0, resumed.communicate()[1]
        # Every request whose stream began counts as paid, cut or not: the strict reading.
        paid = Counter(entry["body_sha256"] for entry in emu.ledger if entry["status"] == 200)
        assert all(entry["stream"] for entry in emu.ledger)
    assert len(paid) == ROWS
    assert sum(count - 1 for count in paid.values()) <= CONCURRENCY
    output = pl.read_parquet(folder / "out" / "result.parquet").drop(VOLATILE)
    assert_frame_equal(output, reference)
    assert (output["reasoning_tokens"] > 0).all() == (model == "qwq-plus")
