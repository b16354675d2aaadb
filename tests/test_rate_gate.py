"""The rate-gate seam without Ray: what the runner calls on its gate, the executor's injection point,
and the Ray engine's gate and shared limiter wired directly to each other (no actor in between)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import qwen_batch
from qwen_batch.engines.ray_limiter import SETTLE, SUCCESS, THROTTLED, Answer, RemoteGate, SharedLimits
from qwen_batch.errors import RateLimited
from qwen_batch.limits import Limits, LimitsStatistics, RateGate
from qwen_batch.testing import FakeBackend

from .conftest import sentences_job
from .test_runner import ListSink, ScriptedBackend, make_runner, request


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class RecordingGate:
    """A ``RateGate`` that lets everything through and records each call, in order."""

    def __init__(self) -> None:
        self.inner = Limits.from_settings(None, None)
        self.calls: list[tuple[object, ...]] = []

    def send_now(self, tokens: int) -> bool:
        return False  # every attempt waits, so each one's turn is recorded as a "wait"

    async def wait_to_send(self, tokens: int) -> None:
        self.calls.append(("wait", tokens))

    def settle(self, charged: int, used: int) -> None:
        self.calls.append(("settle", charged, used))

    def on_success(self) -> None:
        self.calls.append(("ok",))

    def on_throttled(self, error: RateLimited) -> None:
        self.calls.append(("429", error.kind))

    def statistics(self) -> LimitsStatistics:
        return self.inner.statistics()


def _throttled(retry_after: float | None = None) -> RateLimited:
    return RateLimited("Throttling.RateQuota", "slow down", retry_after=retry_after, kind="requests")


@pytest.mark.anyio
async def test_the_runner_calls_its_gate_once_per_attempt_in_order() -> None:
    gate = RecordingGate()
    backend = ScriptedBackend({0: [_throttled()]})
    runner = make_runner(backend, ListSink(), 1, limits=gate, concurrency=1)
    await runner.run(iter([[request(0, input_tokens=10, max_tokens=20)]]))
    assert gate.calls == [
        ("wait", 30), ("settle", 30, 0), ("429", "requests"),  # the throttled attempt
        ("wait", 30), ("settle", 30, 15), ("ok",),  # its retry: 10 in + 5 out used
    ]


def test_limits_is_a_rate_gate_as_it_is() -> None:
    gate: RateGate = Limits.from_settings(60, 1000)  # mypy checks the protocol; the seam adds no wrapper
    assert type(gate) is Limits


def test_the_online_executor_takes_each_models_gate_from_its_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
    made: list[tuple[str, float | None, float | None]] = []
    gates: list[RecordingGate] = []

    def factory(model: str, rpm: float | None, tpm: float | None) -> RateGate:
        made.append((model, rpm, tpm))
        gates.append(RecordingGate())
        return gates[-1]

    job = sentences_job(tmp_path, [f"row {i}" for i in range(5)], execution={"tokens_per_minute": 90000})
    executor = qwen_batch.OnlineExecutor(FakeBackend(), gate_factory=factory)
    result = qwen_batch.run(job, executor=executor)
    assert result.exit_code == 0
    assert made == [("qwen-turbo", 600000, 90000)]
    assert sum(call[0] == "wait" for call in gates[0].calls) == 5


class DirectEndpoint:
    """A ``LimiterEndpoint`` that calls a ``SharedLimits`` in this process, and counts messages."""

    def __init__(self, shared: SharedLimits) -> None:
        self.shared = shared
        self.requests: list[list[Answer]] = []
        self.records: list[list[Answer]] = []
        self.recorded = anyio.Event()

    async def wait_to_send(self, tokens: int, answers: list[Answer]) -> LimitsStatistics:
        self.requests.append(answers)
        return await self.shared.wait_to_send(tokens, answers)

    def record(self, answers: list[Answer]) -> None:
        self.records.append(answers)
        self.shared.replay(answers)
        self.recorded.set()


def _gate(shared: SharedLimits) -> tuple[RemoteGate, DirectEndpoint]:
    endpoint = DirectEndpoint(shared)
    return RemoteGate(endpoint, shared._limits.statistics()), endpoint


async def _one_answered(gate: RemoteGate) -> None:
    """One attempt as the runner makes it: its slot, then its answer (30 tokens charged, 15 used)."""
    await gate.wait_to_send(30)
    gate.settle(30, 15)
    gate.on_success()


@pytest.mark.anyio
async def test_answers_ride_with_the_next_request_and_a_429_goes_at_once() -> None:
    gate, endpoint = _gate(SharedLimits(None, None))
    await _one_answered(gate)
    assert endpoint.records == []  # no message of their own
    await gate.wait_to_send(30)
    assert endpoint.requests == [[], [(SETTLE, 30, 15), (SUCCESS,)]]
    gate.settle(30, 0)
    gate.on_throttled(_throttled(retry_after=2.0))
    assert endpoint.records == [[(SETTLE, 30, 0), (THROTTLED, "Throttling.RateQuota", "requests", 2.0)]]


@pytest.mark.anyio
async def test_answers_of_a_quiet_worker_go_on_their_own_soon() -> None:
    gate, endpoint = _gate(SharedLimits(None, None))
    await _one_answered(gate)
    with anyio.fail_after(2):
        await endpoint.recorded.wait()
    assert endpoint.records == [[(SETTLE, 30, 15), (SUCCESS,)]]


@pytest.mark.anyio
async def test_a_429_one_worker_sees_holds_every_worker_at_the_shared_limiter() -> None:
    shared = SharedLimits(6000, None)
    first, _ = _gate(shared)
    second, _ = _gate(shared)
    await first.wait_to_send(10)
    await second.wait_to_send(10)  # both pass while nothing was refused
    first.settle(10, 0)
    first.on_throttled(_throttled(retry_after=30.0))
    assert (await shared.statistics()).throttle.cooling_down_s > 29
    with anyio.move_on_after(0.3) as waited:
        await second.wait_to_send(10)
    assert waited.cancelled_caught, "the other worker was let through during the cool-down"
    assert second.statistics().throttle.throttled == 0  # its snapshot is from before the 429


@pytest.mark.anyio
async def test_the_gate_snapshot_follows_the_limiter_with_each_grant() -> None:
    shared = SharedLimits(6000, 100000)
    gate, _ = _gate(shared)
    assert gate.statistics().requests_per_minute == 6000
    gate.settle(10, 0)
    gate.on_throttled(_throttled())
    await gate.wait_to_send(10)
    assert gate.statistics().throttle.throttled == 1
