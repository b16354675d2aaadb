"""The collector's sending-phase settings: set for the pool's run, restored after it."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Sequence

import anyio
import pytest

from qwen_batch import collector
from qwen_batch.backends.base import Completed, Event
from qwen_batch.limits import Limits
from qwen_batch.retry import RetryPolicy
from qwen_batch.runner import Runner
from qwen_batch.types import Outcome, Reply, Request, UnitKey


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_the_phase_freezes_what_is_alive_and_spaces_scans_out_until_it_ends() -> None:
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with collector.sending_phase():
        assert gc.get_threshold() == collector.SENDING_THRESHOLDS
        assert gc.get_freeze_count() > 0
        assert gc.isenabled()  # cycles are still collected
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_overlapping_phases_restore_the_settings_only_when_the_last_ends() -> None:
    before = gc.get_threshold()
    first, second = collector.sending_phase(), collector.sending_phase()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert gc.get_threshold() == collector.SENDING_THRESHOLDS and gc.get_freeze_count() > 0
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_phase_ended_by_an_exception_restores_the_settings() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), collector.sending_phase():
        raise RuntimeError("the pool failed")
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


class ThresholdSeeingBackend:
    """Answers every request and notes the collector's thresholds while it does."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, int, int]] = set()

    async def stream(self, request: Request) -> AsyncIterator[Event]:
        self.seen.add(gc.get_threshold())
        await anyio.lowlevel.checkpoint()
        yield Completed(Reply("ok", "stop", request.input_tokens, 1, f"id-{request.index}"))


class ListSink:
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def write(self, outcomes: Sequence[Outcome]) -> None:
        self.outcomes.extend(outcomes)


@pytest.mark.anyio
async def test_a_pool_sends_under_the_sending_phase_and_leaves_the_collector_as_it_was() -> None:
    before = gc.get_threshold()
    backend, sink = ThresholdSeeingBackend(), ListSink()
    runner = Runner(
        backend,
        sink,
        concurrency=2,
        limits=Limits.from_settings(None, None),
        retry_policy=RetryPolicy(max_retries=0),
        price=None,
        rows_total=3,
    )
    requests = [Request(i, str(i), "m", [], {}, f"{i:064x}", 5, 5, UnitKey(i)) for i in range(3)]
    stats = await runner.run(iter([requests]))
    assert stats.ok == 3 and len(sink.outcomes) == 3
    assert backend.seen == {collector.SENDING_THRESHOLDS}
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
