"""The runner's event-log hooks through its seams: every attempt counted once, written with the rows."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
import pytest

from qwen_batch.backends.base import Event
from qwen_batch.errors import RateLimited, ServerError
from qwen_batch.run_events import RunEvents
from qwen_batch.types import Request

from .test_runner import ListSink, ScriptedBackend, make_runner, request


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class RecordingEventSink:
    """Keeps each append, and how many row groups the row sink had written by then."""

    def __init__(self, rows: ListSink) -> None:
        self.rows = rows
        self.appends: list[tuple[int, bytes]] = []

    def append(self, data: bytes) -> None:
        self.appends.append((len(self.rows.groups), data))

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for _, data in self.appends for line in data.splitlines()]


@pytest.mark.anyio
async def test_every_attempt_is_counted_by_code_and_kind_after_its_rows_are_durable() -> None:
    failures: dict[int, list[Exception]] = {
        1: [RateLimited("Throttling.BurstRate", "slow down", kind="burst")],
        2: [RateLimited("Throttling.RateQuota", "quota", kind="requests"), ServerError("InternalError", "boom", status=500)],
        3: [ServerError("InternalError", "boom", status=500)] * 4,  # spends its 3 retries: an error row
    }
    backend, sink = ScriptedBackend(failures), ListSink()
    events_sink = RecordingEventSink(sink)
    events = RunEvents({"mode": "online"}, rates=lambda: (None, None))
    runner = make_runner(backend, sink, 8, events=events, event_sink=events_sink)
    await runner.run(iter([[request(i) for i in range(8)]]))
    buckets = [line for line in events_sink.lines() if line["kind"] == "bucket"]
    assert events_sink.lines()[0]["kind"] == "segment"
    assert sum(b["started"] for b in buckets) == len(backend.calls) == 8 + 1 + 2 + 3
    assert sum(b["answered"] for b in buckets) == 7
    errors: dict[str, int] = {}
    throttled: dict[str, int] = {}
    for b in buckets:
        for code, n in b["errors"].items():
            errors[code] = errors.get(code, 0) + n
        for kind, n in b["throttled"].items():
            throttled[kind] = throttled.get(kind, 0) + n
    assert errors == {"Throttling.BurstRate": 1, "Throttling.RateQuota": 1, "InternalError": 5}
    assert throttled == {"burst": 1, "requests": 1}
    assert events.in_flight == 0
    # Lines go out in the same thread call as a group of rows, after it (or at the run's end).
    assert all(groups >= 1 for groups, _ in events_sink.appends)


class HangingBackend:
    """Every request hangs; ``all_sent`` is set once ``expected`` are on the wire."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.sent = 0
        self.all_sent = anyio.Event()

    async def stream(self, req: Request) -> AsyncIterator[Event]:
        self.sent += 1
        if self.sent == self.expected:
            self.all_sent.set()
        await anyio.sleep_forever()
        yield  # pragma: no cover - never reached


@pytest.mark.anyio
async def test_attempts_abandoned_by_a_cancel_leave_nothing_in_flight() -> None:
    backend, sink = HangingBackend(4), ListSink()
    events_sink = RecordingEventSink(sink)
    events = RunEvents({"mode": "online"}, rates=lambda: (None, None))
    runner = make_runner(backend, sink, 10, events=events, event_sink=events_sink)  # type: ignore[arg-type]
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(runner.run, iter([[request(i) for i in range(10)]]))
            await backend.all_sent.wait()
            assert events.in_flight == 4
            runner.cancel_now()
    assert events.in_flight == 0
    buckets = [line for line in events_sink.lines() if line["kind"] == "bucket"]
    assert sum(b["started"] for b in buckets) == 4 and max(b["in_flight_max"] for b in buckets) == 4
