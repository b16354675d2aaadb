"""The run report: its event log (bounded, resumable, torn tails cut), the CLI's bad input, no plotly."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_batch.cli import main
from qwen_batch.run_events import BUCKET_CAP_S, EventLog, RunEvents, bucket_width, read_events

from .conftest import run_subprocess, sentences_job


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in data.splitlines()]


def test_buckets_are_one_second_then_widen_as_the_run_ages() -> None:
    assert [bucket_width(t, 100) for t in (0, 99.9, 100, 199, 200, 399, 400, 800)] == [1, 1, 2, 2, 4, 4, 8, 16]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=86_400 * 2, allow_nan=False), min_size=1, max_size=400))
def test_every_attempt_is_counted_once_in_a_bounded_number_of_buckets(times: list[float]) -> None:
    clock = FakeClock()
    events = RunEvents({"mode": "online"}, clock=clock, cap_s=60, rates=lambda: (2.0, None))
    for t in sorted(times):
        clock.now = t
        events.attempt_started()
        events.attempt_failed("Throttling.RateQuota", "requests")
    lines = _lines(events.take() + events.finish())
    buckets = [line for line in lines if line["kind"] == "bucket"]
    assert sum(b["started"] for b in buckets) == len(times)
    assert sum(b["throttled"].get("requests", 0) for b in buckets) == len(times)
    span = max(times)
    bound = 60 + 30 * (max(0.0, __import__("math").log2(max(span, 60) / 60)) + 1)
    assert len(buckets) <= bound
    # Buckets never overlap, and each holds only times inside it.
    ends = [(b["t"], b["t"] + b["width_s"]) for b in buckets]
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))
    assert events.in_flight == 0


def test_a_day_long_run_stays_small() -> None:
    clock = FakeClock()
    events = RunEvents({"mode": "online"}, clock=clock, rates=lambda: (None, None))
    data = b""
    for second in range(0, 86_400, 1):
        clock.now = second + 0.5
        for _ in range(5):
            events.attempt_started()
            events.attempt_answered(100, 50)
        if second % 10 == 0:
            data += events.take()
    data += events.finish()
    buckets = [line for line in _lines(data) if line["kind"] == "bucket"]
    assert sum(b["answered"] for b in buckets) == 5 * 86_400
    assert len(buckets) < BUCKET_CAP_S + BUCKET_CAP_S // 2 * 6
    assert len(data) < 4_000_000


def test_opening_the_log_cuts_a_torn_tail_and_counts_segments(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    assert log.segments == 0
    log.append(RunEvents({"mode": "online"}).finish())
    log.close()
    with path.open("ab") as f:
        f.write(b'{"kind":"bucket","segm')
    again = EventLog(path)
    assert again.segments == 1
    assert path.read_bytes().endswith(b"\n")
    again.close()


def test_a_resumed_run_appends_a_second_segment(tmp_path: Path, job_env: dict[str, str]) -> None:
    job = sentences_job(tmp_path, [f"t{i}" for i in range(6)])
    assert main(["run", str(job), "--quiet", "--limit", "3"]) == 0
    assert main(["run", str(job), "--quiet"]) == 0
    output = tmp_path / "out" / "result.parquet"
    segments, buckets = read_events(output.with_name(output.name + ".checkpoint") / "events.jsonl")
    assert [s["segment"] for s in segments] == [0, 1]
    assert {b["segment"] for b in buckets} == {0, 1}
    assert sum(b["answered"] for b in buckets) == 6
    assert main(["report", str(output), "--json"]) == 0
    report = json.loads(output.with_name(output.name + ".report.json").read_text(encoding="utf-8"))
    assert report["header"]["segments"] == 2
    assert sum(report["timeline"]["answered"]) == 6


@pytest.mark.parametrize("kind", ["missing", "not-parquet", "not-an-output"])
def test_bad_input_is_one_line_and_exit_2_writing_nothing(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.parquet"
    if kind == "not-parquet":
        path.write_text("id,text\n1,a\n")
    elif kind == "not-an-output":
        pl.DataFrame({"id": [1], "text": ["a"]}).write_parquet(path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_without_plotly_the_report_writes_tables_and_json_and_says_how(tmp_path: Path, job_env: dict[str, str]) -> None:
    job = sentences_job(tmp_path, ["a", "b", "c"])
    assert main(["run", str(job), "--quiet"]) == 0
    output = tmp_path / "out" / "result.parquet"
    # A real process in which plotly cannot be imported (a package that refuses, first on the path).
    blocker = tmp_path / "blocker" / "plotly"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('plotly is not installed')\n")
    env = {**job_env, "PYTHONPATH": os.pathsep.join([str(blocker.parent), *sys.path])}
    done = run_subprocess(["report", str(output)], env)
    assert done.returncode == 0, done.stderr
    assert "qwen-batch report: test-job" in done.stdout
    notes = [line for line in done.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: no HTML page: the plots need plotly (pip install 'qwen-batch[report]')"]
    assert output.with_name(output.name + ".report.json").exists()
    assert not output.with_name(output.name + ".report.html").exists()


def test_report_html_path_and_json_on_stdout(tmp_path: Path, job_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    job = sentences_job(tmp_path, ["a", "b"])
    assert main(["run", str(job), "--quiet"]) == 0
    capsys.readouterr()
    output = tmp_path / "out" / "result.parquet"
    page = tmp_path / "elsewhere" / "page.html"
    assert main(["report", str(output), "--html", str(page), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(output.with_name(output.name + ".report.json").read_text(encoding="utf-8"))
    assert printed["header"]["rows"]["ok"] == 2
    text = page.read_text(encoding="utf-8")
    assert "<script src=" not in text and "cdn.plot.ly" not in text.split("<script>", 2)[-1][-200:]
    embedded = text.split('<script id="report-data" type="application/json">', 1)[1].split("</script>", 1)[0]
    assert json.loads(embedded) == printed


def test_an_older_output_without_optional_columns_still_reports(tmp_path: Path) -> None:
    """Columns added by later features (model, finish_reason, reasoning, first token) may be absent."""
    from qwen_batch.run_report import build_report

    path = tmp_path / "old.parquet"
    pl.DataFrame({
        "status": ["ok", "ok", "error"], "error_code": [None, None, "InternalError"], "attempts": [1, 2, 4],
        "latency_s": [0.5, 1.5, 3.0], "input_tokens": [10, 20, None], "output_tokens": [5, 7, None],
        "cost": [0.001, 0.002, None],
    }).write_parquet(path)
    report = build_report(path)
    assert report["header"]["rows"] == {"total": 3, "ok": 2, "error": 1, "not_done": 0}
    assert report["finish_reason"] == [] and report["tokens"]["reasoning"] is None
    assert report["latency"]["first_token_s"] is None and report["timeline"] == {"available": False}
    assert report["retries"] == {"attempts": [1, 2, 4], "rows": [1, 1, 1], "share_retried": 2 / 3}
    assert report["errors_by_code"] == {"InternalError": 1}
    [cost] = report["cost"]
    assert cost["total"] == pytest.approx(0.003) and cost["unsplit"] == pytest.approx(0.003)


def test_variants_and_newer_columns_group_the_figures(tmp_path: Path) -> None:
    """An evaluation run's output (variant, sample, request_sha256, structured-output columns)."""
    from qwen_batch.run_report import build_report

    path = tmp_path / "eval.parquet"
    n = 60
    frame = pl.DataFrame({
        "qid": [f"q{i}" for i in range(n)],
        "status": ["ok" if i % 10 else "error" for i in range(n)],
        "error_code": [None if i % 10 else "BudgetExceeded" for i in range(n)],
        "attempts": [1 if i % 10 else 0 for i in range(n)],
        "latency_s": [0.1 + i / 100 for i in range(n)],
        "input_tokens": [100 + i for i in range(n)], "output_tokens": [10 + i % 7 for i in range(n)],
        "reasoning_tokens": [i % 3 for i in range(n)],
        "cost": [0.0001 * (1 + i % 4) if i % 10 else None for i in range(n)],
        "finish_reason": ["length" if i % 4 == 0 else "stop" for i in range(n)],
        "model": ["qwen-plus" if i % 2 else "qwen-turbo" for i in range(n)],
        "variant": ["a" if i % 3 else "b" for i in range(n)],
        "sample": [0] * n, "request_sha256": ["x"] * n,
        "output_json": [None] * n, "parse_status": ["ok"] * n, "parse_error": [None] * n,
    })
    frame.write_parquet(path)
    report = build_report(path)
    assert report["header"]["variants"] == ["a", "b"] and report["header"]["models"] == ["qwen-plus", "qwen-turbo"]
    assert report["header"]["rows"]["not_done"] == 6
    expected = (
        frame.filter(pl.col("cost").is_not_null()).group_by("model", "variant").agg(pl.col("cost").sum()).sort("model", "variant")
    )
    got = {(c["model"], c["variant"]): c["total"] for c in report["cost"]}
    assert got == pytest.approx({(m, v): c for m, v, c in expected.iter_rows()})
    for c in report["cost"]:
        assert c["input"] + c["output"] + c["thinking"] == pytest.approx(c["total"]) and c["unsplit"] == 0
    ok = frame.filter(pl.col("status") == "ok")
    for record in report["finish_reason"]:
        group = ok.filter((pl.col("model") == record["model"]) & (pl.col("variant") == record["variant"]))
        assert record["count"] == group.filter(pl.col("finish_reason") == record["finish_reason"]).height
        assert record["share"] == pytest.approx(record["count"] / group.height)


def test_a_day_long_event_log_is_merged_to_a_few_hundred_points_keeping_every_count(tmp_path: Path) -> None:
    from qwen_batch.run_report.aggregate import TIMELINE_POINTS, _timeline

    clock = FakeClock()
    events = RunEvents({"mode": "online", "requests_per_minute": 600}, clock=clock, wall=lambda: 1000.0,
                       rates=lambda: (9.0, None))
    data = b""
    for second in range(0, 86_400, 3):
        clock.now = second + 0.1
        events.attempt_started()
        if second % 300 == 0:
            events.attempt_failed("Throttling.RateQuota", "requests")
        else:
            events.attempt_answered(10, 5)
        data += events.take()
    lines = _lines(data + events.finish())
    segments = [line for line in lines if line["kind"] == "segment"]
    buckets = [line for line in lines if line["kind"] == "bucket"]
    timeline = _timeline(segments, buckets)
    assert len(buckets) > TIMELINE_POINTS >= len(timeline["t"]) > TIMELINE_POINTS / 4
    assert sum(timeline["started"]) == 86_400 // 3
    assert sum(timeline["throttled_by_kind"]["requests"]) == 86_400 // 300
    assert sum(timeline["answered"]) == 86_400 // 3 - 86_400 // 300
    starts = [t + w for t, w in zip(timeline["t"], timeline["width_s"])]
    assert all(end <= nxt for end, nxt in zip(starts, timeline["t"][1:]))
    assert set(timeline["request_rate_per_min"]) == {540.0}


def test_a_streamed_run_reports_its_first_token_times(tmp_path: Path, job_env: dict[str, str]) -> None:
    from qwen_batch.run_report import build_report

    job = sentences_job(tmp_path, [f"s{i}" for i in range(8)], parameters={"seed": 7, "max_tokens": 200, "stream": True})
    assert main(["run", str(job), "--quiet"]) == 0
    output = tmp_path / "out" / "result.parquet"
    first = pl.read_parquet(output)["first_token_s"]
    report = build_report(output)["latency"]["first_token_s"]
    assert report is not None and report["count"] == first.filter(first > 0).len() == 8
    assert report["p50"] == pytest.approx(first.quantile(0.5, interpolation="linear"))
