"""Every figure of the run report, from the output Parquet, its summary and its event log.

The output is scanned lazily and only the columns a figure needs are read; each chart gets
bins (counts per bucket), never rows, so a million-row run makes a small report. Columns
that only some outputs hold (``variant``, ``reasoning_tokens``, ``first_token_s``, ...) are
looked up by name and skipped when absent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import polars as pl

from ..errors import InputError
from ..resume import checkpoint_dir_for
from ..run_events import events_path, read_events

REPORT_FORMAT = 1
HISTOGRAM_BINS = 40
TOP_ROWS = 10
# Points on the time charts at most (about): a day-long run's event log is merged down to this.
TIMELINE_POINTS = 720
# Rows a run stopped before sending are written as errors with this code and no attempt.
NOT_DONE_CODE = "BudgetExceeded"
# The columns every output of qwen-batch has held since its first release.
REQUIRED_COLUMNS = ("status", "error_code", "attempts", "latency_s", "input_tokens", "output_tokens", "cost")
COST_DECIMALS = 10


def report_json_path(output: Path) -> Path:
    """Where ``report.json`` goes by default: next to the output, ``<output>.report.json``."""
    return output.with_name(output.name + ".report.json")


def default_html_path(output: Path) -> Path:
    return output.with_name(output.name + ".report.html")


def _scan_output(path: Path) -> tuple[pl.LazyFrame, list[str]]:
    """The output as a lazy frame and its column names; InputError if it is not an output."""
    if not path.is_file():
        raise InputError(f"{path}: no such file; give the output Parquet of a run (output.path of its job)")
    try:
        frame = pl.scan_parquet(path)
        names = frame.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a Parquet file ({first[:120]}); give the output Parquet of a run") from None
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise InputError(
            f"{path}: not a qwen-batch output (no column {', '.join(repr(m) for m in missing)}); "
            "give the output Parquet of a run"
        )
    return frame, names


def build_report(output: Path) -> dict[str, Any]:
    """Every aggregate of the run that wrote ``output`` (raises InputError on a bad file)."""
    output = Path(output)
    frame, names = _scan_output(output)
    summary = _read_summary(output)
    segments, buckets = read_events(events_path(checkpoint_dir_for(output)))
    groups: list[str] = [name for name in ("model", "variant") if name in names]
    max_tokens = next((s.get("max_tokens") for s in reversed(segments) if s.get("max_tokens")), None)
    id_column = next((s.get("id_column") for s in reversed(segments) if s.get("id_column")), None)
    if id_column not in names:
        id_column = None
    header = _header(frame, names, summary, segments)
    timeline = _timeline(segments, buckets)
    # The segments' running time (event log); without one, the summary's.
    header["wall_time_s"] = timeline["span_s"] if timeline["available"] else _summary_wall_time(summary)
    return {
        "format": REPORT_FORMAT,
        "output": str(output),
        "header": header,
        "latency": _latency(frame, names),
        "timeline": timeline,
        "finish_reason": _finish_reasons(frame, names, groups),
        "tokens": _token_histograms(frame, names, max_tokens),
        "cost": _cost(frame, names, groups),
        "retries": _retries(frame),
        "errors_by_code": _errors_by_code(frame),
        "slowest": _top(frame, names, id_column, "latency_s"),
        "most_expensive": _top(frame, names, id_column, "cost"),
    }


def _read_summary(output: Path) -> dict[str, Any] | None:
    path = output.with_name(output.name + ".summary.json")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _not_done() -> pl.Expr:
    return (pl.col("status") == "error") & (pl.col("error_code") == NOT_DONE_CODE) & (pl.col("attempts") == 0)


def _header(frame: pl.LazyFrame, names: list[str], summary: dict[str, Any] | None, segments: list[dict[str, Any]]) -> dict[str, Any]:
    counts = frame.select(
        pl.len().alias("total"),
        (pl.col("status") == "ok").sum().alias("ok"),
        _not_done().sum().alias("not_done"),
        pl.col("cost").sum().alias("cost"),
        *([pl.col("model").unique().sort().implode().alias("models")] if "model" in names else []),
        *([pl.col("variant").drop_nulls().unique().sort().implode().alias("variants")] if "variant" in names else []),
    ).collect().row(0, named=True)
    total, ok, not_done = int(counts["total"]), int(counts["ok"]), int(counts["not_done"])
    last = segments[-1] if segments else {}
    summary = summary or {}
    cost = summary.get("cost", {}) if isinstance(summary.get("cost"), dict) else {}
    estimate = [s.get("estimated_cost_max") for s in segments if s.get("estimated_cost_max") is not None]
    return {
        "job": summary.get("job") or last.get("job"),
        "models": [m for m in counts.get("models") or [] if m is not None],
        "variants": list(counts.get("variants") or []),
        "rows": {"total": total, "ok": ok, "error": total - ok - not_done, "not_done": not_done},
        "cost": {
            "total": round(float(counts["cost"] or 0.0), COST_DECIMALS),
            "currency": cost.get("currency"),
            # The first run's preflight worst case for what it was to send (the whole job unless
            # it ran with --limit); a resume's covers only what was left, so it is not added.
            "estimate_max": estimate[0] if estimate else None,
            "budget": last.get("max_cost"),
        },
        "mode": last.get("mode") or _mode_from_summary(cost),
        "segments": len(segments),
        "has_event_log": bool(segments),
    }


def _mode_from_summary(cost: dict[str, Any]) -> str:
    """A run without an event-log segment (batch mode writes none): its summary's price source says."""
    from ..catalog import BILLED_AS_BATCH

    source = cost.get("price_source")
    if not isinstance(source, str):
        return "unknown"
    return "batch" if source.startswith(BILLED_AS_BATCH) else "online"


def _summary_wall_time(summary: dict[str, Any] | None) -> float | None:
    value = (summary or {}).get("wall_time_s")
    return float(value) if isinstance(value, (int, float)) else None


def _quantiles(column: pl.Expr) -> list[pl.Expr]:
    return [column.quantile(q, interpolation="linear").alias(f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)]


def _log_histogram(frame: pl.LazyFrame, column: str) -> dict[str, Any] | None:
    """Counts of the positive values of ``column`` in log-spaced bins, with p50/p95/p99."""
    values = frame.select(pl.col(column)).filter(pl.col(column) > 0)
    stats = values.select(
        pl.len().alias("count"), pl.col(column).min().alias("min"), pl.col(column).max().alias("max"),
        *_quantiles(pl.col(column)),
    ).collect().row(0, named=True)
    if not stats["count"]:
        return None
    low, high = math.log10(stats["min"]), math.log10(stats["max"])
    step = (high - low) / HISTOGRAM_BINS or 1.0
    bins = (
        values.select(((pl.col(column).log10() - low) / step).floor().clip(0, HISTOGRAM_BINS - 1).cast(pl.Int64).alias("bin"))
        .group_by("bin").len().collect()
    )
    counts = [0] * HISTOGRAM_BINS
    for index, n in bins.iter_rows():
        counts[index] = int(n)
    return {
        "count": int(stats["count"]),
        "p50": stats["p50"], "p95": stats["p95"], "p99": stats["p99"],
        "edges": [10 ** (low + step * i) for i in range(HISTOGRAM_BINS + 1)],
        "counts": counts,
    }


def _latency(frame: pl.LazyFrame, names: list[str]) -> dict[str, Any]:
    # Answered rows only: a cache hit took no time, an error's latency is its retries'.
    answered = frame.filter((pl.col("status") == "ok") & (pl.col("attempts") > 0))
    first = _log_histogram(answered, "first_token_s") if "first_token_s" in names else None
    return {"latency_s": _log_histogram(answered, "latency_s"), "first_token_s": first}


def _linear_histogram(frame: pl.LazyFrame, column: str, upper: int | None) -> dict[str, Any] | None:
    values = frame.select(pl.col(column)).filter(pl.col(column).is_not_null())
    stats = values.select(pl.len().alias("count"), pl.col(column).max().alias("max")).collect().row(0, named=True)
    if not stats["count"]:
        return None
    top = max(int(stats["max"] or 0), int(upper or 0), 1)
    width = max(1, math.ceil((top + 1) / HISTOGRAM_BINS))
    bins = values.select((pl.col(column) // width).clip(0, HISTOGRAM_BINS - 1).cast(pl.Int64).alias("bin")).group_by("bin").len().collect()
    counts = [0] * HISTOGRAM_BINS
    for index, n in bins.iter_rows():
        counts[index] = int(n)
    return {"count": int(stats["count"]), "max": int(stats["max"] or 0), "bin_width": width,
            "edges": [width * i for i in range(HISTOGRAM_BINS + 1)], "counts": counts}


def _token_histograms(frame: pl.LazyFrame, names: list[str], max_tokens: int | None) -> dict[str, Any]:
    answered = frame.filter(pl.col("status") == "ok")
    columns = {"input": "input_tokens", "output": "output_tokens", "reasoning": "reasoning_tokens"}
    result: dict[str, Any] = {"max_tokens": max_tokens}
    for label, column in columns.items():
        present = column in names
        result[label] = _linear_histogram(answered, column, max_tokens if label == "output" else None) if present else None
    return result


def _group_keys(groups: list[str]) -> list[pl.Expr]:
    return [pl.col(name).cast(pl.String).fill_null("") for name in groups]


def _finish_reasons(frame: pl.LazyFrame, names: list[str], groups: list[str]) -> list[dict[str, Any]]:
    if "finish_reason" not in names:
        return []
    table = (
        frame.filter(pl.col("status") == "ok")
        .group_by(*_group_keys(groups), pl.col("finish_reason").fill_null("(none)"))
        .len()
        .sort([*groups, "finish_reason"])
        .collect()
    )
    totals: dict[tuple[str, ...], int] = {}
    rows = table.to_dicts()
    for row in rows:
        key = tuple(row[g] for g in groups)
        totals[key] = totals.get(key, 0) + int(row["len"])
    return [
        {
            **{g: row[g] for g in groups},
            "finish_reason": row["finish_reason"],
            "count": int(row["len"]),
            "share": int(row["len"]) / totals[tuple(row[g] for g in groups)],
        }
        for row in rows
    ]


def _price_split(frame: pl.LazyFrame, names: list[str]) -> pl.LazyFrame:
    """Each billed row's cost split into input / output / thinking at its model's catalog shares.

    The output holds one cost per row; the split of that cost follows the catalog's price
    tier for the row's model and input size. Rows of a model without a catalog price keep
    their whole cost under ``unsplit``.
    """
    from ..catalog import builtin

    catalog = builtin()
    reasoning = pl.col("reasoning_tokens").fill_null(0) if "reasoning_tokens" in names else pl.lit(0)
    input_tokens = pl.col("input_tokens").fill_null(0)
    answer = pl.col("output_tokens").fill_null(0) - reasoning
    rates: dict[str, pl.Expr] = {"in": pl.lit(None, pl.Float64), "out": pl.lit(None, pl.Float64), "think": pl.lit(None, pl.Float64)}
    models = frame.select(pl.col("model").unique()).collect()["model"].to_list() if "model" in names else []
    for model in models:
        info = catalog.get(model) if model else None
        if info is None or info.price is None:
            continue
        for key, attr in (("in", "input_per_million"), ("out", "output_per_million"), ("think", "reasoning_per_million")):
            tiered: pl.Expr = pl.lit(getattr(info.price.tiers[-1], attr))
            for tier in reversed(info.price.tiers[:-1]):
                tiered = pl.when(input_tokens <= tier.up_to_input_tokens).then(pl.lit(getattr(tier, attr))).otherwise(tiered)
            rates[key] = pl.when(pl.col("model") == model).then(tiered).otherwise(rates[key])
    parts = {"input": input_tokens * rates["in"], "output": answer * rates["out"], "thinking": reasoning * rates["think"]}
    whole = parts["input"] + parts["output"] + parts["thinking"]
    cost = pl.col("cost").fill_null(0.0)
    split = {name: pl.when(whole > 0).then(cost * part / whole).otherwise(0.0) for name, part in parts.items()}
    return frame.with_columns(
        *(value.fill_null(0.0).alias(f"cost_{name}") for name, value in split.items()),
        pl.when(whole.is_null()).then(cost).otherwise(0.0).alias("cost_unsplit"),
    )


def _cost(frame: pl.LazyFrame, names: list[str], groups: list[str]) -> list[dict[str, Any]]:
    billed = frame.filter(pl.col("cost").is_not_null())
    table = (
        _price_split(billed, names)
        .group_by(_group_keys(groups) or [pl.lit("").alias("_all")])
        .agg(
            pl.len().alias("rows"),
            pl.col("cost").sum().alias("total"),
            *(pl.col(f"cost_{part}").sum().alias(part) for part in ("input", "output", "thinking", "unsplit")),
        )
        .sort(groups or ["_all"])
        .collect()
    )
    rounded = ("total", "input", "output", "thinking", "unsplit")
    return [
        {**{g: row[g] for g in groups}, "rows": int(row["rows"]), **{k: round(float(row[k]), COST_DECIMALS) for k in rounded}}
        for row in table.to_dicts()
    ]


def _retries(frame: pl.LazyFrame) -> dict[str, Any]:
    table = frame.filter(pl.col("attempts") > 0).group_by("attempts").len().sort("attempts").collect()
    attempts, rows = table["attempts"].to_list(), [int(n) for n in table["len"].to_list()]
    sent = sum(rows)
    retried = sum(n for a, n in zip(attempts, rows) if a >= 2)
    return {"attempts": attempts, "rows": rows, "share_retried": retried / sent if sent else 0.0}


def _errors_by_code(frame: pl.LazyFrame) -> dict[str, int]:
    table = (
        frame.filter(pl.col("status") != "ok")
        .group_by(pl.col("error_code").fill_null("Unknown"))
        .len()
        .sort(["len", "error_code"], descending=[True, False])
        .collect()
    )
    return {code: int(n) for code, n in table.iter_rows()}


def _top(frame: pl.LazyFrame, names: list[str], id_column: str | None, by: str) -> list[dict[str, Any]]:
    columns = [c for c in ("model", "variant", "input_tokens", "output_tokens", "reasoning_tokens", "latency_s", "cost") if c in names]
    table = (
        frame.with_row_index("row")
        .filter(pl.col(by).is_not_null() & (pl.col("status") == "ok"))
        .select("row", *([pl.col(id_column).cast(pl.String).alias("id")] if id_column else []), *columns)
        .top_k(TOP_ROWS, by=by)
        .sort([by, "row"], descending=[True, False])
        .collect()
    )
    return table.to_dicts()


_COUNTS = ("started", "answered", "failed", "input_tokens", "output_tokens")


def _on_one_axis(segments: list[dict[str, Any]], buckets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The buckets in time order, each with ``at``: its start in seconds since the first segment began."""
    starts = {s["segment"]: float(s["wall_start"]) for s in segments}
    origin = min(starts.values())
    placed = [{**b, "at": starts.get(b["segment"], origin) - origin + float(b["t"])} for b in buckets]
    return sorted(placed, key=lambda b: b["at"])


def _coarsened(points: list[dict[str, Any]], most: int) -> list[dict[str, Any]]:
    """At most about ``most`` points: buckets merged onto a grid whose width is a power of two
    no narrower than any bucket (counts summed, the in-flight peak kept, the last rates kept)."""
    if len(points) <= most:
        return points
    span = points[-1]["at"] + points[-1]["width_s"]
    width = max(int(b["width_s"]) for b in points)
    while span / width > most:
        width *= 2
    merged: dict[int, dict[str, Any]] = {}
    for point in points:
        cell = int(point["at"] // width)
        into = merged.get(cell)
        if into is None:
            merged[cell] = {**point, "at": float(cell * width), "width_s": width,
                            "errors": dict(point["errors"]), "throttled": dict(point["throttled"])}
            continue
        for name in _COUNTS:
            into[name] += point[name]
        into["in_flight_max"] = max(into["in_flight_max"], point["in_flight_max"])
        into["request_rate"], into["token_rate"], into["segment"] = point.get("request_rate"), point.get("token_rate"), point["segment"]
        for key in ("errors", "throttled"):
            for name, n in point[key].items():
                into[key][name] = into[key].get(name, 0) + n
    return [merged[cell] for cell in sorted(merged)]


def _timeline(segments: list[dict[str, Any]], buckets: list[dict[str, Any]]) -> dict[str, Any]:
    """The event log's buckets on one time axis (seconds since the first segment started),
    merged to at most ``TIMELINE_POINTS`` so that a day-long run's charts stay small."""
    if not segments:
        return {"available": False}
    limits = {s["segment"]: (s.get("requests_per_minute"), s.get("tokens_per_minute")) for s in segments}
    points = _coarsened(_on_one_axis(segments, buckets), TIMELINE_POINTS)
    series: dict[str, list[Any]] = {name: [] for name in (
        *_COUNTS, "in_flight_max", "rows_per_s", "tokens_per_s", "request_rate_per_min", "token_rate_per_min",
        "rpm_limit", "tpm_limit",
    )}
    throttled: dict[str, list[int]] = {}
    errors: dict[str, list[int]] = {}
    for i, point in enumerate(points):
        width = int(point["width_s"])
        for name in (*_COUNTS, "in_flight_max"):
            series[name].append(int(point[name]))
        series["rows_per_s"].append(round(point["answered"] / width, 4))
        series["tokens_per_s"].append(round((point["input_tokens"] + point["output_tokens"]) / width, 4))
        rpm, tpm = limits.get(point["segment"], (None, None))
        rate, token_rate = point.get("request_rate"), point.get("token_rate")
        # An unpaced throttle (null) sends at the configured limit.
        series["request_rate_per_min"].append(round(rate * 60, 4) if rate is not None else rpm)
        series["token_rate_per_min"].append(round(token_rate * 60, 4) if token_rate is not None else tpm)
        series["rpm_limit"].append(rpm)
        series["tpm_limit"].append(tpm)
        for kind, n in point["throttled"].items():
            throttled.setdefault(kind, [0] * len(points))[i] = int(n)
        for code, n in point["errors"].items():
            errors.setdefault(code, [0] * len(points))[i] = int(n)
    # Seconds the segments ran, summed: the time between a run and its resume is not counted.
    ends: dict[int, float] = {}
    for bucket in buckets:
        ends[bucket["segment"]] = max(ends.get(bucket["segment"], 0.0), float(bucket["t"] + bucket["width_s"]))
    origin = min(float(s["wall_start"]) for s in segments)
    return {
        "available": True,
        "t": [round(point["at"], 3) for point in points],
        "width_s": [int(point["width_s"]) for point in points],
        **series,
        "throttled_by_kind": dict(sorted(throttled.items())),
        "attempt_errors_by_code": dict(sorted(errors.items())),
        "span_s": sum(ends.values()),
        "segments": [{"segment": s["segment"], "start_s": float(s["wall_start"]) - origin, "mode": s.get("mode")} for s in segments],
    }
