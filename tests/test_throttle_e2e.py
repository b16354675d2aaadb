"""Adaptive throttling end to end: the real CLI against the emulator over loopback.

The six cases of issue 12, scaled down in time but not in counts: the emulator's rate window
is 2 s instead of a minute and the throttle is told so (``QWEN_BATCH_RATE_WINDOW_S``, which
scales its time constants and the retry backoff the same way); 300/s configured, so a window
holds 600 requests, half of what qwen-turbo's 1,200 RPM puts in a real minute (a sample of
answers is then as small a part of a window as for real), and a run is ten windows or more.
Every figure is a ratio to the configured rate or to the emulator's limit, from the
emulator's ledger of the same run. The bounds are the issue's thresholds where the runs
meet them with room (the measured figures are in BENCHMARKS.md), else the issue's less a
margin for a loaded 2-core machine, said where. The thresholds are asserted exactly on a fake
clock at DashScope's 60 s window in tests/test_throttle_sim.py, and ``python -m bench
throttle`` measures the cases at a 4 s window (1,200 requests per window, twenty windows).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qwen_batch.backends.errors import throttling_kind
from qwen_batch.cli import main
from qwen_batch.emulator import EmulatorConfig, FaultRates
from qwen_batch.limits import RATE_WINDOW_ENV
from qwen_batch.testing import EmulatorThread
from qwen_batch.wire import ERRORS

from .conftest import read_summary, run_subprocess, sentences_job

# Rates over wall-clock windows: run alone, after the parallel tests (pyproject's `serial` marker).
pytestmark = pytest.mark.serial

WINDOW_S = 2.0
CONFIGURED = 300.0  # requests per second (18,000 RPM)


def run_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: EmulatorConfig, rows: int,
            configured: float = CONFIGURED, **execution: Any) -> tuple[int, list[dict[str, Any]]]:
    """Run a ``rows``-row job against an emulator with ``config``; the exit code and the ledger.

    The CLI runs as its own process: sharing this one's interpreter (and its GIL) with the
    emulator's thread made both slower at 300/s on a loaded 2-core machine, which the
    throttle then measured as the service's pace.
    """
    with EmulatorThread(config) as emu:
        env = {
            "DASHSCOPE_API_KEY": emu.api_key,
            "DASHSCOPE_HTTP_BASE_URL": emu.base_url,
            "QWEN_BATCH_CACHE_DIR": str(tmp_path / "cache"),
            RATE_WINDOW_ENV: str(WINDOW_S),
        }
        settings = {"concurrency": 16, "max_retries": 30, "request_timeout_s": 5,
                    "requests_per_minute": configured * 60} | execution
        job = sentences_job(tmp_path, [f"row {i}" for i in range(rows)], execution=settings)
        done = run_subprocess(["run", str(job), "--quiet"], env, timeout=110)
        return done.returncode, emu.ledger


def rate(ledger: list[dict[str, Any]], start: float, end: float, statuses: tuple[int, ...] | None = None) -> float:
    """Requests per second in [start, end) (times relative to the first request)."""
    t0 = ledger[0]["time"]
    return sum(1 for e in ledger if start <= e["time"] - t0 < end and (statuses is None or e["status"] in statuses)) / (end - start)


def span(ledger: list[dict[str, Any]]) -> float:
    return ledger[-1]["time"] - ledger[0]["time"]


def report(label: str, text: str) -> None:
    if os.environ.get("QWEN_BATCH_BENCH_PRINT"):
        print(f"\n{label}: {text}")


@pytest.mark.parametrize("p", [0.15, 0.30])
def test_case_1_random_429s_do_not_slow_the_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, p: float) -> None:
    """No server limit; ten windows of rows (the 429s retried take more)."""
    rows = int(10 * WINDOW_S * CONFIGURED * (1 - p))
    code, ledger = run_job(tmp_path, monkeypatch, EmulatorConfig(faults=FaultRates(rate_quota=p), fault_seed=1), rows)
    assert code == 0
    attempts = len(ledger) / span(ledger)
    report(f"case 1 p={p}", f"{attempts:.1f} attempts/s = {attempts / CONFIGURED:.0%} of the configured rate")
    assert attempts >= 0.8 * CONFIGURED


def test_case_2_against_a_server_limit_half_the_configured_one_the_run_converges_with_few_429s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the third window on (the first two are the burst into an empty window)."""
    limit = CONFIGURED / 2
    config = EmulatorConfig(rpm_limit=int(limit * WINDOW_S), rate_window_s=WINDOW_S)
    rows = int(10 * WINDOW_S * limit)
    code, ledger = run_job(tmp_path, monkeypatch, config, rows)
    assert code == 0
    end = span(ledger)
    admitted = rate(ledger, 2 * WINDOW_S, end, (200,))
    t0 = ledger[0]["time"]
    later = [e for e in ledger if e["time"] - t0 >= 2 * WINDOW_S]
    share = sum(e["status"] == 429 for e in later) / len(later)
    report("case 2", f"{admitted:.2f}/s = {admitted / limit:.0%} of the limit, 429 share {share:.1%}")
    assert admitted >= 0.92 * limit  # the issue: 95% (96.6-97.8% measured; a loaded machine sends later)
    assert share < 0.05
    assert read_summary(tmp_path / "out" / "result.parquet")["rows"]["ok"] == rows


def test_case_3_a_server_limit_and_random_429s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = CONFIGURED / 2
    config = EmulatorConfig(rpm_limit=int(limit * WINDOW_S), rate_window_s=WINDOW_S,
                            faults=FaultRates(rate_quota=0.10), fault_seed=2)
    code, ledger = run_job(tmp_path, monkeypatch, config, int(10 * WINDOW_S * limit))
    assert code == 0
    admitted = rate(ledger, 2 * WINDOW_S, span(ledger), (200,))
    report("case 3", f"{admitted:.2f}/s = {admitted / limit:.0%} of the limit")
    assert admitted >= 0.80 * limit  # the issue: 85% (fake clock, this set-up, seeds 0-7: 82.8-96.4%)


def test_case_4_after_an_outage_the_rate_comes_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every attempt is answered 503 for half a window (the issue's 30 s of a minute), from one
    window in; then the rate is back at 90% of the configured within half a window (the issue),
    asserted within a window: 0.1 s and 1.8 s measured, the workers' retry backoff (scaled, up to
    1 s) decides, and a loaded machine sends later."""
    start, end = WINDOW_S, 1.5 * WINDOW_S
    code, ledger = run_job(tmp_path, monkeypatch, EmulatorConfig(outages=((start, end),)), int(5 * WINDOW_S * CONFIGURED))
    assert code == 0
    assert {e["status"] for e in ledger} == {200, 503}
    step, span_s = WINDOW_S / 20, WINDOW_S / 4
    back = next((i * step for i in range(60) if rate(ledger, end + i * step, end + i * step + span_s, (200,))
                 >= 0.9 * CONFIGURED), None)
    report("case 4", f"back at 90% of the configured rate {back:.2f} s after service returned" if back is not None else "not back")
    assert back is not None and back <= WINDOW_S


def test_case_5_another_client_takes_half_the_limit_then_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit is the configured rate; another client of the account sends half of it for
    six windows, from two windows after our first request."""
    limit, start, stop = CONFIGURED, 2 * WINDOW_S, 8 * WINDOW_S
    config = EmulatorConfig(rpm_limit=int(limit * WINDOW_S), rate_window_s=WINDOW_S,
                            other_load=(limit / 2, start, stop))
    code, ledger = run_job(tmp_path, monkeypatch, config, int(11 * WINDOW_S * limit))
    assert code == 0
    t0 = ledger[0]["time"]
    during = [e for e in ledger if start <= e["time"] - t0 < stop]
    share = sum(e["status"] == 429 for e in during) / len(during)
    settled = rate(ledger, start + 2 * WINDOW_S, stop, (200,)) / (limit / 2)
    step, span_s = WINDOW_S / 20, WINDOW_S / 4
    back = next((i * step for i in range(80) if rate(ledger, stop + i * step, stop + i * step + span_s, (200,))
                 >= 0.9 * limit), None)
    report("case 5", f"429 share while it runs {share:.1%}; settled at {settled:.0%} of what is left; "
           f"90% of the limit {back if back is None else round(back, 2)} s after it stops")
    assert share < 0.05
    assert settled >= 0.85
    # The issue: one window (60 s); met on the fake clock at 60 s for seeds 0-49 (40-59 s), not
    # always at this scale: the same set-up on the fake clock, seeds 0-49, 0.1-1.4 windows (the
    # probe runs into the window the other client still fills just before it stops). A guard.
    assert back is not None and back <= 2 * WINDOW_S


def test_case_6_a_heavy_fault_mix_at_the_default_limits_finishes_in_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """About half of all attempts fail, across all nine kinds, at qwen-turbo's default
    1,200 RPM (no requests_per_minute in the spec). Each row's last request finishes it."""
    names = ["rate_quota", "allocation_quota", "burst_rate", "internal_error", "unavailable",
             "reset", "hang", "malformed", "truncated"]
    faults = FaultRates(**{name: 0.5 / len(names) for name in names})
    rows, default_rate = 200, 20.0
    code, ledger = run_job(tmp_path, monkeypatch, EmulatorConfig(faults=faults, fault_seed=3), rows,
                           requests_per_minute=None, concurrency=16, request_timeout_s=1.0)
    assert code in (0, 1)
    by_row: dict[str, float] = {}
    for entry in ledger:
        by_row[entry["body_sha256"]] = entry["time"]
    assert len(by_row) == rows  # every row accounted for once
    summary = read_summary(tmp_path / "out" / "result.parquet")
    assert summary["rows"]["ok"] + summary["rows"]["error"] == rows
    need = len(ledger) / default_rate
    finished = sorted(t - ledger[0]["time"] for t in by_row.values())
    at_99 = finished[int(0.99 * rows) - 1]
    report("case 6", f"{len(ledger)} attempts need {need:.1f} s; 99% of rows at {at_99 / need:.2f}x, "
           f"all at {finished[-1] / need:.2f}x")
    assert at_99 <= 2.5 * need
    assert finished[-1] <= 5 * need


@pytest.mark.parametrize(
    ("code", "message", "kind"),
    [
        ("Throttling.RateQuota", ERRORS["Throttling.RateQuota"].message, "requests"),
        ("Throttling.AllocationQuota", ERRORS["Throttling.AllocationQuota"].message, "tokens"),
        ("Throttling.BurstRate", ERRORS["Throttling.BurstRate"].message, "burst"),
        ("Throttling", ERRORS["Throttling"].message, "requests"),
        ("Throttling", "Allocated quota exceeded, please increase your quota limit.", "tokens"),
        ("Throttling", "Request rate increased too quickly.", "burst"),
        ("LimitRequests", "You exceeded your current requests list.", "requests"),
        ("limit_burst_rate", "m", "burst"),
        ("insufficient_quota", "You exceeded your current quota", "tokens"),
        ("SomethingNew", "Requests rate limit exceeded", "requests"),
    ],
)
def test_the_limit_kind_comes_from_the_code_else_the_message(code: str, message: str, kind: str) -> None:
    assert throttling_kind(code, message) == kind


def test_the_pool_honours_retry_after_as_one_shared_pause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With Retry-After: 1 on every 429, the requests that follow a 429 wait it out together."""
    config = EmulatorConfig(rpm_limit=10, rate_window_s=1.0, retry_after=1.0)
    code, ledger = run_job(tmp_path, monkeypatch, config, 30, requests_per_minute=6000)
    assert code == 0
    times = [entry["time"] for entry in ledger]
    first_429 = min(entry["time"] for entry in ledger if entry["status"] == 429)
    # Requests already queued behind the fixed limiter do not go out into the cool-down:
    # after the first 429 answer, nothing is sent for (about) the Retry-After.
    after = [t for t in times if t > first_429 + 0.05]
    assert after and min(after) >= first_429 + 0.9


@pytest.fixture
def failing_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    with EmulatorThread(EmulatorConfig()) as emu:
        monkeypatch.setenv("DASHSCOPE_API_KEY", emu.api_key)
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", emu.base_url)
        monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
        yield emu


def test_max_error_rate_stops_a_run_that_cannot_succeed_and_a_rerun_resumes(
    tmp_path: Path, failing_rows: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows from 100 on fail for good (InvalidParameter): the run stops with exit 3 once more
    than half of the latest 200 rows failed, having sent far fewer than all 1,000 rows; a
    re-run without the limit sends only the rows not done."""
    texts = [f"row {i}" + (" [[emu: always=InvalidParameter]]" if i >= 100 else "") for i in range(1000)]
    job = sentences_job(tmp_path, texts, execution={"concurrency": 4, "max_error_rate": 0.5})
    assert main(["run", str(job), "--quiet"]) == 3
    err = capsys.readouterr()
    lines = [line for line in (err.out + err.err).splitlines() if line.startswith("stopped:")]
    assert len(lines) == 1 and "of the last 200 rows failed, more than execution.max_error_rate 0.5" in lines[0]
    sent = len(failing_rows.ledger)
    assert 201 <= sent < 215  # 100 ok, then 101 failed (101 of the latest 200), and the few in flight
    job = sentences_job(tmp_path, texts, execution={"concurrency": 4})
    assert main(["run", str(job), "--quiet"]) == 1
    ledger = failing_rows.ledger
    assert len(ledger) == 1000 and len({e["body_sha256"] for e in ledger}) == 1000  # no row sent twice
