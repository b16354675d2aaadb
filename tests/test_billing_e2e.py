"""The billed columns hold billed usage only: SUM(input_tokens) and SUM(cost) are the bill.

A row never sent (over-long, a row problem, stopped by the budget) and a cache hit (paid for
when first fetched) have no billed usage; the preflight's exact count has its own column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import qwen_batch
from qwen_batch.cli import main

from .conftest import read_summary, sentences_job

# qwen-turbo's input limit in the API page's era (early 2024) is 6,000 tokens; one "数据" is one token.
OVER_LONG_TEXT = "数据" * 6100
TEXTS = ["short", OVER_LONG_TEXT, "", "also short"]  # "" is a null cell: a row problem
PRICING = {"currency": "CNY", "input_per_1k": 1.0, "output_per_1k": 2.0}
BILLED = ["input_tokens", "output_tokens", "total_tokens", "cost"]


def _counted(job: Path) -> dict[int, int]:
    """The preflight's exact input count of every row that renders to a request."""
    return {request.index: request.input_tokens for request in qwen_batch.prepare(job).requests()}


def _paid(emulator: Any) -> list[dict[str, Any]]:
    return [entry for entry in emulator.ledger if entry["status"] == 200]


def _assert_sums_are_the_bill(frame: pl.DataFrame, summary: dict[str, Any], emulator: Any) -> None:
    paid = _paid(emulator)
    assert frame["cost"].sum() == pytest.approx(summary["cost"]["total"])
    assert frame["input_tokens"].sum() == summary["tokens"]["input"]
    assert frame["output_tokens"].sum() == summary["tokens"]["output"]
    assert frame["total_tokens"].sum() == summary["tokens"]["total"]
    assert summary["tokens"]["input"] == sum(entry["input_tokens"] for entry in paid)


def test_rows_never_sent_have_null_usage_and_the_sums_are_the_bill(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = sentences_job(tmp_path, TEXTS, preflight={"over_long": "error"}, pricing=PRICING)
    counted = _counted(job)
    assert main(["run", str(job), "--quiet"]) == 1
    output = tmp_path / "out" / "result.parquet"
    frame = pl.read_parquet(output)
    assert frame["status"].to_list() == ["ok", "error", "error", "ok"]
    over_long, problem = frame.row(1, named=True), frame.row(2, named=True)
    assert over_long["error_code"] == "InvalidParameter" and "not sent" in over_long["error_message"]
    assert problem["error_code"] == "InvalidParameter" and "null" in problem["error_message"]
    for row in (over_long, problem):
        assert [row[name] for name in BILLED] == [None] * 4 and row["attempts"] == 0
    assert over_long["preflight_input_tokens"] == counted[1] > 6000
    assert problem["preflight_input_tokens"] is None  # nothing to count: the row has no prompt
    sent = frame.filter(pl.col("status") == "ok")
    assert sent["preflight_input_tokens"].to_list() == sent["input_tokens"].to_list() == [counted[0], counted[3]]
    assert len(_paid(emulator)) == 2
    _assert_sums_are_the_bill(frame, read_summary(output), emulator)


def test_cache_hits_cost_nothing_and_add_no_billed_usage(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = sentences_job(tmp_path, TEXTS, preflight={"over_long": "error"}, pricing=PRICING)
    output = tmp_path / "out" / "result.parquet"
    assert main(["run", str(job), "--quiet"]) == 1
    first = pl.read_parquet(output)
    assert main(["run", str(job), "--quiet", "--fresh"]) == 1  # the same requests: answered by the cache
    frame = pl.read_parquet(output)
    summary = read_summary(output)
    hits = frame.filter(pl.col("status") == "ok")
    assert hits["cost"].to_list() == [0.0, 0.0] and hits["attempts"].to_list() == [0, 0]
    assert hits["input_tokens"].null_count() == 2 and hits["output_tokens"].null_count() == 2
    assert hits["preflight_input_tokens"].to_list() == first.filter(pl.col("status") == "ok")["input_tokens"].to_list()
    assert summary["cache"]["hits"] == 2 and summary["cache"]["saved_cost"] == pytest.approx(first["cost"].sum())
    assert summary["tokens"] == {"input": 0, "output": 0, "reasoning": 0, "total": 0, "estimated_rows": 0, "estimate": None} and summary["cost"]["total"] == 0.0
    assert len(_paid(emulator)) == 2  # nothing sent the second time
    assert frame["cost"].sum() == pytest.approx(summary["cost"]["total"])


def test_rows_the_budget_stopped_have_null_usage(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = sentences_job(
        tmp_path,
        [f"row {i} with some words to pay for" for i in range(30)],
        pricing=PRICING,
        budget={"max_cost": 0.3},
        execution={"concurrency": 1, "requests_per_minute": 600000},
        parameters={"seed": 7, "max_tokens": 100},
    )
    assert main(["run", str(job), "--quiet"]) == 3
    output = tmp_path / "out" / "result.parquet"
    frame = pl.read_parquet(output)
    stopped = frame.filter(pl.col("error_code") == "BudgetExceeded")
    assert 0 < stopped.height < 30
    assert all(stopped[name].null_count() == stopped.height for name in [*BILLED, "preflight_input_tokens"])
    _assert_sums_are_the_bill(frame, read_summary(output), emulator)


def test_a_checkpoint_from_before_the_preflight_column_resumes_with_the_same_meaning(
    tmp_path: Path, job_env: dict, emulator: Any
) -> None:
    """An older log kept an over-long row's count in input_tokens and had no preflight field."""
    job = sentences_job(tmp_path, TEXTS, preflight={"over_long": "error"}, pricing=PRICING)
    counted = _counted(job)
    assert main(["run", str(job), "--quiet", "--limit", "2"]) == 1
    log = tmp_path / "out" / "result.parquet.checkpoint" / "rows.jsonl"
    old_records = []
    for line in log.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        preflight = record.pop("preflight_input_tokens")
        if record["status"] == "error":
            record["input_tokens"] = preflight
        old_records.append(json.dumps(record))
    log.write_text("\n".join(old_records) + "\n", encoding="utf-8")
    assert main(["run", str(job), "--quiet"]) == 1
    assert len(_paid(emulator)) == 2  # row 0 was not sent again; row 3 was sent now
    output = tmp_path / "out" / "result.parquet"
    frame = pl.read_parquet(output)
    assert frame["status"].to_list() == ["ok", "error", "error", "ok"]
    over_long = frame.row(1, named=True)
    assert [over_long[name] for name in BILLED] == [None] * 4
    assert over_long["preflight_input_tokens"] == counted[1]
    assert frame["input_tokens"][0] == counted[0] and frame["preflight_input_tokens"][0] is None  # not recorded then
    assert frame["preflight_input_tokens"][3] == counted[3]
    _assert_sums_are_the_bill(frame, read_summary(output), emulator)
