"""Configuration errors: refused before sending when we can tell, explained when the service tells.

Before anything is sent (``validate``, ``run``, ``estimate``): ``check_model_known`` refuses a
model outside the built-in catalog with a close match, unless the spec sets
``api.allow_unknown_model: true``; ``check_native_path`` refuses a DashScope host whose path is
not the native ``/api/v1`` (the compatible-mode base is the usual mix-up). ``explain`` turns the ``ConfigurationRefused`` that
stopped a run into the one line a user reads: what is wrong, where it was set, the fix.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .catalog import Catalog
from .errors import (
    ConfigError,
    ConfigurationRefused,
    EndpointNotFound,
    ModelNotOnEndpoint,
    ParameterRefused,
    SpecError,
    UnknownModel,
)
from .spec import JobSpec, Parameters
from .wire import API_PREFIX, DEFAULT_BASE_URL, MULTIMODAL_PATH

# A model name is quoted at most this long (a runaway value must not flood the terminal).
MAX_SHOWN_NAME_CHARS = 80
ALLOW_UNKNOWN_MODEL_KEY = "api.allow_unknown_model"
# Every DashScope gateway (regional, workspace-scoped) serves the native API under API_PREFIX
# (protocol reference section 1.1); hosts elsewhere (proxies, the emulator) are not judged.
DASHSCOPE_DOMAIN = "aliyuncs.com"


def check_model_known(spec: JobSpec, catalog: Catalog) -> None:
    """Refuse a model the catalog lacks (SpecError, exit 2) unless the spec says it is deliberate."""
    if catalog.get(spec.model) is not None or spec.api.allow_unknown_model:
        return
    raise SpecError(
        f"{spec.where}: model: {_shown(spec.model)} is not in the built-in catalog; "
        f"{_model_fix(spec, catalog)}, or set {ALLOW_UNKNOWN_MODEL_KEY}: true "
        "if the service has this model and the catalog does not"
    )


def check_native_path(base_url: str, key: str) -> None:
    """Refuse a DashScope host whose path is not the native API's (ConfigError, exit 2).

    ``key`` names where the URL came from, for the message (``job.yaml: api.base_url``).
    """
    parts = urlsplit(base_url)
    host = (parts.hostname or "").rstrip(".").lower()
    path = parts.path.rstrip("/")
    if not (host == DASHSCOPE_DOMAIN or host.endswith("." + DASHSCOPE_DOMAIN)) or path == API_PREFIX:
        return
    native = urlunsplit((parts.scheme, parts.netloc, API_PREFIX, "", ""))
    raise ConfigError(
        f"{key}: {base_url} is a DashScope host, but qwen-batch speaks the native API under {API_PREFIX} "
        f"(compatible-mode is the OpenAI-style one); write {native}"
    )


def explain(
    error: ConfigurationRefused,
    *,
    spec: JobSpec,
    catalog: Catalog,
    base_url: str,
    base_url_key: str,
    parameters: dict[str, Any],
) -> str:
    """One line: what the service refused, where it is configured, and the fix.

    ``base_url_key`` names where the base URL came from (``api.base_url`` or the environment
    variable); ``parameters`` are those every request carried.
    """
    answer = _answer(error)
    where = spec.where
    if isinstance(error, UnknownModel):
        return f"the service does not know model {_shown(spec.model)} ({answer}); {_model_fix(spec, catalog)}"
    if isinstance(error, ModelNotOnEndpoint):
        other = "text" if error.url.endswith(MULTIMODAL_PATH) else "multimodal"
        return (
            f"{error.url} does not serve model {_shown(spec.model)} ({answer}): each model answers on one native "
            "path (Qwen3.5 and later, VL and audio models on multimodal-generation); "
            f"set api.endpoint: {other} in {where}, or check model:"
        )
    if isinstance(error, EndpointNotFound):
        return (
            f"{error.url} answered {answer}: {base_url_key} ({base_url}) looks wrong; "
            f"the DashScope default is {DEFAULT_BASE_URL}"
        )
    if isinstance(error, ParameterRefused):
        return _explain_parameter(error, spec, answer, parameters)
    return f"the service refused the job's configuration ({answer}); check {where}"


def _explain_parameter(error: ParameterRefused, spec: JobSpec, answer: str, parameters: dict[str, Any]) -> str:
    name = error.parameter
    if name not in Parameters.model_fields:
        return (
            f"model {_shown(spec.model)} needs {name} set otherwise than qwen-batch's non-streaming requests "
            f"allow ({answer}); choose another model in model: of {spec.where}"
        )
    value = parameters.get(name)
    if value is None:  # a key the spec has (issue 14's enable_thinking) but left unset, so never sent
        return (
            f"model {_shown(spec.model)} refuses every request without parameters.{name} ({answer}); "
            f"set parameters.{name} in {spec.where}"
        )
    origin = "" if name in spec.parameters.model_fields_set else f" (not set in the spec: {value!r} is the default)"
    return (
        f"the service refuses parameters.{name} = {value!r} for model {_shown(spec.model)} in every request "
        f"({answer}){origin}; fix parameters.{name} in {spec.where}"
    )


def _answer(error: ConfigurationRefused) -> str:
    """``HTTP 400 InvalidParameter: Model not exist.``, or ``HTTP 404 (404: Not Found)`` for a body with no code."""
    status = f"HTTP {error.status}" if error.status is not None else "the answer"
    if error.code.startswith("HTTP"):
        return f"{status} ({error.message})"
    return f"{status} {error.code}: {error.message}"


def _model_fix(spec: JobSpec, catalog: Catalog) -> str:
    """``did you mean 'qwen-turbo'? Fix model: in job.yaml``, or the catalog's names when none is close."""
    close = catalog.closest(spec.model)
    if close is not None:
        return f"did you mean {close!r}? Fix model: in {spec.where}"
    return f"fix model: in {spec.where} (the built-in catalog has {', '.join(catalog.names())})"


def _shown(name: str) -> str:
    text = repr(name)
    return text if len(text) <= MAX_SHOWN_NAME_CHARS else text[: MAX_SHOWN_NAME_CHARS - 3] + "..."
