"""What a job will cost and how long it will take, before sending anything.

Input tokens are exact (the preflight counts them with the Qwen tokenizer). Output tokens
are a range, 0 to ``max_tokens`` per row, plus an expected figure: the mean reply length of
the rows this job already finished when there are at least ``MIN_DONE_FOR_MEAN`` of them,
otherwise the documented assumption that a reply is as long as its prompt, capped at
``max_tokens`` (right for translation, generous for summaries).

A thinking job's rows also bill reasoning tokens, shown apart: 0 to the job's reasoning cap
(``thinking_budget``, else the model's longest thought) per row, and expected at the cap,
since how long a model thinks cannot be told from the prompt; the expected cost is then an
upper estimate, never one a thinking job overspends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .structured import REASK_ERROR_MAX_BYTES

if TYPE_CHECKING:
    from .plan import JobPlan
    from .preflight import PreflightReport

MIN_DONE_FOR_MEAN = 20
REASONING_BASIS = "assumption: every row thinks up to its cap (thinking length cannot be told from the prompt)"
REASK_BASIS = (
    "worst case: every row's answer fails to parse {n} time(s) (output.json_retries); each re-ask resends "
    "the conversation with the answer (at most max_tokens) and the parse error (at most "
    f"{REASK_ERROR_MAX_BYTES} bytes); the expected cost assumes none"
)


def expected_output_per_row(plan: JobPlan, done_mean: float | None, done_rows: int) -> tuple[float, str]:
    """Expected reply tokens per row and where the figure comes from."""
    report = plan.preflight
    if done_mean is not None and done_rows >= MIN_DONE_FOR_MEAN:
        return done_mean, f"mean reply length of the {done_rows} rows already done"
    if report.to_send == 0:
        return 0.0, "nothing left to send"
    mean_input = report.to_send_input_tokens / report.to_send
    mean_max = report.to_send_max_output_tokens / report.to_send
    return min(mean_input, mean_max), "assumption: a reply as long as its prompt, capped at max_tokens"


def _batch_cost(online: dict[str, Any]) -> dict[str, Any]:
    """The same rows through the Batch API: every figure at ``BATCH_PRICE_FACTOR`` (one factor
    on every tier and token kind, so the online range scales exactly)."""
    from .catalog import BATCH_PRICE_FACTOR, BATCH_PRICE_SOURCE

    figures = {
        key: None if online[key] is None else round(online[key] * BATCH_PRICE_FACTOR, 6) for key in ("min", "expected", "max")
    }
    return {**figures, "source": BATCH_PRICE_SOURCE if online["min"] is not None else online["source"]}


def _reasks(report: PreflightReport) -> dict[str, Any] | None:
    """A JSON-mode job's re-asks at most (None when it makes none): the cost maximum includes them."""
    per_row = report.reasks_per_row
    if not per_row:
        return None
    return {
        "per_row_max": per_row,
        "requests_max": per_row * report.to_send,
        "input_tokens_max": report.to_send_reask_input_tokens_max,
        "output_tokens_max": per_row * report.to_send_max_output_tokens,
        "basis": REASK_BASIS.format(n=per_row),
    }


def build_estimate(
    plan: JobPlan,
    *,
    done_mean_output: float | None,
    done_rows: int,
    requests_per_minute: float | None,
    tokens_per_minute: float | None,
) -> dict[str, Any]:
    """The ``qwen-batch estimate`` figures as one JSON-ready dict."""
    report = plan.preflight
    to_send = report.to_send
    expected_per_row, basis = expected_output_per_row(plan, done_mean_output, done_rows)
    expected_output = expected_per_row * to_send
    expected_reasoning = report.to_send_max_reasoning_tokens
    cost: dict[str, Any] = {"currency": plan.price.currency if plan.price else None}
    if report.to_send_cost_min is not None and report.to_send_output_price is not None:
        mean_output_price = report.to_send_output_price / to_send if to_send else 0.0
        reasoning_cost = report.reasoning_cap * (report.to_send_reasoning_price or 0.0)
        cost.update(
            min=round(report.to_send_cost_min, 6),
            expected=round(report.to_send_cost_min + expected_output * mean_output_price + reasoning_cost, 6),
            max=round(report.to_send_cost_max or 0.0, 6),
            source=plan.price.source if plan.price else None,
        )
    else:
        cost.update(min=None, expected=None, max=None, source="unknown: no price for this model")
    cost["batch"] = _batch_cost(cost)
    minutes = []
    if requests_per_minute:
        minutes.append(to_send / requests_per_minute)
    if tokens_per_minute:
        minutes.append((report.to_send_input_tokens + expected_output + expected_reasoning) / tokens_per_minute)
    estimate = {
        "job": plan.spec.name,
        "model": plan.spec.model,
        "rows": plan.rows,
        "rows_done": plan.resume.count(),
        "rows_cached": report.cached,
        "rows_with_problems": report.row_problems,
        "rows_over_long": len(report.over_long),
        "requests_to_send": to_send,
        "input_tokens": {"all_rows": report.input_tokens, "to_send": report.to_send_input_tokens},
        "output_tokens": {
            "min": 0,
            "expected": round(expected_output),
            "max": report.to_send_max_output_tokens,
            "expected_basis": basis,
        },
        "reasoning_tokens": {
            "min": 0,
            "expected": expected_reasoning,
            "max": report.to_send_max_reasoning_tokens,
            "per_row_cap": report.reasoning_cap,
            "expected_basis": REASONING_BASIS if report.reasoning_cap else "the job does not think",
        },
        "json_reasks": _reasks(report),
        "cost": cost,
        "time": {
            "requests_per_minute": requests_per_minute,
            "tokens_per_minute": tokens_per_minute,
            "minutes_at_limits": round(max(minutes), 2) if minutes else None,
            "note": None if minutes else "no rate limits: bound by concurrency and the service's latency",
        },
    }
    if len(plan.variants) > 1:
        estimate["by_variant"] = _by_variant(plan, expected_per_row)
    return estimate


def _by_variant(plan: JobPlan, expected_per_row: float) -> dict[str, dict[str, Any]]:
    """A sweep's requests, input tokens and cost bounds per variant, in sweep order (each at its
    model's price; the expected output per unit is the job's)."""
    shares = plan.preflight.to_send_by_variant
    cap = plan.preflight.reasoning_cap
    out: dict[str, dict[str, Any]] = {}
    for variant in plan.variants:
        share = shares[variant.index] if variant.index < len(shares) else None
        to_send = share.to_send if share is not None else 0
        entry: dict[str, Any] = {
            "model": variant.model,
            "requests_to_send": to_send,
            "input_tokens": share.input_tokens if share is not None else 0,
            "cost": {"min": None, "expected": None, "max": None},
        }
        if share is not None and variant.price is not None:
            reasoning = cap * share.reasoning_price
            entry["cost"] = {
                "min": round(share.cost_min, 6),
                "expected": round(share.cost_min + expected_per_row * share.output_price + reasoning, 6),
                "max": round(share.cost_max, 6),
            }
        out[variant.id] = entry
    return out

