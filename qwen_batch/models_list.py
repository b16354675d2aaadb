"""``qwen-batch models``: what the catalog knows of each model, with every figure's source.

``listing`` is the stable JSON shape (``--json``); ``render_listing`` draws it as a table,
then each model's sources. Figures no first-hand source confirms are marked ``*`` in the
table and named in ``unconfirmed``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .catalog import CATALOG_PATH, Catalog, ModelInfo, Price, RateLimits
from .errors import UsageError

LISTING_FORMAT = 1
UNCONFIRMED_MARK = "*"


def family(name: str) -> str:
    """The model's family as the docs group them: ``qwen3.5``, ``qwen3-2507``, ``qwq``, ``qwen``."""
    head = name.split("-", 1)[0]
    if re.search(r"-2507$", name):
        return f"{head}-2507"
    return head


def listing(catalog: Catalog, names: Sequence[str] = ()) -> dict[str, Any]:
    """The catalog as one JSON-ready dict: ``models`` in name order (only ``names`` when given).

    Raises UsageError for a name the catalog lacks.
    """
    for name in names:
        if catalog.get(name) is None:
            close = catalog.closest(name)
            hint = f"did you mean {close!r}?" if close else "`qwen-batch models` lists them all"
            raise UsageError(f"models: {name!r} is not in the catalog; {hint}")
    chosen = list(dict.fromkeys(names)) if names else catalog.names()
    user_files = sorted({str(path) for path in catalog.from_user.values()})
    return {
        "format": LISTING_FORMAT,
        "catalog": {"built_in": str(CATALOG_PATH), "user_files": user_files},
        "models": [_model(catalog, name) for name in chosen],
    }


def _model(catalog: Catalog, name: str) -> dict[str, Any]:
    info = catalog.models[name]
    origin = catalog.from_user.get(name)
    return {
        "name": name,
        "family": family(name),
        "origin": str(origin) if origin is not None else "built-in",
        "thinking": {
            "mode": info.thinking,
            "default": info.thinking_default,
            "needs_stream": info.thinking_needs_stream,
            "max_tokens": info.max_thinking_tokens,
            "source": info.thinking_source,
        },
        "stream_only": info.stream_only,
        "native_path": info.native_path,
        "limits": {
            "context_tokens": info.context_tokens,
            "max_input_tokens": info.max_input_tokens,
            "max_output_tokens": info.max_output_tokens,
            "default_max_tokens": info.default_max_tokens,
            "default_result_format": info.default_result_format,
            "source": info.limits_source,
        },
        "price": _price(info.price),
        "rate_limits": _rate_limits(info.rate_limits),
        "unconfirmed": list(info.unconfirmed),
        "notes": info.notes,
    }


def _price(price: Price | None) -> dict[str, Any] | None:
    if price is None:
        return None
    tiers = [
        {
            "up_to_input_tokens": tier.up_to_input_tokens,
            "input_per_million": tier.input_per_million,
            "output_per_million": tier.output_per_million,
            "thinking_output_per_million": tier.thinking_output_per_million,
        }
        for tier in price.tiers
    ]
    return {"currency": price.currency, "tiers": tiers, "source": price.source}


def _rate_limits(limits: RateLimits | None) -> dict[str, Any] | None:
    if limits is None:
        return None
    return {
        "requests_per_minute": limits.requests_per_minute,
        "tokens_per_minute": limits.tokens_per_minute,
        "source": limits.source,
    }


def catalog_for_listing(catalog_file: Path | None) -> Catalog:
    """The built-in catalog with ``QWEN_BATCH_CATALOG``'s file and then ``--catalog``'s laid over it."""
    from .user_catalog import user_files, with_user_files

    return with_user_files(user_files(catalog_file.absolute() if catalog_file is not None else None))


# --- the table ---------------------------------------------------------------------------------


def render_listing(data: dict[str, Any], out: TextIO) -> None:
    """The listing as a table, then every model's sources (the same figures as ``--json``)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="qwen-batch models", show_lines=False)
    for column in ("model", "family", "thinking", "path", "context / input / output / thinking", "price per M", "RPM / TPM"):
        table.add_column(column)
    for model in data["models"]:
        marks = set(model["unconfirmed"])
        table.add_row(
            model["name"] + ("" if model["origin"] == "built-in" else " (user)"),
            model["family"],
            _thinking_cell(model),
            model["native_path"],
            _limits_cell(model, marks),
            _price_cell(model["price"], marks),
            _rate_cell(model["rate_limits"], marks),
        )
    console = Console(file=out, width=None if out.isatty() else 160)
    console.print(table)
    print(f"{UNCONFIRMED_MARK} unconfirmed figure; sources and dates:", file=out)
    for model in data["models"]:
        print(f"  {model['name']}:", file=out)
        for what, text in _sources(model):
            if text:
                print(f"    {what}: {text}", file=out)
    if data["catalog"]["user_files"]:
        print(f"user catalog files: {', '.join(data['catalog']['user_files'])}", file=out)


def _mark(value: object, key: str, marks: set[str]) -> str:
    shown = "?" if value is None else f"{value:,}" if isinstance(value, int) else str(value)
    return shown + (UNCONFIRMED_MARK if key in marks else "")


def _thinking_cell(model: dict[str, Any]) -> str:
    thinking = model["thinking"]
    if thinking["mode"] == "none":
        return "none" + (", stream only" if model["stream_only"] else "")
    words = [thinking["mode"]]
    if thinking["mode"] == "hybrid":
        words.append("on by default" if thinking["default"] else "off by default")
    if model["stream_only"]:
        words.append("stream only")
    elif thinking["needs_stream"]:
        words.append("streamed when thinking")
    return ", ".join(words)


def _limits_cell(model: dict[str, Any], marks: set[str]) -> str:
    limits = model["limits"]
    parts = [_mark(limits[key], key, marks) for key in ("context_tokens", "max_input_tokens", "max_output_tokens")]
    parts.append(_mark(model["thinking"]["max_tokens"], "max_thinking_tokens", marks))
    return " / ".join(parts)


def _price_cell(price: dict[str, Any] | None, marks: set[str]) -> str:
    if price is None:
        return "unknown"
    lines = []
    for tier in price["tiers"]:
        bound = tier["up_to_input_tokens"]
        text = f"{tier['input_per_million']:g} in, {tier['output_per_million']:g} out"
        if tier["thinking_output_per_million"] is not None:
            text += f", {tier['thinking_output_per_million']:g} thinking"
        lines.append(text + (f" (<= {bound:,} in)" if bound is not None else ""))
    return "\n".join(lines) + f" {price['currency']}" + (UNCONFIRMED_MARK if "price" in marks else "")


def _rate_cell(limits: dict[str, Any] | None, marks: set[str]) -> str:
    if limits is None:
        return "unknown"
    rpm = _mark(limits["requests_per_minute"], "", set())
    tpm = _mark(limits["tokens_per_minute"], "", set())
    return f"{rpm} / {tpm}" + (UNCONFIRMED_MARK if "rate_limits" in marks else "")


def _sources(model: dict[str, Any]) -> list[tuple[str, str]]:
    price, rate = model["price"], model["rate_limits"]
    return [
        ("limits", model["limits"]["source"]),
        ("thinking and path", model["thinking"]["source"]),
        ("price", price["source"] if price else ""),
        ("rate limits", rate["source"] if rate else ""),
        ("notes", model["notes"]),
    ]
