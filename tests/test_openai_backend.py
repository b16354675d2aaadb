"""The OpenAI-compatible backend: over loopback against the emulator's compatible endpoint, and
local servers' bodies (research-wave2 D.1) through ``httpx.MockTransport``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from qwen_batch.backends import DashScopeBackend, collect
from qwen_batch.backends.openai import OpenAIBackend
from qwen_batch.emulator.config import EmulatorConfig, FaultRates
from qwen_batch.errors import AuthError, BackendError, BadRequest, RateLimited, ServerError, TransportError
from qwen_batch.servers import DIALECTS
from qwen_batch.testing import EmulatorThread
from qwen_batch.tokens import count_text
from qwen_batch.types import Reply, Request, UnitKey

from .test_backend_stream import Chunks

KEY = "sk-secret-0123456789abcdef"
BASE = "http://server.test/v1"


def make_request(parameters: dict[str, Any] | None = None, model: str = "qwen-plus", index: int = 0) -> Request:
    return Request(
        index=index,
        row_id=f"r{index}",
        model=model,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"question {index}"}],
        parameters=parameters or {"seed": 3, "max_tokens": 40, "result_format": "message"},
        fingerprint="f",
        input_tokens=12,
        max_tokens=40,
        unit=UnitKey(index),
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


Handler = Callable[[httpx.Request], httpx.Response]


def recording(handler: Handler, seen: list[httpx.Request]) -> httpx.MockTransport:
    def record(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return handler(request)

    return httpx.MockTransport(record)


def json_reply(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Handler:
    return lambda request: httpx.Response(status, content=json.dumps(body).encode(), headers=headers or {})


def sse(lines: list[Any], then: BaseException | None = None) -> Handler:
    chunks = [b"data: " + (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n\n" for line in lines]
    return lambda request: httpx.Response(200, stream=Chunks(chunks, then), headers={"Content-Type": "text/event-stream"})


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-rid-1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def backend(handler: Handler, seen: list[httpx.Request] | None = None, *, streamed: bool = False, server: str = "dashscope", key: str | None = KEY) -> OpenAIBackend:
    return OpenAIBackend(
        BASE, key, timeout_s=5, max_connections=2, transport=recording(handler, seen if seen is not None else []),
        streamed=streamed, dialect=DIALECTS[server],
    )


async def reply_of(client: OpenAIBackend, request: Request | None = None) -> Reply:
    return await collect(client.stream(request or make_request()))


# --- against the emulator, over loopback -----------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("streamed", [False, True])
async def test_the_compatible_endpoint_gives_the_native_answer(streamed: bool) -> None:
    # The service thinks only when streaming (a non-streamed thinking request is refused).
    params = {"seed": 5, "max_tokens": 60, "result_format": "message", "top_k": 4, "enable_thinking": streamed}
    request = make_request(params)
    with EmulatorThread(EmulatorConfig()) as emu:
        async with OpenAIBackend(emu.compatible_base_url, emu.api_key, timeout_s=10, max_connections=2, streamed=streamed) as client:
            compatible = await reply_of(client, request)
        async with DashScopeBackend(emu.base_url, emu.api_key, timeout_s=10, max_connections=2, streamed=True) as native_client:
            native = await collect(native_client.stream(request))
        bodies = list(emu.received)
    assert (compatible.text, compatible.reasoning, compatible.finish_reason) == (native.text, native.reasoning, native.finish_reason)
    assert (compatible.input_tokens, compatible.output_tokens, compatible.reasoning_tokens) == (
        native.input_tokens, native.output_tokens, native.reasoning_tokens,
    )
    assert compatible.usage_source == "service" and compatible.text
    assert bool(compatible.reasoning and compatible.reasoning_tokens) is streamed
    assert compatible.request_id is not None
    body = bodies[0]
    assert body["top_k"] == 4 and body["enable_thinking"] is streamed and "result_format" not in body and "parameters" not in body
    assert body.get("stream", False) is streamed
    if streamed:
        assert body["stream_options"] == {"include_usage": True}


@pytest.mark.anyio
async def test_a_wrong_key_is_an_auth_error_that_never_shows_the_key() -> None:
    with EmulatorThread(EmulatorConfig()) as emu:
        async with OpenAIBackend(emu.compatible_base_url, KEY, timeout_s=10, max_connections=1) as client:
            with pytest.raises(AuthError) as caught:
                await reply_of(client)
    assert KEY not in str(caught.value) and KEY not in repr(caught.value)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fault", "error_class"),
    [("rate_quota", RateLimited), ("internal_error", ServerError), ("reset", TransportError), ("malformed", TransportError), ("truncated", TransportError)],
)
@pytest.mark.parametrize("streamed", [False, True])
async def test_the_emulators_faults_become_the_native_error_classes(fault: str, error_class: type[BackendError], streamed: bool) -> None:
    config = EmulatorConfig(faults=FaultRates(**{fault: 1.0}))
    with EmulatorThread(config) as emu:
        async with OpenAIBackend(emu.compatible_base_url, emu.api_key, timeout_s=10, max_connections=1, streamed=streamed) as client:
            with pytest.raises(error_class):
                await reply_of(client)


# --- local servers' bodies ---------------------------------------------------------------


@pytest.mark.anyio
async def test_vllm_reasoning_field_and_integer_error_codes() -> None:
    body = {"id": "chatcmpl-x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "2", "reasoning": "1+1 is 2"}, "finish_reason": "stop", "stop_reason": None}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21, "completion_tokens_details": {"reasoning_tokens": 6}}}
    reply = await reply_of(backend(json_reply(body), server="vllm"))
    assert (reply.text, reply.reasoning, reply.reasoning_tokens, reply.output_tokens) == ("2", "1+1 is 2", 6, 9)
    error = {"error": {"message": "This model's maximum context length is 32 tokens.", "type": "BadRequestError", "param": None, "code": 400}}
    with pytest.raises(BadRequest) as caught:
        await reply_of(backend(json_reply(error, status=400), server="vllm"))
    assert caught.value.code == "BadRequestError" and "maximum context length" in str(caught.value)


@pytest.mark.anyio
async def test_the_flat_sglang_error_body_is_read() -> None:
    flat = {"object": "error", "message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}
    with pytest.raises(ServerError) as caught:
        await reply_of(backend(json_reply(flat, status=500), server="sglang"))
    assert "Internal server error" in str(caught.value)


@pytest.mark.anyio
async def test_a_429_with_and_without_retry_after() -> None:
    limited = {"error": {"message": "Requests rate limit exceeded", "type": "limit_requests", "param": None, "code": "limit_requests"}}
    with pytest.raises(RateLimited) as caught:
        await reply_of(backend(json_reply(limited, status=429, headers={"Retry-After": "3"})))
    assert caught.value.retry_after == 3.0
    with pytest.raises(RateLimited) as bare:
        await reply_of(backend(json_reply(limited, status=429)))
    assert bare.value.retry_after is None


@pytest.mark.anyio
async def test_a_stream_with_vllm_reasoning_and_usage() -> None:
    lines = [chunk({"role": "assistant", "content": ""}), chunk({"reasoning": "think "}), chunk({"reasoning": "more"}),
             chunk({"content": "an"}), chunk({"content": "swer"}), chunk({}, "stop"),
             {"id": "chatcmpl-rid-1", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 7, "completion_tokens_details": {"reasoning_tokens": 3}}},
             b"[DONE]"]
    seen: list[httpx.Request] = []
    reply = await reply_of(backend(sse(lines), seen, streamed=True, server="vllm"))
    assert (reply.text, reply.reasoning, reply.output_tokens, reply.reasoning_tokens, reply.request_id) == ("answer", "think more", 7, 3, "rid-1")
    assert reply.usage_source == "service"
    assert json.loads(seen[0].content)["stream_options"] == {"include_usage": True}


@pytest.mark.anyio
@pytest.mark.parametrize("streamed", [False, True])
async def test_missing_usage_is_counted_with_the_tokenizer_and_marked_estimated(streamed: bool) -> None:
    if streamed:
        handler = sse([chunk({"content": "hello there"}), chunk({}, "stop"), b"[DONE]"])
    else:
        handler = json_reply({"choices": [{"index": 0, "message": {"role": "assistant", "content": "hello there"}, "finish_reason": "stop"}]})
    reply = await reply_of(backend(handler, streamed=streamed, server="ollama"))
    assert reply.usage_source == "estimated"
    assert reply.input_tokens == 12  # the request's exact count
    assert reply.output_tokens == count_text("hello there", "qwen-plus") > 0


@pytest.mark.anyio
async def test_a_stream_cut_before_done_is_truncated_and_a_bad_chunk_malformed() -> None:
    with pytest.raises(TransportError) as cut:
        await reply_of(backend(sse([chunk({"content": "par"})]), streamed=True))
    assert cut.value.code == "TruncatedReply"
    with pytest.raises(TransportError) as reset:
        await reply_of(backend(sse([chunk({"content": "par"})], then=httpx.ReadError("reset")), streamed=True))
    assert reset.value.code == "ConnectionError"
    with pytest.raises(TransportError) as bad:
        await reply_of(backend(sse([b'{"choices":[{"delta":']), streamed=True))
    assert bad.value.code in ("TruncatedReply", "MalformedReply")


@pytest.mark.anyio
async def test_an_error_chunk_mid_stream_is_the_error() -> None:
    lines = [chunk({"content": "par"}), {"error": {"code": "data_inspection_failed", "message": "Output data may contain inappropriate content."}}]
    with pytest.raises(BadRequest) as caught:
        await reply_of(backend(sse(lines), streamed=True))
    assert caught.value.code == "data_inspection_failed"


@pytest.mark.anyio
@pytest.mark.parametrize(("finish", "error_class"), [("abort", ServerError), ("error", ServerError), ("content_filter", BadRequest)])
@pytest.mark.parametrize("streamed", [False, True])
async def test_finish_reasons_that_are_not_an_answer(finish: str, error_class: type[BackendError], streamed: bool) -> None:
    if streamed:
        handler = sse([chunk({"content": "x"}), chunk({}, finish), b"[DONE]"])
    else:
        handler = json_reply({"choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": finish}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    with pytest.raises(error_class) as caught:
        await reply_of(backend(handler, streamed=streamed, server="vllm"))
    assert caught.value.code == f"finish_reason:{finish}"


@pytest.mark.anyio
@pytest.mark.parametrize("finish", ["stop", "length", "tool_calls", "repetition"])
async def test_finish_reasons_kept_as_given(finish: str) -> None:
    handler = json_reply({"choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": finish}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    assert (await reply_of(backend(handler, server="vllm"))).finish_reason == finish


@pytest.mark.anyio
async def test_a_keyless_server_gets_no_authorization_header() -> None:
    seen: list[httpx.Request] = []
    handler = json_reply({"choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    await reply_of(backend(handler, seen, key=None, server="llamacpp"))
    assert "authorization" not in seen[0].headers
    assert str(seen[0].url) == BASE + "/chat/completions"
