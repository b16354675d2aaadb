"""Paired tests for ``diff --score``: McNemar's exact test for 0/1 scores, a paired bootstrap otherwise.

scipy is not a dependency: the exact binomial tail is summed in log space, and the bootstrap
resamples with polars (seeded, so the same pair of outputs gives the same interval).
"""

from __future__ import annotations

import math
from typing import Any

import polars as pl

CONFIDENCE = 0.95
Z_95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 20261201
SMALL_N = 30
SMALL_DISCORDANT = 10


def paired_test(a: pl.Series, b: pl.Series) -> dict[str, Any]:
    """McNemar when every score is 0 or 1, else a paired bootstrap of the mean difference (B - A)."""
    n = a.len()
    if n == 0:
        return {"test": None, "n": 0, "warning": "no row has a score in both outputs"}
    binary = bool(pl.concat([a, b]).is_in([0.0, 1.0]).all())
    result = mcnemar(a, b) if binary else paired_bootstrap(a, b)
    warning = _small_n_warning(n, result)
    if warning:
        result["warning"] = warning
    return result


def mcnemar(a: pl.Series, b: pl.Series) -> dict[str, Any]:
    """Exact McNemar on the discordant pairs, with a Wald interval for the difference in rates."""
    n = a.len()
    a_only = int(((a == 1) & (b == 0)).sum())  # right in A, wrong in B
    b_only = int(((a == 0) & (b == 1)).sum())
    difference = (b_only - a_only) / n
    spread = math.sqrt(max(a_only + b_only - (b_only - a_only) ** 2 / n, 0.0)) / n
    return {
        "test": "mcnemar-exact",
        "n": n,
        "mean_a": _number(a.mean()),
        "mean_b": _number(b.mean()),
        "a_only": a_only,
        "b_only": b_only,
        "difference": difference,
        "ci": [difference - Z_95 * spread, difference + Z_95 * spread],
        "confidence": CONFIDENCE,
        "p_value": exact_binomial_two_sided(min(a_only, b_only), a_only + b_only),
    }


def exact_binomial_two_sided(k: int, n: int) -> float:
    """P(X <= k or X >= n - k) for X ~ Binomial(n, 1/2), k <= n/2: McNemar's exact p-value."""
    if n == 0:
        return 1.0
    log_half = n * math.log(0.5)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half for i in range(k + 1)]
    peak = max(terms)
    tail = math.exp(peak) * math.fsum(math.exp(term - peak) for term in terms)
    return min(1.0, 2.0 * tail)


def paired_bootstrap(a: pl.Series, b: pl.Series) -> dict[str, Any]:
    """Percentile interval of the mean of B - A over resampled rows; p from the share across zero."""
    deltas = (b - a).alias("delta")
    frame = deltas.to_frame()
    means = pl.Series(
        [frame.sample(fraction=1.0, with_replacement=True, seed=BOOTSTRAP_SEED + i)["delta"].mean()
         for i in range(BOOTSTRAP_RESAMPLES)],
        dtype=pl.Float64,
    )
    low, high = (1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2
    below = _number((means <= 0).mean())
    above = _number((means >= 0).mean())
    return {
        "test": "paired-bootstrap",
        "n": a.len(),
        "mean_a": _number(a.mean()),
        "mean_b": _number(b.mean()),
        "difference": _number(deltas.mean()),
        "ci": [_number(means.quantile(low)), _number(means.quantile(high))],
        "confidence": CONFIDENCE,
        "p_value": min(1.0, 2.0 * min(below, above)),
        "resamples": BOOTSTRAP_RESAMPLES,
    }


def _number(value: object) -> float:
    """A polars aggregate as a float (0.0 for an empty one)."""
    return float(value) if isinstance(value, (int, float)) else 0.0


def _small_n_warning(n: int, result: dict[str, Any]) -> str | None:
    if n < SMALL_N:
        return f"small n ({n} paired rows, under {SMALL_N}): the interval is rough and the test has little power"
    discordant = result.get("a_only", SMALL_DISCORDANT) + result.get("b_only", 0)
    if result["test"] == "mcnemar-exact" and discordant < SMALL_DISCORDANT:
        return f"only {discordant} rows changed score: the Wald interval is rough (the exact p-value holds)"
    return None
