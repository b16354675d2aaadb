"""Job spec: YAML text -> a validated, immutable ``JobSpec``.

The spec is the user's interface, so every mistake in it becomes ONE line that names the
file, the dotted key and the fix (``jobs/x.yaml: parameters.top_p: must be in (0, 1], got
1.5``). Unknown keys are errors at every level (``extra="forbid"``), with a close-match
suggestion, because a misspelt key silently ignored is a run with the wrong settings.

Parameter names and ranges are DashScope's own (dashscope-protocol.md §1.3) and are sent
as written; nothing is passed through unchecked. ``max_tokens`` is checked against the
model's output limit only when the model is known (see ``check_against_model``).

Paths in a spec loaded by ``load_spec`` are absolute: relative ones are taken from the job
file's folder, not from the working directory, so a job runs the same from anywhere.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import reprlib
import string
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from .catalog import Catalog, ModelInfo, Price
from .errors import ConfigError, SpecError
from .wire import COMPATIBLE_BASE_URL, DEFAULT_BASE_URL
from .yaml12 import YamlRefused, load_yaml

# --- defaults (named so docs, CLI help and tests can refer to them) -------------------------

DEFAULT_SEED = 1234  # DashScope's own default; always sent so a run is reproducible
SEED_MAX = 9_223_372_036_854_775_807  # the service's `Range of seed should be [0, 9223372036854775807]`
DEFAULT_CONCURRENCY = 16
MAX_CONCURRENCY = 4096
DEFAULT_MAX_RETRIES = 8
MAX_RETRIES_LIMIT = 100
DEFAULT_REQUEST_TIMEOUT_S = 120.0
MAX_REQUEST_TIMEOUT_S = 3600.0
DEFAULT_OUTPUT_DIR = "out"
DEFAULT_OUTPUT_SUFFIX = ".parquet"
DEFAULT_CURRENCY = "CNY"
DEFAULT_OVER_LONG: OverLong = "fail"
PRICING_SOURCE = "job spec"
LOOPBACK_NAMES = frozenset({"localhost"})

_SHORT = reprlib.Repr()  # messages quote the user's values through this, so a huge value stays a short line
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 60

ResultFormat = Literal["text", "message"]
StreamSetting = Literal["auto"] | bool
EndpointSetting = Literal["auto", "text", "multimodal"]
DEFAULT_STREAM: StreamSetting = "auto"
DEFAULT_ENDPOINT: EndpointSetting = "auto"
ProtocolSetting = Literal["dashscope", "openai"]
ServerSetting = Literal["auto", "dashscope", "vllm", "sglang", "ollama", "llamacpp"]
DEFAULT_PROTOCOL: ProtocolSetting = "dashscope"
DEFAULT_SERVER: ServerSetting = "auto"
DEFAULT_KEY_ENV = "DASHSCOPE_API_KEY"
DEFAULT_JSON_RETRIES = 1
MAX_JSON_RETRIES = 10
ExecutionMode = Literal["online", "batch"]
DEFAULT_EXECUTION_MODE: ExecutionMode = "online"
# The Batch API's documented limits (dashscope-protocol.md section 7.2-7.3).
DEFAULT_COMPLETION_WINDOW = "24h"
BATCH_WINDOW_HOURS = (24, 336)
DEFAULT_POLL_INTERVAL_S = 60.0
BATCH_MAX_REQUESTS_PER_FILE = 50_000
# Decimal megabytes: the smaller reading of the docs' "MB", so a file fits under either.
BATCH_MAX_FILE_BYTES = 500_000_000
BATCH_MAX_LINE_BYTES = 6_000_000
DEFAULT_MAX_LINE_BYTES = 1_000_000  # research-wave2.md E.8: 1 MB until a capture settles 1 MB vs 6 MB
# Settings that choose how a request is sent, not what it asks: never wire parameters.
_NOT_SENT = {"stream"}
OverLong = Literal["fail", "error"]
StopValue = Union[str, list[str], list[int], list[list[int]]]

_CONFIG = ConfigDict(
    extra="forbid",
    frozen=True,
    strict=True,  # YAML `"yes"` must not become True, nor `"16"` an int
    protected_namespaces=(),  # `model` and `model_limits` are the key names
)


# --- range checks with the messages users read ------------------------------------------


def _fmt(value: int | float) -> str:  # with `float` alone mypy takes the isinstance below as always true
    return _SHORT.repr(int(value) if isinstance(value, float) and value.is_integer() else value)


def _in_range(
    low: float | None, high: float | None, *, low_open: bool = False, high_open: bool = False
) -> AfterValidator:
    """A bound check whose error reads like the docs: ``must be in (0, 1], got 1.5``."""
    if low is not None and high is not None:
        text = f"{'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
    elif low is not None:
        text = f"{'>' if low_open else '>='} {_fmt(low)}"
    elif high is not None:
        text = f"{'<' if high_open else '<='} {_fmt(high)}"
    else:
        raise TypeError("a range needs a low or a high bound")
    phrase = f"must be in {text}" if low is not None and high is not None else f"must be {text}"

    def check(value: int | float) -> int | float:
        if isinstance(value, float) and not math.isfinite(value):  # YAML's .nan and .inf
            raise PydanticCustomError("not_finite", "must be a finite number, got {got}", {"got": _fmt(value)})
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise PydanticCustomError("out_of_range", "{phrase}, got {got}", {"phrase": phrase, "got": _fmt(value)})
        return value

    return AfterValidator(check)


def _check_stop(value: Any) -> StopValue | None:
    """DashScope's rule: a str, or a non-empty list whose elements are all str, all int, or all list[int]."""

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value):
            return value
        if all(is_int(x) for x in value):
            return value
        if all(isinstance(x, list) and x and all(is_int(y) for y in x) for x in value):
            return value
    raise PydanticCustomError(
        "stop_type",
        'must be a str, list[str], list[int] or list[list[int]] with all elements of the same type '
        '(DashScope: The "stop" parameter must be of type "str", "list[str]", "list[int]", or '
        '"list[list[int]]", and all elements within the list must be of the same type.)',
    )


def _check_stream(value: Any) -> StreamSetting:
    """``auto``, ``true`` or ``false``: YAML gives a bool or a string, and only these three mean anything."""
    if value == "auto" or isinstance(value, bool):
        return value  # type: ignore[no-any-return]
    raise PydanticCustomError("stream_value", "must be auto, true or false, got {got}", {"got": _show(value)})


def _check_name(value: str) -> str:
    if not value.strip() or any(c in value for c in "/\\\0") or value in {".", ".."}:
        raise PydanticCustomError("bad_name", "must be a plain file name (no '/' or '\\'), got {got}", {"got": _quoted(value)})
    return value


# --- template parsing (once, at load) ----------------------------------------------------



def parse_template(template: str) -> tuple[tuple[str, str | None], ...]:
    """Split a template into literal text and plain ``{column}`` fields.

    Only plain fields are accepted: attribute/index access (``{a.b}``, ``{a[0]}``), format specs
    (``{a:>10}``) and conversions (``{a!r}``) would run Python formatting on cell data, and a
    positional ``{}`` names no column. ``{{``/``}}`` are literal braces. Raises ValueError.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{exc} (write literal braces as {{{{ and }}}})") from None
    parts: list[tuple[str, str | None]] = []
    pending = ""  # escaped braces split the literal text; join it back so rendering does less
    for literal, field, spec, conversion in parsed:
        if field is None:
            pending += literal
            continue
        shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if field == "":
            raise ValueError(f"field {shown} names no column; write {{column_name}}")
        if "." in field or "[" in field:
            raise ValueError(f"field {shown}: attribute or index access is not supported; use a plain {{column}}")
        if conversion:
            raise ValueError(f"field {shown}: conversions (!r, !s, !a) are not supported; use a plain {{{field}}}")
        if spec:
            raise ValueError(f"field {shown}: format specs are not supported; use a plain {{{field}}}")
        parts.append((pending + literal, field))
        pending = ""
    if pending:
        parts.append((pending, None))
    return tuple(parts)


def _check_template(value: str) -> str:
    try:
        parse_template(value)
    except ValueError as exc:
        raise PydanticCustomError("bad_template", "{why}", {"why": str(exc)}) from None
    return value


# --- the models --------------------------------------------------------------------------

PathStr = Annotated[Path, Field(strict=False)]  # YAML gives str; a Path is what callers want
ColumnName = Annotated[str, Field(min_length=1)]
PositiveInt = Annotated[int, _in_range(1, None)]


class InputSpec(BaseModel):
    """The input table: its path (Parquet, CSV, JSONL/NDJSON) and optional id column."""

    model_config = _CONFIG

    path: PathStr
    id_column: ColumnName | None = None


class PromptSpec(BaseModel):
    """How a row becomes messages: exactly one of template / prompt_column / messages_column."""

    model_config = _CONFIG

    system: str | None = None
    template: Annotated[str, AfterValidator(_check_template)] | None = None
    prompt_column: ColumnName | None = None
    messages_column: ColumnName | None = None

    _parts: tuple[tuple[str, str | None], ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _exactly_one_source(self) -> PromptSpec:
        given = [k for k in ("template", "prompt_column", "messages_column") if getattr(self, k) is not None]
        if len(given) != 1:
            got = f"got {', '.join(given)}" if given else "got none"
            raise PydanticCustomError(
                "prompt_source", "give exactly one of template, prompt_column, messages_column ({got})", {"got": got}
            )
        if self.template is not None:
            self._parts = parse_template(self.template)
        return self

    @property
    def template_parts(self) -> tuple[tuple[str, str | None], ...]:
        """The template parsed once: (literal, column or None) pairs, rendered by concatenation."""
        return self._parts

    @property
    def template_columns(self) -> list[str]:
        """Columns the template refers to, in first-use order, without repeats."""
        return list(dict.fromkeys(column for _, column in self._parts if column is not None))

    @property
    def columns(self) -> list[str]:
        """Every input column this prompt reads."""
        if self.prompt_column is not None:
            return [self.prompt_column]
        if self.messages_column is not None:
            return [self.messages_column]
        return self.template_columns


def _check_json_schema(value: dict[str, Any]) -> dict[str, Any]:
    from .structured import schema_problem  # jsonschema is imported only for a job that has a schema

    problem = schema_problem(value)
    if problem is not None:
        raise PydanticCustomError(
            "bad_schema", "not a valid JSON Schema ({why}); fix the schema", {"why": problem}
        )
    return value


def _check_format_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise PydanticCustomError(
            "format_name", "must be 1 to 64 letters, digits, '_' or '-', got {got}", {"got": _quoted(value)}
        )
    return value


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: OpenAI's shape, ``strict`` inside it (research-wave2 B.1)."""

    model_config = _CONFIG

    name: Annotated[str, AfterValidator(_check_format_name)]
    # "schema" shadows a BaseModel attribute: the field is schema_, the YAML key schema.
    schema_: Annotated[dict[str, Any], AfterValidator(_check_json_schema), Field(alias="schema")]
    strict: bool | None = None


ResponseFormatType = Literal["text", "json_object", "json_schema"]


class ResponseFormat(BaseModel):
    """``parameters.response_format``: plain text, any JSON, or JSON of a schema (structured.py)."""

    model_config = _CONFIG

    type: ResponseFormatType
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError(
                "schema_missing",
                "type json_schema needs json_schema (its name and schema); add it, or use type: json_object",
                {"key": "json_schema"},
            )
        if self.type != "json_schema" and self.json_schema is not None:
            raise PydanticCustomError(
                "schema_unused", "is read only with type: json_schema; remove it, or set type: json_schema",
                {"key": "json_schema"},
            )
        return self


class Parameters(BaseModel):
    """DashScope generation parameters, names and ranges as documented; unset ones are not sent."""

    model_config = _CONFIG

    seed: Annotated[int, _in_range(0, SEED_MAX)] = DEFAULT_SEED
    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, _in_range(0, 2, high_open=True)] | None = None
    top_p: Annotated[float, _in_range(0, 1, low_open=True)] | None = None
    top_k: Annotated[int, _in_range(0, None)] | None = None
    repetition_penalty: Annotated[float, _in_range(0, None, low_open=True)] | None = None
    presence_penalty: Annotated[float, _in_range(-2, 2)] | None = None
    stop: Annotated[Any, AfterValidator(_check_stop)] = None
    enable_search: bool | None = None
    result_format: ResultFormat | None = None
    # How to send (see modes.resolve_mode); kept out of to_wire so fingerprints do not change.
    stream: Annotated[Any, AfterValidator(_check_stream)] = DEFAULT_STREAM
    enable_thinking: bool | None = None
    thinking_budget: PositiveInt | None = None
    response_format: ResponseFormat | None = None

    def to_wire(self) -> dict[str, Any]:
        """The parameters that are set, as DashScope names them (seed always)."""
        wire = {k: v for k, v in self.model_dump(exclude=_NOT_SENT).items() if v is not None}
        if self.response_format is not None:
            wire["response_format"] = self.response_format.model_dump(by_alias=True, exclude_none=True)
        return wire


def _non_empty_list(value: list[Any]) -> list[Any]:
    if not value:
        raise ValueError("a sweep axis needs at least one value")
    if len({repr(v) for v in value}) != len(value):
        raise ValueError("a sweep axis lists a value twice")
    return value


def _sweepable_parameters(value: dict[str, list[Any]]) -> dict[str, list[Any]]:
    unknown = [key for key in value if key not in Parameters.model_fields or key == "seed"]
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} (sweep.seed sweeps the seed; "
            f"parameters are {', '.join(k for k in Parameters.model_fields if k != 'seed')})"
        )
    for values in value.values():
        _non_empty_list(values)
    return value


class SweepSpec(BaseModel):
    """A matrix crossed with every row (variants.py): models, seeds and parameter values."""

    model_config = _CONFIG

    model: Annotated[list[Annotated[str, Field(min_length=1)]], AfterValidator(_non_empty_list)] | None = None
    seed: Annotated[list[Annotated[int, _in_range(0, SEED_MAX)]], AfterValidator(_non_empty_list)] | None = None
    parameters: Annotated[dict[str, list[Any]], AfterValidator(_sweepable_parameters)] = Field(default_factory=dict)


class ExecutionSpec(BaseModel):
    """How hard to push: concurrency, client-side rate limits, retries, timeout."""

    model_config = _CONFIG

    concurrency: Annotated[int, _in_range(1, MAX_CONCURRENCY)] = DEFAULT_CONCURRENCY
    requests_per_minute: Annotated[float, _in_range(0, None, low_open=True)] | None = None
    tokens_per_minute: Annotated[float, _in_range(0, None, low_open=True)] | None = None
    max_retries: Annotated[int, _in_range(0, MAX_RETRIES_LIMIT)] = DEFAULT_MAX_RETRIES
    request_timeout_s: Annotated[float, _in_range(0, MAX_REQUEST_TIMEOUT_S, low_open=True)] = (
        DEFAULT_REQUEST_TIMEOUT_S
    )
    # Stop early (exit 3) when more than this share of the last ERROR_WINDOW_ROWS rows failed.
    max_error_rate: Annotated[float, _in_range(0, 1, low_open=True)] | None = None
    # online: the worker pool; batch: DashScope's file-based Batch API at half price (the batch: section).
    mode: ExecutionMode = DEFAULT_EXECUTION_MODE


def window_hours(window: str) -> int:
    """Hours of a ``completion_window`` the service accepts (``24h``-``336h`` or ``1d``-``14d``,
    integers only: dashscope-protocol.md section 7.3); raises ValueError otherwise."""
    match = re.fullmatch(r"([1-9][0-9]*)([hd])", window)
    hours = int(match[1]) * (24 if match[2] == "d" else 1) if match else 0
    if not BATCH_WINDOW_HOURS[0] <= hours <= BATCH_WINDOW_HOURS[1]:
        raise ValueError(window)
    return hours


def duration_seconds(text: str) -> float:
    """Seconds of a duration such as ``90s``, ``30m``, ``20h`` or ``1d``; raises ValueError otherwise."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(s|m|h|d)", text)
    if not match or float(match[1]) <= 0:
        raise ValueError(text)
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def _check_window(value: str) -> str:
    try:
        window_hours(value)
    except ValueError:
        raise PydanticCustomError(
            "bad_window",
            "must be a whole number of hours 24h to 336h, or of days 1d to 14d (the service's range), got {got}",
            {"got": _quoted(value)},
        ) from None
    return value


def _check_duration(value: str) -> str:
    try:
        duration_seconds(value)
    except ValueError:
        raise PydanticCustomError(
            "bad_duration", "must be a positive duration such as 90s, 30m, 20h or 1d, got {got}", {"got": _quoted(value)}
        ) from None
    return value


class BatchSpec(BaseModel):
    """The Batch API's settings (``execution.mode: batch``); the limits default to the service's own.

    ``max_line_bytes`` defaults to 1 MB, not the 6 MB of the older docs: a newer source says
    1 MB per line and no capture settles it (research-wave2.md E.8), so a line that fits
    1 MB is accepted under either reading. ``base_url``: the compatible-mode base the files
    and batches live under; unset, it is derived from the job's base URL (shared/NOTES.md).
    """

    model_config = _CONFIG

    completion_window: Annotated[str, AfterValidator(_check_window)] = DEFAULT_COMPLETION_WINDOW
    poll_interval_s: Annotated[float, _in_range(0, 3600, low_open=True)] = DEFAULT_POLL_INTERVAL_S
    max_requests_per_file: Annotated[int, _in_range(1, BATCH_MAX_REQUESTS_PER_FILE)] = BATCH_MAX_REQUESTS_PER_FILE
    max_file_bytes: Annotated[int, _in_range(1, BATCH_MAX_FILE_BYTES)] = BATCH_MAX_FILE_BYTES
    max_line_bytes: Annotated[int, _in_range(1, BATCH_MAX_LINE_BYTES)] = DEFAULT_MAX_LINE_BYTES
    online_after: Annotated[str, AfterValidator(_check_duration)] | None = None
    base_url: Annotated[str, Field(min_length=1)] | None = None

    @property
    def window_s(self) -> float:
        return window_hours(self.completion_window) * 3600.0

    @property
    def online_after_s(self) -> float | None:
        return duration_seconds(self.online_after) if self.online_after is not None else None


class OutputSpec(BaseModel):
    """Where results go; ``load_spec`` fills the default ``out/<name>.parquet`` next to the job file."""

    model_config = _CONFIG

    path: PathStr | None = None
    # JSON mode: how many times an answer that does not parse is asked again (structured.py).
    json_retries: Annotated[int, _in_range(0, MAX_JSON_RETRIES)] = DEFAULT_JSON_RETRIES


class ApiSpec(BaseModel):
    """The endpoint. ``DASHSCOPE_HTTP_BASE_URL`` overrides ``base_url`` (the caller reads it).

    ``allow_unknown_model`` says a model outside the catalog is deliberate (the service has
    models the catalog lacks); without it such a name is refused before sending. ``endpoint``
    picks the native path: ``auto`` takes the catalog's binding for the model. ``protocol``
    ``openai`` speaks chat completions at ``{base_url}/chat/completions`` (an unset
    ``base_url`` is then DashScope's compatible-mode base); ``server`` names whose dialect
    to speak there (``auto``: decided once at start, ``servers.py``); ``key_env`` names the
    variable that holds the key, or is null for a server that needs none.
    """

    model_config = _CONFIG

    base_url: Annotated[str, Field(min_length=1)] = DEFAULT_BASE_URL
    allow_insecure_http: bool = False
    allow_unknown_model: bool = False
    endpoint: EndpointSetting = DEFAULT_ENDPOINT
    protocol: ProtocolSetting = DEFAULT_PROTOCOL
    server: ServerSetting = DEFAULT_SERVER
    key_env: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = DEFAULT_KEY_ENV

    @model_validator(mode="before")
    @classmethod
    def _protocol_default_url(cls, data: Any) -> Any:
        # The openai protocol's default is DashScope's compatible-mode base, not the native one.
        if isinstance(data, dict) and data.get("protocol") == "openai" and "base_url" not in data:
            return {**data, "base_url": COMPATIBLE_BASE_URL}
        return data

    @model_validator(mode="after")
    def _safe_url(self) -> ApiSpec:
        problem = base_url_problem(self.base_url, self.allow_insecure_http)
        if problem is not None:
            raise PydanticCustomError("bad_url", "{why}", {"why": problem, "key": "base_url"})
        if self.protocol == "dashscope" and self.server not in ("auto", "dashscope"):
            raise PydanticCustomError(
                "bad_server",
                "server {server} speaks the OpenAI-compatible API: set api.protocol: openai",
                {"server": repr(self.server), "key": "server"},
            )
        return self

    @property
    def names_local_server(self) -> bool:
        """A server the user runs, named in the spec: DashScope's prices and service rules
        (stream-only models, thinking only when streamed) do not apply to it."""
        return self.protocol == "openai" and self.server not in ("auto", "dashscope")


class PricingSpec(BaseModel):
    """A flat price that replaces the built-in table for this job."""

    model_config = _CONFIG

    currency: Annotated[str, Field(min_length=1)] = DEFAULT_CURRENCY
    input_per_1k: Annotated[float, _in_range(0, None)]
    output_per_1k: Annotated[float, _in_range(0, None)]
    # What a reasoning token costs; without it, output_per_1k (shared/NOTES.md, "Prices with thinking").
    thinking_output_per_1k: Annotated[float, _in_range(0, None)] | None = None


class CacheSpec(BaseModel):
    """Response cache across runs; ``path`` None means the caller's per-user default."""

    model_config = _CONFIG

    enabled: bool = True
    path: PathStr | None = None


class BudgetSpec(BaseModel):
    """Stop before the cost (in the price currency) would exceed ``max_cost``."""

    model_config = _CONFIG

    max_cost: Annotated[float, _in_range(0, None, low_open=True)] | None = None


class PreflightSpec(BaseModel):
    """What to do with rows longer than the model's input limit: fail the run, or record row errors."""

    model_config = _CONFIG

    over_long: OverLong = DEFAULT_OVER_LONG


class ModelLimitsSpec(BaseModel):
    """Overrides of the catalog's limits for this model (the service changes them)."""

    model_config = _CONFIG

    max_input_tokens: PositiveInt | None = None
    max_output_tokens: PositiveInt | None = None


class ShardLimitsSpec(BaseModel):
    """A shard's own RPM and TPM (``shards[i].execution``), in place of a share of the job's."""

    model_config = _CONFIG

    requests_per_minute: Annotated[float, _in_range(0, None, low_open=True)] | None = None
    tokens_per_minute: Annotated[float, _in_range(0, None, low_open=True)] | None = None


class ShardSpec(BaseModel):
    """One entry of ``shards:``: the ``api`` keys this shard sends with (another account or
    region) over the job's, and its own limits. The ``api`` keys are checked laid over the
    job's, as ``ApiSpec`` (``JobSpec._check_shards``)."""

    model_config = _CONFIG

    api: dict[str, Any] = Field(default_factory=dict)
    execution: ShardLimitsSpec = Field(default_factory=ShardLimitsSpec)


class _ShardApi(BaseModel):
    """A shard's ``api`` section, the job's with its entry's keys over it: errors say ``api.KEY``."""

    model_config = _CONFIG

    api: ApiSpec


class JobSpec(BaseModel):
    """A whole job. Build it with ``load_spec`` so paths are resolved and defaults filled.

    ``path`` is the job file (None for a spec built in code), used in messages.
    """

    model_config = _CONFIG

    name: Annotated[str, AfterValidator(_check_name)] | None = None
    model: Annotated[str, Field(min_length=1)]
    input: InputSpec
    prompt: PromptSpec
    parameters: Parameters = Field(default_factory=Parameters)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    api: ApiSpec = Field(default_factory=ApiSpec)
    pricing: PricingSpec | None = None
    cache: CacheSpec = Field(default_factory=CacheSpec)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    preflight: PreflightSpec = Field(default_factory=PreflightSpec)
    model_limits: ModelLimitsSpec = Field(default_factory=ModelLimitsSpec)
    batch: BatchSpec = Field(default_factory=BatchSpec)
    catalog: PathStr | None = None  # a user catalog file (user_catalog.py), over the built-in one
    # Issue 17 (variants.py): results per row, and a matrix of models/seeds/parameters.
    samples: PositiveInt = 1
    sweep: SweepSpec | None = None
    # Issue 19 (sharding.py): per-shard accounts and limits for ``run --shard I/N``, N entries.
    shards: Annotated[list[ShardSpec], Field(min_length=1)] | None = None

    _path: Path | None = PrivateAttr(default=None)
    _job: JobSpec | None = PrivateAttr(default=None)  # the job's spec, when this is one shard's (for_shard)

    @model_validator(mode="after")
    def _safe_batch_url(self) -> JobSpec:
        # Checked here, not in BatchSpec: api.allow_insecure_http governs it too.
        if self.batch.base_url is not None:
            problem = base_url_problem(self.batch.base_url, self.api.allow_insecure_http)
            if problem is not None:
                raise PydanticCustomError("bad_url", "{why}", {"why": problem, "key": "batch.base_url"})
        return self

    @model_validator(mode="after")
    def _check_shards(self) -> JobSpec:
        for number in range(len(self.shards or ())):
            self._shard_api(number)
        return self

    def _shard_api(self, number: int) -> ApiSpec:
        """Shard ``number``'s api section: the job's, its ``shards:`` entry's keys over it."""
        assert self.shards is not None
        merged = {**self.api.model_dump(exclude_unset=True), **self.shards[number].api}
        try:
            return _ShardApi.model_validate({"api": merged}).api
        except ValidationError as exc:
            why = f"shards[{number}].{describe_validation_error(exc)}"
            raise PydanticCustomError("bad_shard", "{why}", {"why": why}) from None

    def for_shard(self, index: int, count: int) -> JobSpec:
        """The spec shard ``index`` of ``count`` runs with: its ``shards:`` entry's api keys and
        limits over the job's (this spec, without ``shards:``). SpecError unless ``count`` is
        the number of entries."""
        if self.shards is None:
            return self
        if count != len(self.shards):
            raise SpecError(
                f"{self.where}: shards: lists {len(self.shards)} shards, but --shard {index}/{count} is one of "
                f"{count}; run --shard I/{len(self.shards)}, or list {count} entries under shards"
            )
        limits = self.shards[index].execution.model_dump(exclude_none=True)
        shard = self.model_copy(
            update={"api": self._shard_api(index), "execution": self.execution.model_copy(update=limits)}
        )
        shard._path, shard._job = self._path, self.job
        return shard

    @property
    def path(self) -> Path | None:
        """The job file this spec was read from."""
        return self._path

    @property
    def where(self) -> str:
        """How messages name this spec: its file, or ``job spec`` when built in code."""
        return str(self._path) if self._path is not None else "job spec"

    @property
    def job(self) -> JobSpec:
        """The whole job's spec: this one, or the one a shard's was made from (``for_shard``)."""
        return self._job if self._job is not None else self


# --- base URL safety ---------------------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``: traffic that never leaves the machine."""
    host = host.strip("[]").rstrip(".").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def base_url_problem(url: str, allow_insecure_http: bool) -> str | None:
    """Why ``url`` may not carry the API key, or None when it may.

    Messages show the URL without its user info, query and fragment, which may hold secrets.
    """
    shown = _quoted(shown_url(url))
    if any(char <= " " or char == "\x7f" for char in url):
        return f"{shown} has a space or control character in it; write the URL without it"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return f"{shown} is not a valid URL (its host or port is malformed); write e.g. {DEFAULT_BASE_URL}"
    if "@" in parts.netloc:
        return (
            f"{shown} has a user name or password in it; remove it "
            "(the API key goes in DASHSCOPE_API_KEY, never in the URL)"
        )
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return f"{shown} has a query or fragment (?... or #...); the base URL ends with its path, e.g. /api/v1"
    if parts.scheme not in ("http", "https") or not host:
        return f"{shown} is not an http(s) URL; write e.g. {DEFAULT_BASE_URL}"
    if parts.scheme == "http" and not allow_insecure_http and not is_loopback_host(host):
        return (
            f"{shown} would send the API key unencrypted; use https, "
            "or set api.allow_insecure_http: true if you really mean it"
        )
    return None


def shown_url(url: str) -> str:
    """``url`` as messages may show it: user info masked, query and fragment cut off."""
    cut = min((i for i in (url.find("?"), url.find("#")) if i >= 0), default=len(url))
    shown = url[:cut] + ("?..." if cut < len(url) else "")
    return re.sub(r"^([^:/?#]*://)?.*@", r"\1***@", shown, flags=re.DOTALL)


def check_base_url(url: str, allow_insecure_http: bool, *, source: str = "base URL") -> None:
    """Refuse a base URL that could leak the key: plain http to a non-loopback host, credentials, junk.

    Raises ConfigError (the URL may come from ``DASHSCOPE_HTTP_BASE_URL``, not the spec);
    ``source`` names where it came from.
    """
    problem = base_url_problem(url, allow_insecure_http)
    if problem is not None:
        raise ConfigError(f"{source}: base URL {problem}")


# --- model and price ----------------------------------------------------------------------


def resolve_model(spec: JobSpec, catalog: Catalog) -> ModelInfo | None:
    """The catalog's entry for ``spec.model`` with ``model_limits`` applied; None if unknown."""
    info = catalog.get(spec.model)
    if info is None:
        return None
    limits = spec.model_limits
    info = info.with_overrides(max_input_tokens=limits.max_input_tokens, max_output_tokens=limits.max_output_tokens)
    if (
        info.max_output_tokens is not None
        and info.default_max_tokens is not None
        and info.default_max_tokens > info.max_output_tokens
    ):
        info = info.with_overrides(default_max_tokens=info.max_output_tokens)
    return info


def price_for(spec: JobSpec, model_info: ModelInfo | None) -> Price | None:
    """The spec's pricing override if any, else the catalog's price, else None (cost unknown)."""
    if spec.pricing is not None:
        p = spec.pricing
        return Price.flat(p.input_per_1k, p.output_per_1k, p.currency, PRICING_SOURCE, p.thinking_output_per_1k)
    return model_info.price if model_info is not None else None


def max_output_tokens(spec: JobSpec, model_info: ModelInfo | None) -> int | None:
    """The largest max_tokens this job may send: the model's limit, else model_limits, else unknown."""
    if model_info is not None and model_info.max_output_tokens is not None:
        return model_info.max_output_tokens
    return spec.model_limits.max_output_tokens


def check_against_model(spec: JobSpec, model_info: ModelInfo | None) -> None:
    """Checks that need the model: ``max_tokens`` within the output limit. Raises SpecError."""
    limit = max_output_tokens(spec, model_info)
    asked = spec.parameters.max_tokens
    if model_info is not None and asked is None and limit is None and model_info.default_max_tokens is None:
        raise SpecError(
            f"{spec.where}: parameters.max_tokens: the catalog does not know {spec.model}'s output limit, so a "
            "request's worst-case cost is unknown; set parameters.max_tokens (or model_limits.max_output_tokens)"
        )
    if limit is not None and asked is not None and asked > limit:
        raise SpecError(
            f"{spec.where}: parameters.max_tokens: Range of max_tokens should be [1, {limit}] for {spec.model}, "
            f"got {asked}; lower it (or set model_limits.max_output_tokens if the service now allows more)"
        )


# --- loading -------------------------------------------------------------------------------


def load_spec(path: Path, catalog: Catalog | None = None) -> JobSpec:
    """Read, validate and resolve a job file. Every problem is a one-line SpecError.

    ``catalog`` (default: the job's, ``user_catalog.for_job``) is used only to check ``max_tokens``
    against the model's output limit; an unknown model is not an error here (callers warn).
    """
    path = Path(path)
    text = _read_job_file(path)
    try:
        data = load_yaml(text)
    except YamlRefused as exc:
        raise SpecError(f"{path}:{exc.line}: {exc.message}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {_yaml_reason(exc, text)}") from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}, not a mapping of keys"
        raise SpecError(f"{path}: the job file is {kind}; it must be a YAML mapping with model, input and prompt")
    _read_schema_file(data, path)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"{path}: {describe_validation_error(exc)}") from None
    spec = _resolved(spec, path, data)
    from .user_catalog import for_job  # the catalog is read on first use, not at import

    check_against_model(spec, resolve_model(spec, catalog or for_job(spec.catalog)))
    return spec


SCHEMA_KEY = "parameters.response_format.json_schema.schema"
SCHEMA_MAX_BYTES = 1024 * 1024  # a schema is a page of JSON; anything larger is a mistake


def _read_schema_file(data: dict[str, Any], path: Path) -> None:
    """A schema given as a path (a string, relative to the job file's folder) becomes the JSON
    object its file holds, in ``data``, before validation: the rest of the job, its
    fingerprints included, sees the schema itself. A file that is missing, unreadable, not
    JSON or not a JSON Schema is a SpecError naming the key and the file."""
    from .paths import expanded, read_bounded, resolved

    parameters = data.get("parameters")
    response_format = parameters.get("response_format") if isinstance(parameters, dict) else None
    json_schema = response_format.get("json_schema") if isinstance(response_format, dict) else None
    if not isinstance(json_schema, dict) or not isinstance(json_schema.get("schema"), str):
        return
    raw = json_schema["schema"]
    file = resolved(resolved(path, "job file", SpecError).parent / expanded(raw), SCHEMA_KEY, SpecError)
    try:
        text = read_bounded(file, "schema file", "the path", SCHEMA_MAX_BYTES, SpecError)
    except SpecError as exc:
        raise SpecError(f"{path}: {SCHEMA_KEY}: {exc}") from None
    json_schema["schema"] = _schema_of_file(text, file, path)


def _schema_of_file(text: bytes, file: Path, path: Path) -> dict[str, Any]:
    """The JSON Schema a schema file holds; a SpecError naming the key and ``file`` otherwise."""
    import json

    from .structured import schema_problem

    where = f"{path}: {SCHEMA_KEY}: {file}"
    try:
        schema = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SpecError(f"{where}: not UTF-8 text (byte {exc.start}); save the schema file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); fix the file") from None
    if not isinstance(schema, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(schema), "a number")
        raise SpecError(f"{where}: holds {kind}, not an object; a schema file holds one JSON Schema object")
    problem = schema_problem(schema)
    if problem is not None:
        raise SpecError(f"{where}: not a valid JSON Schema ({problem}); fix the schema")
    return schema


def _read_job_file(path: Path) -> str:
    """The job file's text: a regular file of at most SPEC_MAX_BYTES, in UTF-8 (never blocks on a pipe)."""
    from .paths import SPEC_MAX_BYTES, read_bounded

    data = read_bounded(path, "job file", "the path of the job file", SPEC_MAX_BYTES, SpecError)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start}); save the job file as UTF-8") from None


def _resolved(spec: JobSpec, path: Path, data: dict[str, Any]) -> JobSpec:
    """Fill defaults that depend on the job file, make every path absolute, and check them together.

    ``~`` is expanded; a path written with a trailing ``/`` (seen in the raw ``data``, as
    ``Path`` drops it) names a folder: the output and the cache get their default file name
    inside it, and an input must be a file.
    """
    from .cache import CACHE_FILE_NAME
    from .paths import expanded, job_paths, names_folder, resolved

    base = resolved(path, "job file", SpecError).parent
    name = spec.name if spec.name is not None else path.stem

    def absolute(section: str, default_file: str | None) -> Path:
        raw = data[section]["path"]
        full = base / expanded(raw)
        if names_folder(raw):
            if default_file is None:
                raise SpecError(f"{path}: {section}.path {raw!r} ends in '/', so it names a folder; name one file")
            full = full / default_file
        return resolved(full, f"{section}.path", SpecError)

    input_path = absolute("input", None)
    output_path = (
        absolute("output", f"{name}{DEFAULT_OUTPUT_SUFFIX}")
        if spec.output.path is not None
        else base / DEFAULT_OUTPUT_DIR / f"{name}{DEFAULT_OUTPUT_SUFFIX}"
    )
    cache = spec.cache
    if cache.path is not None:
        cache = cache.model_copy(update={"path": absolute("cache", CACHE_FILE_NAME)})
    user_catalog = None
    if spec.catalog is not None:
        raw_catalog = data["catalog"]
        if names_folder(raw_catalog):
            raise SpecError(f"{path}: catalog: {raw_catalog!r} ends in '/', so it names a folder; name one JSON file")
        user_catalog = resolved(base / expanded(raw_catalog), "catalog", SpecError)
    resolved_spec = spec.model_copy(
        update={
            "name": name,
            "input": spec.input.model_copy(update={"path": input_path}),
            "output": spec.output.model_copy(update={"path": output_path}),
            "cache": cache,
            "catalog": user_catalog,
        }
    )
    resolved_spec._path = path
    job_paths(resolved_spec, cache=cache.path if cache.enabled else None, error=SpecError)
    return resolved_spec


def _yaml_reason(exc: yaml.YAMLError, text: str) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = (getattr(exc, "problem", None) or str(exc).splitlines()[0])[:200]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow: no mark, a position
        where = f" at line {text.count(chr(10), 0, exc.position) + 1}"
    return f"{problem}{where}; fix the syntax (quote strings that contain ': ' or start with {{ [ * & ! | >)"


# --- ValidationError -> one line -------------------------------------------------------------

_MISSING_HINTS = {
    "model": " (e.g. model: qwen-turbo)",
    "input": " (e.g. input: {path: data/rows.csv})",
    "input.path": " (the input table: .parquet, .csv, .jsonl or .ndjson)",
    "prompt": " (e.g. prompt: {template: \"Translate: {text}\"})",
}

_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "path_type": "a path string",
    "model_type": "a mapping of keys",
    "model_attributes_type": "a mapping of keys",
    "dict_type": "a mapping of keys",
    "list_type": "a list",
}


def describe_validation_error(exc: ValidationError) -> str:
    """The first error as ``key: what is wrong, what to do``; later ones are counted, not listed."""
    errors = exc.errors(include_url=False)
    # A misspelt key also makes the real one "missing": report the typo, it is the cause.
    errors.sort(key=lambda error: error["type"] != "extra_forbidden")
    line = _describe(errors[0])
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return line


def _describe(error: ErrorDetails) -> str:
    raw = error["loc"]
    # The offending key of an unknown-key error is the user's text, whatever it looks like.
    loc = _clean_loc(raw[:-1]) + (str(raw[-1]),) if error["type"] == "extra_forbidden" and raw else _clean_loc(raw)
    if "key" in error.get("ctx", {}):  # a section-level check about one of its keys
        loc = (*loc, error["ctx"]["key"])
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        parent, key = loc[:-1], str(loc[-1])
        valid = _keys_at(parent)
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
        prefix = f"{'.'.join(parent)}: " if parent else ""
        return f"{prefix}unknown key {_quoted(key)} ({hint})"
    dotted = ".".join(loc)
    prefix = f"{dotted}: " if dotted else ""
    if kind == "missing":
        return f"missing key {dotted!r}; add it{_MISSING_HINTS.get(dotted, '')}"
    if kind in _TYPE_WORDS:
        return f"{prefix}must be {_TYPE_WORDS[kind]}, got {_show(value)}"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{prefix}must be one of {expected}, got {_show(value)}"
    if kind in ("string_too_short", "too_short"):
        return f"{prefix}must not be empty"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{prefix}{error['msg'].lower().replace('input should be', 'must be')}, got {_show(value)}"
    msg = error["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{prefix}{msg}"


def _clean_loc(loc: tuple[int | str, ...]) -> tuple[str, ...]:
    """Drop pydantic's union/validator branch names so the path reads like the YAML keys."""
    out: list[str] = []
    for part in loc:
        if isinstance(part, int) and out == ["shards"]:
            out[-1] = f"shards[{part}]"  # an entry as the README names it: shards[i].KEY
        elif isinstance(part, int):
            out.append(str(part))
        elif part in _BRANCH_LABELS or part.startswith(("function-", "lax-", "strict-")) or "[" in part:
            continue
        else:
            out.append(part)
    return tuple(out)


_BRANCH_LABELS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "is-instance[Path]"})


def _show(value: object) -> str:
    """A value as an error message quotes it: bounded, however large (or aliased) it is."""
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return f"{_SHORT.repr(value)} ({type(value).__name__})"


def _quoted(text: str) -> str:
    """``repr(text)``, cut in the middle when long, so one message line stays one short line."""
    return _SHORT.repr(text)


def _model_of(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType, typing.Annotated, list):  # list: shards[i]
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _keys_at(loc: tuple[str, ...]) -> list[str]:
    """The valid keys of the section at ``loc`` (for did-you-mean suggestions)."""
    model: type[BaseModel] | None = JobSpec
    for part in loc:
        field = model.model_fields.get(part.split("[")[0]) if model is not None else None
        model = _model_of(field.annotation) if field is not None else None
    return [field.alias or name for name, field in model.model_fields.items()] if model is not None else []
