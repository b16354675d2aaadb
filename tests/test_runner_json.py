"""JSON mode in the worker pool, through its seams: a scripted backend, an in-memory sink and cache."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import anyio
import pytest

from qwen_batch.backends.base import Completed, Event
from qwen_batch.budget import Budget
from qwen_batch.errors import AuthError, BadRequest
from qwen_batch.runner import STOP_AUTH, STOP_BUDGET
from qwen_batch.structured import JsonMode
from qwen_batch.types import Reply, Request, UnitKey

from .test_runner import ListSink, make_runner

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def json_request(index: int) -> Request:
    messages = [{"role": "user", "content": f"Give row {index} as JSON"}]
    return Request(index, str(index), "qwen-turbo", messages, {"seed": 1}, f"{index:064x}", 10, 20, UnitKey(index))


class ReaskingBackend:
    """Answers bad JSON to a first ask and a valid object once the conversation holds a re-ask;
    ``refuse_reask`` raises that error on a re-ask instead."""

    def __init__(self, refuse_reask: Exception | None = None) -> None:
        self.bodies: list[list[dict[str, str]]] = []
        self.refuse_reask = refuse_reask

    async def stream(self, req: Request) -> AsyncIterator[Event]:
        self.bodies.append(req.messages)
        await anyio.lowlevel.checkpoint()
        if len(req.messages) == 1:
            yield Completed(Reply('{"n": ', "stop", req.input_tokens, 3, f"first-{req.index}"))
            return
        if self.refuse_reask is not None:
            raise self.refuse_reask
        yield Completed(Reply(f'{{"n": {req.index}}}', "stop", req.input_tokens, 4, f"again-{req.index}"))


class DictStore:
    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}

    def get_many(self, fingerprints: Sequence[str]) -> dict[str, Reply]:
        return {f: self.replies[f] for f in fingerprints if f in self.replies}

    def put_many(self, items: Sequence[tuple[str, Reply]]) -> None:
        self.replies.update(items)


def _mode(retries: int = 1) -> JsonMode:
    return JsonMode("json_schema", SCHEMA, retries=retries, protocol="dashscope")


@pytest.mark.anyio
async def test_a_reasked_row_is_one_outcome_summing_both_attempts_and_each_attempt_is_cached() -> None:
    backend, sink, store = ReaskingBackend(), ListSink(), DictStore()
    runner = make_runner(backend, sink, 2, json_mode=_mode(), replies=store)  # type: ignore[arg-type]
    stats = await runner.run(iter([[json_request(0), json_request(1)]]))
    assert len(backend.bodies) == 4 and stats.reasks == 2
    for outcome in sink.outcomes:
        assert (outcome.status, outcome.parse_status, outcome.reasks, outcome.attempts) == ("ok", "ok", 1, 2)
        assert outcome.output_json == f'{{"n":{outcome.index}}}'
        assert outcome.fingerprint == json_request(outcome.index).fingerprint
        assert outcome.output_tokens == 3 + 4 and outcome.request_id == f"again-{outcome.index}"
    assert len(store.replies) == 4  # both attempts of both rows, each under its own request
    assert stats.cost == pytest.approx(sum(o.cost for o in sink.outcomes))  # type: ignore[misc]

    # A second run from the same cache sends nothing and ends the same way.
    again, sink2 = ReaskingBackend(), ListSink()
    await make_runner(again, sink2, 2, json_mode=_mode(), replies=store).run(iter([[json_request(0), json_request(1)]]))  # type: ignore[arg-type]
    assert again.bodies == []
    assert {o.index: o.output_json for o in sink2.outcomes} == {o.index: o.output_json for o in sink.outcomes}
    assert all(o.cached and o.cost == 0 for o in sink2.outcomes)


@pytest.mark.anyio
async def test_retries_0_records_the_first_answer_as_it_parsed() -> None:
    backend, sink = ReaskingBackend(), ListSink()
    await make_runner(backend, sink, 1, json_mode=_mode(retries=0)).run(iter([[json_request(0)]]))
    (outcome,) = sink.outcomes
    assert len(backend.bodies) == 1
    assert (outcome.status, outcome.error_code, outcome.parse_status, outcome.output_text) == (
        "error", "InvalidJSON", "invalid_json", '{"n": '
    )
    assert outcome.cost and outcome.input_tokens == 10


@pytest.mark.anyio
async def test_a_budget_that_runs_out_before_the_reask_keeps_the_answer_as_a_retryable_error() -> None:
    backend, sink = ReaskingBackend(), ListSink()
    # The first ask reserves 0.05 and costs 0.016; the re-ask's worst case no longer fits.
    runner = make_runner(backend, sink, 1, json_mode=_mode(), budget=Budget(0.06))
    await runner.run(iter([[json_request(0)]]))
    assert runner.stop_reason == STOP_BUDGET and len(backend.bodies) == 1
    (outcome,) = sink.outcomes
    assert (outcome.status, outcome.parse_status, outcome.retryable) == ("error", "invalid_json", True)
    assert outcome.cost == pytest.approx((10 * 1.0 + 3 * 2.0) / 1000)


@pytest.mark.anyio
async def test_a_reask_the_service_refuses_is_that_error_with_the_first_answer_paid() -> None:
    backend, sink = ReaskingBackend(BadRequest("InvalidParameter", "no")), ListSink()
    await make_runner(backend, sink, 1, json_mode=_mode()).run(iter([[json_request(0)]]))
    (outcome,) = sink.outcomes
    assert (outcome.status, outcome.error_code, outcome.parse_status) == ("error", "InvalidParameter", "invalid_json")
    assert outcome.output_text == '{"n": ' and outcome.cost == pytest.approx(0.016) and outcome.reasks == 1


@pytest.mark.anyio
async def test_a_refused_key_on_the_reask_records_nothing() -> None:
    backend, sink = ReaskingBackend(AuthError("InvalidApiKey", "bad key")), ListSink()
    runner = make_runner(backend, sink, 1, json_mode=_mode())
    await runner.run(iter([[json_request(0)]]))
    assert runner.stop_reason == STOP_AUTH and sink.outcomes == []
