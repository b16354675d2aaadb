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
COMPATIBLE_PATH = "/compatible-mode/v1/chat/completions"
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


def native_error_body(code: str, message: str, request_id: str) -> dict[str, Any]:
    """The native error JSON: ``{"code", "message", "request_id"}``."""
    return {"code": code, "message": message, "request_id": request_id}


def compatible_error_body(code: str, message: str, request_id: str, error_type: str = "invalid_request_error") -> dict[str, Any]:
    """The OpenAI-compatible error JSON."""
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}, "request_id": request_id}


def native_body(request: Request) -> dict[str, Any]:
    """The native JSON body of ``request``: ``{"model", "input": {"messages"}, "parameters"}``."""
    return {"model": request.model, "input": {"messages": request.messages}, "parameters": request.parameters}


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


CANONICAL_FRAMES: dict[str, CanonicalFrame] = {DASHSCOPE: native_canonical_frame}
"""Each protocol's canonical form, by protocol name: what the fingerprint of a request hashes."""


class MalformedReply(ValueError):
    """A 200 body that is not a DashScope generation result."""


def parse_native_reply(body: Any) -> Reply:
    """Read a native 200 body of either result format into a Reply."""
    try:
        output = body["output"]
        usage = body["usage"]
        if output.get("choices"):
            choice = output["choices"][0]
            text = choice["message"]["content"]
            finish_reason = choice["finish_reason"]
        else:
            text = output["text"]
            finish_reason = output["finish_reason"]
        input_tokens = int(usage["input_tokens"])
        output_tokens = int(usage["output_tokens"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise MalformedReply(f"not a generation result: missing or wrong {exc!s}") from None
    if not isinstance(text, str) or not isinstance(finish_reason, str):
        raise MalformedReply("not a generation result: text or finish_reason is not a string")
    return Reply(text, finish_reason, input_tokens, output_tokens, body.get("request_id"))
