"""The DashScope backend streamed, and on the multimodal path: SSE events become one Reply, or one error.

Bodies follow the references' captures (shared/dashscope-protocol.md section 3; research-wave2.md
A.2: reasoning deltas first with empty content, cumulative usage with
``output_tokens_details.reasoning_tokens``; item 1: content-part lists on the multimodal path).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from qwen_batch.backends import DashScopeBackend, collect
from qwen_batch.errors import BackendError, BadRequest, ModelNotOnEndpoint, ServerError, TransportError
from qwen_batch.types import Reply, Request, UnitKey
from qwen_batch.wire import MULTIMODAL_PATH, NATIVE_PATH

KEY = "sk-secret-0123456789abcdef"
BASE = "http://dashscope.test/api/v1"
REQUEST = Request(
    index=0,
    row_id="r0",
    model="qwen-plus",
    messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}],
    parameters={"seed": 3, "max_tokens": 10, "result_format": "message", "enable_thinking": True},
    fingerprint="f",
    input_tokens=12,
    max_tokens=10,
    unit=UnitKey(0),
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def event(content: Any, reasoning: str | None, finish: str, output_tokens: int, reasoning_tokens: int | None = None, *, n: int = 1) -> bytes:
    message: dict[str, Any] = {"content": content, "role": "assistant"}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    usage: dict[str, Any] = {"total_tokens": 12 + output_tokens, "input_tokens": 12, "output_tokens": output_tokens}
    if reasoning_tokens is not None:
        usage["output_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    data = {"output": {"choices": [{"message": message, "finish_reason": finish}]}, "usage": usage, "request_id": "rid-s"}
    return b"id:%d\nevent:result\n:HTTP_STATUS/200\ndata:%s\n\n" % (n, json.dumps(data, separators=(",", ":")).encode())


THINKING_STREAM = [
    event("", "嗯", "null", 3, 1, n=1),
    event("", "，用户问", "null", 5, 3, n=2),
    event("1+1", "", "null", 7, 3, n=3),
    event("=2", "", "null", 9, 3, n=4),
    event("", "", "stop", 9, 3, n=5),
]
ERROR_EVENT = b'id:6\nevent:error\n:HTTP_STATUS/400\ndata:{"code":"DataInspectionFailed","message":"Output data may contain inappropriate content.","request_id":"rid-e"}\n\n'


class Chunks(httpx.AsyncByteStream):
    """A body delivered in the given chunks; then ``then`` is raised, if given (a reset, a timeout)."""

    def __init__(self, chunks: list[bytes], then: BaseException | None = None) -> None:
        self.chunks, self.then = chunks, then

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.then is not None:
            raise self.then


def sse(chunks: list[bytes], then: BaseException | None = None, status: int = 200) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, stream=Chunks(chunks, then), headers={"Content-Type": "text/event-stream;charset=UTF-8"})

    return handler


def backend_for(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> DashScopeBackend:
    options.setdefault("streamed", True)
    return DashScopeBackend(BASE, KEY, timeout_s=5, max_connections=4, transport=httpx.MockTransport(handler), **options)


async def call(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> Reply:
    async with backend_for(handler, **options) as backend:
        return await collect(backend.stream(REQUEST))


async def failure(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> BackendError:
    with pytest.raises(BackendError) as info:
        await call(handler, **options)
    assert KEY not in str(info.value)
    return info.value


@pytest.mark.anyio
async def test_a_streamed_request_sends_the_sse_headers_and_incremental_output_but_keeps_the_request_neutral() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return sse(THINKING_STREAM)(request)

    await call(handler)
    (sent,) = seen
    assert str(sent.url) == BASE + NATIVE_PATH
    assert sent.headers["x-dashscope-sse"] == "enable"
    assert sent.headers["accept"] == "text/event-stream"
    body = json.loads(sent.content)
    assert body["parameters"] == {**REQUEST.parameters, "incremental_output": True}
    assert "incremental_output" not in REQUEST.parameters  # the neutral request (and its fingerprint) is untouched


@pytest.mark.anyio
async def test_reasoning_and_answer_deltas_join_and_the_last_usage_counts() -> None:
    reply = await call(sse(THINKING_STREAM))
    assert reply == Reply("1+1=2", "stop", 12, 9, "rid-s", reasoning="嗯，用户问", reasoning_tokens=3, first_token_s=None)


@pytest.mark.anyio
async def test_events_split_anywhere_across_chunks_give_the_same_reply() -> None:
    whole = b"".join(THINKING_STREAM).replace(b"\n", b"\r\n")
    chunks = [whole[i : i + 7] for i in range(0, len(whole), 7)]
    reply = await call(sse(chunks))
    assert (reply.text, reply.reasoning, reply.output_tokens) == ("1+1=2", "嗯，用户问", 9)


@pytest.mark.anyio
async def test_first_token_s_is_measured_from_the_collect_call_to_the_first_delta() -> None:
    ticks = iter([100.0, 100.25, 101.0, 102.0])
    async with backend_for(sse(THINKING_STREAM)) as backend:
        reply = await collect(backend.stream(REQUEST), clock=lambda: next(ticks))
    assert reply.first_token_s == 0.25


@pytest.mark.anyio
async def test_an_error_event_mid_stream_is_the_error_its_code_maps_to() -> None:
    error = await failure(sse([*THINKING_STREAM[:3], ERROR_EVENT]))
    assert isinstance(error, BadRequest) and not error.retryable
    assert (error.code, error.request_id) == ("DataInspectionFailed", "rid-e")
    internal = ERROR_EVENT.replace(b"DataInspectionFailed", b"InternalError")
    error = await failure(sse([*THINKING_STREAM[:2], internal]))
    assert isinstance(error, ServerError) and error.retryable


@pytest.mark.anyio
@pytest.mark.parametrize(
    "then", [httpx.ReadError("connection reset by peer"), httpx.ReadTimeout("timed out"), None], ids=["reset", "timeout", "closed"]
)
async def test_a_stream_cut_before_its_finish_is_a_retryable_transport_error(then: BaseException | None) -> None:
    # The partial text ("1+1") never becomes a reply.
    error = await failure(sse(THINKING_STREAM[:3], then))
    assert isinstance(error, TransportError) and error.retryable
    assert error.code in {"ConnectionError", "Timeout", "TruncatedReply"}
    if then is None:
        assert error.code == "TruncatedReply"


@pytest.mark.anyio
async def test_a_cut_after_the_finishing_event_keeps_the_whole_reply() -> None:
    reply = await call(sse(THINKING_STREAM, httpx.ReadError("reset after the end")))
    assert reply.text == "1+1=2"


@pytest.mark.anyio
async def test_an_unreadable_event_is_a_retryable_malformed_reply() -> None:
    broken = b'id:1\nevent:result\n:HTTP_STATUS/200\ndata:{"output":{"choi\n\n'
    error = await failure(sse([broken]))
    assert isinstance(error, TransportError) and error.code in {"TruncatedReply", "MalformedReply"}


@pytest.mark.anyio
async def test_a_refusal_before_the_stream_keeps_its_status_whether_json_or_sse() -> None:
    sse_refusal = b'id:1\nevent:error\n:HTTP_STATUS/429\ndata:{"code":"Throttling.RateQuota","message":"Requests rate limit exceeded"}\n\n'
    error = await failure(sse([sse_refusal], status=429))
    assert error.status == 429 and error.code == "Throttling.RateQuota"
    # The same error sent with HTTP 200 (section 3.4, mode 1): the code's documented status.
    error = await failure(sse([sse_refusal]))
    assert error.status == 429 and error.retryable


@pytest.mark.anyio
async def test_text_format_events_stream_too() -> None:
    def text_event(text: str, finish: str, tokens: int) -> bytes:
        data = {"output": {"finish_reason": finish, "text": text}, "usage": {"input_tokens": 12, "output_tokens": tokens}}
        return b"event:result\ndata:" + json.dumps(data).encode() + b"\n\n"

    reply = await call(sse([text_event("1+", "null", 1), text_event("1", "null", 2), text_event("", "length", 2)]))
    assert (reply.text, reply.finish_reason, reply.reasoning, reply.reasoning_tokens) == ("1+1", "length", None, None)


# -- the multimodal path -------------------------------------------------------------

MULTIMODAL_REPLY = {
    "output": {"choices": [{"finish_reason": "stop", "message": {"role": "assistant", "content": [{"text": "1+1"}, {"text": "=2"}], "reasoning_content": "easy"}}]},
    "usage": {"input_tokens": 12, "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 2}, "prompt_tokens_details": {"cached_tokens": 4}},
    "request_id": "rid-m",
}


@pytest.mark.anyio
async def test_the_multimodal_path_sends_content_parts_and_joins_the_replys_parts() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=MULTIMODAL_REPLY)

    reply = await call(handler, streamed=False, path="multimodal")
    assert str(seen[0].url) == BASE + MULTIMODAL_PATH
    assert json.loads(seen[0].content)["input"]["messages"] == [
        {"role": "system", "content": [{"text": "be brief"}]},
        {"role": "user", "content": [{"text": "1+1?"}]},
    ]
    assert reply == Reply("1+1=2", "stop", 12, 7, "rid-m", reasoning="easy", reasoning_tokens=2, cached_tokens=4)


@pytest.mark.anyio
async def test_the_multimodal_path_streams_content_parts() -> None:
    stream = [event([{"text": "1+"}], "", "null", 2, 0, n=1), event([{"text": "1"}], "", "null", 3, 0, n=2), event([], "", "stop", 3, 0, n=3)]
    reply = await call(sse(stream), path="multimodal")
    assert (reply.text, reply.reasoning, reply.reasoning_tokens) == ("1+1", None, 0)


# -- the url-error switch ------------------------------------------------------------

URL_ERROR = {"code": "InvalidParameter", "message": "url error, please check url！", "request_id": "rid-u"}
URL_ERROR_EVENT = b"id:1\nevent:error\n:HTTP_STATUS/400\ndata:" + json.dumps(URL_ERROR).encode() + b"\n\n"


def bound_to(path: str, answer: Callable[[httpx.Request], httpx.Response], sent: list[str]) -> Callable[[httpx.Request], httpx.Response]:
    """A service that serves the model on ``path`` only and answers the other with the url-error 400."""

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        if not request.url.path.endswith(path):
            return httpx.Response(400, json=URL_ERROR)
        return answer(request)

    return handler


@pytest.mark.anyio
@pytest.mark.parametrize("streamed", [False, True])
async def test_an_unknown_models_first_url_error_moves_the_run_to_the_other_path_once(streamed: bool) -> None:
    sent: list[str] = []
    notes: list[str] = []
    answer = sse(THINKING_STREAM) if streamed else (lambda request: httpx.Response(200, json=MULTIMODAL_REPLY))
    async with backend_for(bound_to(MULTIMODAL_PATH, answer, sent), streamed=streamed, path_known=False, notify=notes.append) as backend:
        first = await collect(backend.stream(REQUEST))
        second = await collect(backend.stream(REQUEST))
    assert first.text == second.text == "1+1=2"
    # The refused request is sent again on the new path; later ones go there first.
    assert sent == ["/api/v1" + NATIVE_PATH, "/api/v1" + MULTIMODAL_PATH, "/api/v1" + MULTIMODAL_PATH]
    assert backend.path == "multimodal"
    (note,) = notes
    assert "'qwen-plus'" in note and "multimodal path" in note and "api.endpoint: multimodal" in note


@pytest.mark.anyio
@pytest.mark.parametrize("streamed", [False, True])
async def test_a_url_error_on_both_paths_is_the_configuration_error(streamed: bool) -> None:
    sent: list[str] = []
    never = bound_to("/nowhere", lambda request: httpx.Response(500), sent)
    error = await failure(never, streamed=streamed, path_known=False, notify=lambda note: None)
    assert isinstance(error, ModelNotOnEndpoint)
    assert len(sent) == 2


@pytest.mark.anyio
async def test_a_url_error_for_a_catalog_model_is_refused_at_once() -> None:
    sent: list[str] = []
    error = await failure(bound_to(MULTIMODAL_PATH, lambda request: httpx.Response(500), sent), streamed=False)
    assert isinstance(error, ModelNotOnEndpoint)
    assert sent == ["/api/v1" + NATIVE_PATH]


@pytest.mark.anyio
async def test_a_url_error_sent_as_a_200_sse_event_switches_too() -> None:
    # "the url error also arrives as a 200 SSE error event" on a stream (research-wave2.md item 1).
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return sse(THINKING_STREAM if request.url.path.endswith(MULTIMODAL_PATH) else [URL_ERROR_EVENT])(request)

    reply = await call(handler, path_known=False, notify=lambda note: None)
    assert reply.text == "1+1=2" and len(sent) == 2


# -- over loopback, against the emulator's SSE (its non-thinking models) ---------------


def emulator_request(content: str) -> Request:
    return Request(
        index=0,
        row_id="r0",
        model="qwen-turbo",
        messages=[{"role": "user", "content": content}],
        parameters={"seed": 7, "max_tokens": 60, "result_format": "message"},
        fingerprint="f",
        input_tokens=0,
        max_tokens=60,
        unit=UnitKey(0),
    )


async def ask(emu: Any, content: str, *, streamed: bool) -> Reply:
    async with DashScopeBackend(emu.base_url, emu.api_key or "sk-emulator", timeout_s=5, max_connections=2, streamed=streamed) as backend:
        return await collect(backend.stream(emulator_request(content)))


@pytest.mark.anyio
async def test_over_loopback_a_streamed_reply_equals_the_whole_one(emulator: Any) -> None:
    whole = await ask(emulator, "Tell me about rivers.", streamed=False)
    streamed = await ask(emulator, "Tell me about rivers.", streamed=True)
    assert (streamed.text, streamed.finish_reason, streamed.input_tokens, streamed.output_tokens) == (
        whole.text, whole.finish_reason, whole.input_tokens, whole.output_tokens
    )
    assert len(streamed.text) > 20
    # The server writes a stream's ledger line once its last event is out, which may be after the
    # client has read it: wait for the line rather than race it.
    assert emulator.emulator.ledger.wait_for_entries(2, timeout=10)
    streams = [entry["stream"] for entry in emulator.ledger]
    assert streams == [False, True]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("directive", "error_class", "code"),
    [
        ("[[emu: fail=InternalError midstream]]", ServerError, "InternalError"),
        ("[[emu: fail=DataInspectionFailed midstream]]", BadRequest, "DataInspectionFailed"),
        ("[[emu: truncated]]", TransportError, None),
        ("[[emu: malformed]]", TransportError, None),
    ],
)
async def test_over_loopback_a_stream_spoiled_half_way_is_one_error(emulator: Any, directive: str, error_class: type, code: str | None) -> None:
    with pytest.raises(BackendError) as info:
        await ask(emulator, f"Tell me about rivers. {directive}", streamed=True)
    assert isinstance(info.value, error_class)
    if code is not None:
        assert info.value.code == code


def test_the_registered_factory_takes_the_jobs_mode() -> None:
    from qwen_batch.backends import backend_factory

    made = backend_factory("dashscope")(BASE, KEY, timeout_s=5, max_connections=2, stream=True, path="multimodal", path_known=False)
    assert isinstance(made, DashScopeBackend)
    assert (made.streamed, made.path, made.path_known) == (True, "multimodal", False)
    plain = backend_factory("dashscope")(BASE, KEY, timeout_s=5, max_connections=2)
    assert isinstance(plain, DashScopeBackend) and (plain.streamed, plain.path) == (False, "text")


@pytest.mark.anyio
async def test_a_url_error_after_deltas_is_never_resent_on_the_other_path() -> None:
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return sse([THINKING_STREAM[2], URL_ERROR_EVENT])(request)

    error = await failure(handler, path_known=False, notify=lambda note: None)
    assert isinstance(error, ModelNotOnEndpoint) and len(sent) == 1


@pytest.mark.anyio
async def test_by_default_the_switch_is_said_once_as_a_warning_line_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    sent: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=MULTIMODAL_REPLY)

    async with DashScopeBackend(BASE, KEY, timeout_s=5, max_connections=2, path_known=False,
                                transport=httpx.MockTransport(bound_to(MULTIMODAL_PATH, answer, sent))) as backend:
        for _ in range(3):
            await collect(backend.stream(REQUEST))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: the service does not serve 'qwen-plus' on the text path")
    assert KEY not in lines[0]
