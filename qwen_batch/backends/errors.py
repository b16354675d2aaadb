"""The one place where the wire becomes the error tree, for every backend.

HTTP statuses and error bodies (``ErrorTranslator.status_error``, with
``configuration_error`` for the answers that say the job's configuration is wrong),
transport exceptions (``ErrorTranslator.transport_error``; ``TRANSPORT_EXCEPTIONS`` is what a
backend catches around its one send) and 200 bodies that cannot be read
(``ErrorTranslator.unreadable_body``) become exactly one ``BackendError``. Nothing else in
qwen-batch sees an httpx or aiohttp exception. Every message built here has the API key
scrubbed out (a server may echo it), and every error is built outside an ``except`` block or
raised ``from None``, so no chained httpx exception (which holds the request and its
headers) travels along.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import time
from collections.abc import Collection, Mapping
from typing import Any

import aiohttp
import httpx

from ..errors import (
    AuthError,
    BackendError,
    BadRequest,
    ConfigurationRefused,
    EndpointNotFound,
    ModelNotOnEndpoint,
    ParameterRefused,
    RateLimited,
    ServerError,
    TransportError,
    UnknownModel,
)
from ..wire import FREE_QUOTA_EXHAUSTED_MESSAGE, NON_TRANSIENT_429_CODES, REQUEST_ID_HEADER, THROTTLING_KINDS

# Error messages quote at most this much of a body the service did not shape as an error.
MAX_QUOTED_BODY_CHARS = 200
_SERVER_ERROR_STATUSES = frozenset({408, 500, 502, 503, 504})
_REDACTED = "sk-***"

TRANSPORT_EXCEPTIONS: tuple[type[BaseException], ...] = (httpx.HTTPError, aiohttp.ClientError, asyncio.TimeoutError, OSError)
"""What a send can raise that ``ErrorTranslator.transport_error`` translates."""


class ErrorTranslator:
    """Translates one backend's wire failures into the error tree, scrubbing ``api_key``.

    ``url`` is where the backend sends: configuration errors name it.
    """

    __slots__ = ("_api_key", "_url")

    def __init__(self, api_key: str, url: str) -> None:
        self._api_key = api_key
        self._url = url

    def status_error(
        self, status: int, content: bytes, headers: Mapping[str, str], *, sent_parameters: Collection[str]
    ) -> BackendError:
        """The error for a non-200 answer (or a 200 error body).

        ``sent_parameters``: the parameter names the request carried, which a 400 may refuse
        for the whole job (``configuration_error``).
        """
        code, message, request_id = error_fields(content)
        if not code:
            code = f"HTTP{status}"
        if not message:
            message = self.quote(content) or f"HTTP status {status}"
        message = self.scrub(message)
        request_id = request_id or headers.get(REQUEST_ID_HEADER)
        if status == 429:
            if code in NON_TRANSIENT_429_CODES or FREE_QUOTA_EXHAUSTED_MESSAGE in message:
                return BadRequest(code, message, status=status, request_id=request_id)
            return RateLimited(
                code,
                message,
                status=status,
                request_id=request_id,
                retry_after=retry_after(headers),
                kind=throttling_kind(code, message),
            )
        if status in (401, 403):
            return AuthError(code, message, status=status, request_id=request_id)
        configuration = configuration_error(
            status, code, message, sent_parameters=sent_parameters, request_id=request_id, url=self._url
        )
        if configuration is not None:
            return configuration
        if status in _SERVER_ERROR_STATUSES or status >= 500:
            return ServerError(code, message, status=status, request_id=request_id)
        return BadRequest(code, message, status=status, request_id=request_id)

    def transport_error(self, exc: BaseException) -> TransportError:
        """The error for one of ``TRANSPORT_EXCEPTIONS`` raised by a send."""
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
        detail = self.scrub(str(cause)) or "no detail"
        return TransportError(code, f"{type(cause).__name__}: {detail[:MAX_QUOTED_BODY_CHARS]}")

    def unreadable_body(self, content: bytes, headers: Mapping[str, str]) -> TransportError:
        """A 200 body that a fast JSON reader refused: cut off, or not JSON (as the standard library reads it)."""
        try:
            json.loads(content)
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            exc: ValueError | None = error
        else:  # JSON to the standard library only: NaN, lone surrogates
            exc = None
        request_id = headers.get(REQUEST_ID_HEADER)
        declared = headers.get("content-length")
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
            f"the reply body is not JSON: {self.quote(content)}",
            status=200,
            request_id=request_id,
        )

    def quote(self, content: bytes) -> str:
        """The start of a body, on one line, scrubbed: for messages about bodies the service did not shape."""
        text = " ".join(content[: MAX_QUOTED_BODY_CHARS * 4].decode("utf-8", "replace").split())
        if len(text) > MAX_QUOTED_BODY_CHARS:
            text = text[:MAX_QUOTED_BODY_CHARS] + "..."
        return self.scrub(text)

    def scrub(self, text: str) -> str:
        """Remove the API key from text that came from outside (a server may echo it)."""
        # A keyless server has the empty key, which is in every text and is no secret.
        return text.replace(self._api_key, _REDACTED) if self._api_key and self._api_key in text else text


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


def error_fields(content: bytes) -> tuple[str | None, str | None, str | None]:
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
    if (isinstance(code, int) or (isinstance(code, str) and code.isdigit())) and isinstance(fields.get("type"), str):
        # vLLM, SGLang and llama.cpp put the HTTP status in ``code``: their ``type`` names the error.
        code = fields["type"] or code
    return (
        str(code) if code else None,
        str(message) if message else None,
        str(request_id) if request_id else None,
    )


def retry_after(headers: Mapping[str, str]) -> float | None:
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
