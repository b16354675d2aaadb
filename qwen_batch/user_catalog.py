"""User catalog files laid over the built-in catalog, each checked key by key.

The files apply in order: ``QWEN_BATCH_CATALOG``'s, then the spec's ``catalog:`` (so the
spec's wins where both give a key), then nothing else; ``for_job`` is the catalog a job sees.

The file has the shape of the built-in ``data/models.json``: ``{"models": {name: entry}}``
(an ``_about`` string may sit beside ``models``). An entry may be partial: it gives only the
keys it changes. Every key and type is checked as strictly as a job spec's, because a
misspelt ``max_thinking_tokens`` silently ignored would be a budget computed from the wrong
figure.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .catalog import Catalog, ModelJson, builtin, builtin_json, model_from_dict
from .errors import ConfigError

CATALOG_ENV = "QWEN_BATCH_CATALOG"  # a user catalog file, read when a command runs
USER_CATALOG_MAX_BYTES = 16 * 1024 * 1024

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
    from .paths import read_bounded

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
            raise ConfigError(f"{path}: {_described(exc, ('models', name))}") from None
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


def _described(exc: ValidationError, where: tuple[str, ...]) -> str:
    """The first error as ``models.<name>.<key>: what is wrong``, with a did-you-mean for a misspelt key."""
    # A misspelt key also makes the real one "missing": report the typo, it is the cause.
    error = min(exc.errors(include_url=False), key=lambda found: found["type"] != "extra_forbidden")
    loc = [str(part) for part in error["loc"]]
    if error["type"] == "extra_forbidden":
        parent, key = loc[:-1], loc[-1]
        valid = _keys_at(parent)
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
        return f"{'.'.join((*where, *parent))}: unknown key {key!r} ({hint})"
    message = error["msg"].replace("Input should be", "must be").replace("Field required", "missing; add it")
    if error["type"] == "literal_error":
        message = f"must be one of {error.get('ctx', {}).get('expected', '')}"
    got = "" if error["type"] == "missing" else f", got {json.dumps(error.get('input'), ensure_ascii=False)[:60]}"
    return f"{'.'.join((*where, *loc))}: {message}{got}"


def _keys_at(loc: Sequence[str]) -> list[str]:
    """The keys valid at ``loc`` inside an entry (list indexes skipped)."""
    models: dict[str, type[BaseModel]] = {"price": _Price, "tiers": _Tier, "rate_limits": _RateLimits}
    model: type[BaseModel] = UserModelEntry
    for part in loc:
        if not part.isdigit():
            model = models.get(part, model)
    return list(model.model_fields)


def with_user_files(paths: Sequence[Path]) -> Catalog:
    """The built-in catalog with each user catalog file laid over it in turn (later files win).

    A user entry for a built-in model replaces only the keys it gives (a ``price`` or
    ``rate_limits`` it gives replaces that whole object); a new name is a new model.
    Raises ConfigError naming the file and key for a bad file.
    """
    if not paths:
        return builtin()
    merged: dict[str, ModelJson] = dict(builtin_json())
    from_user: dict[str, Path] = {}
    for path in paths:
        for name, entry in load_user_catalog(path).items():
            merged[name] = {**merged.get(name, {}), **entry}
            from_user[name] = path
    models = dict(builtin().models)
    models.update({name: model_from_dict(name, merged[name]) for name in from_user})
    return Catalog(models, from_user)


def user_files(spec_catalog: Path | None, environ: Mapping[str, str] | None = None) -> list[Path]:
    """The user catalog files in the order they apply: ``QWEN_BATCH_CATALOG``, then the spec's ``catalog:``."""
    env = os.environ if environ is None else environ
    paths = []
    named = env.get(CATALOG_ENV, "").strip()
    if named:
        paths.append(Path(os.path.expanduser(named)).absolute())
    if spec_catalog is not None:
        paths.append(spec_catalog)
    return paths


def for_job(catalog_file: Path | None) -> Catalog:
    """The catalog a job sees: the built-in one, ``QWEN_BATCH_CATALOG``'s file over it, and the
    job's ``catalog:`` file (``catalog_file``, absolute) on top."""
    return with_user_files(user_files(catalog_file))
