"""The run summary: the whole job's figures from its durable records, plus this run's timing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import pricing
from .catalog import CURRENCY
from .checkpoint import billed

if TYPE_CHECKING:
    import polars as pl

    from .plan import JobPlan
    from .runner import RunStatistics


COST_DECIMALS = 10  # sums of float costs, without binary noise like 0.03820000000000001
SUMMARY_COLUMNS = ["index", "status", "error_code", "input_tokens", "output_tokens", "cost", "cached"]


def build_summary(
    plan: JobPlan,
    log: pl.LazyFrame,
    statistics: RunStatistics,
    stop_reason: str | None,
) -> dict[str, Any]:
    """Job name, model, rows, errors by code, tokens, cost (with currency and source), retries, timing.

    ``log`` is the checkpoint's record log in write order; the last record of a row counts.
    """
    import polars as pl

    frame = (
        log.select(SUMMARY_COLUMNS)
        .filter(pl.col("index") < plan.rows)
        # The last record of each index, as a filter: unique(keep="last") took 460 MB on a
        # million-row log where this takes 180 MB.
        .filter(pl.col("index").is_last_distinct())
        .collect()
    )
    ok = frame.filter(pl.col("status") == "ok")
    errors = frame.filter(pl.col("status") == "error")
    cached = ok.filter(pl.col("cached"))
    # Billed usage only, as in the output's columns: a cache hit's tokens were paid for before.
    paid = frame.filter(billed())
    input_tokens = int(paid["input_tokens"].fill_null(0).sum())
    output_tokens = int(paid["output_tokens"].fill_null(0).sum())
    price = plan.price
    cost = round(float(frame["cost"].fill_null(0.0).sum()), COST_DECIMALS) if price is not None else None
    saved = None
    if price is not None:
        saved = round(
            sum(
                pricing.cost(price, i or 0, o or 0) or 0.0
                for i, o in zip(cached["input_tokens"].to_list(), cached["output_tokens"].to_list())
            ),
            COST_DECIMALS,
        )
    by_code = errors.group_by("error_code").len().sort("error_code")
    model = plan.spec.model
    return {
        "job": plan.spec.name,
        "model": model,
        "output": str(plan.output_path),
        "stopped": stop_reason,
        "rows": {
            "total": plan.rows,
            "ok": ok.height,
            "error": errors.height,
            "not_done": plan.rows - frame.height,
        },
        "errors_by_code": {row[0] or "Unknown": int(row[1]) for row in by_code.iter_rows()},
        "tokens": {"input": input_tokens, "output": output_tokens, "total": input_tokens + output_tokens},
        "cost": {
            "currency": price.currency if price else CURRENCY,
            "total": cost,
            "by_model": {model: cost},
            "price_source": price.source if price else "unknown: no price for this model",
        },
        "cache": {"hits": cached.height, "saved_cost": saved},
        "retries": statistics.retries,
        "throttled": statistics.throttled,
        "this_run": {
            "rows": statistics.rows_done,
            "sent_ok": statistics.ok - statistics.cached,
            "cost": round(statistics.cost, COST_DECIMALS),
            "wall_time_s": round(statistics.elapsed_s, 3),
            "rows_per_second": round(statistics.rows_per_second, 2),
        },
        "wall_time_s": round(statistics.elapsed_s, 3),
        "rows_per_second": round(statistics.rows_per_second, 2),
    }
