"""The DashScope wire shapes, shared by the client and the emulator.

Paths, error codes with their HTTP statuses and canonical messages, the native request
body and its canonical form (what a fingerprint hashes), and the mapping from a reply body
to a ``Reply``. See shared/dashscope-protocol.md sections 1-4.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .types import Reply, Request

DASHSCOPE = "dashscope"
"""The protocol name of the native DashScope API (the only one today)."""

DEFAULT_BASE_URL = "https://dashscope.aliyuncs.com/api/v1"
NATIVE_PATH = "/services/aigc/text-generation/generation"
MULTIMODAL_PATH = "/services/aigc/multimodal-generation/generation"
"""Where Qwen3.5 and later, VL and audio models answer (research-wave2.md, item 1)."""
NATIVE_PATHS = {"text": NATIVE_PATH, "multimodal": MULTIMODAL_PATH}
"""The native path of each ``catalog.NativePath``."""
COMPATIBLE_PATH = "/compatible-mode/v1/chat/completions"
OPENAI = "openai"
"""The protocol name of OpenAI's chat completions (DashScope compatible mode, local servers)."""
COMPATIBLE_BASE_URL = "https://dashscope.aliyuncs.com/compatible-mode/v1"
CHAT_COMPLETIONS_ROUTE = "/chat/completions"
API_PREFIX = "/api/v1"

SSE_HEADER = "X-DashScope-SSE"
REQUEST_ID_HEADER = "X-Request-ID"


class ErrorSpec(NamedTuple):
    status: int
    code: str
    message: str
    compatible_code: str


# The service's errors as documented (protocol reference section 4.2).
ERRORS: dict[str, ErrorSpec] = {
    spec.code: spec
    for spec in (
        ErrorSpec(400, "InvalidParameter", "Required parameter(s) missing or invalid, please check the request parameters.", "invalid_parameter_error"),
        ErrorSpec(400, "DataInspectionFailed", "Input or output data may contain inappropriate content.", "data_inspection_failed"),
        ErrorSpec(400, "Arrearage", "Access denied, please make sure your account is in good standing.", "Arrearage"),
        ErrorSpec(400, "BadRequest.EmptyInput", "Required input parameter missing from request.", "invalid_parameter_error"),
        ErrorSpec(400, "BadRequest.EmptyParameters", 'Required parameter "parameters" missing from request.', "invalid_parameter_error"),
        ErrorSpec(400, "BadRequest.EmptyModel", 'Required parameter "model" missing from request.', "invalid_parameter_error"),
        ErrorSpec(400, "BadRequest.IllegalInput", "The input parameter requires json format.", "invalid_parameter_error"),
        ErrorSpec(401, "InvalidApiKey", "Invalid API-key provided.", "invalid_api_key"),
        ErrorSpec(403, "AccessDenied", "Access denied.", "access_denied"),
        ErrorSpec(403, "AccessDenied.Unpurchased", "Access to model denied. Please make sure you are eligible for using the model.", "access_denied"),
        ErrorSpec(404, "ModelNotFound", "Model can not be found.", "model_not_found"),
        ErrorSpec(413, "BadRequest.TooLarge", "Payload Too Large.", "invalid_parameter_error"),
        ErrorSpec(429, "Throttling", "Requests throttling triggered.", "limit_requests"),
        ErrorSpec(429, "Throttling.RateQuota", "Requests rate limit exceeded, please try again later.", "limit_requests"),
        ErrorSpec(429, "Throttling.BurstRate", "Request rate increased too quickly. To ensure system stability, please adjust your client logic to scale requests more smoothly over time.", "limit_burst_rate"),
        ErrorSpec(429, "Throttling.AllocationQuota", "Allocated quota exceeded, please increase your quota limit.", "insufficient_quota"),
        ErrorSpec(429, "LimitRequests", "You exceeded your current requests list.", "limit_requests"),
        ErrorSpec(429, "PrepaidBillOverdue", "The prepaid bill is overdue.", "PrepaidBillOverdue"),
        ErrorSpec(429, "PostpaidBillOverdue", "The postpaid bill is overdue.", "PostpaidBillOverdue"),
        ErrorSpec(429, "CommodityNotPurchased", "Commodity has not purchased yet.", "CommodityNotPurchased"),
        ErrorSpec(500, "InternalError", "An internal error has occured, please try again later or contact service support.", "internal_error"),
        ErrorSpec(500, "InternalError.Algo", "An internal error has occured during execution, please try again later or contact service support.", "internal_error"),
        ErrorSpec(500, "RequestTimeOut", "Request timed out, please try again later.", "request_timeout"),
        ErrorSpec(503, "ModelUnavailable", "Model is unavailable, please try again later.", "model_unavailable"),
        ErrorSpec(503, "ModelServingError", "Too many requests. Your requests are being throttled due to system capacity limits. Please try again later.", "model_serving_error"),
        ErrorSpec(504, "GatewayTimeout", "Gateway timeout.", "gateway_timeout"),
    )
}

# Which limit a 429 code reports, for throttling the whole pool the right way.
THROTTLING_KINDS = {
    "Throttling": "requests",
    "Throttling.RateQuota": "requests",
    "LimitRequests": "requests",
    "Throttling.AllocationQuota": "tokens",
    "Throttling.BurstRate": "burst",
    "limit_requests": "requests",
    "insufficient_quota": "tokens",
    "limit_burst_rate": "burst",
}
# 429s that will not pass by waiting: billing problems and an exhausted free quota.
NON_TRANSIENT_429_CODES = frozenset({"PrepaidBillOverdue", "PostpaidBillOverdue", "CommodityNotPurchased"})
FREE_QUOTA_EXHAUSTED_MESSAGE = "Free allocated quota exceeded."


def error_body_status(body: Mapping[str, Any]) -> int:
    """The HTTP status an error body sent with 200 (or as an SSE ``event:error``) stands for:
    its code's documented status, else 400 (what SDK 2.0.2 reports for an in-stream error)."""
    code = str(body.get("code") or "")
    return ERRORS[code].status if code in ERRORS else 400


def native_error_body(code: str, message: str, request_id: str) -> dict[str, Any]:
    """The native error JSON: ``{"code", "message", "request_id"}``."""
    return {"code": code, "message": message, "request_id": request_id}


def compatible_error_body(code: str, message: str, request_id: str, error_type: str = "invalid_request_error") -> dict[str, Any]:
    """The OpenAI-compatible error JSON."""
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}, "request_id": request_id}


def native_body(request: Request) -> dict[str, Any]:
    """The native JSON body of ``request``: ``{"model", "input": {"messages"}, "parameters"}``."""
    return {"model": request.model, "input": {"messages": request.messages}, "parameters": request.parameters}


def multimodal_body(request: Request) -> dict[str, Any]:
    """The body of ``request`` on the multimodal path: each message's content as a list of parts,
    ``[{"text": ...}]``, the shape that path reads (research-wave2.md item 1; its captures)."""
    messages = [
        {**message, "content": [{"text": content}]} if isinstance(content := message.get("content"), str) else message
        for message in request.messages
    ]
    return {"model": request.model, "input": {"messages": messages}, "parameters": request.parameters}


def content_text(content: Any) -> str:
    """A message's content as text: a string as it is, a multimodal list of parts joined
    (each part's ``text``; parts without text, such as images, add nothing)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    raise MalformedReply(f"not a generation result: the content is a {type(content).__name__}")


_canonical_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode

CanonicalFrame = Callable[[str, Mapping[str, Any]], tuple[str, str]]
"""``(model, parameters) -> (head, tail)``: a protocol's canonical JSON of a request is
``head + messages + tail``, where ``messages`` is the comma-joined canonical JSON of each
message (``{"content":...,"role":...}``). Head and tail are fixed per run, so rendering
writes only the messages per row."""


def native_canonical_frame(model: str, parameters: Mapping[str, Any]) -> tuple[str, str]:
    """The fixed parts of the native body's canonical JSON (sorted keys, compact, UTF-8).

    ``{"input":{"messages":[...]},"model":...,"parameters":{...}}``: exactly what
    ``json.dumps(native_body(request), sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)`` writes, so fingerprints stay those of every earlier release.
    """
    head = '{"input":{"messages":['
    tail = ']},"model":' + _canonical_dumps(model) + ',"parameters":' + _canonical_dumps(dict(parameters)) + "}"
    return head, tail


COMPATIBLE_NOT_SENT = frozenset({"result_format", "incremental_output"})
"""Native parameters with no meaning in chat completions (the message format is its only one)."""


def compatible_canonical_frame(model: str, parameters: Mapping[str, Any]) -> tuple[str, str]:
    """The fixed parts of the chat-completions request's canonical JSON (sorted keys, compact).

    ``{..., "messages":[...], "model":..., ...}``: the model, the messages and every sent
    parameter under its DashScope name at the top level, as DashScope's compatible mode reads
    them. Where a local server reads an extension elsewhere is a detail of its dialect: the
    cache is keyed per service (its base URL) already, so it need not be hashed.
    """
    body = {key: value for key, value in parameters.items() if key not in COMPATIBLE_NOT_SENT}
    body["model"] = model
    body["messages"] = []
    # Keys are sorted and a quote inside a string is escaped, so the key is the one match.
    head, _, tail = _canonical_dumps(body).partition('"messages":[]')
    return head + '"messages":[', "]" + tail


CANONICAL_FRAMES: dict[str, CanonicalFrame] = {DASHSCOPE: native_canonical_frame, OPENAI: compatible_canonical_frame}
"""Each protocol's canonical form, by protocol name: what the fingerprint of a request hashes."""


class MalformedReply(ValueError):
    """A 200 body that is not a DashScope generation result."""


def parse_native_reply(body: Any) -> Reply:
    """Read a native 200 body of either result format, on either path, into a Reply.

    A thinking model's ``reasoning_content`` becomes ``Reply.reasoning`` (None when absent
    or empty) and ``usage.output_tokens_details.reasoning_tokens`` its count.
    """
    try:
        usage = body["usage"]
        text, reasoning, finish_reason = _output_fields(body["output"])
        input_tokens = int(usage["input_tokens"])
        output_tokens = int(usage["output_tokens"])
        reasoning_tokens, cached_tokens = usage_details(usage)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise MalformedReply(f"not a generation result: missing or wrong {exc!s}") from None
    if not isinstance(text, str) or not isinstance(finish_reason, str):
        raise MalformedReply("not a generation result: text or finish_reason is not a string")
    if reasoning is not None and not isinstance(reasoning, str):
        raise MalformedReply("not a generation result: reasoning_content is not a string")
    return Reply(
        text,
        finish_reason,
        input_tokens,
        output_tokens,
        body.get("request_id"),
        reasoning=reasoning,
        reasoning_tokens=reasoning_tokens,
        cached_tokens=cached_tokens,
    )


def _output_fields(output: Any) -> tuple[Any, Any, Any]:
    """``(text, reasoning, finish_reason)`` of a body's ``output``, either result format, either
    path, unchecked; raises KeyError, IndexError, TypeError or AttributeError when it has no such shape."""
    if output.get("choices"):
        choice = output["choices"][0]
        message = choice["message"]
        return content_text(message["content"]), message.get("reasoning_content") or None, choice.get("finish_reason")
    return output["text"], None, output.get("finish_reason")


def read_stream_event(body: Any) -> tuple[str, str | None, str | None, Mapping[str, Any] | None]:
    """``(text, reasoning, finish_reason, usage)`` of one incremental SSE ``result`` event.

    The text and reasoning are this event's deltas (``""`` and None when it has none);
    ``finish_reason`` is None until the last event (the service writes ``"null"``); ``usage``
    is the cumulative usage so far, None if the event has none.
    """
    try:
        text, reasoning, finish_reason = _output_fields(body["output"])
        usage = body.get("usage")
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise MalformedReply(f"not a generation stream event: missing or wrong {exc!s}") from None
    if not isinstance(text, str) or (reasoning is not None and not isinstance(reasoning, str)):
        raise MalformedReply("not a generation stream event: content or reasoning_content is not text")
    if finish_reason == "null" or not isinstance(finish_reason, str):  # "null" (a string) until the end
        finish_reason = None
    return text, reasoning, finish_reason, usage if isinstance(usage, dict) else None


def usage_details(usage: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """``(reasoning_tokens, cached_tokens)`` of a usage object; None where it does not say."""
    output_details = usage.get("output_tokens_details")
    prompt_details = usage.get("prompt_tokens_details")
    reasoning = output_details.get("reasoning_tokens") if isinstance(output_details, dict) else None
    cached = prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else None
    return (int(reasoning) if reasoning is not None else None, int(cached) if cached is not None else None)


def compatible_usage(usage: Any) -> tuple[int, int, int | None, int | None] | None:
    """``(input, output, reasoning, cached)`` tokens of a chat-completions ``usage``; None when
    it has no counts (absent, null, or a server's partial object): usage unknown, not zero."""
    if not isinstance(usage, dict):
        return None
    try:
        input_tokens, output_tokens = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    except (KeyError, TypeError, ValueError):
        return None
    output_details = usage.get("completion_tokens_details")
    prompt_details = usage.get("prompt_tokens_details")
    reasoning = output_details.get("reasoning_tokens") if isinstance(output_details, dict) else None
    cached = prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else None
    return (
        input_tokens,
        output_tokens,
        int(reasoning) if isinstance(reasoning, int) else None,
        int(cached) if isinstance(cached, int) else None,
    )


def message_reasoning(message: Mapping[str, Any]) -> Any:
    """A message's (or delta's) reasoning: ``reasoning_content`` (DashScope, SGLang, llama.cpp)
    or ``reasoning`` (vLLM since late 2025, Ollama); research-wave2 D.1."""
    return message.get("reasoning_content") or message.get("reasoning") or None


def read_compatible_choice(body: Any) -> tuple[str, str | None, str | None]:
    """``(text, reasoning, finish_reason)`` of a chat completion's first choice (message or delta);
    raises MalformedReply when it has no such shape. A null content (a reply that is all
    reasoning, or a tool call) is the empty text."""
    try:
        choice = body["choices"][0]
        message = choice["message"] if "message" in choice else choice["delta"]
        text = message.get("content")
        reasoning = message_reasoning(message)
        finish_reason = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise MalformedReply(f"not a chat completion: missing or wrong {exc!s}") from None
    if text is None:
        text = ""
    elif not isinstance(text, str):
        text = content_text(text)
    if reasoning is not None and not isinstance(reasoning, str):
        raise MalformedReply("not a chat completion: the reasoning is not text")
    if finish_reason is not None and not isinstance(finish_reason, str):
        raise MalformedReply("not a chat completion: finish_reason is not a string")
    return text, reasoning, finish_reason
