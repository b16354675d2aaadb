"""What a request costs, from its token usage and a price table. Pure."""

from __future__ import annotations

from .catalog import Price


def cost(price: Price | None, input_tokens: int, output_tokens: int) -> float | None:
    """Cost of one request in the price's currency; None when the price is unknown."""
    if price is None:
        return None
    tier = price.tier_for(input_tokens)
    return (input_tokens * tier.input_per_million + output_tokens * tier.output_per_million) / 1_000_000


def worst_case_cost(price: Price | None, input_tokens: int, max_tokens: int) -> float | None:
    """The most one request can cost: its exact input plus a reply of ``max_tokens`` tokens."""
    return cost(price, input_tokens, max_tokens)
