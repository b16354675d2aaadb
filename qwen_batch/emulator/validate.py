"""Request validation with the service's own error codes, HTTP statuses and message texts.

A body either becomes a ``ChatRequest`` (messages with the prompt folded in, checked
parameters, the effective ``max_tokens`` and the billed input tokens) or raises
``ApiError``. Texts are those of the protocol reference sections 1.3, 5 and 6; the few
the reference does not give are marked "not documented" and listed in docs/emulator.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..catalog import Catalog, ModelInfo
from ..tokens import response_format_tokens
from ..wire import ERRORS
from .models import Behaviour, NativePath, behaviour
from .servers import Server
from .structured import FormatError, check_json_word, json_mode
from .usage import input_tokens as count_input

SEED_MAX_NATIVE = 2**63 - 1
SEED_MAX_COMPATIBLE = 2**31 - 1
ALLOWED_ROLES = frozenset({"system", "user", "assistant", "tool", "plugin", "function"})

BODY_INVALID = "Required body invalid, please check the request body format."
EITHER_PROMPT_OR_MESSAGES = 'Either "prompt" or "messages" must exist and cannot both be none'
ROLE_OR_EMPTY = "Role must be user or assistant and Content length must be greater than 0"
NOT_ALTERNATING = "User and assistant need to appear alternately in the message"
NO_USER = "The input messages do not contain elements with the role of user."
CONTENT_REQUIRED = "The content field is a required field."
CONTENT_NOT_STRING = "input content must be a string."
TOOL_WITHOUT_CALL = 'messages with role "tool" must be a response to a preceeding message with "tool_calls"'
LAST_NOT_USER = "list index out of range"
MODEL_NOT_EXIST = "Model not exist."
STOP_TYPES = (
    'The "stop" parameter must be of type "str", "list[str]", "list[int]", or "list[list[int]]", '
    "and all elements within the list must be of the same type."
)
# Not documented: the reference gives no text for these two.
RESULT_FORMAT_INVALID = 'The result_format parameter must be "text" or "message".'
TOP_K_NOT_INTEGER = "'top_k' must be Integer"
# Thinking (PROTO §1.3, WAVE2 A.1); the first of these is not documented.
ENABLE_THINKING_NOT_BOOLEAN = "'enable_thinking' must be Boolean"
THINKING_NEEDS_MESSAGE = 'The result_format parameter must be "message" when enable_thinking is true'
THINKING_NEEDS_INCREMENTAL = 'The incremental_output parameter must be "true" when enable_thinking is true'
INCREMENTAL_LOCKED = "The incremental_output parameter of this model cannot be set to False."
JSON_WITH_THINKING = "Json mode response is not supported when enable_thinking is true"
# The gateway's answer for a model bound to the other aigc path (PROTO §1.1, DOC-APIREF: note the
# full-width "！"); its code is InvalidParameter per dashscope 2.0.2 acli/providers/tongyi.py.
URL_ERROR = "url error, please check url！"
# The emulator's own refusal: it generates text only.
PART_NOT_SERVED = "The emulator serves text only: content part {kind!r} is not supported (use {{\"text\": ...}} parts)."


class ApiError(Exception):
    """A refusal the emulator sends as the service would: status, code, message.

    ``compatible_code`` overrides the OpenAI-style ``error.code`` (default: wire.ERRORS').
    """

    def __init__(
        self,
        code: str,
        message: str | None = None,
        status: int | None = None,
        *,
        compatible_code: str | None = None,
        stream_status: int | None = None,
    ) -> None:
        spec = ERRORS.get(code)
        # The HTTP status of this refusal on a stream, where the service is known to fix it.
        self.stream_status = stream_status
        self.code = code
        self.message = message if message is not None else (spec.message if spec else code)
        self.status = status if status is not None else (spec.status if spec else 500)
        self.compatible_code = compatible_code or (spec.compatible_code if spec else code)
        super().__init__(f"{self.status} {code}: {self.message}")


def invalid(message: str) -> ApiError:
    return ApiError("InvalidParameter", message)


@dataclass(slots=True)
class ChatRequest:
    """A validated request, the same for both endpoints."""

    model: ModelInfo
    messages: list[dict[str, Any]]
    parameters: dict[str, Any]
    max_tokens: int
    result_format: str
    incremental_output: bool
    input_tokens: int
    stream: bool = False
    include_usage: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    thinking: bool = False
    thinking_budget: int = 0
    # response_format: "json_object" | "json_schema" | None, and the schema of json_schema.
    json_mode: str | None = None
    json_schema: dict[str, Any] | None = None
    # False: the reply carries no usage (a server that sends none, or the no_usage directive).
    send_usage: bool = True


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a body, or the service's "body invalid" error."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise invalid(BODY_INVALID) from None
    if not isinstance(body, dict):
        raise invalid(BODY_INVALID)
    return body


def _model(catalog: Catalog, body: dict[str, Any], *, compatible: bool) -> ModelInfo:
    name = body.get("model")
    if not name:
        raise ApiError("BadRequest.EmptyModel")
    info = catalog.get(name) if isinstance(name, str) else None
    if info is None:
        if compatible:
            # Compatible mode answers an unknown model with 404 model_not_found (reference section 6).
            raise ApiError("ModelNotFound", MODEL_NOT_EXIST, 404, compatible_code="model_not_found")
        raise invalid(MODEL_NOT_EXIST)
    return info


def _content(message: dict[str, Any], *, compatible: bool, parts: bool = False) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None:
        if message.get("role") == "assistant" and message.get("tool_calls"):
            return ""
        raise invalid(CONTENT_REQUIRED)
    if compatible and isinstance(content, list):
        # OpenAI-style content parts; a text model reads their text.
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "".join(texts)  # type: ignore[arg-type]
    if parts and isinstance(content, list):
        return _native_parts_text(content)
    raise invalid(CONTENT_NOT_STRING)


def _native_parts_text(content: list[Any]) -> str:
    """The text of multimodal-path parts (``[{"text": ...}]``); other parts are refused."""
    texts: list[str] = []
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            kind = next(iter(part), "?") if isinstance(part, dict) and part else type(part).__name__
            raise invalid(PART_NOT_SERVED.format(kind=kind))
        texts.append(part["text"])
    return "".join(texts)


def check_messages(raw: Any, rules: str, *, compatible: bool, parts: bool = False) -> list[dict[str, Any]]:
    """Messages with string content, checked against the role rules (reference section 5.1)."""
    if not isinstance(raw, list):
        raise invalid(EITHER_PROMPT_OR_MESSAGES if not compatible else ERRORS["InvalidParameter"].message)
    if not raw:
        raise invalid("[] is too short")
    messages: list[dict[str, Any]] = []
    for message in raw:
        if not isinstance(message, dict) or message.get("role") not in ALLOWED_ROLES:
            raise invalid(ROLE_OR_EMPTY)
        content = _content(message, compatible=compatible, parts=parts)
        if not content and message["role"] in ("user", "system"):
            raise invalid(ROLE_OR_EMPTY)
        if content is message.get("content"):
            messages.append(message)
        else:
            messages.append({**message, "content": content})
    if not any(m["role"] == "user" for m in messages):
        raise invalid(NO_USER)
    if rules == "strict":
        _check_strict_order(messages)
    return messages


def _check_strict_order(messages: list[dict[str, Any]]) -> None:
    """The 2024 rules: system only first, user/assistant alternate, the last is user (or partial)."""
    turns: list[str] = []
    previous: dict[str, Any] | None = None
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            if index != 0:
                raise invalid(ROLE_OR_EMPTY)
        elif role == "tool":
            if previous is None or not (previous["role"] == "tool" or previous.get("tool_calls")):
                raise invalid(TOOL_WITHOUT_CALL)
        elif role == "assistant" and message.get("tool_calls"):
            # A tool-calling turn and its tool results stand in for one assistant turn.
            pass
        elif role in ("user", "assistant"):
            turns.append(role)
        previous = message
    for position, role in enumerate(turns):
        if role != ("user" if position % 2 == 0 else "assistant"):
            raise invalid(NOT_ALTERNATING)
    last = messages[-1]
    if last["role"] in ("user", "tool", "function", "plugin"):
        return
    if last["role"] == "assistant" and last.get("partial") is True:
        return
    # The service fails this in the model, not the gateway (reference section 5.1).
    raise ApiError("InternalError.Algo", LAST_NOT_USER, 500)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list):
        raise invalid(STOP_TYPES)
    if not stop:
        return
    if all(isinstance(s, str) for s in stop) or all(_integer(s) for s in stop):
        return
    if all(isinstance(s, list) and all(_integer(i) for i in s) for s in stop):
        return
    raise invalid(STOP_TYPES)


def check_parameters(params: dict[str, Any], model: ModelInfo, *, compatible: bool) -> int:
    """Range checks with the documented texts; returns the effective ``max_tokens``."""
    seed = params.get("seed")
    if seed is not None:
        if compatible:
            if not _integer(seed) or seed < 0:
                raise invalid(f"{seed} is lesser than the minimum of 0 - 'seed'")
            if seed > SEED_MAX_COMPATIBLE:
                raise invalid(f"{seed} is greater than the maximum of {SEED_MAX_COMPATIBLE} - 'seed'")
        elif not _integer(seed) or not 0 <= seed <= SEED_MAX_NATIVE:
            raise invalid(f"Range of seed should be [0, {SEED_MAX_NATIVE}]")
    top_p = params.get("top_p")
    if top_p is not None:
        if not _number(top_p):
            raise invalid("'top_p' must be Float")
        if not 0.0 < top_p <= 1.0:
            raise invalid("Range of top_p should be (0.0, 1.0]")
    temperature = params.get("temperature")
    if temperature is not None:
        if not _number(temperature):
            raise invalid("'temperature' must be Float")
        if not 0.0 <= temperature < 2.0:
            raise invalid("Temperature should be in [0.0, 2.0)")
    top_k = params.get("top_k")
    if top_k is not None:
        if not _integer(top_k):
            raise invalid(TOP_K_NOT_INTEGER)
        if top_k < 0:
            raise invalid("Parameter top_k be greater than or equal to 0")
    penalty = params.get("repetition_penalty")
    if penalty is not None and (not _number(penalty) or penalty <= 0):
        raise invalid("Repetition_penalty should be greater than 0.0")
    presence = params.get("presence_penalty")
    if presence is not None and (not _number(presence) or not -2.0 <= presence <= 2.0):
        raise invalid("Presence_penalty should be in [-2.0, 2.0]")
    n = params.get("n")
    if n is not None and (not _integer(n) or not 1 <= n <= 4):
        raise invalid("Range of n should be [1, 4]")
    _check_stop(params.get("stop"))
    ceiling = model.max_output_tokens
    max_tokens = params.get("max_tokens")
    if max_tokens is None:
        return model.default_max_tokens or ceiling or 2048
    if not _integer(max_tokens) or max_tokens < 1 or (ceiling is not None and max_tokens > ceiling):
        raise invalid(f"Range of max_tokens should be [1, {ceiling}]")
    return int(max_tokens)


def _check_input_length(messages: list[dict[str, Any]], model: ModelInfo, usage_mode: str) -> int:
    count = count_input(messages, model.name, usage_mode)
    limit = model.max_input_tokens
    if limit is not None and count > limit:
        raise invalid(f"Range of input length should be [1, {limit}]")
    return count


def _native_messages(inp: dict[str, Any], rules: str, parts: bool) -> list[dict[str, Any]]:
    prompt = inp.get("prompt")
    raw = inp.get("messages")
    history = inp.get("history")
    if raw is None and prompt is None:
        raise invalid(EITHER_PROMPT_OR_MESSAGES)
    if prompt is not None and not isinstance(prompt, str):
        raise invalid(CONTENT_NOT_STRING)
    combined: list[Any] = list(raw) if isinstance(raw, list) else ([] if raw is None else raw)
    if not isinstance(combined, list):
        raise invalid(EITHER_PROMPT_OR_MESSAGES)
    if isinstance(history, list):
        # The legacy {"user", "bot"} pairs come before the prompt.
        for turn in history:
            if isinstance(turn, dict):
                combined += [{"role": "user", "content": turn.get("user")}, {"role": "assistant", "content": turn.get("bot")}]
    if prompt is not None:
        # The prompt is appended as the last user message (reference section 1.3).
        combined.append({"role": "user", "content": prompt})
    return check_messages(combined, rules, compatible=False, parts=parts)


def validate_native(
    body: dict[str, Any],
    catalog: Catalog,
    *,
    rules: str,
    usage_mode: str,
    path: NativePath = "text",
    stream: bool = False,
) -> ChatRequest:
    """A native body on ``path`` → ChatRequest, or ApiError in the service's order of checks."""
    model = _model(catalog, body, compatible=False)
    model_rules = behaviour(model.name)
    if model_rules.path != path:
        # A stream hears it as HTTP 200 with an SSE error event (tongyi.py: "the url error also
        # arrives as a 200 SSE error event").
        raise ApiError("InvalidParameter", URL_ERROR, 400, stream_status=200)
    if "input" not in body or body["input"] is None:
        raise ApiError("BadRequest.EmptyInput")
    inp = body["input"]
    if not isinstance(inp, dict):
        raise ApiError("BadRequest.IllegalInput")
    params = body.get("parameters")
    if params is None:
        # Whether omission is refused is UNCONFIRMED; accepted, as public examples never test it.
        params = {}
    if not isinstance(params, dict):
        raise invalid(BODY_INVALID)
    multimodal = path == "multimodal"
    messages = _native_messages(inp, rules, parts=multimodal)
    max_tokens = check_parameters(params, model, compatible=False)
    result_format = params.get("result_format") or model.default_result_format
    if result_format not in ("text", "message"):
        raise invalid(RESULT_FORMAT_INVALID)
    if multimodal:
        result_format = "message"  # the multimodal path always answers with choices
    incremental = _incremental(params.get("incremental_output"), model_rules, stream)
    thinking, budget = check_thinking(params, model.name, model_rules, stream=stream, result_format=result_format,
                                      incremental=incremental)
    mode, schema = check_response_format(params, messages, json_word=True)
    count = _check_input_length(messages, model, usage_mode) + json_overhead(mode)
    return ChatRequest(model, messages, params, max_tokens, result_format, incremental, count,
                       stream=stream, thinking=thinking, thinking_budget=budget, json_mode=mode, json_schema=schema)


def _incremental(value: Any, rules: Behaviour, stream: bool) -> bool:
    """The effective ``incremental_output``: the model's default when not sent; a locked false refused."""
    if value is None:
        return rules.incremental_default
    # Only checked on a stream, where the parameter means something (UNCONFIRMED otherwise).
    if stream and rules.incremental_locked and value is False:
        raise invalid(INCREMENTAL_LOCKED)
    return bool(value)


def check_thinking(
    params: dict[str, Any], model: str, rules: Behaviour, *, stream: bool, result_format: str, incremental: bool
) -> tuple[bool, int]:
    """Whether a request to ``model`` (behaving as ``rules``) thinks, and its budget; or the
    documented refusal (PROTO §1.3, WAVE2 A.1).

    A ``thinking_budget`` on a request that does not think is ignored (UNCONFIRMED).
    """
    enable = params.get("enable_thinking")
    if enable is not None and not isinstance(enable, bool):
        raise invalid(ENABLE_THINKING_NOT_BOOLEAN)
    if enable is True and rules.thinking == "none":
        raise ApiError("InvalidParameter.NotSupportEnableThinking", f"The model {model} does not support enable_thinking.",
                       400, compatible_code="invalid_parameter_error")
    if rules.thinking == "only" and not stream and rules.stream_only_message:
        raise invalid(rules.stream_only_message)
    if not rules.thinks(enable):
        return False, 0
    ceiling = rules.max_thinking_tokens or 0
    budget = params.get("thinking_budget")
    if budget is not None and (not _integer(budget) or not 0 < budget <= ceiling):
        raise invalid(f"The thinking_budget parameter must be a positive integer and not greater than {ceiling}")
    if not stream and rules.thinking_stream_only and rules.stream_only_message:
        raise invalid(rules.stream_only_message)
    if result_format != "message":
        raise invalid(THINKING_NEEDS_MESSAGE)
    if stream and not incremental:
        raise invalid(THINKING_NEEDS_INCREMENTAL)
    response_format = params.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        raise invalid(JSON_WITH_THINKING)
    return True, int(budget) if budget is not None else ceiling


COMPATIBLE_SAMPLING_KEYS = (
    "seed", "temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "n", "stop", "max_tokens", "enable_search", "response_format",
    "enable_thinking", "thinking_budget",
)


def validate_compatible(body: dict[str, Any], catalog: Catalog, *, rules: str, usage_mode: str) -> ChatRequest:
    """An OpenAI-compatible body → ChatRequest (parameters under their native names)."""
    model = _model(catalog, body, compatible=True)
    messages, params, max_tokens, stream, include_usage = _chat_fields(body, model, COMPATIBLE_SAMPLING_KEYS, rules)
    # Compatible mode has no result_format and streams deltas only (reference section 6).
    thinking, budget = check_thinking(params, model.name, behaviour(model.name), stream=stream, result_format="message",
                                      incremental=True)
    mode, schema = check_response_format(params, messages, json_word=True)
    count = _check_input_length(messages, model, usage_mode) + json_overhead(mode)
    return ChatRequest(model, messages, params, max_tokens, "message", True, count, stream, include_usage,
                       thinking=thinking, thinking_budget=budget, json_mode=mode, json_schema=schema)


def _chat_fields(
    body: dict[str, Any], model: ModelInfo, sampling_keys: tuple[str, ...], rules: str
) -> tuple[list[dict[str, Any]], dict[str, Any], int, bool, bool]:
    """A chat completion's checked messages, the parameters among ``sampling_keys`` (``max_completion_tokens``
    read as ``max_tokens``), the effective ``max_tokens``, and whether it streams and asks for usage."""
    if "messages" not in body:
        raise invalid(ERRORS["InvalidParameter"].message)
    messages = check_messages(body["messages"], rules, compatible=True)
    params = {key: body[key] for key in sampling_keys if body.get(key) is not None}
    if "max_tokens" not in params and body.get("max_completion_tokens") is not None:
        params["max_tokens"] = body["max_completion_tokens"]
    max_tokens = check_parameters(params, model, compatible=True)
    stream = body.get("stream") is True
    options = body.get("stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    return messages, params, max_tokens, stream, include_usage


def check_response_format(
    params: dict[str, Any], messages: list[dict[str, Any]], *, json_word: bool
) -> tuple[str | None, dict[str, Any] | None]:
    """The json mode and schema of ``response_format``, or the refusal; ``json_word``: DashScope's
    rule that json_object needs "json" in the messages (WAVE2 B.1)."""
    try:
        mode, schema = json_mode(params)
        if mode == "json_object" and json_word:
            check_json_word(messages)
    except FormatError as exc:
        raise invalid(str(exc)) from None
    return mode, schema


def json_overhead(mode: str | None) -> int:
    """json_object adds 2 input tokens on DashScope (PROTO §9: 25 vs 23); json_schema's is UNCONFIRMED (0).
    The client's preflight counts the same (``tokens.response_format_tokens``)."""
    return response_format_tokens(mode)


# vLLM's over-long prompt (WAVE2 D.1, ``renderers/params.py``).
LOCAL_TOO_LONG = ("This model's maximum context length is {limit} tokens. However, your prompt contains {count} "
                  "input tokens, which exceeds this limit even without any output tokens.")
# Not in WAVE2 D.1: vLLM's unknown-model text, used for every local server (UNCONFIRMED).
LOCAL_MODEL_MISSING = "The model `{name}` does not exist."


def validate_local(body: dict[str, Any], catalog: Catalog, server: Server, *, send_usage: bool) -> ChatRequest:
    """A chat completion as a local server reads it (WAVE2 D.1): only its sampling keys count,
    thinking is switched where it reads the switch, roles are not ordered, DashScope's json
    refusals do not apply, and the prompt's length is checked against the model's context."""
    name = body.get("model")
    model = catalog.get(name) if isinstance(name, str) else None
    if model is None:
        raise ApiError("ModelNotFound", LOCAL_MODEL_MISSING.format(name=name), 404)
    messages, params, max_tokens, stream, include_usage = _chat_fields(body, model, server.sampling_keys, "lenient")
    thinking, budget = _local_thinking(body, model.name, server)
    mode, schema = check_response_format(params, messages, json_word=False)
    count = count_input(messages, model.name, "chatml")
    limit = model.max_input_tokens
    if limit is not None and count > limit and server.name != "ollama":  # Ollama truncates silently
        raise invalid(LOCAL_TOO_LONG.format(limit=limit, count=count))
    return ChatRequest(model, messages, params, max_tokens, "message", True, count, stream, include_usage,
                       thinking=thinking, thinking_budget=budget, json_mode=mode, json_schema=schema,
                       send_usage=send_usage)


def _local_thinking(body: dict[str, Any], model: str, server: Server) -> tuple[bool, int]:
    """Whether a local server's reply thinks, and its budget: a hybrid model thinks unless switched
    off where the server reads the switch (the chat template's default, UNCONFIRMED); a model
    that cannot think ignores the switch."""
    rules = behaviour(model)
    enable = server.thinking_switch(body) if server.thinking_switch is not None else None
    thinks = rules.thinking == "only" or (rules.thinking == "hybrid" and enable is not False)
    if not thinks:
        return False, 0
    budget = body.get(server.budget_key) if server.budget_key else None
    if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
        return True, budget
    return True, rules.max_thinking_tokens or 1 << 20  # no budget: the thought's natural length
