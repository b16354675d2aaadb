"""Batch mode's parts through their seams: custom ids, shards within every limit, result lines of
either error shape, the Batch API client over an ``httpx.MockTransport``, the durable state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_batch.batch.api import BatchApi
from qwen_batch.batch.ids import custom_id, ds_name, unit_of
from qwen_batch.batch.results import LineError, read_line
from qwen_batch.batch.shards import LineTooLarge, Shard, ShardWriter, UnitLine
from qwen_batch.batch.state import BatchState
from qwen_batch.catalog import Price, batch_price
from qwen_batch.errors import AuthError
from qwen_batch.spec import duration_seconds, window_hours
from qwen_batch.types import Reply, UnitKey


@given(st.integers(0, 10**12), st.integers(0, 50), st.integers(0, 50))
def test_a_custom_id_names_its_unit_and_nothing_else(row: int, variant: int, sample: int) -> None:
    unit = UnitKey(row, variant, sample)
    assert unit_of(custom_id(unit)) == unit
    assert len(custom_id(unit)) <= 256


@pytest.mark.parametrize("text", ["", "a", "1.2", "-1", "1.2.3.4", "١", " 1", "1e3"])
def test_a_custom_id_that_is_none_of_ours_names_no_unit(text: str) -> None:
    assert unit_of(text) is None


def test_a_batch_name_fits_the_services_limit() -> None:
    assert len(ds_name("0123456789abcdef", "s99999")) <= 100


@pytest.mark.parametrize(("window", "hours"), [("24h", 24), ("336h", 336), ("1d", 24), ("14d", 336), ("7d", 168)])
def test_completion_windows_the_service_accepts(window: str, hours: int) -> None:
    assert window_hours(window) == hours


@pytest.mark.parametrize("window", ["23h", "337h", "15d", "0d", "1.5d", "24", "24H", "024h", " 24h"])
def test_completion_windows_the_service_refuses(window: str) -> None:
    with pytest.raises(ValueError):
        window_hours(window)


def test_durations() -> None:
    assert [duration_seconds(t) for t in ("90s", "30m", "20h", "1d", "0.5s")] == [90, 1800, 72000, 86400, 0.5]
    for bad in ("0s", "5", "1w", "-1h"):
        with pytest.raises(ValueError):
            duration_seconds(bad)


def test_the_batch_price_is_half_of_every_tier_and_says_so() -> None:
    price = Price.flat(0.008, 0.02, "CNY", "the table", thinking_output_per_1k=0.05)
    half = batch_price(price)
    tier, full = half.tiers[0], price.tiers[0]
    assert (tier.input_per_million, tier.output_per_million, tier.thinking_output_per_million) == (
        full.input_per_million / 2, full.output_per_million / 2, full.thinking_output_per_million / 2  # type: ignore[operator]
    )
    assert half.source.startswith("billed as batch") and "the table" in half.source and "50%" in half.source


# -- shards ------------------------------------------------------------------------------------


def _writer(folder: Path, sealed: list[Shard], **limits: int) -> ShardWriter:
    names = iter(f"s{i:05d}" for i in range(1, 10_000))
    return ShardWriter(folder, next_name=lambda: next(names), on_sealed=sealed.append, **limits)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 300), st.sampled_from(["qwen-turbo", "qwen-plus"]), st.booleans()), max_size=60),
    st.integers(1, 7),
    st.integers(300, 1500),
)
def test_shards_keep_every_limit_and_every_line_once(
    tmp_path_factory: pytest.TempPathFactory, lines: list[tuple[int, str, bool]], max_lines: int, max_bytes: int
) -> None:
    folder = tmp_path_factory.mktemp("shards")
    sealed: list[Shard] = []
    writer = _writer(folder, sealed, max_lines=max_lines, max_file_bytes=max_bytes, max_line_bytes=300)
    for index, (size, model, thinking) in enumerate(lines):
        line = json.dumps({"custom_id": str(index), "pad": "x" * size}).encode() + b"\n"
        unit = UnitLine(index, f"fp{index}", 1, model, None)
        if len(line) > 300:
            with pytest.raises(LineTooLarge):
                writer.add(line, unit, thinking=thinking)
            lines[index] = (-1, model, thinking)
        else:
            writer.add(line, unit, thinking=thinking)
    writer.close()
    written: list[int] = []
    for shard in sealed:
        data = shard.path.read_bytes()
        assert 1 <= shard.lines <= max_lines and len(data) == shard.bytes <= max_bytes
        ids = [int(json.loads(line)["custom_id"]) for line in data.splitlines()]
        assert ids == [unit.index for unit in shard.units]
        assert {(lines[i][1], lines[i][2]) for i in ids} == {(shard.model, shard.thinking)}  # one model, one mode
        written += ids
    assert sorted(written) == [i for i, (size, _, _) in enumerate(lines) if size >= 0]


# -- result lines ------------------------------------------------------------------------------

COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 26, "completion_tokens": 49, "total_tokens": 75},
}


def test_an_output_line_of_the_capture_reads_as_its_reply() -> None:
    line = {"id": "r-1", "custom_id": "1", "response": {"status_code": 200, "request_id": "r-1", "body": COMPLETION}, "error": None}
    assert read_line(line, 1) == Reply("hi", "stop", 26, 49, "r-1", usage_source="service")


@pytest.mark.parametrize(
    "error",
    [{"code": "internal_error", "message": "boom"}, {"error_code": "internal_error", "error_message": "boom"}],
)
def test_an_error_line_of_either_documented_shape_is_read(error: dict[str, str]) -> None:
    line = {"id": "r-2", "custom_id": "2", "response": {"status_code": 500, "request_id": "r-2", "body": {}}, "error": error}
    assert read_line(line, 2) == LineError("internal_error", "boom", True, "r-2")


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [(400, "data_inspection_failed", False), (404, "model_not_found", False), (429, "limit_requests", True),
     (408, "request_timeout", True), (None, "batch_expired", True), (None, "batch_cancelled", True),
     (None, "mismatched_model", False), (None, "invalid_parameter_error", False)],
)
def test_a_refusal_is_the_rows_error_and_anything_else_may_pass_in_a_new_batch(
    status: int | None, code: str, retryable: bool
) -> None:
    response = {"status_code": status, "request_id": None, "body": {}} if status else None
    line = {"id": "x", "custom_id": "3", "response": response, "error": {"code": code, "message": "m"}}
    result = read_line(line, 3)
    assert isinstance(result, LineError) and result.code == code and result.retryable is retryable


def test_an_answer_without_usage_is_counted_here_or_is_an_error() -> None:
    body = {**COMPLETION, "usage": None}
    line = {"custom_id": "4", "response": {"status_code": 200, "request_id": "q", "body": body}, "error": None}
    assert isinstance(read_line(line, 4), LineError)
    reply = read_line(line, 4, estimate=lambda row, text, reasoning: (10, 2, None))
    assert isinstance(reply, Reply) and (reply.input_tokens, reply.output_tokens, reply.usage_source) == (10, 2, "estimated")


# -- the API client ----------------------------------------------------------------------------

KEY = "sk-test-0123456789abcdef"


def _api(handler: Any, waits: list[float], clock: list[float] | None = None) -> BatchApi:
    now = clock if clock is not None else [0.0]

    async def sleep(seconds: float) -> None:  # an instant sleep on a clock of its own
        waits.append(seconds)
        now[0] += seconds

    return BatchApi("http://127.0.0.1:1/compatible-mode/v1", KEY, transport=httpx.MockTransport(handler), sleep=sleep, clock=lambda: now[0])


def test_throttling_and_server_errors_are_tried_again_with_backoff() -> None:
    answers = iter([429, 503, 200])
    waits: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        if status != 200:
            return httpx.Response(status, json={"error": {"code": "limit_requests" if status == 429 else "x", "message": "m"}})
        return httpx.Response(200, json={"id": "batch_1", "status": "validating"})

    api = _api(handler, waits)
    batch = anyio.run(api.retrieve, "batch_1")
    assert batch["id"] == "batch_1" and waits == [0.5, 1.0]


def test_a_refused_key_is_an_auth_error_that_never_shows_the_key() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == f"Bearer {KEY}"
        return httpx.Response(401, json={"error": {"code": "invalid_api_key", "message": f"bad key {KEY}"}})

    with pytest.raises(AuthError) as caught:
        anyio.run(_api(handler, []).retrieve, "batch_1")
    assert KEY not in str(caught.value) and KEY not in caught.value.message


def test_list_calls_keep_to_the_documented_100_a_minute_and_read_every_page() -> None:
    pages = {
        None: {"data": [{"id": "b3", "created_at": 3, "metadata": {"ds_name": "job/s1-other"}}], "has_more": True},
        "b3": {"data": [{"id": "b2", "created_at": 2, "metadata": {"ds_name": "job/s1"}}], "has_more": False},
    }
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        after = request.url.params.get("after")
        seen.append(after)
        assert request.url.params["ds_name"] == "job/s1"
        return httpx.Response(200, json=pages[after])

    waits: list[float] = []
    found = anyio.run(_api(handler, waits).find, "job/s1")
    assert found is not None and found["id"] == "b2"  # a name that only contains ours is not ours
    assert seen == [None, "b3"] and waits == [pytest.approx(0.6)]


def test_a_download_streams_to_its_file_and_leaves_no_half_file(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/file-good/content"):
            return httpx.Response(200, content=b"line\n" * 1000)
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "No such file"}})

    api = _api(handler, [])
    target = tmp_path / "out.jsonl"
    anyio.run(api.download, "file-good", target)
    assert target.read_bytes() == b"line\n" * 1000
    with pytest.raises(Exception):
        anyio.run(api.download, "file-gone", tmp_path / "gone.jsonl")
    assert not (tmp_path / "gone.jsonl").exists()
    assert anyio.run(api.file, "file-gone") is None


# -- state -------------------------------------------------------------------------------------


def test_the_state_survives_reopening_and_counts_the_batches_a_row_was_in(tmp_path: Path) -> None:
    state = BatchState.open(tmp_path)
    job_id = state.job_id
    first = Shard(state.next_shard_name(), tmp_path / "a.jsonl", "qwen-turbo", False, 2, 10,
                  [UnitLine(0, "f0", 5, "qwen-turbo", 7), UnitLine(1, "f1", 6, "qwen-turbo", 7)])
    state.record_shard(first, ds_name(job_id, first.name), 86400.0)
    state.set_file(first.name, "file-1")
    state.set_batch(first.name, "batch_1", "validating", 1000.0)
    state.set_collected(first.name)
    second = Shard(state.next_shard_name(), tmp_path / "b.jsonl", "qwen-turbo", False, 1, 5, [UnitLine(1, "f1", 6, "qwen-turbo", 7)])
    state.record_shard(second, ds_name(job_id, second.name), 86400.0)
    state.close()
    again = BatchState.open(tmp_path)
    assert again.job_id == job_id
    shards = again.shards()
    assert [s.name for s in shards] == ["s00001", "s00002"] and shards[0].deadline == 1000.0 + 86400.0
    assert [s.name for s in again.shards(uncollected_only=True)] == ["s00002"]
    units = again.units([0, 1])
    assert (units[0].batches, units[1].batches, units[1].shard, units[0].first_sent) == (1, 2, "s00002", 1000.0)
    assert again.in_open_shards([0, 1, 2]) == {1}
    assert again.next_shard_name() == "s00003"
    again.close()
