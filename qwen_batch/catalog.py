"""The built-in model catalog: limits, prices and default rate limits, each with its source.

The data lives in ``data/models.json`` and is read on first use. A job spec or the
emulator may add models or override figures (the service changes them); ``Catalog.with_models``
returns a new catalog with those entries merged in. A user catalog file of the same shape,
named by ``QWEN_BATCH_CATALOG`` and by the spec's ``catalog:`` key, adds models or overrides
the keys its entries give (``user_catalog.py``), since the service changes models monthly.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict


CATALOG_PATH = Path(__file__).with_name("data") / "models.json"
CURRENCY = "CNY"
BATCH_PRICE_FACTOR = 0.5
BATCH_PRICE_SOURCE = (
    "DashScope Batch API docs, help.aliyun.com/zh/model-studio/batch-interfaces-compatible-with-openai "
    "(dashscope-protocol.md section 7.7): successful requests at 50% of the real-time price"
)
ThinkingMode = Literal["none", "hybrid", "only"]
"""``none``: never thinks; ``hybrid``: ``enable_thinking`` turns it on or off; ``only``: always thinks."""
NativePath = Literal["text", "multimodal"]
"""Which native path a model answers on: text-generation or multimodal-generation."""

# Names longer than this get no did-you-mean hint (difflib's cost grows with the product of lengths).
MAX_SUGGESTED_NAME_CHARS = 100


@dataclass(frozen=True, slots=True)
class PriceTier:
    """Prices per million tokens for requests with at most ``up_to_input_tokens`` input tokens."""

    up_to_input_tokens: int | None
    input_per_million: float
    output_per_million: float
    thinking_output_per_million: float | None = None

    @property
    def reasoning_per_million(self) -> float:
        """What a reasoning token costs: the thinking price, else the output price."""
        if self.thinking_output_per_million is not None:
            return self.thinking_output_per_million
        return self.output_per_million


@dataclass(frozen=True, slots=True)
class Price:
    """A model's price table; the request's input size picks one tier for all its tokens."""

    tiers: tuple[PriceTier, ...]
    currency: str = CURRENCY
    source: str = ""

    def tier_for(self, input_tokens: int) -> PriceTier:
        for tier in self.tiers:
            if tier.up_to_input_tokens is None or input_tokens <= tier.up_to_input_tokens:
                return tier
        return self.tiers[-1]

    @classmethod
    def flat(
        cls,
        input_per_1k: float,
        output_per_1k: float,
        currency: str,
        source: str,
        thinking_output_per_1k: float | None = None,
    ) -> Price:
        thinking = None if thinking_output_per_1k is None else thinking_output_per_1k * 1000
        return cls((PriceTier(None, input_per_1k * 1000, output_per_1k * 1000, thinking),), currency, source)


# How a batch run's price source begins (the summary's ``cost.price_source``; the report reads it).
BILLED_AS_BATCH = "billed as batch"


def batch_price(price: Price) -> Price:
    """``price`` as the Batch API bills it: every tier at ``BATCH_PRICE_FACTOR``, the source saying so."""

    def half(value: float | None) -> float | None:
        return None if value is None else value * BATCH_PRICE_FACTOR

    tiers = tuple(
        PriceTier(t.up_to_input_tokens, t.input_per_million * BATCH_PRICE_FACTOR,
                  t.output_per_million * BATCH_PRICE_FACTOR, half(t.thinking_output_per_million))
        for t in price.tiers
    )
    source = f"{BILLED_AS_BATCH}: {BATCH_PRICE_FACTOR:.0%} of the real-time price ({price.source or 'no source'}); {BATCH_PRICE_SOURCE}"
    return Price(tiers, price.currency, source)


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The service's documented default limits for a model."""

    requests_per_minute: int | None
    tokens_per_minute: int | None
    source: str = ""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the catalog knows of one model."""

    name: str
    context_tokens: int | None
    max_input_tokens: int | None
    max_output_tokens: int | None
    default_max_tokens: int | None
    default_result_format: str = "text"
    limits_source: str = ""
    price: Price | None = None
    rate_limits: RateLimits | None = None
    thinking: ThinkingMode = "none"
    thinking_default: bool = False
    thinking_needs_stream: bool = False
    stream_only: bool = False
    native_path: NativePath = "text"
    max_thinking_tokens: int | None = None
    # The keys of this entry whose figures no first-hand source confirms (``qwen-batch models`` shows them).
    unconfirmed: tuple[str, ...] = ()
    thinking_source: str = ""  # where the thinking and path figures come from
    notes: str = ""  # what a figure left null would be, and where a user finds it

    def with_overrides(self, **changes: Any) -> ModelInfo:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


# The JSON shape of one model in ``data/models.json``; a key left out is unknown.
class _TierJson(TypedDict):
    up_to_input_tokens: NotRequired[int | None]
    input: float
    output: float
    thinking_output: NotRequired[float | None]


class _PriceJson(TypedDict):
    tiers: list[_TierJson]
    currency: NotRequired[str]
    source: NotRequired[str]


class _RateLimitsJson(TypedDict, total=False):
    requests_per_minute: int | None
    tokens_per_minute: int | None
    source: str


class ModelJson(TypedDict, total=False):
    context_tokens: int | None
    max_input_tokens: int | None
    max_output_tokens: int | None
    default_max_tokens: int | None
    default_result_format: str
    limits_source: str
    price: _PriceJson | None
    rate_limits: _RateLimitsJson | None
    thinking: ThinkingMode
    thinking_default: bool
    thinking_needs_stream: bool
    stream_only: bool
    native_path: NativePath
    max_thinking_tokens: int | None
    unconfirmed: list[str]
    thinking_source: str
    notes: str


def model_from_dict(name: str, data: ModelJson) -> ModelInfo:
    """Build a ModelInfo from the JSON shape of ``data/models.json`` (missing keys are unknown)."""
    price = None
    price_data = data.get("price")
    if price_data:
        price = Price(
            tiers=tuple(
                PriceTier(
                    t.get("up_to_input_tokens"),
                    float(t["input"]),
                    float(t["output"]),
                    _optional_float(t.get("thinking_output")),
                )
                for t in price_data["tiers"]
            ),
            currency=price_data.get("currency", CURRENCY),
            source=price_data.get("source", ""),
        )
    limits = None
    raw = data.get("rate_limits")
    if raw:
        limits = RateLimits(raw.get("requests_per_minute"), raw.get("tokens_per_minute"), raw.get("source", ""))
    return ModelInfo(
        name=name,
        context_tokens=data.get("context_tokens"),
        max_input_tokens=data.get("max_input_tokens"),
        max_output_tokens=data.get("max_output_tokens"),
        default_max_tokens=data.get("default_max_tokens", data.get("max_output_tokens")),
        default_result_format=data.get("default_result_format", "text"),
        limits_source=data.get("limits_source", ""),
        price=price,
        rate_limits=limits,
        thinking=data.get("thinking", "none"),
        thinking_default=data.get("thinking_default", False),
        thinking_needs_stream=data.get("thinking_needs_stream", False),
        stream_only=data.get("stream_only", False),
        native_path=data.get("native_path", "text"),
        max_thinking_tokens=data.get("max_thinking_tokens"),
        unconfirmed=tuple(data.get("unconfirmed", ())),
        thinking_source=data.get("thinking_source", ""),
        notes=data.get("notes", ""),
    )


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class Catalog:
    """Models by name; ``from_user`` names the user catalog file each added or changed model came from."""

    models: Mapping[str, ModelInfo]
    from_user: Mapping[str, Path] = field(default_factory=dict)

    def get(self, name: str) -> ModelInfo | None:
        return self.models.get(name)

    def names(self) -> list[str]:
        return sorted(self.models)

    def closest(self, name: str) -> str | None:
        """The model name nearest to ``name``, for a did-you-mean hint; None when none is close.

        Case, spaces and underscores are not told apart (``Qwen Turbo`` is ``qwen-turbo``).
        """
        if len(name) > MAX_SUGGESTED_NAME_CHARS:
            return None
        by_key = {_name_key(known): known for known in self.models}
        key = _name_key(name)
        if key in by_key:
            return by_key[key]
        matches = difflib.get_close_matches(key, list(by_key), n=1)
        return by_key[matches[0]] if matches else None

    def with_models(self, extra: Mapping[str, ModelInfo]) -> Catalog:
        return Catalog({**self.models, **extra}, self.from_user)

    @classmethod
    def from_json(cls, text: str) -> Catalog:
        return cls({name: model_from_dict(name, entry) for name, entry in _builtin_entries(text).items()})


def _name_key(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def _builtin_entries(text: str) -> dict[str, ModelJson]:
    entries: dict[str, ModelJson] = json.loads(text)["models"]
    return entries


@functools.cache
def builtin_json() -> dict[str, ModelJson]:
    """The built-in entries as ``data/models.json`` has them (a user catalog is laid over these)."""
    return _builtin_entries(CATALOG_PATH.read_text(encoding="utf-8"))


@functools.cache
def builtin() -> Catalog:
    """The catalog shipped with qwen-batch, read once."""
    return Catalog({name: model_from_dict(name, entry) for name, entry in builtin_json().items()})
