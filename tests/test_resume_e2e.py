"""Crash safety end to end: SIGKILL and SIGINT a real `qwen-batch run`, resume, compare outputs."""

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

import qwen_batch
from qwen_batch.emulator import EmulatorConfig
from qwen_batch.testing import EmulatorThread

from .conftest import read_summary, run_subprocess, sentences_job

ROWS = 300
CONCURRENCY = 8
# Volatile columns: everything else must be identical between a resumed and an uninterrupted run.
VOLATILE = ["request_id", "latency_s", "attempts"]


def _texts(n: int) -> list[str]:
    return [f"row number {i}: 请把这句话翻译成英文 {i}" for i in range(n)]


def _env(emu: Any, tmp_path: Path, name: str) -> dict[str, str]:
    return {
        "DASHSCOPE_API_KEY": emu.api_key,
        "DASHSCOPE_HTTP_BASE_URL": emu.base_url,
        "QWEN_BATCH_CACHE_DIR": str(tmp_path / f"cache-{name}"),
    }


def _start(job: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "qwen_batch", "run", str(job), "--quiet"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_billed(emu: Any, count: int, process: subprocess.Popen[str], timeout: float = 30) -> None:
    """Block until the emulator has answered ``count`` requests with 200 (or the run ended)."""
    deadline = time.monotonic() + timeout
    while emu.stats()["billable"] < count and process.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"emulator billed {emu.stats()['billable']} < {count}")
        emu.wait_for_request(timeout=1.0)


def _reference(tmp_path: Path) -> pl.DataFrame:
    folder = tmp_path / "reference"
    folder.mkdir()
    job = sentences_job(folder, _texts(ROWS), execution={"concurrency": CONCURRENCY})
    with EmulatorThread(EmulatorConfig(latency_s=0.002)) as emu:
        done = run_subprocess(["run", str(job), "--quiet"], _env(emu, tmp_path, "reference"))
    assert done.returncode == 0, done.stderr
    return pl.read_parquet(folder / "out" / "result.parquet").drop(VOLATILE)


def _assert_paid_at_most_once_plus_in_flight(emu: Any, kills: int) -> None:
    paid = Counter(entry["body_sha256"] for entry in emu.ledger if entry["status"] == 200)
    paid_twice = sum(count - 1 for count in paid.values())
    assert len(paid) == ROWS
    assert paid_twice <= CONCURRENCY * kills


@pytest.mark.parametrize("kill_after", [1, ROWS // 2, ROWS - 5])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path: Path, kill_after: int) -> None:
    reference = _reference(tmp_path)
    folder = tmp_path / "killed"
    folder.mkdir()
    job = sentences_job(folder, _texts(ROWS), execution={"concurrency": CONCURRENCY})
    with EmulatorThread(EmulatorConfig(latency_s=0.002)) as emu:
        env = _env(emu, tmp_path, "killed")
        process = _start(job, env)
        _wait_for_billed(emu, kill_after, process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        resumed = run_subprocess(["run", str(job), "--quiet"], env)
        assert resumed.returncode == 0, resumed.stderr
        _assert_paid_at_most_once_plus_in_flight(emu, kills=1)
    output = pl.read_parquet(folder / "out" / "result.parquet").drop(VOLATILE)
    assert_frame_equal(output, reference)


def test_sigkill_during_the_final_write_leaves_no_torn_output(tmp_path: Path) -> None:
    """Kill repeatedly around the end of the run: the output is absent or complete, and resume finishes it."""
    reference = _reference(tmp_path)
    folder = tmp_path / "late"
    folder.mkdir()
    job = sentences_job(folder, _texts(ROWS), execution={"concurrency": CONCURRENCY})
    output_path = folder / "out" / "result.parquet"
    with EmulatorThread(EmulatorConfig(latency_s=0.002)) as emu:
        env = _env(emu, tmp_path, "late")
        process = _start(job, env)
        _wait_for_billed(emu, ROWS, process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        if output_path.exists():
            assert pl.read_parquet(output_path).height == ROWS
        resumed = run_subprocess(["run", str(job), "--quiet"], env)
        assert resumed.returncode == 0, resumed.stderr
        _assert_paid_at_most_once_plus_in_flight(emu, kills=1)
    assert_frame_equal(pl.read_parquet(output_path).drop(VOLATILE), reference)


def test_sigint_exits_130_and_resume_completes(tmp_path: Path) -> None:
    folder = tmp_path / "interrupted"
    folder.mkdir()
    job = sentences_job(folder, _texts(ROWS), execution={"concurrency": CONCURRENCY})
    with EmulatorThread(EmulatorConfig(latency_s=0.01)) as emu:
        env = _env(emu, tmp_path, "interrupted")
        process = _start(job, env)
        _wait_for_billed(emu, 20, process)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
        assert process.returncode == 130, stderr
        assert "qwen-batch run" in stderr
        billed_before = emu.stats()["billable"]
        assert billed_before < ROWS
        resumed = run_subprocess(["run", str(job), "--quiet"], env)
        assert resumed.returncode == 0, resumed.stderr
        paid = Counter(entry["body_sha256"] for entry in emu.ledger if entry["status"] == 200)
        assert len(paid) == ROWS and max(paid.values()) == 1
    summary = read_summary(folder / "out" / "result.parquet")
    assert summary["rows"]["ok"] == ROWS


def test_a_changed_spec_refuses_to_resume_and_fresh_keeps_old_results(tmp_path: Path) -> None:
    job = sentences_job(tmp_path, _texts(10))
    with EmulatorThread(EmulatorConfig()) as emu:
        env = _env(emu, tmp_path, "changed")
        first = run_subprocess(["run", str(job), "--quiet", "--limit", "5"], env)
        assert first.returncode == 0, first.stderr
        changed = sentences_job(tmp_path, _texts(10), parameters={"seed": 7, "max_tokens": 200, "temperature": 0.9})
        refused = run_subprocess(["run", str(changed), "--quiet"], env)
        assert refused.returncode == 2
        assert "parameters.temperature" in refused.stderr and "--fresh" in refused.stderr
        sent_before = len(emu.ledger)
        assert sent_before == 5
        fresh = run_subprocess(["run", str(changed), "--quiet", "--fresh"], env)
        assert fresh.returncode == 0, fresh.stderr
    kept = list((tmp_path / "out").glob("result.parquet.old-*"))
    assert len(kept) == 1
    assert pl.read_parquet(kept[0] / "result.parquet").height == 5
    assert pl.read_parquet(tmp_path / "out" / "result.parquet").height == 10


def test_a_second_job_over_the_same_rows_is_answered_from_the_cache(tmp_path: Path) -> None:
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    texts = _texts(6)
    with EmulatorThread(EmulatorConfig()) as emu:
        env = _env(emu, tmp_path, "shared")
        assert run_subprocess(["run", str(sentences_job(first_dir, texts)), "--quiet"], env).returncode == 0
        sent = len(emu.ledger)
        assert run_subprocess(["run", str(sentences_job(second_dir, texts)), "--quiet"], env).returncode == 0
        assert len(emu.ledger) == sent
        changed = sentences_job(second_dir, texts, parameters={"seed": 8, "max_tokens": 200}, output={"path": "out/other.parquet"})
        assert run_subprocess(["run", str(changed), "--quiet"], env).returncode == 0
        assert len(emu.ledger) == sent + len(texts)
    summary = read_summary(second_dir / "out" / "result.parquet")
    assert summary["cache"]["hits"] == len(texts)
    assert summary["cache"]["saved_cost"] > 0
    second = pl.read_parquet(second_dir / "out" / "result.parquet")
    first = pl.read_parquet(first_dir / "out" / "result.parquet")
    assert second["output_text"].to_list() == first["output_text"].to_list()
    assert second["cost"].to_list() == [0.0] * len(texts)


def test_no_cache_flag_sends_again(tmp_path: Path) -> None:
    texts = _texts(3)
    with EmulatorThread(EmulatorConfig()) as emu:
        env = _env(emu, tmp_path, "nocache")
        for folder in ("a", "b"):
            (tmp_path / folder).mkdir()
            job = sentences_job(tmp_path / folder, texts)
            assert run_subprocess(["run", str(job), "--quiet", "--no-cache"], env).returncode == 0
        assert len(emu.ledger) == 2 * len(texts)


def test_resume_retries_retryable_errors_and_keeps_permanent_ones_unless_asked(tmp_path: Path) -> None:
    texts = ["fine", "blocked [[emu: always=DataInspectionFailed]]", "busy [[emu: fail=ModelUnavailable times=2]]"]
    job = sentences_job(tmp_path, texts, execution={"max_retries": 1, "concurrency": 1})
    with EmulatorThread(EmulatorConfig()) as emu:
        env = _env(emu, tmp_path, "errors")
        first = run_subprocess(["run", str(job), "--quiet"], env)
        assert first.returncode == 1
        frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
        assert frame["error_code"].to_list() == [None, "DataInspectionFailed", "ModelUnavailable"]
        sent = len(emu.ledger)
        second = run_subprocess(["run", str(job), "--quiet"], env)
        # Only the retryable row went again (its third attempt succeeds); the permanent one stays.
        assert second.returncode == 1
        assert len(emu.ledger) == sent + 1
        frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
        assert frame["status"].to_list() == ["ok", "error", "ok"]
        third = run_subprocess(["run", str(job), "--quiet", "--retry-errors"], env)
        assert third.returncode == 1
        assert len(emu.ledger) == sent + 2
        assert emu.ledger[-1]["code"] == "DataInspectionFailed"


def test_a_second_sigint_stops_at_once_and_the_run_still_resumes(tmp_path: Path) -> None:
    job = sentences_job(tmp_path, _texts(40), execution={"concurrency": 4})
    with EmulatorThread(EmulatorConfig(latency_s=30)) as emu:
        env = _env(emu, tmp_path, "twice")
        process = _start(job, env)
        assert emu.wait_for_in_flight(4, timeout=20)
        process.send_signal(signal.SIGINT)
        assert process.stderr is not None
        assert "finishing the requests in flight" in process.stderr.readline() + process.stderr.readline()
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=15)
        assert process.returncode == 130, stderr
        # The first Ctrl-C alone would wait up to 5 s for the 30 s requests; the second does not.
        assert time.monotonic() - started < 4
    with EmulatorThread(EmulatorConfig()) as emu:
        resumed = run_subprocess(["run", str(job), "--quiet"], _env(emu, tmp_path, "twice"))
        assert resumed.returncode == 0, resumed.stderr
    assert pl.read_parquet(tmp_path / "out" / "result.parquet")["status"].to_list() == ["ok"] * 40


def test_status_shows_how_far_a_run_got_without_sending(tmp_path: Path) -> None:
    job = sentences_job(tmp_path, _texts(10) + ["bad [[emu: always=DataInspectionFailed]]"])
    with EmulatorThread(EmulatorConfig()) as emu:
        env = _env(emu, tmp_path, "status")
        before = run_subprocess(["status", str(job)], env)
        assert before.returncode == 0 and "not started" in before.stdout
        assert run_subprocess(["run", str(job), "--quiet", "--limit", "6"], env).returncode == 0
        sent = len(emu.ledger)
        partial = run_subprocess(["status", str(job)], env)
        assert partial.returncode == 0
        assert "done:      6 (6 ok, 0 error" in partial.stdout
        assert "remaining: 5" in partial.stdout
        assert len(emu.ledger) == sent
        summary = read_summary(tmp_path / "out" / "result.parquet")
        assert f"{summary['cost']['total']:.4f} CNY so far" in partial.stdout


def _limit_file_size(limit: int) -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_full_disk_stops_the_run_cleanly_and_keeps_what_was_written(tmp_path: Path) -> None:
    """Files may not grow past 40 KB (RLIMIT_FSIZE): the checkpoint write fails like on a full disk."""
    job = sentences_job(tmp_path, _texts(ROWS), execution={"concurrency": CONCURRENCY})
    with EmulatorThread(EmulatorConfig()) as emu:
        env = _env(emu, tmp_path, "full")
        full = subprocess.run(
            [sys.executable, "-m", "qwen_batch", "run", str(job), "--quiet", "--no-cache"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=lambda: _limit_file_size(40_000),
        )
        assert full.returncode == 2, full.stderr
        assert "Traceback" not in full.stderr
        assert "rows.jsonl" in full.stderr
        billed_before = emu.stats()["billable"]
        assert 0 < billed_before < ROWS
        resumed = run_subprocess(["run", str(job), "--quiet", "--no-cache"], env)
        assert resumed.returncode == 0, resumed.stderr
        _assert_paid_at_most_once_plus_in_flight(emu, kills=1)
    assert pl.read_parquet(tmp_path / "out" / "result.parquet").height == ROWS


def test_a_changed_input_row_refuses_to_resume_and_names_the_row(tmp_path: Path) -> None:
    texts = _texts(8)
    job = sentences_job(tmp_path, texts)
    with EmulatorThread(EmulatorConfig()) as emu:
        env = _env(emu, tmp_path, "input")
        assert run_subprocess(["run", str(job), "--quiet", "--limit", "5"], env).returncode == 0
        sent = len(emu.ledger)
        edited = list(texts)
        edited[3] = "a different sentence"
        sentences_job(tmp_path, edited)
        refused = run_subprocess(["run", str(job), "--quiet"], env)
        assert refused.returncode == 2
        assert "r003" in refused.stderr and "--fresh" in refused.stderr
        assert len(emu.ledger) == sent
        # Rows appended after the finished ones are not a change: the job resumes.
        sentences_job(tmp_path, texts + ["one more row"])
        grown = run_subprocess(["run", str(job), "--quiet"], env)
        assert grown.returncode == 0, grown.stderr
        assert len(emu.ledger) == sent + 4


def test_finished_rows_are_trusted_only_while_the_input_is_byte_identical(tmp_path: Path) -> None:
    texts = _texts(6)
    job = sentences_job(tmp_path, texts)
    with EmulatorThread(EmulatorConfig()) as emu:
        assert run_subprocess(["run", str(job), "--quiet", "--limit", "4"], _env(emu, tmp_path, "trust")).returncode == 0
    unchanged = qwen_batch.prepare(job)
    assert unchanged.resume.verified and unchanged.resume.count() == 4
    assert unchanged.preflight.to_send == 2
    sentences_job(tmp_path, texts + ["appended"])
    grown = qwen_batch.prepare(job)
    assert not grown.resume.verified and grown.resume.count() == 4
    assert grown.preflight.to_send == 3 and grown.preflight.mismatched_row_ids == ()
