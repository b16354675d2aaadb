"""The OpenAI-compatible dialect (``/compatible-mode/v1/chat/completions``) and its model list.

Streaming is asked for in the body (``"stream": true``); errors are OpenAI's
``{"error": {"message", "type", "param", "code"}}``; SSE events are bare ``data:`` lines
ending with ``data: [DONE]`` (reference section 6). Thinking (``enable_thinking`` and
``thinking_budget`` as top-level keys) streams ``delta.reasoning_content`` before
``delta.content``, and usage gains ``completion_tokens_details.reasoning_tokens``
(research-wave2 A.3); every model is served here, whatever its native path.

With ``EmulatorConfig.server`` set to a local server (``servers.py``) the same endpoint
speaks that server's dialect under ``/v1``: its reasoning field, thinking switch, error
bodies, finish reasons and ``owned_by``, with no key needed.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..catalog import Catalog
from ..wire import REQUEST_ID_HEADER
from .config import EmulatorConfig
from .generate import Generation
from .pipeline import JSON_CONTENT_TYPE, SSE_CONTENT_TYPE, Exchange, json_bytes
from .servers import SERVERS, Server, error_body
from .validate import ApiError, ChatRequest, validate_compatible, validate_local

AUTH_MESSAGE = "Incorrect API key provided. "
_DONE = b"data: [DONE]\n\n"


class CompatibleDialect:
    """The OpenAI-compatible protocol, as the pipeline's ``Dialect``."""

    endpoint = "compatible"
    auth_message: str | None = AUTH_MESSAGE

    def __init__(self, config: EmulatorConfig, catalog: Catalog) -> None:
        self._config = config
        self._catalog = catalog
        self.server: Server = SERVERS[config.server]
        self.finish_reasons = self.server.finish_reasons

    def start(self, request: web.Request, exchange: Exchange) -> None:
        pass  # the body says whether to stream

    def note(self, body: dict[str, Any], exchange: Exchange) -> None:
        exchange.model = body.get("model") if isinstance(body.get("model"), str) else None
        exchange.seed = body.get("seed")
        exchange.stream = body.get("stream") is True

    def validate(self, body: dict[str, Any], stream: bool) -> ChatRequest:
        config = self._config
        if self.server.local:
            return validate_local(body, self._catalog, self.server, send_usage=config.send_usage)
        chat = validate_compatible(body, self._catalog, rules=config.role_rules, usage_mode=config.usage_mode)
        chat.send_usage = config.send_usage
        return chat

    def error_response(self, error: ApiError, exchange: Exchange, headers: dict[str, str]) -> web.Response:
        # A stream refused before generation too: a plain JSON error, which is what the openai package parses.
        payload = json_bytes(_error_body(self.server, error, exchange.request_id))
        headers = {REQUEST_ID_HEADER: exchange.request_id, "Content-Type": JSON_CONTENT_TYPE, **headers}
        return web.Response(body=payload, status=error.status, headers=headers)

    def error_body(self, error: ApiError, request_id: str) -> dict[str, Any]:
        """The JSON body of a refusal (a batch line's error response carries it too)."""
        return _error_body(self.server, error, request_id)

    def reply(self, chat: ChatRequest, generation: Generation, request_id: str, created: int) -> bytes:
        message = {"role": "assistant", "content": generation.text}
        if chat.thinking:
            message[self.server.reasoning_field] = generation.reasoning
        choice: dict[str, Any] = {"message": message, "finish_reason": generation.finish_reason, "index": 0,
                                  "logprobs": None}
        if self.server.stop_reason:
            choice["stop_reason"] = None  # vLLM's extra field (WAVE2 D.1): the stop string or token, if one ended it
        body: dict[str, Any] = {"choices": [choice], "object": "chat.completion"}
        if chat.send_usage:
            body["usage"] = _usage(chat, generation)
        body.update(created=created, system_fingerprint=None, model=chat.model.name, id=f"chatcmpl-{request_id}")
        return json_bytes(body)

    def reply_stream(self, chat: ChatRequest, generation: Generation, request_id: str, created: int) -> CompatibleStream:
        return CompatibleStream(chat, generation, request_id, created, self.server)

    def models(self, created: int) -> web.Response:
        """``GET {base}/models``: the catalog's names, owned by the emulated server (NOTES.md)."""
        owner = self.server.owned_by
        data = [{"id": name, "object": "model", "created": created, "owned_by": owner}
                for name in self._catalog.names()]
        return web.Response(body=json_bytes({"object": "list", "data": data}), content_type=JSON_CONTENT_TYPE)

    def unauthorized(self, request_id: str) -> web.Response:
        """The 401 of a listing without the key (only DashScope needs one)."""
        error = ApiError("InvalidApiKey", self.auth_message)
        payload = json_bytes(_error_body(self.server, error, request_id))
        return web.Response(body=payload, status=error.status, content_type=JSON_CONTENT_TYPE,
                            headers={REQUEST_ID_HEADER: request_id})


class CompatibleStream:
    """OpenAI chunks: a role chunk, one delta chunk per piece, a finish chunk, usage if asked, [DONE]."""

    def __init__(self, chat: ChatRequest, generation: Generation, request_id: str, created: int,
                 server: Server = SERVERS["dashscope"]) -> None:
        self._chat = chat
        self._generation = generation
        self._request_id = request_id
        self._server = server
        self._common = {"object": "chat.completion.chunk", "usage": None, "created": created,
                        "system_fingerprint": None, "model": chat.model.name, "id": f"chatcmpl-{request_id}"}
        self.headers = {"Content-Type": SSE_CONTENT_TYPE, REQUEST_ID_HEADER: request_id}

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        return _data(json_bytes({"choices": [choice], **self._common}))

    def opening(self) -> tuple[bytes, ...]:
        return (self._chunk({"delta": {"content": "", "role": "assistant"}, "index": 0, "logprobs": None,
                             "finish_reason": None}),)

    def thought(self, cumulative: str, delta: str, reasoning_tokens: int) -> bytes:
        return self._chunk({"finish_reason": None, "delta": {self._server.reasoning_field: delta}, "index": 0,
                            "logprobs": None})

    def piece(self, cumulative: str, delta: str, output_tokens: int) -> bytes:
        return self._chunk({"finish_reason": None, "delta": {"content": delta}, "index": 0, "logprobs": None})

    def error(self, error: ApiError) -> bytes:
        return _data(json_bytes(_error_body(self._server, error, self._request_id, in_stream=True)))

    def malformed(self) -> bytes:
        return b'data: {"choices":[{"delta":\n\n'

    def closing(self) -> tuple[bytes, ...]:
        generation = self._generation
        finish = self._chunk({"finish_reason": generation.finish_reason, "delta": {"content": ""}, "index": 0,
                              "logprobs": None})
        if not (self._chat.include_usage and self._chat.send_usage):
            return finish, _DONE
        usage = _data(json_bytes({**self._common, "choices": [], "usage": _usage(self._chat, generation)}))
        return finish, usage, _DONE


def _data(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def _usage(chat: ChatRequest, generation: Generation) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": chat.input_tokens, "completion_tokens": generation.output_tokens,
                             "total_tokens": chat.input_tokens + generation.output_tokens}
    if chat.thinking:
        usage["completion_tokens_details"] = {"reasoning_tokens": generation.reasoning_tokens}
    return usage


def _error_body(server: Server, error: ApiError, request_id: str, *, in_stream: bool = False) -> dict[str, Any]:
    if server.local:
        return error_body(server, error.status, error.message, in_stream=in_stream)
    code = error.compatible_code
    if error.status in (400, 401, 404, 413) and code != "data_inspection_failed":
        error_type = "invalid_request_error"
    else:
        error_type = code
    return {"error": {"message": error.message, "type": error_type, "param": None, "code": code},
            "request_id": request_id}
