"""What a request costs, from its token usage and a price table. Pure."""

from __future__ import annotations

from .catalog import Price


def cost(price: Price | None, input_tokens: int, output_tokens: int, reasoning_tokens: int = 0) -> float | None:
    """Cost of one request in the price's currency; None when the price is unknown.

    ``output_tokens`` includes the ``reasoning_tokens`` (as the service bills them); those
    are charged at the tier's thinking price, the rest at its output price.
    """
    if price is None:
        return None
    tier = price.tier_for(input_tokens)
    answer_tokens = output_tokens - reasoning_tokens
    return (
        input_tokens * tier.input_per_million
        + answer_tokens * tier.output_per_million
        + reasoning_tokens * tier.reasoning_per_million
    ) / 1_000_000


def worst_case_cost(price: Price | None, input_tokens: int, max_tokens: int, reasoning_cap: int = 0) -> float | None:
    """The most one request can cost: its exact input, an answer of ``max_tokens`` tokens and
    ``reasoning_cap`` reasoning tokens."""
    return cost(price, input_tokens, max_tokens + reasoning_cap, reasoning_cap)
