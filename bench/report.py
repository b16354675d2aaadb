"""The ``report`` case: ``qwen-batch report`` of a synthetic 1,000,000-row output.

The output (every result column, realistic spreads of latency, tokens, attempts and finish
reasons, a few errors) and a day-long event log are written by this module, then the report
runs in a fresh process under ``bench/rss.py``: wall time, peak RSS and the page's size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import harness as h

GOALS = {"wall_s": 10.0, "max_rss_mb": 1024.0, "html_mb": 5.0}


def make_output(folder: Path, rows: int) -> Path:
    """A synthetic output Parquet of ``rows`` rows and its checkpoint's event log (a 24 h run)."""
    import polars as pl

    from qwen_batch.run_events import RunEvents, events_path

    output = folder / "report-bench.parquet"
    i = pl.int_range(0, rows, eager=True)
    status = pl.when(i % 97 == 0).then(pl.lit("error")).otherwise(pl.lit("ok"))
    frame = pl.DataFrame({"id": i.cast(pl.String)}).with_columns(
        pl.lit("Say something short.").alias("text"),
        pl.lit("an answer of a few words").alias("output_text"),
        pl.when(i % 13 == 0).then(pl.lit("length")).otherwise(pl.lit("stop")).alias("finish_reason"),
        (20 + i % 50).alias("input_tokens"),
        (5 + (i * 7919) % 64).alias("output_tokens"),
        status.alias("status"),
        pl.when(i % 97 == 0).then(pl.lit("InternalError")).alias("error_code"),
        (1 + (i % 17 == 0).cast(pl.Int64) + (i % 101 == 0).cast(pl.Int64)).alias("attempts"),
        (0.05 + ((i * 104729) % 10_000) / 2_000.0).alias("latency_s"),
        pl.lit("qwen-turbo").alias("model"),
        (i % 5).cast(pl.String).alias("variant"),
        pl.lit(0).alias("reasoning_tokens"),
    ).with_columns(
        (pl.col("input_tokens") * 0.3e-6 + pl.col("output_tokens") * 0.6e-6).alias("cost"),
    )
    frame.write_parquet(output)
    checkpoint = output.with_name(output.name + ".checkpoint")
    checkpoint.mkdir(exist_ok=True)
    clock = [0.0]
    events = RunEvents({"mode": "online", "job": "report-bench", "requests_per_minute": 1200, "tokens_per_minute": 5_000_000,
                        "max_tokens": 64, "id_column": "id"}, clock=lambda: clock[0], rates=lambda: (19.5, None))
    per_second = max(1, rows // 86_400)
    data = []
    for second in range(86_400):
        clock[0] = second + 0.5
        for _ in range(per_second):
            events.attempt_started()
            events.attempt_answered(40, 30)
        if second % 600 == 0:
            events.attempt_started()
            events.attempt_failed("Throttling.RateQuota", "requests")
        data.append(events.take())
    data.append(events.finish())
    events_path(checkpoint).write_bytes(b"".join(data))
    return output


def report(rows: int = 1_000_000, runs: int = 3) -> dict[str, Any]:
    """Wall time and peak RSS of ``qwen-batch report`` on ``rows`` rows; the page's size."""
    with h.workdir() as folder:
        output = make_output(folder, rows)
        env = h._env()
        walls, peaks = [], []
        for _ in range(runs):
            run = h.run_child(h.with_peak_rss([h.PYTHON, "-m", "qwen_batch", "report", str(output)]), env)
            if run.returncode != 0:
                raise RuntimeError(f"qwen-batch report exited {run.returncode}")
            walls.append(run.wall_s)
            peaks.append(run.max_rss_mb or 0.0)
        page = output.with_name(output.name + ".report.html")
        html_mb = page.stat().st_size / 1e6
        events_mb = (output.with_name(output.name + ".checkpoint") / "events.jsonl").stat().st_size / 1e6
        report_kb = output.with_name(output.name + ".report.json").stat().st_size / 1e3
    wall, peak = h.median(walls), max(peaks)
    met = wall < GOALS["wall_s"] and peak < GOALS["max_rss_mb"] and html_mb < GOALS["html_mb"]
    return {
        "case": "report",
        "rows": rows,
        "runs": runs,
        "wall_s": walls,
        "max_rss_mb": peaks,
        "html_mb": round(html_mb, 3),
        "event_log_mb": round(events_mb, 3),
        "report_json_kb": round(report_kb, 1),
        "goal": "under 10 s and 1 GB; page under 5 MB",
        "met": met,
        "headline": f"{rows:,} rows: {wall:.2f} s (median of {runs}), peak RSS {peak:.0f} MB, page {html_mb:.2f} MB, "
        f"event log of a 24 h run {events_mb:.2f} MB",
    }


if __name__ == "__main__":
    print(json.dumps(report(), indent=2))
