"""The fault matrix: the real CLI against an emulator that fails most attempts in every way
it can (all 429 kinds, 500, 503, resets, hangs, malformed and truncated replies)."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from qwen_batch.cli import main
from qwen_batch.emulator import EmulatorConfig, FaultRates
from qwen_batch.testing import EmulatorThread

from .conftest import read_summary, sentences_job

RETRYABLE_CODES = {
    "Throttling.RateQuota", "Throttling.AllocationQuota", "Throttling.BurstRate", "InternalError",
    "ModelUnavailable", "ConnectionError", "Timeout", "MalformedReply", "TruncatedReply",
}


def spread(total: float, **extra: float) -> FaultRates:
    """``total`` probability per attempt, spread evenly over every fault kind."""
    names = ["rate_quota", "allocation_quota", "burst_rate", "internal_error", "unavailable",
             "reset", "hang", "malformed", "truncated"]
    return FaultRates(**{name: total / len(names) for name in names} | extra)


@pytest.fixture
def faulty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    # Retry-After is honoured as the pool's cool-down: a short one keeps the test short.
    config = EmulatorConfig(faults=spread(0.65), fault_seed=11, retry_after=0.2)
    with EmulatorThread(config) as emu:
        monkeypatch.setenv("DASHSCOPE_API_KEY", emu.api_key)
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", emu.base_url)
        monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
        yield emu


def test_under_the_fault_matrix_every_row_ends_ok_or_with_its_last_error_once(tmp_path: Path, faulty: Any) -> None:
    """65% of attempts fail: rows take several attempts, a few spend their retries; none is lost,
    duplicated or paid twice, and the summary matches the output."""
    texts = [f"row {i}: {{braces}} and %s stay literal" for i in range(40)]
    max_retries = 4
    # Long enough that only the scripted hangs time out: an answer the emulator sends after
    # the client gave up is billed (as the service would bill it), and this test counts bills.
    timeout_s = 1.5
    job = sentences_job(
        tmp_path, texts,
        execution={"concurrency": 8, "max_retries": max_retries, "request_timeout_s": timeout_s,
                   "requests_per_minute": 600000},
    )
    code = main(["run", str(job), "--quiet"])
    output = tmp_path / "out" / "result.parquet"
    frame = pl.read_parquet(output)
    ledger = [entry for entry in faulty.ledger if entry["endpoint"].endswith("/generation")] or faulty.ledger

    # One output row per input row, in order, each ok or error.
    assert frame["id"].to_list() == [f"r{i:03d}" for i in range(len(texts))]
    assert set(frame["status"]) <= {"ok", "error"}
    ok = frame.filter(pl.col("status") == "ok")
    failed = frame.filter(pl.col("status") == "error")
    assert code == (1 if failed.height else 0)
    # The matrix really bit: most rows needed more than one attempt, every kind was met.
    assert (frame["attempts"] > 1).sum() > len(texts) / 2
    faults_seen = {entry["fault"] or entry["code"] for entry in ledger if entry["status"] != 200}
    assert {"Throttling.RateQuota", "Throttling.AllocationQuota", "Throttling.BurstRate", "InternalError",
            "ModelUnavailable", "reset", "hang", "malformed", "truncated"} <= faults_seen
    # A failed row spent all its retries and carries the last error it met.
    assert failed["attempts"].to_list() == [max_retries + 1] * failed.height
    assert set(failed["error_code"]) <= RETRYABLE_CODES
    assert failed["output_text"].null_count() == failed.height
    # An ok row was paid for exactly once: one 200 per request body, none for failed rows.
    billed = collections.Counter(entry["body_sha256"] for entry in ledger if entry["status"] == 200)
    assert len(billed) == ok.height and set(billed.values()) == {1}
    assert ok["output_text"].null_count() == 0 and (ok["output_tokens"] > 0).all()
    # Every attempt the client made reached the ledger, and no more: nothing lost or duplicated.
    assert len(ledger) == frame["attempts"].sum()
    # (That hangs are cut by the timeout is test_a_hang_is_cut_by_the_request_timeout_every_time's:
    # a row's latency here also holds its backoffs and the throttle's pacing after random 429s.)
    # The summary tells the same story as the output.
    summary = read_summary(output)
    assert summary["rows"] == {"total": len(texts), "ok": ok.height, "error": failed.height, "not_done": 0, "truncated_in_thinking": 0}
    assert sum(summary["errors_by_code"].values()) == failed.height
    assert summary["retries"] == frame["attempts"].sum() - len(texts)
    assert summary["tokens"]["output"] == ok["output_tokens"].sum()


def test_a_hang_is_cut_by_the_request_timeout_every_time(tmp_path: Path, faulty: Any) -> None:
    """A row that always hangs ends as a Timeout error after its retries; the run still finishes."""
    job = sentences_job(
        tmp_path, ["always hangs [[emu: hang times=9]]"],
        execution={"concurrency": 1, "max_retries": 2, "request_timeout_s": 0.3},
    )
    assert main(["run", str(job), "--quiet"]) == 1
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["error_code"].to_list() == ["Timeout"] and frame["attempts"].to_list() == [3]


def _peak_rss_mb(job: Path, env: dict[str, str]) -> float:
    script = (
        "import resource, sys; from qwen_batch.cli import main; code = main(sys.argv[1:]); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)"
    )
    import subprocess, os  # noqa: E401 - only this helper runs a child

    done = subprocess.run(
        [sys.executable, "-c", script, "run", str(job), "--quiet"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode in (0, 1), done.stderr
    assert "Traceback" not in done.stderr
    peak = [line for line in done.stderr.splitlines() if line.startswith("PEAK ")]
    return int(peak[-1].split()[1]) / 1024  # ru_maxrss is in KiB on Linux


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units differ")
def test_memory_stays_bounded_as_the_table_grows(tmp_path: Path) -> None:
    """Peak RSS of a real process barely grows from 100 to 1,200 faulty rows of 2 KB each:
    rows, replies and retries are streamed, not buffered."""
    # No 429s here: they slow the whole pool down on purpose, and the matrix above has them.
    rates = FaultRates(internal_error=0.06, unavailable=0.06, reset=0.06, malformed=0.04, truncated=0.04)
    peaks = {}
    with EmulatorThread(EmulatorConfig(faults=rates, fault_seed=5, retry_after=0.05)) as emu:
        env = {"DASHSCOPE_API_KEY": emu.api_key, "DASHSCOPE_HTTP_BASE_URL": emu.base_url,
               "QWEN_BATCH_CACHE_DIR": str(tmp_path / "cache")}
        for rows in (100, 1200):
            folder = tmp_path / str(rows)
            folder.mkdir()
            texts = [f"row {i} " + "lorem ipsum " * 170 for i in range(rows)]
            job = sentences_job(
                folder, texts,
                execution={"concurrency": 128, "max_retries": 3, "request_timeout_s": 5, "requests_per_minute": 6_000_000,
                           "tokens_per_minute": 10**10},
            )
            peaks[rows] = _peak_rss_mb(job, env)
            summary = json.loads((folder / "out" / "result.parquet.summary.json").read_text(encoding="utf-8"))
            assert summary["rows"]["total"] == rows and summary["rows"]["not_done"] == 0
    # Measured: about 240 MB and 280 MB. The growth is the output batch (up to 50,000 rows
    # per Parquet batch, so here the whole table once); buffering every request, reply and
    # retry would add several copies of the data on top, and a leak would grow with attempts.
    assert peaks[1200] - peaks[100] < 120, peaks
    assert peaks[1200] < 800, peaks
