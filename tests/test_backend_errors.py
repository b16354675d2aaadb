"""The one shared translation of the wire into the error tree: every mapped case maps, key scrubbed."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import httpx
import pytest

from qwen_batch.backends.errors import TRANSPORT_EXCEPTIONS, ErrorTranslator, retry_after
from qwen_batch.errors import (
    AuthError,
    BadRequest,
    EndpointNotFound,
    ModelNotOnEndpoint,
    ParameterRefused,
    RateLimited,
    ServerError,
    TransportError,
    UnknownModel,
)
from qwen_batch.wire import ERRORS

KEY = "sk-shared-errors-0123456789"
URL = "http://dashscope.test/api/v1/services/aigc/text-generation/generation"
ERRORS_OF = ErrorTranslator(KEY, URL)


def expected_class(status: int, code: str) -> type:
    """What each documented (status, code) of the service must become."""
    if code == "ModelNotFound":
        return UnknownModel
    if status == 429:
        return BadRequest if code in {"PrepaidBillOverdue", "PostpaidBillOverdue", "CommodityNotPurchased"} else RateLimited
    if status in (401, 403):
        return AuthError
    if status >= 500:
        return ServerError
    return BadRequest


@pytest.mark.parametrize("spec", list(ERRORS.values()), ids=lambda spec: spec.code)
def test_every_documented_service_error_maps_to_its_class(spec) -> None:
    body = json.dumps({"code": spec.code, "message": spec.message, "request_id": "rid"}).encode()
    error = ERRORS_OF.status_error(spec.status, body, {}, sent_parameters=("seed", "max_tokens"))
    assert type(error) is expected_class(spec.status, spec.code)
    assert (error.code, error.message, error.status, error.request_id) == (spec.code, spec.message, spec.status, "rid")


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (404, b"", EndpointNotFound),
        (405, b"", EndpointNotFound),
        (400, b'{"code":"InvalidURL","message":"url error, please check url"}', ModelNotOnEndpoint),
        (400, b'{"code":"InvalidParameter","message":"Model not exist."}', UnknownModel),
        (400, b'{"code":"InvalidParameter","message":"Range of max_tokens should be [1, 8192]"}', ParameterRefused),
        (400, b'{"code":"InvalidParameter","message":"Range of input length should be [1, 6000]"}', BadRequest),
        (408, b"", ServerError),
        (502, b"<html>bad gateway</html>", ServerError),
        (599, b"", ServerError),
        (418, b"", BadRequest),
    ],
)
def test_statuses_without_a_documented_code_map_by_status_and_message(status, body, cls) -> None:
    error = ERRORS_OF.status_error(status, body, {}, sent_parameters=("max_tokens",))
    assert type(error) is cls
    assert error.status == status


def test_the_throttling_kind_and_retry_after_travel_with_a_rate_limit() -> None:
    body = b'{"code":"Throttling.AllocationQuota","message":"Allocated quota exceeded"}'
    error = ERRORS_OF.status_error(429, body, {"retry-after": "3"}, sent_parameters=())
    assert isinstance(error, RateLimited)
    assert (error.kind, error.retry_after) == ("tokens", 3.0)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [({"retry-after-ms": "1500"}, 1.5), ({"retry-after": "2"}, 2.0), ({"retry-after": "soon"}, None), ({}, None)],
)
def test_retry_after_reads_milliseconds_and_seconds(headers, seconds) -> None:
    assert retry_after(httpx.Headers(headers)) == seconds


def _wrapped(cause: BaseException) -> httpx.HTTPError:
    """What httpx_aiohttp raises: a coarse httpx error with the aiohttp original as its cause."""
    error = httpx.ConnectTimeout("wrapped")
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (httpx.ConnectError("refused"), "ConnectionError"),
        (httpx.ReadTimeout("slow"), "Timeout"),
        (httpx.ConnectTimeout("slow"), "Timeout"),
        (httpx.RemoteProtocolError("peer closed connection without sending complete message body"), "TruncatedReply"),
        (httpx.RemoteProtocolError("bad status line"), "ConnectionError"),
        (asyncio.TimeoutError(), "Timeout"),
        (aiohttp.ClientPayloadError("cut"), "TruncatedReply"),
        (aiohttp.ServerDisconnectedError(), "ConnectionError"),
        (ConnectionResetError("reset"), "ConnectionError"),
        (_wrapped(aiohttp.ClientPayloadError("cut")), "TruncatedReply"),
        (_wrapped(aiohttp.ServerDisconnectedError()), "ConnectionError"),
    ],
)
def test_every_transport_exception_maps_to_a_transport_error_with_its_code(exc, code) -> None:
    assert isinstance(exc, TRANSPORT_EXCEPTIONS)
    error = ERRORS_OF.transport_error(exc)
    assert type(error) is TransportError and error.code == code and error.retryable


@pytest.mark.parametrize(
    ("content", "headers", "code"),
    [(b'{"output": {"te', {}, "TruncatedReply"), (b"{}", {"content-length": "90"}, "TruncatedReply"), (b"<html>", {}, "MalformedReply")],
)
def test_an_unreadable_200_body_is_truncated_or_malformed(content, headers, code) -> None:
    assert ERRORS_OF.unreadable_body(content, headers).code == code


def test_the_key_is_scrubbed_from_every_translation() -> None:
    echoed = f'{{"code":"InvalidApiKey","message":"bad key {KEY}"}}'.encode()
    errors = [
        ERRORS_OF.status_error(401, echoed, {}, sent_parameters=()),
        ERRORS_OF.status_error(500, f"<html>{KEY}</html>".encode(), {}, sent_parameters=()),
        ERRORS_OF.transport_error(httpx.ConnectError(f"to {KEY}")),
        ERRORS_OF.unreadable_body(f"<{KEY}>".encode(), {}),
    ]
    for error in errors:
        assert KEY not in error.message and "sk-***" in error.message
