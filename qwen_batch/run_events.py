"""The run's event log: what the report needs and the output does not hold, in bounded size.

The output has one row per input row, with no clock: it cannot say when attempts went out,
which of them got a 429 (and of which kind), how many were in flight, or what rate the
throttle paced at. This log keeps those as one line per *bucket* of run time:

* a ``segment`` line when a run starts (a resume appends a new segment, numbered on from
  the last): wall-clock start, mode, the configured RPM/TPM, concurrency, max_tokens, model;
* a ``bucket`` line per bucket that saw an attempt: attempts started, answered, failed by
  error code, 429s by kind, the most attempts in flight, the throttle's rates at its close,
  and the tokens answered.

Buckets are one second wide for the first ``cap_s`` seconds of a segment; after that they
double in width each time the run's age doubles, so a segment of ``T`` seconds has at most
``cap_s + cap_s / 2 * log2(T / cap_s)`` lines (a day-long run: about 12,000 lines, 2.7 MB measured).

The lines are written by the runner's group commit, in the same flush that made the rows
durable (after their fsync, in the same worker-thread call): a bucket is written once when
it closes, so the log costs at most one small write and fsync per bucket, never per row. The
hot-path hooks are a clock read and a few integer additions. A torn last line (a kill in
the middle of a write) is cut away when the log is opened again.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from .checkpoint import write_durably
from .errors import StorageError

if TYPE_CHECKING:
    from .plan import JobPlan

EVENTS_NAME = "events.jsonl"
EVENTS_FORMAT = 1
# Seconds of a segment kept at one-second resolution before buckets widen.
BUCKET_CAP_S = 3600
FILE_MODE = 0o600

Rates = Callable[[], tuple[float | None, float | None]]
"""The throttle's request and token rates per second now (None: not pacing)."""


def events_path(checkpoint_dir: Path) -> Path:
    """Where a run's event log lives: inside its checkpoint folder, so ``--fresh`` sets it aside too."""
    return Path(checkpoint_dir) / EVENTS_NAME


def bucket_width(age_s: float, cap_s: int = BUCKET_CAP_S) -> int:
    """The width in seconds of the bucket that holds ``age_s``: 1 before ``cap_s``, then 2, 4, 8…

    Each width starts at a multiple of itself (``cap_s * 2**k``), so buckets never overlap.
    """
    if age_s < cap_s:
        return 1
    return int(2 ** (int(math.log2(age_s / cap_s)) + 1))


def segment_header(plan: JobPlan, mode: str, rpm: float | None, tpm: float | None) -> dict[str, Any]:
    """What a segment line says of the run: the report's header and its configured-limit lines."""
    preflight = plan.preflight
    return {
        "mode": mode,
        "job": plan.spec.name,
        "model": plan.spec.model,
        "rows": plan.rows,
        "to_send": preflight.to_send,
        "concurrency": plan.workers,
        "requests_per_minute": rpm,
        "tokens_per_minute": tpm,
        "max_tokens": plan.renderer.max_tokens,
        "id_column": plan.spec.input.id_column,
        "max_cost": plan.max_cost,
        "estimated_cost_min": preflight.to_send_cost_min,
        "estimated_cost_max": preflight.to_send_cost_max,
    }


class _Bucket:
    __slots__ = (
        "start", "end", "started", "answered", "failed", "errors", "throttled", "in_flight_max",
        "input_tokens", "output_tokens",
    )

    def __init__(self, start: int, width: int, in_flight: int) -> None:
        self.start = start
        self.end = start + width
        self.started = 0
        self.answered = 0
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.throttled: dict[str, int] = {}
        self.in_flight_max = in_flight
        self.input_tokens = 0
        self.output_tokens = 0

    @property
    def empty(self) -> bool:
        return not (self.started or self.answered or self.failed)

    def line(self, segment: int, in_flight: int, rates: tuple[float | None, float | None]) -> bytes:
        record = {
            "kind": "bucket",
            "segment": segment,
            "t": self.start,
            "width_s": self.end - self.start,
            "started": self.started,
            "answered": self.answered,
            "failed": self.failed,
            "errors": self.errors,
            "throttled": self.throttled,
            "in_flight_max": self.in_flight_max,
            "in_flight_end": in_flight,
            "request_rate": rates[0],
            "token_rate": rates[1],
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


class RunEvents:
    """Counts one run segment's attempts into time buckets; hands closed buckets' lines out.

    The runner calls the ``attempt_*`` hooks (event-loop thread) and ``take`` at each group
    commit; ``take`` returns the bytes to append, which the commit writes with ``EventLog``.
    """

    def __init__(
        self,
        header: dict[str, Any],
        *,
        segment: int = 0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rates: Rates | None = None,
        cap_s: int = BUCKET_CAP_S,
    ) -> None:
        self.segment = segment
        self.in_flight = 0
        self._clock = clock
        self._rates = rates if rates is not None else (lambda: (None, None))
        self._cap_s = cap_s
        self._t0 = clock()
        self._bucket = _Bucket(0, 1, 0)
        self._pending: list[bytes] = [
            orjson.dumps(
                {"kind": "segment", "segment": segment, "format": EVENTS_FORMAT, "wall_start": wall(), **header},
                option=orjson.OPT_APPEND_NEWLINE,
            )
        ]

    def _now(self) -> _Bucket:
        bucket = self._bucket
        age = self._clock() - self._t0
        if age < bucket.end:
            return bucket
        self._close(bucket)
        width = bucket_width(age, self._cap_s)
        bucket = self._bucket = _Bucket(int(age // width) * width, width, self.in_flight)
        return bucket

    def _close(self, bucket: _Bucket) -> None:
        if not bucket.empty:
            self._pending.append(bucket.line(self.segment, self.in_flight, self._rates()))

    # the hot path: one clock read and a few additions each

    def attempt_started(self) -> None:
        """An attempt went out (after its rate-limit wait)."""
        bucket = self._now()
        bucket.started += 1
        self.in_flight += 1
        if self.in_flight > bucket.in_flight_max:
            bucket.in_flight_max = self.in_flight

    def attempt_answered(self, input_tokens: int, output_tokens: int) -> None:
        """An attempt got its answer."""
        bucket = self._now()
        bucket.answered += 1
        bucket.input_tokens += input_tokens
        bucket.output_tokens += output_tokens
        self.in_flight -= 1

    def attempt_failed(self, code: str, throttled_kind: str | None = None) -> None:
        """An attempt failed with ``code``; a 429 also names its kind (requests, tokens, burst)."""
        bucket = self._now()
        bucket.failed += 1
        bucket.errors[code] = bucket.errors.get(code, 0) + 1
        if throttled_kind is not None:
            bucket.throttled[throttled_kind] = bucket.throttled.get(throttled_kind, 0) + 1
        self.in_flight -= 1

    def attempt_abandoned(self) -> None:
        """An attempt ended without an answer or an error (cancelled): no longer in flight."""
        self.in_flight -= 1

    # the group commit

    def take(self) -> bytes:
        """The lines of the buckets closed since the last call (cheap when none closed)."""
        self._now()
        if not self._pending:
            return b""
        data = b"".join(self._pending)
        self._pending = []
        return data

    def finish(self) -> bytes:
        """Close the current bucket and return every line not yet taken (the run is over)."""
        self._now()
        self._close(self._bucket)
        self._bucket = _Bucket(self._bucket.end, 1, self.in_flight)
        data = b"".join(self._pending)
        self._pending = []
        return data


class EventLog:
    """The append-only file of event lines; opening it cuts a torn tail and counts its segments.

    Raises StorageError when the file cannot be opened or written.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.segments = _repair(self.path)
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot open the run's event log ({exc.strerror or exc})") from None

    def append(self, data: bytes) -> None:
        """Write ``data`` and fsync: called at most once per closed bucket, so never per row."""
        if not data or self._fd is None:
            return
        try:
            write_durably(self._fd, data)
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot append to the run's event log ({exc.strerror or exc})") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _repair(path: Path) -> int:
    """Cut a torn last line away; the number of segments the log already holds."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        os.truncate(path, keep)
    segments = 0
    for line in data[:keep].splitlines():
        if line.startswith(b'{"kind":"segment"'):
            segments += 1
    return segments


def read_events(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The segments and the buckets of an event log (both empty when there is none).

    Lines that do not parse (a torn tail being written right now) are skipped.
    """
    segments: list[dict[str, Any]] = []
    buckets: list[dict[str, Any]] = []
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return segments, buckets
    for line in data.splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        if record.get("kind") == "segment":
            segments.append(record)
        elif record.get("kind") == "bucket":
            buckets.append(record)
    return segments, buckets
