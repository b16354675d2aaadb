"""The report page of a real run with faults, rendered in a real headless Chromium with no network.

The run goes through the CLI against the emulator (429s of two kinds and 5xx, so rows retry);
``report.json`` is checked against the output Parquet with independent pyarrow queries and
against the emulator's ledger; then the page is opened from disk in Chromium, driven over
its DevTools protocol on loopback: no console error, no request but the page itself, every
chart drawn, and each chart's numbers (read back from plotly's own data on the page) equal
to report.json's. A screenshot is written to the test's tmp folder.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from qwen_batch.cli import main
from qwen_batch.emulator import EmulatorConfig
from qwen_batch.emulator.config import FaultRates
from qwen_batch.run_report.page import CHARTS
from qwen_batch.testing import EmulatorThread

from .cdp import Browser
from .conftest import sentences_job

ROWS = 80


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run with 429s (requests, burst) and 5xx, its report written by ``run --report``."""
    import os

    folder = tmp_path_factory.mktemp("report-run")
    faults = FaultRates(rate_quota=0.12, burst_rate=0.06, internal_error=0.1)
    config = EmulatorConfig(faults=faults, fault_seed=21, retry_after=0.05)
    saved = {k: os.environ.get(k) for k in ("DASHSCOPE_API_KEY", "DASHSCOPE_HTTP_BASE_URL", "QWEN_BATCH_CACHE_DIR")}
    with EmulatorThread(config) as emu:
        os.environ.update(DASHSCOPE_API_KEY=emu.api_key, DASHSCOPE_HTTP_BASE_URL=emu.base_url,
                          QWEN_BATCH_CACHE_DIR=str(folder / "cache"))
        try:
            job = sentences_job(
                folder, [f"sentence number {i}" for i in range(ROWS)],
                execution={"concurrency": 4, "max_retries": 4, "request_timeout_s": 5, "requests_per_minute": 6000},
            )
            code = main(["run", str(job), "--quiet", "--report"])
            ledger = list(emu.ledger)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    output = folder / "out" / "result.parquet"
    report = json.loads(output.with_name(output.name + ".report.json").read_text(encoding="utf-8"))
    return {"code": code, "output": output, "report": report, "ledger": ledger, "folder": folder}


def test_report_json_matches_the_output_parquet(faulty_run: dict[str, Any]) -> None:
    report, table = faulty_run["report"], pq.read_table(faulty_run["output"])
    assert faulty_run["code"] in (0, 1)
    status = table.column("status").to_pylist()
    attempts = table.column("attempts").to_pylist()
    assert report["header"]["rows"] == {
        "total": ROWS, "ok": status.count("ok"), "error": status.count("error"), "not_done": 0,
    }
    assert max(attempts) >= 2, "the faults must have made rows retry"
    histogram = {a: attempts.count(a) for a in sorted(set(attempts))}
    assert dict(zip(report["retries"]["attempts"], report["retries"]["rows"])) == histogram
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    reasons = ok.column("finish_reason").to_pylist()
    assert {r["finish_reason"]: r["count"] for r in report["finish_reason"]} == {r: reasons.count(r) for r in set(reasons)}
    assert report["header"]["cost"]["total"] == pytest.approx(pc.sum(table.column("cost")).as_py())
    [cost] = report["cost"]
    assert cost["input"] + cost["output"] + cost["thinking"] + cost["unsplit"] == pytest.approx(cost["total"])
    latency = ok.column("latency_s")
    for q, key in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        assert report["latency"]["latency_s"][key] == pytest.approx(pc.quantile(latency, q=q, interpolation="linear")[0].as_py())
    assert sum(report["latency"]["latency_s"]["counts"]) == ok.num_rows
    output_tokens = ok.column("output_tokens").to_pylist()
    histogram_out = report["tokens"]["output"]
    assert sum(histogram_out["counts"]) == ok.num_rows and report["tokens"]["max_tokens"] == 200
    width = histogram_out["bin_width"]
    assert histogram_out["counts"][max(output_tokens) // width] >= 1
    slowest = sorted(latency.to_pylist(), reverse=True)[:10]
    assert [row["latency_s"] for row in report["slowest"]] == slowest


def test_the_event_log_agrees_with_the_output_and_the_ledger(faulty_run: dict[str, Any]) -> None:
    report, table = faulty_run["report"], pq.read_table(faulty_run["output"])
    timeline = report["timeline"]
    attempts = sum(table.column("attempts").to_pylist())
    ok = table.column("status").to_pylist().count("ok")
    assert sum(timeline["started"]) == attempts
    assert sum(timeline["answered"]) == ok
    assert sum(timeline["failed"]) == attempts - ok
    sent = faulty_run["ledger"]  # the emulator saw only this run's requests
    assert len(sent) == attempts
    throttled = sum(sum(counts) for counts in timeline["throttled_by_kind"].values())
    assert throttled == sum(1 for e in sent if e["status"] == 429) > 0
    assert set(timeline["throttled_by_kind"]) == {"requests", "burst"}
    assert sum(sum(c) for c in timeline["attempt_errors_by_code"].values()) == attempts - ok
    assert max(timeline["in_flight_max"]) <= 4
    assert set(timeline["rpm_limit"]) == {6000}


def _chart_data_js() -> str:
    names = json.dumps(list(CHARTS))
    return (
        f"JSON.stringify(Object.fromEntries({names}.map(n => {{ const d = document.getElementById('chart-' + n);"
        " return [n, {drawn: !!d.querySelector('.main-svg'), traces: (d.data || []).map(t => ({name: t.name, x: t.x, y: t.y}))}]; })))"
    )


def test_the_page_renders_offline_in_chromium_with_every_chart_equal_to_report_json(
    faulty_run: dict[str, Any], tmp_path: Path
) -> None:
    report = faulty_run["report"]
    page = faulty_run["output"].with_name("result.parquet.report.html")
    assert page.stat().st_size < 5_000_000

    async def look() -> tuple[dict[str, Any], list[str], list[str], str, int]:
        async with Browser(tmp_path / "profile") as browser:
            await browser.call("Page.navigate", url=page.as_uri())
            await asyncio.wait_for(browser.wait_for("document.body && document.body.dataset.rendered"), 30)
            charts = json.loads(await browser.evaluate(_chart_data_js()))
            header = await browser.evaluate("document.getElementById('header').innerText")
            size = await browser.screenshot(tmp_path / "report.png")
            return charts, browser.console_errors(), browser.requested_urls(), header, size

    charts, errors, urls, header, shot = asyncio.run(asyncio.wait_for(look(), 90))
    assert errors == []
    assert urls and all(url.startswith(("file:", "data:")) for url in urls), urls
    assert shot > 10_000
    assert set(charts) == set(CHARTS) and all(chart["drawn"] for chart in charts.values())
    rows = report["header"]["rows"]
    assert f"{rows['total']}: {rows['ok']} ok, {rows['error']} error" in header

    def trace(chart: str, name: str) -> dict[str, Any]:
        return next(t for t in charts[chart]["traces"] if t["name"] == name)

    assert trace("latency", "latency")["y"] == report["latency"]["latency_s"]["counts"]
    line = report["timeline"]
    assert trace("throughput", "answers / min")["y"] == pytest.approx([r * 60 for r in line["rows_per_s"]])
    assert trace("throughput", "configured RPM")["y"] == line["rpm_limit"]
    assert trace("throughput", "throttle rate (req/min)")["y"] == pytest.approx(line["request_rate_per_min"])
    for kind, counts in line["throttled_by_kind"].items():
        marks = trace("throughput", f"429 {kind}")
        assert marks["y"] == [n for n in counts if n]
        assert marks["x"] == pytest.approx([t for t, n in zip(line["t"], counts) if n])
    assert trace("in_flight", "in flight (most)")["y"] == line["in_flight_max"]
    for record in report["finish_reason"]:
        assert trace("finish_reason", record["finish_reason"])["y"] == [record["count"]]
    for which in ("input", "output", "reasoning"):
        assert trace(f"tokens_{which}", which)["y"] == report["tokens"][which]["counts"]
    for part in ("input", "output"):
        assert trace("cost", part)["y"] == pytest.approx([c[part] for c in report["cost"]])
    assert trace("retries", "rows")["x"] == report["retries"]["attempts"]
    assert trace("retries", "rows")["y"] == report["retries"]["rows"]
    for code, counts in line["attempt_errors_by_code"].items():
        assert trace("errors", code)["y"] == counts
