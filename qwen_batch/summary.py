"""The run summary: the whole job's figures from its durable records, plus this run's timing.

A thinking job's reasoning tokens and what they cost are shown apart, and rows that ran out
of tokens inside their thinking (``finish_reason`` ``length``, an empty answer, reasoning
billed) are counted as ``rows.truncated_in_thinking``: ok to the service, no answer to the user.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import pricing
from .catalog import CURRENCY
from .checkpoint import billed
from .jsonmode import asks_json

if TYPE_CHECKING:
    import polars as pl

    from .catalog import Price
    from .plan import JobPlan
    from .runner import RunStatistics


COST_DECIMALS = 10  # sums of float costs, without binary noise like 0.03820000000000001
SUMMARY_COLUMNS = ["index", "status", "error_code", "input_tokens", "output_tokens", "cost", "cached", "parse_status", "model"]
TRUNCATED_IN_THINKING = "truncated_in_thinking"
ESTIMATED = "usage_estimated"
PARSE_STATUSES = ("ok", "invalid_json", "schema_mismatch")


def _estimate_note(estimated_rows: int, model: str) -> str | None:
    """How far to trust the counts of rows whose server sent no usage (None when there are none):
    the Qwen tokenizer is exact for a Qwen model, an approximation for any other."""
    if not estimated_rows:
        return None
    if "qwen" in model.lower():
        return "counted with the Qwen tokenizer (exact for a Qwen model)"
    return f"an estimate: {model!r} is not a Qwen model, and the Qwen tokenizer counted its tokens"


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
        log.select(
            *SUMMARY_COLUMNS,
            pl.col("reasoning_tokens").fill_null(0),
            truncated_in_thinking(),
            (pl.col("usage_source") == "estimated").fill_null(False).alias(ESTIMATED),
            pl.col("reasks").fill_null(0),
        )
        .filter(pl.col("index") < plan.units)
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
    reasoning_tokens = int(paid["reasoning_tokens"].sum())
    price = plan.price
    cost = round(float(frame["cost"].fill_null(0.0).sum()), COST_DECIMALS) if price is not None else None
    prices = _billed_prices(plan)
    saved = None
    if price is not None:
        saved = round(
            sum(
                pricing.cost(prices.get(m, price), i or 0, o or 0, r) or 0.0
                for i, o, r, m in zip(
                    cached["input_tokens"].to_list(),
                    cached["output_tokens"].to_list(),
                    cached["reasoning_tokens"].to_list(),
                    cached["model"].to_list(),
                )
            ),
            COST_DECIMALS,
        )
    by_code = errors.group_by("error_code").len().sort("error_code")
    model = plan.spec.model
    rows = {
        "total": plan.own_units,
        "ok": ok.height,
        "error": errors.height,
        "not_done": plan.own_units - frame.height,
        TRUNCATED_IN_THINKING: int(ok[TRUNCATED_IN_THINKING].sum()),
    }
    if asks_json(plan.spec):
        rows.update(_parse_counts(frame))
    return {
        "job": plan.spec.name,
        "model": model,
        "output": str(plan.output_path),
        "stopped": stop_reason,
        "rows": rows,
        "errors_by_code": {row[0] or "Unknown": int(row[1]) for row in by_code.iter_rows()},
        "tokens": {
            "input": input_tokens,
            "output": output_tokens,
            "reasoning": reasoning_tokens,
            "total": input_tokens + output_tokens,
            "estimated_rows": int(paid[ESTIMATED].sum()),
            "estimate": _estimate_note(int(paid[ESTIMATED].sum()), model),
        },
        "cost": {
            "currency": price.currency if price else CURRENCY,
            "total": cost,
            "by_model": _cost_by_model(frame, plan) if len(plan.variants) > 1 else {model: cost},
            "reasoning": _reasoning_cost_by_model(paid, prices, price),
            "price_source": price.source if price else "unknown: no price for this model",
        },
        "cache": {"hits": cached.height, "saved_cost": saved},
        "by_variant": _by_variant(frame, plan),
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


def _variant_frame(frame: pl.DataFrame, plan: JobPlan) -> pl.DataFrame:
    """Units, rows, tokens and cost per variant (the unit index names its variant: types.UnitKey)."""
    import polars as pl

    variants = plan.variants
    if not variants:
        return pl.DataFrame()
    number = (pl.col("index") % plan.units_per_row) // plan.samples
    paid = billed()
    return (
        frame.group_by(number.alias("variant_number"))
        .agg(
            (pl.col("status") == "ok").sum().alias("ok"),
            (pl.col("status") == "error").sum().alias("error"),
            pl.when(paid).then(pl.col("input_tokens")).fill_null(0).sum().alias("input"),
            pl.when(paid).then(pl.col("output_tokens")).fill_null(0).sum().alias("output"),
            pl.col("cost").fill_null(0.0).sum().alias("cost"),
        )
        .sort("variant_number")
    )


def _by_variant(frame: pl.DataFrame, plan: JobPlan) -> dict[str, dict[str, Any]]:
    """The summary's rows, tokens and cost per variant id, in sweep order."""
    totals = {row["variant_number"]: row for row in _variant_frame(frame, plan).iter_rows(named=True)}
    out: dict[str, dict[str, Any]] = {}
    for variant in plan.variants:
        row = totals.get(variant.index, {})
        priced = variant.price is not None
        out[variant.id] = (
            {
                "model": variant.model,
                "rows": {"total": _variant_units(plan, variant.index), "ok": int(row.get("ok", 0)), "error": int(row.get("error", 0))},
                "tokens": {"input": int(row.get("input", 0)), "output": int(row.get("output", 0))},
                "cost": round(float(row.get("cost", 0.0)), COST_DECIMALS) if priced else None,
            }
        )
    return out


def _variant_units(plan: JobPlan, number: int) -> int:
    """The units of variant ``number`` this run is for (a shard holds some of each)."""
    if plan.held is None:
        return plan.rows * plan.samples
    per_row, first = plan.units_per_row, number * plan.samples
    return sum(plan.held[first + sample :: per_row].count(1) for sample in range(plan.samples))


def _cost_by_model(frame: pl.DataFrame, plan: JobPlan) -> dict[str, float | None]:
    """Each model's cost (None where it has no price), summed over its variants."""
    costs: dict[str, float | None] = {}
    for entry in _by_variant(frame, plan).values():
        model, cost = entry["model"], entry["cost"]
        known = costs.get(model, 0.0)
        costs[model] = None if cost is None or known is None else round(known + cost, COST_DECIMALS)
    return costs


def _parse_counts(frame: pl.DataFrame) -> dict[str, Any]:
    """JSON mode: rows by the parse status of their last answer, and the re-asks sent for them."""
    statuses = frame["parse_status"].value_counts()
    counts = dict.fromkeys(PARSE_STATUSES, 0)
    counts.update({status: int(n) for status, n in statuses.iter_rows() if status is not None})
    return {"parse_status": counts, "reasks": int(frame["reasks"].sum())}


def truncated_in_thinking() -> pl.Expr:
    """True for a row that thought until it ran out of tokens and never answered (null in older logs: False)."""
    import polars as pl

    return (
        (pl.col("finish_reason") == "length")
        & (pl.col("output_text").fill_null("") == "")
        & (pl.col("reasoning_tokens").fill_null(0) > 0)
    ).fill_null(False).alias(TRUNCATED_IN_THINKING)


def _billed_prices(plan: JobPlan) -> dict[str, Price | None]:
    """Each model's price as billed (job.py prices the plan as its execution billed it)."""
    return {variant.model: variant.price for variant in plan.variants} or {plan.spec.model: plan.price}


def _reasoning_cost_by_model(paid: pl.DataFrame, prices: dict[str, Price | None], price: Price | None) -> float | None:
    """The reasoning cost of each model's rows at its own price, summed; None when unknown."""
    import polars as pl

    if price is None:
        return None
    if len(prices) < 2:
        return _reasoning_cost(paid, price)
    costs = [_reasoning_cost(paid.filter(pl.col("model") == model), each) for model, each in prices.items()]
    return round(sum(cost or 0.0 for cost in costs), COST_DECIMALS)


def _reasoning_cost(paid: pl.DataFrame, price: Price | None) -> float | None:
    """What the billed reasoning tokens cost at the thinking price of each row's tier; None when unknown."""
    import polars as pl

    if price is None:
        return None
    # Each row's tier by its input size, as Price.tier_for picks it, in one vectorised pass.
    per_million: pl.Expr = pl.lit(price.tiers[-1].reasoning_per_million)
    for tier in reversed(price.tiers):
        if tier.up_to_input_tokens is None:
            per_million = pl.lit(tier.reasoning_per_million)
        else:
            per_million = (
                pl.when(pl.col("input_tokens").fill_null(0) <= tier.up_to_input_tokens)
                .then(pl.lit(tier.reasoning_per_million))
                .otherwise(per_million)
            )
    total = paid.select((pl.col("reasoning_tokens") * per_million).sum()).item()
    return round(float(total or 0.0) / 1_000_000, COST_DECIMALS)
