"""The OpenAI-compatible client: chat completions at ``{base_url}/chat/completions``, streamed or not.

The same hot-path choices as the native client (``backends.dashscope``): requests go
straight to the aiohttp transport through httpx's transport interface, no
``httpx.AsyncClient`` in between. The body is the neutral request in one server's dialect
(``servers.Dialect``: where DashScope's extensions go); streamed, it asks for
``stream_options.include_usage`` always, reads bare ``data:`` events up to ``[DONE]``
(protocol reference section 6) and gives the usage and finish only at ``[DONE]``, so a stream
cut short ends without them (``collect`` calls that a ``TruncatedReply``). Reasoning is read
from ``reasoning_content`` or ``reasoning``. A reply without usage (a server that sends
none) is counted here, ``usage_source`` "estimated": the request's own exact input count
and the answer's count with the Qwen tokenizer. vLLM's ``finish_reason`` ``abort`` and
``error`` are retried as server errors and ``content_filter`` is a row error (README,
"Other servers"); every other finish reason is kept as the server gives it. Errors are
translated by ``backends.errors``, the key scrubbed; a keyless server gets no
``Authorization`` header at all.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from types import TracebackType
from typing import Any

import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from ..apikey import key_problem
from ..errors import BackendError, BadRequest, ConfigError, ServerError, TransportError
from ..servers import DIALECTS, Dialect
from ..tokens import count_text
from ..types import Reply, Request
from ..version import __version__
from ..wire import (
    CHAT_COMPLETIONS_ROUTE,
    COMPATIBLE_NOT_SENT,
    ERRORS,
    REQUEST_ID_HEADER,
    MalformedReply,
    compatible_usage,
    read_compatible_choice,
)
from .base import Event, Failed, Finished, ReasoningDelta, TextDelta, Usage, WholeReply
from .errors import TRANSPORT_EXCEPTIONS, ErrorTranslator
from .posting import fixed_headers, post
from .streaming import stream_events

_DONE = b"[DONE]"
RETRIED_FINISH_REASONS = frozenset({"abort", "error"})
"""vLLM's: the engine dropped the request (a restart, a preemption): sending it again may pass."""
ERROR_FINISH_REASONS = frozenset({"content_filter"})
"""The answer was cut by a filter: the text is not the model's whole answer, and asking again will not help."""


def finish_problem(finish_reason: str, request_id: str | None) -> BackendError | None:
    """The error a finish reason stands for (see the module docstring), or None for a kept one."""
    code = f"finish_reason:{finish_reason}"
    if finish_reason in RETRIED_FINISH_REASONS:
        message = f"the server ended the reply with finish_reason {finish_reason!r}"
        return ServerError(code, message, status=200, request_id=request_id)
    if finish_reason in ERROR_FINISH_REASONS:
        return BadRequest(code, "the server's content filter cut the answer", status=200, request_id=request_id)
    return None


def chat_body(request: Request, sent_parameters: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions body of ``request`` with its parameters in a dialect's form: what an
    online request posts and what a batch line carries as its ``body``, the same for both."""
    return {"model": request.model, "messages": request.messages, **sent_parameters}


def estimated_usage(request: Request, text: str, reasoning: str | None) -> Usage:
    """Usage counted here for a reply that reported none: the request's exact input count, the
    answer (and reasoning) counted with the model's tokenizer."""
    reasoning_tokens = count_text(reasoning, request.model) if reasoning else None
    output = count_text(text, request.model) + (reasoning_tokens or 0)
    return Usage(request.input_tokens, output, reasoning_tokens, None, estimated=True)


class OpenAIBackend:
    """Sends ``Request``s to ``base_url`` + ``/chat/completions`` in ``dialect``'s way.

    ``api_key`` None: a server that needs none. ``timeout_s``, ``max_connections``,
    ``transport`` and ``streamed`` are as for ``DashScopeBackend``. Use as ``async with``
    or call ``aclose()``.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout_s: float,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
        streamed: bool = False,
        dialect: Dialect = DIALECTS["dashscope"],
    ) -> None:
        if api_key is not None and (problem := key_problem(api_key)) is not None:
            raise ConfigError(f"the API key {problem}")
        if api_key == "":
            raise ConfigError("the API key is empty (set api.key_env: null for a server that needs none)")
        if timeout_s <= 0 or max_connections < 1:
            raise ConfigError("timeout_s must be positive and max_connections at least 1")
        try:
            self._url = httpx.URL(base_url.rstrip("/") + CHAT_COMPLETIONS_ROUTE)
        except httpx.InvalidURL as error:
            raise ConfigError(f"invalid base URL {base_url!r}: {error}") from None
        if self._url.scheme not in ("http", "https"):
            raise ConfigError(f"invalid base URL {base_url!r}: the scheme must be http or https")
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.streamed = streamed
        self.dialect = dialect
        self._errors = ErrorTranslator(api_key or "", str(self._url))
        if transport is None:
            limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
            transport = AiohttpTransport(limits=limits)
        self._transport = transport
        common = [("Content-Type", "application/json"), ("User-Agent", f"qwen-batch/{__version__}")]
        if api_key is not None:
            common.insert(0, ("Authorization", f"Bearer {api_key}"))
        self._headers = fixed_headers([*common, ("Accept", "application/json"), ("Accept-Encoding", "gzip, deflate")])
        self._stream_headers = fixed_headers([*common, ("Accept", "text/event-stream"), ("Accept-Encoding", "identity")])
        self._extensions = {"timeout": {"connect": timeout_s, "read": timeout_s, "write": timeout_s, "pool": None}}
        # Every request of a run carries the same parameters dict: its dialect form is made once.
        self._parameters_of: tuple[Any, dict[str, Any]] = (None, {})

    def __repr__(self) -> str:
        return (
            f"OpenAIBackend(base_url={self.base_url!r}, timeout_s={self.timeout_s}, "
            f"max_connections={self.max_connections}, streamed={self.streamed}, server={self.dialect.server!r})"
        )

    async def __aenter__(self) -> OpenAIBackend:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection; the backend cannot be used afterwards."""
        await self._transport.aclose()

    def stream(self, request: Request) -> AsyncIterator[Event]:
        """The reply's events (one ``Completed`` when not streamed); see ``DashScopeBackend.stream``."""
        if self.streamed:
            return self._streamed(request)
        return WholeReply(self._generate, request)

    def _body(self, request: Request, *, streamed: bool) -> bytes:
        parameters = request.parameters
        known, sent = self._parameters_of
        if parameters is not known:
            sent = self.dialect.body_parameters(parameters, COMPATIBLE_NOT_SENT)
            self._parameters_of = (parameters, sent)
        body = chat_body(request, sent)
        if streamed:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body)

    # -- not streamed ----------------------------------------------------------------

    async def _generate(self, request: Request) -> Reply:
        """POST ``request`` and return its Reply, or raise one ``BackendError``."""
        errors = self._errors
        error: BackendError
        outgoing = post(self._url, self._headers, self._body(request, streamed=False), self._extensions)
        try:
            response = await self._transport.handle_async_request(outgoing)
            try:
                await response.aread()
            finally:
                await response.aclose()
        except TRANSPORT_EXCEPTIONS as exc:
            error = errors.transport_error(exc)
        else:
            if response.status_code == 200:
                return self._read_reply(response, request)
            error = errors.status_error(
                response.status_code, response.content, response.headers, sent_parameters=request.parameters
            )
        raise error

    def _read_reply(self, response: httpx.Response, request: Request) -> Reply:
        errors = self._errors
        content = response.content
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise errors.unreadable_body(content, response.headers) from None
        if isinstance(data, dict) and "choices" not in data and ("error" in data or data.get("object") == "error"):
            raise errors.status_error(
                _error_status(data), content, response.headers, sent_parameters=request.parameters
            ) from None
        try:
            text, reasoning, finish_reason = read_compatible_choice(data)
        except MalformedReply as exc:
            raise TransportError("MalformedReply", errors.scrub(str(exc)), status=200) from None
        request_id = _reply_id(data) or response.headers.get(REQUEST_ID_HEADER)
        if finish_reason is None:
            raise TransportError(
                "MalformedReply", "the chat completion has no finish_reason", status=200, request_id=request_id
            )
        if (problem := finish_problem(finish_reason, request_id)) is not None:
            raise problem
        usage = compatible_usage(data.get("usage"))
        if usage is None:
            estimate = estimated_usage(request, text, reasoning)
            input_tokens, output_tokens, reasoning_tokens, cached = (
                estimate.input_tokens, estimate.output_tokens, estimate.reasoning_tokens, None
            )
        else:
            input_tokens, output_tokens, reasoning_tokens, cached = usage
        return Reply(
            text,
            finish_reason,
            input_tokens,
            output_tokens,
            request_id,
            reasoning=reasoning,
            reasoning_tokens=reasoning_tokens,
            cached_tokens=cached,
            usage_source="service" if usage is not None else "estimated",
        )

    # -- streamed --------------------------------------------------------------------

    def _streamed(self, request: Request) -> AsyncGenerator[Event, None]:
        """POST ``request`` for SSE and yield its events as they arrive; every failure is the last
        event, a ``Failed`` (see ``DashScopeBackend._stream_on``)."""
        errors = self._errors
        outgoing = post(self._url, self._stream_headers, self._body(request, streamed=True), self._extensions)
        return stream_events(
            self._transport,
            outgoing,
            errors,
            request.parameters,
            lambda response: _ChunkReader(request, errors, response.headers.get(REQUEST_ID_HEADER)),
        )


class _ChunkReader:
    """Turns one stream's ``data:`` events into ``Event``s; usage and finish wait for ``[DONE]``."""

    __slots__ = ("_request", "_errors", "_request_id", "_usage", "_finish", "_text", "_reasoning", "finished", "failure")

    def __init__(self, request: Request, errors: ErrorTranslator, request_id: str | None) -> None:
        self._request = request
        self._errors = errors
        self._request_id = request_id
        self._usage: tuple[int, int, int | None, int | None] | None = None
        self._finish: str | None = None
        self._text: list[str] = []  # kept only to count a reply that reports no usage
        self._reasoning: list[str] = []
        self.finished = False
        self.failure: BackendError | None = None

    def read(self, kind: bytes, data: bytes) -> list[Event]:
        """The events of one ``data:`` payload (bare, so ``kind`` is always the default);
        sets ``failure`` (and returns none) for an error."""
        if self.finished or self.failure is not None:
            return []
        if data == _DONE:
            return self._end()
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.failure = self._errors.unreadable_body(data, {})
            return []
        if not isinstance(body, dict):
            self.failure = TransportError("MalformedReply", "a stream chunk is not a JSON object", status=200)
            return []
        if "error" in body or body.get("object") == "error":
            self.failure = self._errors.status_error(
                _error_status(body), data, {}, sent_parameters=self._request.parameters
            )
            return []
        if self._request_id is None:
            self._request_id = _reply_id(body)
        usage = compatible_usage(body.get("usage"))
        if usage is not None:
            self._usage = usage
        if not body.get("choices"):
            return []  # the usage chunk (choices: [])
        try:
            text, reasoning, finish_reason = read_compatible_choice(body)
        except MalformedReply as exc:
            self.failure = TransportError("MalformedReply", self._errors.scrub(str(exc)), status=200)
            return []
        events: list[Event] = []
        if reasoning:
            self._reasoning.append(reasoning)
            events.append(ReasoningDelta(reasoning))
        if text:
            self._text.append(text)
            events.append(TextDelta(text))
        if finish_reason is not None:
            self._finish = finish_reason
        return events

    def _end(self) -> list[Event]:
        self.finished = True
        finish = self._finish
        if finish is None:
            return []  # collect: the stream ended without its finish
        if (problem := finish_problem(finish, self._request_id)) is not None:
            self.failure = problem
            return []
        if self._usage is None:
            reasoning = "".join(self._reasoning) if self._reasoning else None
            usage = estimated_usage(self._request, "".join(self._text), reasoning)
        else:
            usage = Usage(*self._usage)
        return [usage, Finished(finish, self._request_id)]


def _error_status(body: dict[str, Any]) -> int:
    """The HTTP status an error body sent with 200 stands for: its integer code, else 400."""
    fields = body.get("error") if isinstance(body.get("error"), dict) else body
    code = fields.get("code")  # type: ignore[union-attr]
    if isinstance(code, int) and 400 <= code <= 599:
        return code
    spec = next((spec for spec in ERRORS.values() if spec.compatible_code == code), None)
    return spec.status if spec is not None else 400


def _reply_id(body: dict[str, Any]) -> str | None:
    """The service's request id from a chat completion's ``id`` (``chatcmpl-<request id>`` on DashScope)."""
    reply_id = body.get("id")
    if not isinstance(reply_id, str):
        return None
    return reply_id.removeprefix("chatcmpl-")
