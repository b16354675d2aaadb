"""One streamed request on the wire, for every backend: send, refuse or read SSE events, always close.

A backend gives the request and a reader of its protocol's events (``StreamReader``); this
yields the reader's events as the body arrives and ends in one ``Failed`` for any failure: a
refusal before the stream (a non-200 answer, its body JSON or SSE), an error event the reader
saw, or a transport error while reading (a reset, a timeout between events), unless the
reader had already seen the reply whole. A stream that stops early just ends: ``collect``
calls that a ``TruncatedReply``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Collection
from typing import Protocol

import httpx

from ..errors import BackendError, TransportError
from .base import Event, Failed
from .errors import TRANSPORT_EXCEPTIONS, ErrorTranslator
from .sse import SSEDecoder


class StreamReader(Protocol):
    """A protocol's events: ``read`` one SSE event into ``Event``s; ``failure`` once it saw an
    error; ``finished`` once the reply is whole (a cut after it loses nothing)."""

    finished: bool
    failure: BackendError | None

    def read(self, kind: bytes, data: bytes) -> list[Event]: ...


async def stream_events(
    transport: httpx.AsyncBaseTransport,
    outgoing: httpx.Request,
    errors: ErrorTranslator,
    sent_parameters: Collection[str],
    reader_for: Callable[[httpx.Response], StreamReader],
) -> AsyncGenerator[Event, None]:
    """Send ``outgoing`` and yield its events, read by ``reader_for(response)``; see the module docstring."""
    failure: BackendError | None = None
    response: httpx.Response | None = None
    try:
        response = await transport.handle_async_request(outgoing)
    except TRANSPORT_EXCEPTIONS as exc:
        failure = errors.transport_error(exc)
    if response is None:
        yield Failed(failure or TransportError("ConnectionError", "no response"))
        return
    try:
        if response.status_code != 200:
            failure = await _refusal(response, errors, sent_parameters)
        else:
            reader = reader_for(response)
            decoder = SSEDecoder()
            try:
                async for chunk in response.aiter_bytes():
                    for kind, data in decoder.feed(chunk):
                        for event in reader.read(kind, data):
                            yield event
                    if reader.failure is not None:
                        break
            except TRANSPORT_EXCEPTIONS as exc:
                if not reader.finished:
                    failure = errors.transport_error(exc)
            failure = failure or reader.failure
        if failure is not None:
            yield Failed(failure)
    finally:
        await response.aclose()


async def _refusal(response: httpx.Response, errors: ErrorTranslator, sent_parameters: Collection[str]) -> BackendError:
    """The error of a streaming request answered with a non-200 status (its body JSON or SSE)."""
    try:
        content = await response.aread()
    except TRANSPORT_EXCEPTIONS:
        content = b""
    return errors.status_error(response.status_code, content, response.headers, sent_parameters=sent_parameters)
