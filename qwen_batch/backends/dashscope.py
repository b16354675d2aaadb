"""The native DashScope client: one ``Backend`` implementation, streamed or not, on either native path.

Requests go straight to an httpx transport, the aiohttp one by default: httpx's own pool
measured ~350 req/s at 64 connections and collapsed to ~40 req/s at 256 with 1 s latency,
while the aiohttp transport kept every connection busy. No ``httpx.AsyncClient`` sits in
between: its cookie jar, auth, redirect and hook steps, which DashScope never needs, cost
~130 us of CPU per request (BENCHMARKS.md, "What profiling found", 9).

The neutral request is encoded into the native body of its path (``wire.native_body``, or
``wire.multimodal_body`` whose contents are lists of parts). Not streamed, the reply comes
back as a stream of one ``Completed`` event. Streamed (``X-DashScope-SSE: enable`` with
``incremental_output: true``, protocol reference section 3), each SSE event becomes its
deltas, and the last one the usage and the finish; an ``event:error`` becomes ``Failed``,
and a stream cut short ends without its finish, which ``collect`` refuses. What the wire
does wrong is translated into the error tree by ``backends.errors`` (shared by every
backend); this module adds only what is native. The API key is sent in a header of each
request and never appears in an error.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from types import TracebackType
from typing import Any

import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from ..version import __version__
from ..apikey import key_problem
from ..catalog import NativePath
from ..errors import BackendError, ConfigError, ModelNotOnEndpoint, TransportError
from ..types import Reply, Request
from ..wire import (
    ERRORS,
    NATIVE_PATHS,
    REQUEST_ID_HEADER,
    SSE_HEADER,
    MalformedReply,
    error_body_status,
    multimodal_body,
    native_body,
    parse_native_reply,
    read_stream_event,
    usage_details,
)
from .base import Event, Failed, Finished, ReasoningDelta, TextDelta, Usage, WholeReply
from .errors import TRANSPORT_EXCEPTIONS, ErrorTranslator
from .posting import fixed_headers, post
from .streaming import stream_events

_OTHER_PATH: dict[NativePath, NativePath] = {"text": "multimodal", "multimodal": "text"}


def warn_on_stderr(message: str) -> None:
    """Say ``message`` as the CLI says its other warnings."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class DashScopeBackend:
    """Sends ``Request``s to ``base_url`` + the native path of ``path``.

    ``stream`` yields the reply's events or raises exactly one ``BackendError``.
    ``timeout_s`` bounds connecting and each wait for data, so also each wait between two
    events of a stream (not the wait for a free connection: the runner's worker count
    already bounds that). ``max_connections`` sizes the connection pool; ``transport``
    replaces the aiohttp transport (tests pass ``httpx.MockTransport``). ``streamed``: ask
    for SSE. ``path_known`` False (a model outside the catalog): the first "url error"
    answer moves every later request to the other path, once, and resends the refused one
    there; ``notify`` says so. Use as ``async with DashScopeBackend(...) as backend`` or call
    ``aclose()``.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
        streamed: bool = False,
        path: NativePath = "text",
        path_known: bool = True,
        notify: Callable[[str], None] = warn_on_stderr,
    ) -> None:
        if not api_key:
            raise ConfigError("the DashScope API key is empty")
        if (problem := key_problem(api_key)) is not None:
            raise ConfigError(f"the DashScope API key {problem}")
        if timeout_s <= 0 or max_connections < 1:
            raise ConfigError("timeout_s must be positive and max_connections at least 1")
        try:
            self._urls = {name: httpx.URL(base_url.rstrip("/") + route) for name, route in NATIVE_PATHS.items()}
        except httpx.InvalidURL as error:
            raise ConfigError(f"invalid base URL {base_url!r}: {error}") from None
        if self._urls["text"].scheme not in ("http", "https"):
            raise ConfigError(f"invalid base URL {base_url!r}: the scheme must be http or https")
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.streamed = streamed
        self.path: NativePath = path
        self._first_path: NativePath = path
        self.path_known = path_known
        self._notify = notify
        self._errors = {name: ErrorTranslator(api_key, str(url)) for name, url in self._urls.items()}
        if transport is None:
            limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
            # aiohttp's TCPConnector gets limit=max_connections and no per-host limit, so
            # max_connections requests to the one host really run at once.
            transport = AiohttpTransport(limits=limits)
        self._transport = transport
        common = [
            ("Authorization", f"Bearer {api_key}"),
            ("Content-Type", "application/json"),
            ("User-Agent", f"qwen-batch/{__version__}"),
        ]
        self._headers = fixed_headers([*common, ("Accept", "application/json"), ("Accept-Encoding", "gzip, deflate")])
        # The SDK's streaming headers (protocol reference section 1.4); no compression, so
        # each event can be read as it arrives.
        self._stream_headers = fixed_headers([
            *common,
            ("Accept", "text/event-stream"),
            (SSE_HEADER, "enable"),
            ("X-Accel-Buffering", "no"),
            ("Accept-Encoding", "identity"),
        ])
        # Connect and each read wait; no pool wait (the runner's worker count bounds it).
        self._extensions = {"timeout": {"connect": timeout_s, "read": timeout_s, "write": timeout_s, "pool": None}}

    def __repr__(self) -> str:
        return (
            f"DashScopeBackend(base_url={self.base_url!r}, timeout_s={self.timeout_s}, "
            f"max_connections={self.max_connections}, streamed={self.streamed}, path={self.path!r})"
        )

    async def __aenter__(self) -> DashScopeBackend:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection; the backend cannot be used afterwards."""
        await self._transport.aclose()

    def stream(self, request: Request) -> AsyncIterator[Event]:
        """The reply to ``request`` as a stream of events (one ``Completed`` when not streamed);
        reading it raises one ``BackendError``, or ends in ``Failed``, if the request fails."""
        if self.streamed:
            return self._streamed(request)
        return WholeReply(self._generate, request)

    # -- the path, and its one switch -------------------------------------------------

    def _body(self, request: Request, path: NativePath, *, streamed: bool) -> bytes:
        body = multimodal_body(request) if path == "multimodal" else native_body(request)
        if streamed:
            # Required for thinking, and it spares the quadratic cumulative text (section 3.2);
            # a wire detail: the fingerprint hashes the neutral request without it.
            body["parameters"] = {**request.parameters, "incremental_output": True}
        return orjson.dumps(body)

    def _switch_after_url_error(self, refused_path: NativePath, model: str) -> bool:
        """Whether a "url error" on ``refused_path`` moves the run to the other path (and the
        refused request is to be sent again there). Once per run, for an unknown model only."""
        if self.path_known or refused_path != self._first_path:
            return False
        if self.path == refused_path:
            self.path = _OTHER_PATH[refused_path]
            self._notify(
                f"the service does not serve {model!r} on the {refused_path} path (url error): sending it on the "
                f"{self.path} path from now on (set api.endpoint: {self.path} to start there)"
            )
        return True

    # -- not streamed ----------------------------------------------------------------

    async def _generate(self, request: Request) -> Reply:
        """The Reply to ``request``, on the other path if the first says "url error" (see above)."""
        path = self.path
        try:
            return await self._generate_on(request, path)
        except ModelNotOnEndpoint:
            if not self._switch_after_url_error(path, request.model):
                raise
        return await self._generate_on(request, self.path)

    async def _generate_on(self, request: Request, path: NativePath) -> Reply:
        """POST the body of ``request`` to ``path`` and return the Reply, or raise one ``BackendError``."""
        errors = self._errors[path]
        error: BackendError
        try:
            response = await self._post(self._body(request, path, streamed=False), path)
        except TRANSPORT_EXCEPTIONS as exc:
            # Built outside the ``except`` so the httpx exception is not chained.
            error = errors.transport_error(exc)
        else:
            if response.status_code == 200:
                return self._read_reply(response, request, errors)
            error = errors.status_error(
                response.status_code, response.content, response.headers, sent_parameters=request.parameters
            )
        raise error

    async def _post(self, body: bytes, path: NativePath) -> httpx.Response:
        """The response to one POST, its body read and its connection handed back."""
        outgoing = post(self._urls[path], self._headers, body, self._extensions)
        response = await self._transport.handle_async_request(outgoing)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    def _read_reply(self, response: httpx.Response, request: Request, errors: ErrorTranslator) -> Reply:
        content = response.content
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise errors.unreadable_body(content, response.headers) from None
        if isinstance(data, dict) and "output" not in data and data.get("code"):
            # A 200 that carries an error body (the SDK's "two-layer" errors).
            raise errors.status_error(
                error_body_status(data), content, response.headers, sent_parameters=request.parameters
            ) from None
        try:
            reply = parse_native_reply(data)
        except (MalformedReply, AttributeError) as exc:
            raise TransportError("MalformedReply", errors.scrub(str(exc)), status=200) from None
        if reply.request_id is None:
            header_id = response.headers.get(REQUEST_ID_HEADER)
            if header_id is not None:
                reply = dataclasses.replace(reply, request_id=header_id)
        return reply

    # -- streamed --------------------------------------------------------------------

    async def _streamed(self, request: Request) -> AsyncIterator[Event]:
        """The events of ``request``, on the other path if the first says "url error" (see above)."""
        path = self.path
        began = False  # a refusal after deltas is not a path's: never resend on top of them
        async with aclosing(self._stream_on(request, path)) as events:
            async for event in events:
                if (
                    not began
                    and type(event) is Failed
                    and isinstance(event.error, ModelNotOnEndpoint)
                    and self._switch_after_url_error(path, request.model)
                ):
                    break
                began = True
                yield event
            else:
                return
        async with aclosing(self._stream_on(request, self.path)) as events:
            async for event in events:
                yield event

    def _stream_on(self, request: Request, path: NativePath) -> AsyncGenerator[Event, None]:
        """POST ``request`` to ``path`` for SSE and yield its events as they arrive.

        Every failure is the last event, a ``Failed``: a refusal before the stream, an
        ``event:error`` in it, a transport error while reading (a reset, a timeout between
        events). A stream that stops before its finishing event just ends: ``collect`` calls
        that a ``TruncatedReply``, so its partial text never counts.
        """
        errors = self._errors[path]
        outgoing = post(self._urls[path], self._stream_headers, self._body(request, path, streamed=True), self._extensions)
        return stream_events(
            self._transport,
            outgoing,
            errors,
            request.parameters,
            lambda response: _StreamReader(request, errors, response.headers.get(REQUEST_ID_HEADER)),
        )


class _StreamReader:
    """Turns one stream's SSE events into ``Event``s; keeps the cumulative usage for the end."""

    __slots__ = ("_request", "_errors", "_request_id", "_usage", "finished", "failure")

    def __init__(self, request: Request, errors: ErrorTranslator, request_id: str | None) -> None:
        self._request = request
        self._errors = errors
        self._request_id = request_id
        self._usage: Any = None
        self.finished = False
        self.failure: BackendError | None = None

    def read(self, kind: bytes, data: bytes) -> list[Event]:
        """The events of one SSE event; sets ``failure`` (and returns none) for an error."""
        if self.finished or self.failure is not None:
            return []
        if kind == b"error":
            self.failure = self._error(data)
            return []
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.failure = self._errors.unreadable_body(data, {})
            return []
        if isinstance(body, dict) and "output" not in body and body.get("code"):
            # A result event that is an error (the v2 SDK raises any event with a code).
            self.failure = self._error(data, body)
            return []
        try:
            text, reasoning, finish_reason, usage = read_stream_event(body)
        except MalformedReply as exc:
            self.failure = TransportError("MalformedReply", self._errors.scrub(str(exc)), status=200)
            return []
        events: list[Event] = []
        if reasoning:
            events.append(ReasoningDelta(reasoning))
        if text:
            events.append(TextDelta(text))
        if usage is not None:
            self._usage = usage
        if self._request_id is None and isinstance(body.get("request_id"), str):
            self._request_id = body["request_id"]
        if finish_reason is not None:
            self.finished = True
            usage_event = self._usage_event()
            if usage_event is not None:
                events.append(usage_event)
            events.append(Finished(finish_reason, self._request_id))
        return events

    def _usage_event(self) -> Usage | None:
        usage = self._usage
        try:
            reasoning_tokens, cached_tokens = usage_details(usage)
            return Usage(int(usage["input_tokens"]), int(usage["output_tokens"]), reasoning_tokens, cached_tokens)
        except (KeyError, TypeError, ValueError, AttributeError):
            return None  # collect then reports the stream as ended without its usage

    def _error(self, data: bytes, body: Any = None) -> BackendError:
        if body is None:
            try:
                body = orjson.loads(data)
            except orjson.JSONDecodeError:
                body = {}
        status = error_body_status(body) if isinstance(body, dict) else 400
        return self._errors.status_error(status, data, {}, sent_parameters=self._request.parameters)
