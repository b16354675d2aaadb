"""The native DashScope dialects (text-generation and multimodal-generation paths) and the tokenizer.

Streaming is asked for by header (``X-DashScope-SSE: enable``, or ``Accept:
text/event-stream`` when ``sse_via_accept``); errors are ``{"code", "message",
"request_id"}``; SSE events carry ``id:``, ``event:`` and ``:HTTP_STATUS/`` lines
(reference sections 1-3). Each model answers on one path only (``models.py``); on the
multimodal path a message's content is a list of parts ``[{"text": ...}]`` both ways, and
usage has no ``total_tokens`` ([CNB multimodal-generation-vl-*], 2024-11). A thinking reply
carries ``reasoning_content`` and ``usage.output_tokens_details.reasoning_tokens``
([CNB single-generation-message-reasoning-sse], research-wave2 A.2).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import tokens
from ..catalog import Catalog
from ..wire import REQUEST_ID_HEADER, SSE_HEADER
from .config import EmulatorConfig
from .generate import Generation
from .models import NativePath
from .pipeline import JSON_CONTENT_TYPE, SSE_CONTENT_TYPE, Exchange, Pipeline, json_bytes, new_request_id
from .validate import ApiError, ChatRequest, invalid, parse_body, validate_native


class NativeDialect:
    """The native protocol on the text-generation path, as the pipeline's ``Dialect``."""

    endpoint = "native"
    path: NativePath = "text"
    auth_message: str | None = None
    # PROTO §2.1 (the native finish reasons).
    finish_reasons = frozenset({"stop", "length", "tool_calls"})

    def __init__(self, config: EmulatorConfig, catalog: Catalog) -> None:
        self._config = config
        self._catalog = catalog

    def start(self, request: web.Request, exchange: Exchange) -> None:
        headers = request.headers
        if headers.get(SSE_HEADER, "").lower() == "enable":
            exchange.stream = True
        else:
            exchange.stream = self._config.sse_via_accept and "text/event-stream" in headers.get("Accept", "")

    def note(self, body: dict[str, Any], exchange: Exchange) -> None:
        exchange.model = body.get("model") if isinstance(body.get("model"), str) else None
        params = body.get("parameters")
        exchange.seed = params.get("seed") if isinstance(params, dict) else None

    def validate(self, body: dict[str, Any], stream: bool) -> ChatRequest:
        config = self._config
        return validate_native(body, self._catalog, rules=config.role_rules, usage_mode=config.usage_mode,
                               path=self.path, stream=stream)

    def error_response(self, error: ApiError, exchange: Exchange, headers: dict[str, str]) -> web.Response:
        return self.error(error, exchange.request_id, stream=exchange.stream, headers=headers)

    def error(self, error: ApiError, request_id: str, *, stream: bool, headers: dict[str, str]) -> web.Response:
        """A refusal: JSON, or one SSE ``event:error`` for a streaming request."""
        payload = _error_body(error, request_id)
        headers = {REQUEST_ID_HEADER: request_id, **headers}
        if stream:
            status = error.status if self._config.stream_error_mode == "status" else 200
            if error.stream_status is not None:
                status = error.stream_status
            headers["Content-Type"] = SSE_CONTENT_TYPE
            return web.Response(body=_sse_error(1, error.status, payload), status=status, headers=headers)
        headers["Content-Type"] = JSON_CONTENT_TYPE
        return web.Response(body=payload, status=error.status, headers=headers)

    def reply(self, chat: ChatRequest, generation: Generation, request_id: str, created: int) -> bytes:
        if chat.result_format == "message":  # always so when it thinks
            message = {"role": "assistant", "content": self._content(generation.text)}
            if chat.thinking:
                message["reasoning_content"] = generation.reasoning
            output: dict[str, Any] = {"choices": [{"finish_reason": generation.finish_reason, "message": message}]}
        else:
            output = {"finish_reason": generation.finish_reason, "text": generation.text}
        usage = _usage(chat, generation.output_tokens, generation.reasoning_tokens, parts=self.path == "multimodal")
        return json_bytes({"output": output, "usage": usage, "request_id": request_id})

    def _content(self, text: str) -> Any:
        return text

    def reply_stream(self, chat: ChatRequest, generation: Generation, request_id: str, created: int) -> NativeStream:
        return NativeStream(chat, generation, request_id)

    async def wrong_method(self, request: web.Request) -> web.Response:
        """A GET on the generation path: the service's 400, with no ledger line."""
        error = invalid(f"Request method '{request.method}' is not supported.")
        return self.error(error, new_request_id(), stream=False, headers={})


class MultimodalDialect(NativeDialect):
    """The native protocol on the multimodal-generation path: content as parts, both ways."""

    endpoint = "multimodal"
    path: NativePath = "multimodal"

    def _content(self, text: str) -> Any:
        return [{"text": text}]

    def reply_stream(self, chat: ChatRequest, generation: Generation, request_id: str, created: int) -> NativeStream:
        return PartsStream(chat, generation, request_id)


class NativeStream:
    """Native SSE: numbered ``event:result`` events with the text so far or the delta."""

    def __init__(self, chat: ChatRequest, generation: Generation, request_id: str) -> None:
        self._chat = chat
        self._generation = generation
        self._request_id = request_id
        self._event_id = 0
        self.headers = {"Content-Type": SSE_CONTENT_TYPE, REQUEST_ID_HEADER: request_id, "x-dashscope-finished": "false"}

    def _next_id(self) -> int:
        self._event_id += 1
        return self._event_id

    def _frame(self, data: bytes) -> bytes:
        return b"id:%d\nevent:result\n:HTTP_STATUS/200\ndata:%s\n\n" % (self._next_id(), data)

    def _result(self, content: str, finish_reason: str, output_tokens: int) -> bytes:
        chat = self._chat
        if chat.thinking:
            return self._thinking_result(content, "", finish_reason, output_tokens, self._generation.reasoning_tokens)
        data = _event_data(chat.result_format == "message", content, finish_reason, chat.input_tokens, output_tokens,
                           self._request_id)
        return self._frame(data)

    def _thinking_result(self, content: str, reasoning: str, finish_reason: str, output_tokens: int,
                         reasoning_tokens: int) -> bytes:
        message = {"content": self._content(content), "reasoning_content": reasoning, "role": "assistant"}
        usage = _usage(self._chat, output_tokens, reasoning_tokens, parts=False)
        return self._frame(json_bytes({"output": {"choices": [{"message": message, "finish_reason": finish_reason}]},
                                       "usage": usage, "request_id": self._request_id}))

    def _content(self, text: str) -> Any:
        return text

    def opening(self) -> tuple[bytes, ...]:
        return ()

    def thought(self, cumulative: str, delta: str, reasoning_tokens: int) -> bytes:
        # Thinking always streams deltas (incremental_output is required with it).
        return self._thinking_result("", delta, "null", reasoning_tokens, reasoning_tokens)

    def piece(self, cumulative: str, delta: str, output_tokens: int) -> bytes:
        return self._result(delta if self._chat.incremental_output else cumulative, "null", output_tokens)

    def error(self, error: ApiError) -> bytes:
        return _sse_error(self._next_id(), error.status, _error_body(error, self._request_id))

    def malformed(self) -> bytes:
        return b"id:%d\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{\"choi\n\n" % self._next_id()

    def closing(self) -> tuple[bytes, ...]:
        generation = self._generation
        final = "" if self._chat.incremental_output else generation.text
        return (self._result(final, generation.finish_reason, generation.output_tokens),)


class PartsStream(NativeStream):
    """Multimodal-path SSE: content as a list of parts (empty while thinking), usage without total."""

    def _result(self, content: str, finish_reason: str, output_tokens: int) -> bytes:
        return self._thinking_result(content, "", finish_reason, output_tokens, self._generation.reasoning_tokens)

    def _thinking_result(self, content: str, reasoning: str, finish_reason: str, output_tokens: int,
                         reasoning_tokens: int) -> bytes:
        message: dict[str, Any] = {"content": self._content(content), "role": "assistant"}
        if self._chat.thinking:
            message["reasoning_content"] = reasoning
        usage = _usage(self._chat, output_tokens, reasoning_tokens, parts=True)
        return self._frame(json_bytes({"output": {"choices": [{"message": message, "finish_reason": finish_reason}]},
                                       "usage": usage, "request_id": self._request_id}))

    def _content(self, text: str) -> Any:
        # While it thinks the answer has no part yet (UNCONFIRMED: no capture of a thinking multimodal stream).
        return [{"text": text}] if text else []


def _usage(chat: ChatRequest, output_tokens: int, reasoning_tokens: int, *, parts: bool) -> dict[str, Any]:
    """Native usage; a thinking reply adds its reasoning count, the multimodal path has no total."""
    usage: dict[str, Any] = {"input_tokens": chat.input_tokens, "output_tokens": output_tokens}
    if not parts:
        usage = {"total_tokens": chat.input_tokens + output_tokens, **usage}
    if chat.thinking:
        usage["output_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def _error_body(error: ApiError, request_id: str) -> bytes:
    return json_bytes({"code": error.code, "message": error.message, "request_id": request_id})


def _event_data(message: bool, content: str, finish_reason: str, input_tokens: int, output_tokens: int,
                request_id: str) -> bytes:
    usage = {"total_tokens": input_tokens + output_tokens, "input_tokens": input_tokens, "output_tokens": output_tokens}
    if message:
        output: dict[str, Any] = {"choices": [{"message": {"content": content, "role": "assistant"},
                                               "finish_reason": finish_reason}]}
    else:
        output = {"finish_reason": finish_reason, "text": content}
    return json_bytes({"output": output, "usage": usage, "request_id": request_id})


def _sse_error(event_id: int, status: int, data: bytes) -> bytes:
    return b"id:%d\nevent:error\n:HTTP_STATUS/%d\ndata:%s\n\n" % (event_id, status, data)


async def tokenize(pipeline: Pipeline, dialect: NativeDialect, request: web.Request) -> web.Response:
    """``POST /api/v1/tokenizer``: the token ids of the content; recorded, never billed."""
    with Exchange(pipeline.ledger, "tokenizer", bills=False) as exchange:
        try:
            raw = await pipeline.read(request, exchange)
            if not pipeline.authorized(request):
                raise ApiError("InvalidApiKey")
            name, texts = _tokenizer_input(parse_body(raw), pipeline.catalog, exchange)
        except ApiError as error:
            exchange.status, exchange.code = error.status, error.code
            return dialect.error(error, exchange.request_id, stream=False, headers={})
        # The Feb 2024 capture counts content only, no template (UNCONFIRMED for today).
        ids = tokens.encode("".join(texts), name)
        pieces = [tokens.decode([i], name) for i in ids]
        exchange.status, exchange.input_tokens = 200, len(ids)
        payload = {"output": {"token_ids": ids, "tokens": pieces}, "usage": {"input_tokens": len(ids)},
                   "request_id": exchange.request_id}
        return web.Response(body=json_bytes(payload),
                            headers={"Content-Type": JSON_CONTENT_TYPE, REQUEST_ID_HEADER: exchange.request_id})


def _tokenizer_input(body: dict[str, Any], catalog: Catalog, exchange: Exchange) -> tuple[str, list[str]]:
    """The model and the texts to count, or the service's error; a known model goes in the ledger."""
    name = body.get("model")
    if not name:
        raise ApiError("BadRequest.EmptyModel")
    if not isinstance(name, str) or catalog.get(name) is None:
        raise invalid("Model not exist.")
    exchange.model = name
    inp = body.get("input")
    if not isinstance(inp, dict):
        raise ApiError("BadRequest.EmptyInput")
    texts: list[Any] = [m.get("content") for m in inp.get("messages") or [] if isinstance(m, dict)]
    if isinstance(inp.get("prompt"), str):
        texts.append(inp["prompt"])
    if not texts or not all(isinstance(t, str) for t in texts):
        raise invalid('Either "prompt" or "messages" must exist and cannot both be none')
    return name, texts
