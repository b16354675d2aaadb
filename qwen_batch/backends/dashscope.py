"""The native DashScope text-generation client (non-streaming).

Requests go straight to an httpx transport, the aiohttp one by default: httpx's own pool
measured ~350 req/s at 64 connections and collapsed to ~40 req/s at 256 with 1 s latency,
while the aiohttp transport kept every connection busy. No ``httpx.AsyncClient`` sits in
between: its cookie jar, auth, redirect and hook steps, which DashScope never needs, cost
~130 us of CPU per request (BENCHMARKS.md, "What profiling found", 9).

Everything the wire can do wrong is translated into the error tree here, in
``_translate_status`` (HTTP statuses and error bodies, with ``configuration_error`` for
the answers that say the job's configuration is wrong), ``_translate_exception``
(transport exceptions) and ``_read_reply`` (200 bodies); nothing else in qwen-batch sees
an httpx or aiohttp exception. The API key is sent in a header of each request and is
scrubbed from every message this module builds; exceptions are raised ``from None``
so no chained httpx exception (which holds the request and its headers) travels along.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import re
import time
from collections.abc import Collection
from types import TracebackType
from typing import Any

import aiohttp
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from ..version import __version__
from ..apikey import key_problem
from ..errors import (
    AuthError,
    BackendError,
    BadRequest,
    ConfigError,
    ConfigurationRefused,
    EndpointNotFound,
    ModelNotOnEndpoint,
    ParameterRefused,
    RateLimited,
    ServerError,
    TransportError,
    UnknownModel,
)
from ..types import Reply, Request
from ..wire import (
    ERRORS,
    FREE_QUOTA_EXHAUSTED_MESSAGE,
    NATIVE_PATH,
    NON_TRANSIENT_429_CODES,
    REQUEST_ID_HEADER,
    THROTTLING_KINDS,
    MalformedReply,
    parse_native_reply,
)

# Error messages quote at most this much of a body the service did not shape as an error.
MAX_QUOTED_BODY_CHARS = 200
_SERVER_ERROR_STATUSES = frozenset({408, 500, 502, 503, 504})
_REDACTED = "sk-***"


class DashScopeBackend:
    """Sends ``Request``s to ``base_url + NATIVE_PATH`` and returns ``Reply``s.

    ``generate`` returns a Reply or raises exactly one ``BackendError`` subclass.
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
        self._api_key = api_key
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

    async def generate(self, request: Request) -> Reply:
        """POST ``request.body`` and return the Reply, or raise one ``BackendError``."""
        body = orjson.dumps(request.body)
        error: BackendError
        try:
            response = await self._post(body)
        except (httpx.HTTPError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            # Built outside the ``except`` so the httpx exception is not chained.
            error = self._translate_exception(exc)
        else:
            if response.status_code == 200:
                return self._read_reply(response, request)
            error = self._translate_status(response.status_code, response.content, response.headers, request)
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

    # -- the one place where the wire becomes the error tree ------------------------

    def _read_reply(self, response: httpx.Response, request: Request) -> Reply:
        content = response.content
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise self._bad_body(response) from None
        if isinstance(data, dict) and "output" not in data and data.get("code"):
            # A 200 that carries an error body (the SDK's "two-layer" errors).
            code = str(data["code"])
            status = ERRORS[code].status if code in ERRORS else 400
            raise self._translate_status(status, content, response.headers, request) from None
        try:
            reply = parse_native_reply(data)
        except (MalformedReply, AttributeError) as exc:
            raise TransportError("MalformedReply", self._scrub(str(exc)), status=200) from None
        if reply.request_id is None:
            header_id = response.headers.get(REQUEST_ID_HEADER)
            if header_id is not None:
                reply = dataclasses.replace(reply, request_id=header_id)
        return reply

    def _bad_body(self, response: httpx.Response) -> TransportError:
        """A 200 body that orjson refused: cut off, or not JSON (as the standard library reads it)."""
        content = response.content
        try:
            json.loads(content)
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            exc: ValueError | None = error
        else:  # JSON to the standard library only: NaN, lone surrogates
            exc = None
        request_id = response.headers.get(REQUEST_ID_HEADER)
        declared = response.headers.get("content-length")
        short = declared is not None and declared.isdigit() and int(declared) > len(content)
        # A JSON document that stops in the middle is a cut-off body, not a wrong one.
        ends_early = (
            isinstance(exc, json.JSONDecodeError)
            and len(content) > 0
            and (exc.pos >= len(exc.doc.rstrip()) or exc.msg.startswith("Unterminated string"))
        )
        if short or ends_early:
            return TransportError(
                "TruncatedReply",
                f"the reply body ended after {len(content)} bytes",
                status=200,
                request_id=request_id,
            )
        return TransportError(
            "MalformedReply",
            f"the reply body is not JSON: {self._quote(content)}",
            status=200,
            request_id=request_id,
        )

    def _translate_status(
        self, status: int, content: bytes, headers: httpx.Headers, request: Request
    ) -> BackendError:
        """The error for a non-200 answer (or a 200 error body) to ``request``."""
        code, message, request_id = _error_fields(content)
        if not code:
            code = f"HTTP{status}"
        if not message:
            message = self._quote(content) or f"HTTP status {status}"
        message = self._scrub(message)
        request_id = request_id or headers.get(REQUEST_ID_HEADER)
        if status == 429:
            if code in NON_TRANSIENT_429_CODES or FREE_QUOTA_EXHAUSTED_MESSAGE in message:
                return BadRequest(code, message, status=status, request_id=request_id)
            return RateLimited(
                code,
                message,
                status=status,
                request_id=request_id,
                retry_after=_retry_after(headers),
                kind=throttling_kind(code, message),
            )
        if status in (401, 403):
            return AuthError(code, message, status=status, request_id=request_id)
        sent = request.body.get("parameters") or ()
        configuration = configuration_error(
            status, code, message, sent_parameters=sent, request_id=request_id, url=str(self._url)
        )
        if configuration is not None:
            return configuration
        if status in _SERVER_ERROR_STATUSES or status >= 500:
            return ServerError(code, message, status=status, request_id=request_id)
        return BadRequest(code, message, status=status, request_id=request_id)

    def _translate_exception(self, exc: BaseException) -> TransportError:
        # httpx_aiohttp maps aiohttp errors coarsely (a dropped connection becomes
        # ConnectTimeout), so the aiohttp original, kept as __cause__, decides first.
        cause = exc.__cause__ if isinstance(exc, httpx.HTTPError) and exc.__cause__ is not None else exc
        if isinstance(cause, aiohttp.ClientPayloadError):
            code = "TruncatedReply"
        elif isinstance(cause, (asyncio.TimeoutError, httpx.TimeoutException)):
            code = "Timeout"
        elif isinstance(cause, httpx.RemoteProtocolError) and "complete message body" in str(cause):
            code = "TruncatedReply"
        else:
            code = "ConnectionError"
        detail = self._scrub(str(cause)) or "no detail"
        return TransportError(code, f"{type(cause).__name__}: {detail[:MAX_QUOTED_BODY_CHARS]}")

    def _quote(self, content: bytes) -> str:
        text = " ".join(content[: MAX_QUOTED_BODY_CHARS * 4].decode("utf-8", "replace").split())
        if len(text) > MAX_QUOTED_BODY_CHARS:
            text = text[:MAX_QUOTED_BODY_CHARS] + "..."
        return self._scrub(text)

    def _scrub(self, text: str) -> str:
        """Remove the API key from text that came from outside (a server may echo it)."""
        return text.replace(self._api_key, _REDACTED) if self._api_key in text else text


# Words of the service's 429 messages that name the limit (protocol reference section 4.2),
# for codes that do not: the generic "Throttling" and anything new.
_TOKEN_WORDS = ("quota", "token")
_BURST_WORDS = ("too quickly", "burst", "smoothly")


def throttling_kind(code: str, message: str) -> str:
    """Which limit a transient 429 reports: "requests", "tokens" or "burst".

    The specific codes decide (``Throttling.RateQuota``, ``Throttling.AllocationQuota``,
    ``Throttling.BurstRate`` and their compatible-mode names); for a generic code the
    message does ("Allocated quota exceeded" is tokens per minute, "Request rate
    increased too quickly" a burst); anything else counts as requests per minute.
    """
    kind = THROTTLING_KINDS.get(code)
    if kind is not None and code not in _GENERIC_THROTTLING_CODES:
        return kind
    text = message.lower()
    if any(word in text for word in _BURST_WORDS):
        return "burst"
    if any(word in text for word in _TOKEN_WORDS):
        return "tokens"
    return kind or "requests"


_GENERIC_THROTTLING_CODES = frozenset({"Throttling", "LimitRequests", "limit_requests"})


# --- answers that say the job's configuration is wrong, not the row ---------------------
# (protocol reference sections 1.1, 1.3, 4.2, 6; research-wave2.md item 1)

_UNKNOWN_MODEL_CODES = frozenset({"ModelNotFound", "model_not_found", "Model.NotExist"})
# The native API sends "Model not exist." under the generic 400 InvalidParameter code.
_UNKNOWN_MODEL_MESSAGE = re.compile(
    r"\bmodel\b.{0,80}?\b(?:not exist|does not exist|can ?not be found|not found)|模型不存在", re.IGNORECASE
)
_MODEL_NOT_ON_ENDPOINT_CODE = "InvalidURL"
_MODEL_NOT_ON_ENDPOINT_MESSAGE = "url error"
_ENDPOINT_NOT_FOUND_STATUSES = frozenset({404, 405})
# Parameters the service applies from the model itself; the model is the same in every request.
MODEL_MODE_PARAMETERS = ("enable_thinking", "thinking_budget", "incremental_output")
# Words of a message about the request's input (the row), which a parameter's name never overrides.
_ROW_WORDS = re.compile(r"(?<![A-Za-z_])(?:input|messages|content|role|prompt)(?![A-Za-z_])", re.IGNORECASE)


def configuration_error(
    status: int,
    code: str,
    message: str,
    *,
    sent_parameters: Collection[str],
    request_id: str | None = None,
    url: str = "",
) -> ConfigurationRefused | None:
    """The ``ConfigurationRefused`` this answer is, or None when it may be about the row alone.

    Only a 4xx other than 401, 403 and 429 (which the caller decides first) can be one.
    The rules, most specific first:

    - an unknown-model code (``ModelNotFound``, ``model_not_found``, ``Model.NotExist``), or a
      400/404 whose message says the model does not exist: ``UnknownModel``;
    - 400 ``InvalidURL`` / ``url error``: the model is served on another path, ``ModelNotOnEndpoint``;
    - any other 404 or 405 from the generation URL (``WorkSpaceNotFound`` included): the URL is
      wrong, ``EndpointNotFound``;
    - a 400 ``InvalidParameter`` whose message names a parameter that is the same in every
      request of the job, and says nothing about the input: ``ParameterRefused``. Those
      parameters are the ones this request sent in ``parameters`` (qwen-batch sends the spec's
      parameters, unchanged, with every row) and the ones the service takes from the model
      (``MODEL_MODE_PARAMETERS``). A message about the input (``Range of input length``, roles,
      messages, content, prompt) is that row's error even if it names a parameter too.
    """
    if not 400 <= status < 500:
        return None
    error_class: type[ConfigurationRefused] | None = None
    if code in _UNKNOWN_MODEL_CODES or (status in (400, 404) and _UNKNOWN_MODEL_MESSAGE.search(message)):
        error_class = UnknownModel
    elif status == 400 and (
        code == _MODEL_NOT_ON_ENDPOINT_CODE or message.lower().startswith(_MODEL_NOT_ON_ENDPOINT_MESSAGE)
    ):
        error_class = ModelNotOnEndpoint
    elif status in _ENDPOINT_NOT_FOUND_STATUSES:
        error_class = EndpointNotFound
    if error_class is not None:
        return error_class(code, message, status=status, request_id=request_id, url=url)
    if status != 400 or not ("InvalidParameter" in code or code == "invalid_parameter_error"):
        return None
    parameter = refused_parameter(message, sent_parameters)
    if parameter is None:
        return None
    return ParameterRefused(code, message, parameter=parameter, status=status, request_id=request_id, url=url)


def refused_parameter(message: str, sent_parameters: Collection[str]) -> str | None:
    """The job-constant parameter a 400 message names, or None (none named, or it is about the input)."""
    if _ROW_WORDS.search(message):
        return None
    for name in (*sent_parameters, *MODEL_MODE_PARAMETERS):
        if re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", message, re.IGNORECASE):
            return name
    return None


def _error_fields(content: bytes) -> tuple[str | None, str | None, str | None]:
    """``(code, message, request_id)`` from a JSON, SSE (``data:{...}``) or other body."""
    data: Any = None
    text = content.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
    else:
        for line in text.splitlines():
            if line.startswith("data:"):
                try:
                    data = json.loads(line[5:])
                except ValueError:
                    data = None
                break
    if not isinstance(data, dict):
        return None, None, None
    fields = data
    if isinstance(data.get("error"), dict):  # the OpenAI-compatible shape
        fields = data["error"]
    code, message, request_id = fields.get("code"), fields.get("message"), data.get("request_id")
    return (
        str(code) if code else None,
        str(message) if message else None,
        str(request_id) if request_id else None,
    )


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or an HTTP date) or ``retry-after-ms``."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())
