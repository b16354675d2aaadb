"""A small decoder of server-sent events, as the HTML standard's "event stream" defines them.

No SSE parser is among the dependencies, and the one piece of it a client needs is short:
lines end in LF, CRLF or CR (a CRLF may be split across chunks); a line starting with ``:``
is a comment (DashScope's ``:HTTP_STATUS/200``); ``field:value`` drops one space after the
colon; several ``data`` lines join with LF; a blank line dispatches the event, and an event
never ended by one (the stream was cut) is never dispatched. Bytes stay bytes: the data is
JSON, which orjson reads from bytes without a decode step.
"""

from __future__ import annotations

_BOM = b"\xef\xbb\xbf"
_DEFAULT_EVENT = b"message"


class SSEDecoder:
    """Feed it the body's chunks as they come; each ``feed`` returns the events they completed,
    as ``(event type, data)`` pairs (the type is ``b"message"`` when the event named none)."""

    __slots__ = ("_pending", "_data", "_event", "_after_cr", "_started")

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[bytes] = []
        self._event = _DEFAULT_EVENT
        self._after_cr = False
        self._started = False

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        """The events that ``chunk`` completes, in order."""
        if not self._started:
            if len(self._pending) + len(chunk) < len(_BOM) and _BOM.startswith(self._pending + chunk):
                self._pending += chunk
                return []
            chunk, self._pending, self._started = self._pending + chunk, b"", True
            if chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split across two chunks
        if b"\r" in chunk:
            self._after_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            self._after_cr = False
        lines = (self._pending + chunk if self._pending else chunk).split(b"\n")
        self._pending = lines.pop()
        events: list[tuple[bytes, bytes]] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    events.append((self._event, data[0] if len(data) == 1 else b"\n".join(data)))
                    data = self._data = []
                self._event = _DEFAULT_EVENT
                continue
            if line[0] == 58:  # b":"
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"event":
                self._event = value or _DEFAULT_EVENT
        return events
