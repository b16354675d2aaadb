"""The DashScope backend: every wire outcome becomes a Reply or exactly one BackendError."""

from __future__ import annotations

import email.utils
import json
import time
import traceback

import aiohttp
import httpx
import pytest

from qwen_batch.backends import DashScopeBackend, collect
from qwen_batch.errors import AuthError, BackendError, BadRequest, RateLimited, ServerError, TransportError, UnknownModel
from qwen_batch.types import Reply, Request, UnitKey
from qwen_batch.wire import NATIVE_PATH

KEY = "sk-secret-0123456789abcdef"
BASE = "http://dashscope.test/api/v1"
REQUEST = Request(
    index=0,
    row_id="r0",
    model="qwen-turbo",
    messages=[{"role": "user", "content": "hi"}],
    parameters={"seed": 3, "max_tokens": 10, "result_format": "text"},
    fingerprint="f",
    input_tokens=5,
    max_tokens=10,
    unit=UnitKey(0),
)
TEXT_REPLY = {"output": {"finish_reason": "stop", "text": "hello"}, "usage": {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6}, "request_id": "rid-1"}
MESSAGE_REPLY = {"output": {"choices": [{"finish_reason": "length", "message": {"role": "assistant", "content": "hey"}}]}, "usage": {"input_tokens": 5, "output_tokens": 2}, "request_id": "rid-2"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def backend_for(handler) -> DashScopeBackend:
    return DashScopeBackend(BASE, KEY, timeout_s=5, max_connections=4, transport=httpx.MockTransport(handler))


async def call(handler) -> Reply:
    async with backend_for(handler) as backend:
        return await collect(backend.stream(REQUEST))


async def failure(handler) -> BackendError:
    with pytest.raises(BackendError) as info:
        await call(handler)
    return info.value


def respond(status: int, body=None, *, content: bytes | None = None, headers=None):
    def handler(request: httpx.Request) -> httpx.Response:
        if body is not None:
            return httpx.Response(status, json=body, headers=headers)
        return httpx.Response(status, content=content or b"", headers=headers)

    return handler


def assert_no_key(error: BaseException) -> None:
    text = "".join(traceback.format_exception(error)) + str(error) + repr(error) + repr(vars(error))
    assert KEY not in text


@pytest.mark.anyio
async def test_sends_the_body_with_bearer_key_and_json_content_type_to_the_native_path() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=TEXT_REPLY)

    await call(handler)
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == BASE + NATIVE_PATH
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("qwen-batch/")
    # The native body, byte for byte as before the neutral request: keys in this order, compact.
    assert request.content == (
        b'{"model":"qwen-turbo","input":{"messages":[{"role":"user","content":"hi"}]},'
        b'"parameters":{"seed":3,"max_tokens":10,"result_format":"text"}}'
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (TEXT_REPLY, Reply("hello", "stop", 5, 1, "rid-1")),
        (MESSAGE_REPLY, Reply("hey", "length", 5, 2, "rid-2")),
    ],
)
async def test_a_200_of_either_result_format_parses(body, expected) -> None:
    assert await call(respond(200, body)) == expected


@pytest.mark.anyio
async def test_the_request_id_header_fills_in_when_the_body_has_none() -> None:
    body = {k: v for k, v in TEXT_REPLY.items() if k != "request_id"}
    reply = await call(respond(200, body, headers={"X-Request-ID": "hdr-id"}))
    assert reply.request_id == "hdr-id"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "InvalidParameter", BadRequest),
        (400, "DataInspectionFailed", BadRequest),
        (404, "ModelNotFound", UnknownModel),
        (413, "BadRequest.TooLarge", BadRequest),
        (401, "InvalidApiKey", AuthError),
        (403, "AccessDenied", AuthError),
        (408, "RequestTimeOut", ServerError),
        (500, "InternalError", ServerError),
        (502, "BadGateway", ServerError),
        (503, "ModelUnavailable", ServerError),
        (504, "GatewayTimeout", ServerError),
        (429, "PrepaidBillOverdue", BadRequest),
        (429, "PostpaidBillOverdue", BadRequest),
        (429, "CommodityNotPurchased", BadRequest),
    ],
)
async def test_each_status_maps_to_its_error_class_with_the_service_fields(status, code, cls) -> None:
    error = await failure(respond(status, {"code": code, "message": "the text", "request_id": "rid"}))
    assert type(error) is cls
    assert (error.code, error.message, error.request_id, error.status) == (code, "the text", "rid", status)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("Throttling", "requests"),
        ("Throttling.RateQuota", "requests"),
        ("LimitRequests", "requests"),
        ("Throttling.AllocationQuota", "tokens"),
        ("Throttling.BurstRate", "burst"),
        ("SomethingNew", "requests"),
    ],
)
async def test_a_429_is_rate_limited_with_the_limit_kind(code, kind) -> None:
    error = await failure(respond(429, {"code": code, "message": "slow down", "request_id": "rid"}))
    assert isinstance(error, RateLimited)
    assert (error.kind, error.retry_after, error.request_id) == (kind, None, "rid")


@pytest.mark.anyio
async def test_free_quota_exhausted_is_a_bad_request_not_a_rate_limit() -> None:
    body = {"code": "Throttling.AllocationQuota", "message": "Free allocated quota exceeded.", "request_id": "r"}
    error = await failure(respond(429, body))
    assert type(error) is BadRequest


@pytest.mark.anyio
async def test_retry_after_in_seconds_is_read() -> None:
    error = await failure(respond(429, {"code": "Throttling", "message": "m"}, headers={"Retry-After": "7"}))
    assert isinstance(error, RateLimited) and error.retry_after == 7.0


@pytest.mark.anyio
async def test_retry_after_as_an_http_date_is_read() -> None:
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    error = await failure(respond(429, {"code": "Throttling", "message": "m"}, headers={"Retry-After": date}))
    assert isinstance(error, RateLimited) and 27.0 <= error.retry_after <= 30.0


@pytest.mark.anyio
async def test_an_unreadable_retry_after_is_ignored() -> None:
    error = await failure(respond(429, {"code": "Throttling", "message": "m"}, headers={"Retry-After": "soon"}))
    assert isinstance(error, RateLimited) and error.retry_after is None


@pytest.mark.anyio
async def test_an_sse_error_body_is_read() -> None:
    body = (
        b'id:1\nevent:error\n:HTTP_STATUS/400\ndata:{"request_id":"req-1","code":"Arrearage","type":"Arrearage",'
        b'"message":"Access denied, please make sure your account is in good standing."}\n\n'
    )
    error = await failure(respond(400, content=body, headers={"content-type": "text/event-stream;charset=UTF-8"}))
    assert type(error) is BadRequest
    assert (error.code, error.request_id) == ("Arrearage", "req-1")


@pytest.mark.anyio
async def test_an_sse_429_body_is_rate_limited() -> None:
    body = b'id:1\nevent:error\n:HTTP_STATUS/429\ndata:{"code":"Throttling.AllocationQuota","message":"m","request_id":"q"}\n\n'
    error = await failure(respond(429, content=body))
    assert isinstance(error, RateLimited) and error.kind == "tokens"


@pytest.mark.anyio
async def test_an_unshaped_error_body_gets_an_http_code_and_the_start_of_the_text() -> None:
    error = await failure(respond(502, content=b"<html>  Bad   gateway " + b"x" * 1000, headers={"X-Request-ID": "h"}))
    assert type(error) is ServerError
    assert error.code == "HTTP502"
    assert error.message.startswith("<html> Bad gateway x")
    assert len(error.message) <= 210
    assert error.request_id == "h"


@pytest.mark.anyio
async def test_an_empty_error_body_still_says_the_status() -> None:
    error = await failure(respond(418))
    assert type(error) is BadRequest and error.code == "HTTP418" and "418" in error.message


@pytest.mark.anyio
async def test_a_200_with_an_error_body_is_translated_by_its_code() -> None:
    error = await failure(respond(200, {"code": "InternalError", "message": "m", "request_id": "r"}))
    assert type(error) is ServerError and error.code == "InternalError"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "content",
    [b"<html>not json</html>", b'{"output": 1, "usage": {}}', b'{"output": "x", "usage": {"input_tokens": 1, "output_tokens": 1}}', b"[]", b""],
)
async def test_a_200_that_is_not_a_generation_result_is_a_malformed_reply(content) -> None:
    error = await failure(respond(200, content=content))
    assert type(error) is TransportError and error.code == "MalformedReply"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "text",
    ['{"output": {"text": "a", "finish_reason": "stop"}, "usage": {"input_tokens": NaN, "output_tokens": 1}}',
     '{"output": {"text": "\\ud800", "finish_reason": "stop"}, "usage": {"input_tokens": 1, "output_tokens": 1}}'],
    ids=["NaN", "lone surrogate"],
)
async def test_a_200_that_only_a_lenient_json_reader_accepts_is_a_malformed_reply(text) -> None:
    """Python's json reads these; a text that cannot be written back as UTF-8 must not reach the checkpoint."""
    json.loads(text)
    error = await failure(respond(200, content=text.encode()))
    assert type(error) is TransportError and error.code == "MalformedReply"


@pytest.mark.anyio
@pytest.mark.parametrize("cut", [10, 40, 60, -1])
async def test_a_200_cut_off_mid_json_is_a_truncated_reply(cut) -> None:
    error = await failure(respond(200, content=json.dumps(TEXT_REPLY).encode()[:cut]))
    assert type(error) is TransportError and error.code == "TruncatedReply"


@pytest.mark.anyio
async def test_a_body_shorter_than_its_content_length_is_a_truncated_reply() -> None:
    body = json.dumps(TEXT_REPLY).encode()
    error = await failure(respond(200, content=body + b"garbage", headers={"content-length": str(len(body) + 100)}))
    assert type(error) is TransportError and error.code == "TruncatedReply"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (httpx.ConnectTimeout("connect timed out"), "Timeout"),
        (httpx.ReadTimeout("read timed out"), "Timeout"),
        (httpx.PoolTimeout("pool"), "Timeout"),
        (httpx.ConnectError("refused"), "ConnectionError"),
        (httpx.ReadError("reset by peer"), "ConnectionError"),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), "ConnectionError"),
        (
            httpx.RemoteProtocolError("peer closed connection without sending complete message body: received 10 bytes"),
            "TruncatedReply",
        ),
        (aiohttp.ServerDisconnectedError(), "ConnectionError"),
        (aiohttp.ClientPayloadError("Response payload is not completed"), "TruncatedReply"),
        (aiohttp.SocketTimeoutError("Timeout on reading data from socket"), "Timeout"),
        (ConnectionResetError("reset"), "ConnectionError"),
    ],
)
async def test_each_transport_exception_is_a_transport_error_with_its_code(exc, code) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    error = await failure(handler)
    assert type(error) is TransportError and error.code == code
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


@pytest.mark.anyio
async def test_httpx_aiohttp_wrapped_errors_are_classified_by_the_aiohttp_original() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        # What httpx_aiohttp raises for a dropped connection: ConnectTimeout from ServerDisconnectedError.
        try:
            raise aiohttp.ServerDisconnectedError()
        except aiohttp.ServerDisconnectedError as original:
            raise httpx.ConnectTimeout("Server disconnected") from original

    error = await failure(handler)
    assert error.code == "ConnectionError"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "handler",
    [
        respond(401, {"code": "InvalidApiKey", "message": f"Invalid API-key provided: {KEY}", "request_id": "r"}),
        respond(400, content=f"bad key {KEY}".encode()),
        respond(200, content=f"{{not json {KEY}".encode()),
    ],
)
async def test_the_key_never_appears_in_an_error_even_when_the_server_echoes_it(handler) -> None:
    assert_no_key(await failure(handler))


@pytest.mark.anyio
async def test_the_key_never_appears_in_a_transport_error_or_its_traceback() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"failed with headers {request.headers.get('authorization')}", request=request)

    assert_no_key(await failure(handler))


def test_the_key_is_not_in_the_backend_repr() -> None:
    backend = DashScopeBackend(BASE, KEY, timeout_s=1, max_connections=1, transport=httpx.MockTransport(respond(200)))
    assert KEY not in repr(backend)
