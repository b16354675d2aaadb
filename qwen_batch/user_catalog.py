"""A user's catalog file: checked key by key, so a typo is one line naming the file and the key.

The file has the shape of the built-in ``data/models.json``: ``{"models": {name: entry}}``
(an ``_about`` string may sit beside ``models``). An entry may be partial: it gives only the
keys it changes. Every key and type is checked as strictly as a job spec's, because a
misspelt ``max_thinking_tokens`` silently ignored would be a budget computed from the wrong
figure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .catalog import ModelJson
from .errors import ConfigError

_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)
_TOP_KEYS = ("models", "_about")
Count = Annotated[int, Field(ge=1)]
Amount = Annotated[float, Field(ge=0)]


class _Tier(BaseModel):
    model_config = _STRICT

    up_to_input_tokens: Count | None = None
    input: Amount
    output: Amount
    thinking_output: Amount | None = None


class _Price(BaseModel):
    model_config = _STRICT

    tiers: Annotated[list[_Tier], Field(min_length=1)]
    currency: Annotated[str, Field(min_length=1)] = "CNY"
    source: str = ""


class _RateLimits(BaseModel):
    model_config = _STRICT

    requests_per_minute: Count | None = None
    tokens_per_minute: Count | None = None
    source: str = ""


class UserModelEntry(BaseModel):
    """One model of a user catalog; every key optional, as in ``catalog.ModelJson``."""

    model_config = _STRICT

    context_tokens: Count | None = None
    max_input_tokens: Count | None = None
    max_output_tokens: Count | None = None
    default_max_tokens: Count | None = None
    default_result_format: Literal["text", "message"] = "text"
    limits_source: str = ""
    price: _Price | None = None
    rate_limits: _RateLimits | None = None
    thinking: Literal["none", "hybrid", "only"] = "none"
    thinking_default: bool = False
    thinking_needs_stream: bool = False
    stream_only: bool = False
    native_path: Literal["text", "multimodal"] = "text"
    max_thinking_tokens: Count | None = None
    unconfirmed: list[str] = Field(default_factory=list)
    thinking_source: str = ""
    notes: str = ""


def load_user_catalog(path: Path) -> dict[str, ModelJson]:
    """The entries of the user catalog at ``path``, each with only the keys it gives.

    Raises ConfigError (exit 2) naming the file and the key for anything wrong.
    """
    from .catalog import CATALOG_ENV, USER_CATALOG_MAX_BYTES
    from .paths import read_bounded
    from .spec import describe_validation_error

    data = read_bounded(path, "user catalog", f"the catalog: key or {CATALOG_ENV}", USER_CATALOG_MAX_BYTES)
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the user catalog is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: the user catalog is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            "fix the syntax"
        ) from None
    models = _models_of(path, document)
    entries: dict[str, ModelJson] = {}
    for name, entry in models.items():
        if not name.strip():
            raise ConfigError(f"{path}: models: a model name is empty; name each model as the service does")
        try:
            checked = UserModelEntry.model_validate(entry)
        except ValidationError as exc:
            line = describe_validation_error(exc, UserModelEntry)
            # "thinking: must be ..." reads as models.<name>.thinking; "unknown key ..." names its own key.
            joiner = ": " if line.startswith(("unknown key", "missing key")) else "."
            raise ConfigError(f"{path}: models.{name}{joiner}{line}") from None
        entries[name] = checked.model_dump(exclude_unset=True)  # type: ignore[assignment]
    return entries


def _models_of(path: Path, document: Any) -> dict[str, Any]:
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
        raise ConfigError(
            f'{path}: a user catalog is a JSON object {{"models": {{"<model name>": {{...}}}}}} '
            "like qwen-batch's data/models.json; wrap the entries in a models key"
        )
    unknown = [key for key in document if key not in _TOP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (valid keys: {', '.join(_TOP_KEYS)})")
    models: dict[str, Any] = document["models"]
    for name, entry in models.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: models.{name}: must be a mapping of keys, got {type(entry).__name__}")
    return models
