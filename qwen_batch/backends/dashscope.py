"""The native DashScope text-generation client (non-streaming): one ``Backend`` implementation.

Requests go straight to an httpx transport, the aiohttp one by default: httpx's own pool
measured ~350 req/s at 64 connections and collapsed to ~40 req/s at 256 with 1 s latency,
while the aiohttp transport kept every connection busy. No ``httpx.AsyncClient`` sits in
between: its cookie jar, auth, redirect and hook steps, which DashScope never needs, cost
~130 us of CPU per request (BENCHMARKS.md, "What profiling found", 9).

The neutral request is encoded into the native body (``wire.native_body``); the reply comes
back as a stream of one ``Completed`` event. What the wire does wrong is translated into the
error tree by ``backends.errors`` (shared by every backend); this module adds only what is
native: a 200 that carries an error body, and reading a generation result. The API key is
sent in a header of each request and never appears in an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from types import TracebackType

import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from ..version import __version__
from ..apikey import key_problem
from ..errors import BackendError, ConfigError, TransportError
from ..types import Reply, Request
from ..wire import ERRORS, NATIVE_PATH, REQUEST_ID_HEADER, MalformedReply, native_body, parse_native_reply
from .base import Event, WholeReply
from .errors import TRANSPORT_EXCEPTIONS, ErrorTranslator


class DashScopeBackend:
    """Sends ``Request``s to ``base_url + NATIVE_PATH``; each reply is a stream of one event.

    ``stream`` yields one ``Completed`` or raises exactly one ``BackendError`` subclass.
    ``timeout_s`` bounds connecting and each wait for data (not the wait for a free
    connection: the runner's worker count already bounds that). ``max_connections``
    sizes the connection pool; ``transport`` replaces the aiohttp transport (tests pass
    ``httpx.MockTransport``). Use as ``async with DashScopeBackend(...) as backend`` or
    call ``aclose()``.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not api_key:
            raise ConfigError("the DashScope API key is empty")
        if (problem := key_problem(api_key)) is not None:
            raise ConfigError(f"the DashScope API key {problem}")
        if timeout_s <= 0 or max_connections < 1:
            raise ConfigError("timeout_s must be positive and max_connections at least 1")
        try:
            self._url = httpx.URL(base_url.rstrip("/") + NATIVE_PATH)
        except httpx.InvalidURL as error:
            raise ConfigError(f"invalid base URL {base_url!r}: {error}") from None
        if self._url.scheme not in ("http", "https"):
            raise ConfigError(f"invalid base URL {base_url!r}: the scheme must be http or https")
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._errors = ErrorTranslator(api_key, str(self._url))
        if transport is None:
            limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
            # aiohttp's TCPConnector gets limit=max_connections and no per-host limit, so
            # max_connections requests to the one host really run at once.
            transport = AiohttpTransport(limits=limits)
        self._transport = transport
        self._headers = [
            ("Authorization", f"Bearer {api_key}"),
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
            ("Accept-Encoding", "gzip, deflate"),
            ("User-Agent", f"qwen-batch/{__version__}"),
        ]
        # Connect and each read wait; no pool wait (the runner's worker count bounds it).
        self._timeout = {"connect": timeout_s, "read": timeout_s, "write": timeout_s, "pool": None}

    def __repr__(self) -> str:
        return (
            f"DashScopeBackend(base_url={self.base_url!r}, timeout_s={self.timeout_s}, "
            f"max_connections={self.max_connections})"
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
        """The reply to ``request`` as a stream of one ``Completed`` event; reading it raises
        one ``BackendError`` if the request fails."""
        return WholeReply(self._generate, request)

    async def _generate(self, request: Request) -> Reply:
        """POST the native body of ``request`` and return the Reply, or raise one ``BackendError``."""
        body = orjson.dumps(native_body(request))
        error: BackendError
        try:
            response = await self._post(body)
        except TRANSPORT_EXCEPTIONS as exc:
            # Built outside the ``except`` so the httpx exception is not chained.
            error = self._errors.transport_error(exc)
        else:
            if response.status_code == 200:
                return self._read_reply(response, request)
            error = self._errors.status_error(
                response.status_code, response.content, response.headers, sent_parameters=request.parameters
            )
        raise error

    async def _post(self, body: bytes) -> httpx.Response:
        """The response to one POST, its body read and its connection handed back."""
        outgoing = httpx.Request(
            "POST", self._url, headers=self._headers, content=body, extensions={"timeout": self._timeout}
        )
        response = await self._transport.handle_async_request(outgoing)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    # -- what is native: a 200 body --------------------------------------------------

    def _read_reply(self, response: httpx.Response, request: Request) -> Reply:
        content = response.content
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise self._errors.unreadable_body(content, response.headers) from None
        if isinstance(data, dict) and "output" not in data and data.get("code"):
            # A 200 that carries an error body (the SDK's "two-layer" errors).
            code = str(data["code"])
            status = ERRORS[code].status if code in ERRORS else 400
            raise self._errors.status_error(
                status, content, response.headers, sent_parameters=request.parameters
            ) from None
        try:
            reply = parse_native_reply(data)
        except (MalformedReply, AttributeError) as exc:
            raise TransportError("MalformedReply", self._errors.scrub(str(exc)), status=200) from None
        if reply.request_id is None:
            header_id = response.headers.get(REQUEST_ID_HEADER)
            if header_id is not None:
                reply = dataclasses.replace(reply, request_id=header_id)
        return reply
