"""The billing ledger: one JSON line per request, and running statistics.

``status`` is the HTTP status of the answer the client could use, or 0 when it got none:
a reset, a hang, and a 200 spoiled by an injected malformed or truncated body (``fault``
says which). Billable = a generation answered 200 (the service bills successful calls);
tokenizer calls are recorded but not billed. Tests read the ledger back
to prove that no row was paid for twice. Lines are kept in memory and, when a path is
given, appended (and flushed) to that file as they happen.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

LEDGER_KEYS = (
    "time", "endpoint", "body_sha256", "model", "seed", "stream", "status", "code",
    "request_id", "input_tokens", "output_tokens", "fault",
)


class Ledger:
    """Append-only record of requests plus counters for the stats endpoint.

    Not thread-safe for writers: the server appends from its one event loop. Readers in
    other threads get copies.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._entries: list[dict[str, Any]] = []
        self._file: IO[str] | None = None
        self._by_status: Counter[int] = Counter()
        self._billable = 0
        self._input_tokens = 0
        self._output_tokens = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        # Lets a test thread block until the server thread records the next line.
        self._changed = threading.Condition()

    def open(self) -> None:
        """Open the ledger file for appending (the server calls this at start, not at import)."""
        if self.path is not None and self._file is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def started(self) -> None:
        """A request arrived; tracks in-flight and its peak."""
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight
        with self._changed:
            self._changed.notify_all()

    def finished(self) -> None:
        self.in_flight -= 1

    def record(
        self,
        *,
        endpoint: str,
        body_sha256: str,
        model: str | None,
        seed: Any,
        stream: bool,
        status: int,
        code: str | None,
        request_id: str | None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        fault: str | None = None,
        billable: bool | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Append one line; ``billable`` defaults to "answered 200 with no injected fault".

        ``extra``: keys after the common ones (a batch line's ``batch_id``, ``custom_id``, ``billable``).
        """
        entry = {
            "time": time.time(),
            "endpoint": endpoint,
            "body_sha256": body_sha256,
            "model": model,
            "seed": seed,
            "stream": stream,
            "status": status,
            "code": code,
            "request_id": request_id,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "fault": fault,
        }
        if extra:
            entry.update(extra)
        self._entries.append(entry)
        self._by_status[status] += 1
        if billable is None:
            billable = status == 200 and fault is None
        if billable:
            self._billable += 1
            self._input_tokens += input_tokens
            self._output_tokens += output_tokens
        if self._file is not None:
            self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self._file.flush()
        with self._changed:
            self._changed.notify_all()

    def __len__(self) -> int:
        return len(self._entries)

    def wait_for_entries(self, count: int, timeout: float | None = None) -> bool:
        """Block (a thread other than the server's) until at least ``count`` lines exist."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._entries) >= count, timeout)

    def wait_for_in_flight(self, count: int, timeout: float | None = None) -> bool:
        """Block (a thread other than the server's) until ``count`` requests are being answered."""
        with self._changed:
            return self._changed.wait_for(lambda: self.in_flight >= count, timeout)

    def entries(self) -> list[dict[str, Any]]:
        """A copy of every line so far, oldest first."""
        return [dict(entry) for entry in list(self._entries)]

    def jsonl(self) -> str:
        return "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in list(self._entries))

    def statistics(self) -> dict[str, Any]:
        """Snapshot: requests, by_status, billable, billed tokens, in_flight, peak_in_flight."""
        return {
            "requests": len(self._entries),
            "by_status": {str(status): count for status, count in sorted(self._by_status.items())},
            "billable": self._billable,
            "input_tokens": self._input_tokens,
            "output_tokens": self._output_tokens,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
        }
