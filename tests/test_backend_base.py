"""The backend protocol: a reply is a stream of events, one collector makes the Reply, one registry."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen_batch.backends import DashScopeBackend, backend_factory, collect, protocols, register_backend
from qwen_batch.backends.base import (
    Completed,
    Event,
    Failed,
    Finished,
    ReasoningDelta,
    TextDelta,
    Usage,
    WholeReply,
)
from qwen_batch.errors import ConfigError, ServerError, TransportError
from qwen_batch.types import Reply, Request, UnitKey
from qwen_batch.wire import CANONICAL_FRAMES, DASHSCOPE, OPENAI

REQUEST = Request(0, "r0", "qwen-turbo", [{"role": "user", "content": "hi"}], {"seed": 1}, "f", 5, 10, UnitKey(0))
REPLY = Reply("hello", "stop", 5, 1, "rid")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def events_of(*events: Event, closed: list[bool] | None = None) -> AsyncIterator[Event]:
    try:
        for event in events:
            yield event
    finally:
        if closed is not None:
            closed.append(True)


async def fetch(request: Request) -> Reply:
    assert request is REQUEST
    return REPLY


@pytest.mark.anyio
async def test_a_whole_reply_is_a_stream_of_exactly_one_completed_event() -> None:
    assert [event async for event in WholeReply(fetch, REQUEST)] == [Completed(REPLY)]


@pytest.mark.anyio
async def test_collect_returns_a_whole_reply_as_it_is_whether_read_directly_or_as_events() -> None:
    assert await collect(WholeReply(fetch, REQUEST)) == REPLY
    assert await collect(events_of(Completed(REPLY))) == REPLY


@pytest.mark.anyio
async def test_collect_joins_deltas_and_takes_usage_and_finish_with_the_first_token_time() -> None:
    times = iter([10.0, 10.25])
    stream = events_of(
        ReasoningDelta("think "),
        TextDelta("hel"),
        ReasoningDelta("more"),
        TextDelta("lo"),
        Usage(5, 2, reasoning_tokens=7, cached_tokens=3),
        Finished("stop", "rid-9"),
    )
    reply = await collect(stream, clock=lambda: next(times))
    assert reply == Reply(
        "hello", "stop", 5, 2, "rid-9", reasoning="think more", reasoning_tokens=7, cached_tokens=3, first_token_s=0.25
    )


@pytest.mark.anyio
async def test_a_plain_stream_has_no_reasoning_and_new_reply_fields_default_to_none() -> None:
    reply = await collect(events_of(TextDelta("x"), Usage(1, 1), Finished("length")))
    assert (reply.reasoning, reply.reasoning_tokens, reply.cached_tokens, reply.first_token_s) == (None, None, None, None)
    assert Reply("x", "stop", 1, 1) == Reply("x", "stop", 1, 1, None, None, None, None, None)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("events", "missing"),
    [((TextDelta("x"), Finished("stop")), "usage"), ((TextDelta("x"), Usage(1, 1)), "finish"), ((), "usage and finish")],
)
async def test_a_stream_that_ends_without_usage_or_finish_is_a_truncated_reply(events, missing) -> None:
    with pytest.raises(TransportError) as info:
        await collect(events_of(*events))
    assert info.value.code == "TruncatedReply"
    assert info.value.message.endswith(missing)


@pytest.mark.anyio
async def test_a_failed_event_is_raised_and_the_stream_closed() -> None:
    error = ServerError("InternalError", "mid-stream", status=500)
    closed: list[bool] = []
    with pytest.raises(ServerError) as info:
        await collect(events_of(TextDelta("x"), Failed(error), TextDelta("never"), closed=closed))
    assert info.value is error
    assert closed == [True]


def test_the_registry_makes_the_native_client_for_dashscope() -> None:
    backend = backend_factory("dashscope")("http://127.0.0.1:1/api/v1", "sk-" + "a" * 32, timeout_s=5, max_connections=2)
    assert isinstance(backend, DashScopeBackend)
    assert backend.max_connections == 2


def test_an_unknown_protocol_is_a_config_error_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown service protocol 'nope'; known: dashscope"):
        backend_factory("nope")


def test_every_protocol_with_a_backend_has_a_canonical_encoding_for_its_fingerprints() -> None:
    assert protocols() == tuple(sorted(CANONICAL_FRAMES)) == (DASHSCOPE, OPENAI)


def test_a_registered_factory_is_found_by_its_name() -> None:
    made: list[str] = []

    def factory(base_url: str, api_key: str, *, timeout_s: float, max_connections: int) -> DashScopeBackend:
        made.append(base_url)
        return DashScopeBackend(base_url, api_key, timeout_s=timeout_s, max_connections=max_connections)

    register_backend("test-protocol", factory)
    try:
        backend_factory("test-protocol")("http://127.0.0.1:1/api/v1", "sk-" + "b" * 32, timeout_s=1, max_connections=1)
        assert made == ["http://127.0.0.1:1/api/v1"]
        assert "test-protocol" in protocols()
    finally:
        from qwen_batch.backends import registry

        del registry._FACTORIES["test-protocol"]


# -- the unit key --------------------------------------------------------------------------

@given(
    variants=st.integers(1, 5), samples=st.integers(1, 5), row=st.integers(0, 10_000), data=st.data()
)
def test_the_unit_index_is_dense_and_inverts(variants: int, samples: int, row: int, data: st.DataObject) -> None:
    variant = data.draw(st.integers(0, variants - 1))
    sample = data.draw(st.integers(0, samples - 1))
    key = UnitKey(row, variant, sample)
    index = key.dense_index(variants, samples)
    assert index == (row * variants + variant) * samples + sample
    assert UnitKey.of_dense_index(index, variants, samples) == key


def test_units_are_numbered_without_gaps_in_row_then_variant_then_sample_order() -> None:
    keys = [UnitKey(r, v, s) for r in range(3) for v in range(2) for s in range(4)]
    assert [key.dense_index(2, 4) for key in keys] == list(range(len(keys)))


def test_with_one_variant_and_one_sample_the_unit_index_is_the_row() -> None:
    assert [UnitKey(row).dense_index() for row in range(5)] == [0, 1, 2, 3, 4]
