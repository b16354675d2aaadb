"""The Batch API (/files, /batches), judged by the openai package's own files and batches calls.

Every wait is a poll with a deadline; the time scale is the emulator's config (seconds, not hours).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen_batch.emulator import EmulatorConfig, RunningEmulator
from qwen_batch.emulator.batches import CANCELLED_MESSAGE, EXPIRED_MESSAGE, TEST_ANSWER, window_hours
from qwen_batch.emulator.files import FileApiError, page_after
from qwen_batch.emulator.cli import config_from_args
from qwen_batch.testing import EmulatorThread

from test_cli import REPO, _parse

FAST = {"batch_validating_s": 0.01, "batch_finalizing_s": 0.01, "batch_line_s": 0.0}
FINISHED = ("completed", "failed", "expired", "cancelled")
CHAT = "/v1/chat/completions"
DEADLINE_S = 10.0

Start = Callable[..., tuple[RunningEmulator, openai.OpenAI]]


@pytest.fixture
def start() -> Iterator[Start]:
    """``start(**config)``: an emulator with FAST batches (overridable) and an openai client on it."""
    threads: list[EmulatorThread] = []

    def run(**fields: Any) -> tuple[RunningEmulator, openai.OpenAI]:
        thread = EmulatorThread(EmulatorConfig(**{**FAST, **fields}))
        threads.append(thread)
        emu = thread.__enter__()
        return emu, openai.OpenAI(base_url=emu.compatible_base_url, api_key=emu.api_key, max_retries=0, timeout=10)

    yield run
    for thread in threads:
        thread.__exit__(None, None, None)


def body(text: str, model: str = "qwen-plus", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def line(custom_id: str, request: dict[str, Any], url: str = CHAT) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": request}


def upload(client: openai.OpenAI, lines: list[dict[str, Any]] | bytes) -> str:
    content = lines if isinstance(lines, bytes) else "".join(json.dumps(item) + "\n" for item in lines).encode()
    return client.files.create(file=("input.jsonl", io.BytesIO(content)), purpose="batch").id


def submit(client: openai.OpenAI, lines: list[dict[str, Any]] | bytes, *, endpoint: str = CHAT,
           name: str = "job/0", window: str = "24h") -> Any:
    file_id = upload(client, lines)
    return client.batches.create(input_file_id=file_id, endpoint=endpoint,  # type: ignore[arg-type]
                                 completion_window=window,  # type: ignore[arg-type]
                                 metadata={"ds_name": name, "ds_description": "a test"})


def poll(client: openai.OpenAI, batch_id: str, until: Callable[[Any], bool] = lambda b: b.status in FINISHED,
         seen: list[Any] | None = None) -> Any:
    """Retrieve until ``until`` holds (recording every object seen); fails past the deadline."""
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        batch = client.batches.retrieve(batch_id)
        if seen is not None:
            seen.append(batch)
        if until(batch):
            return batch
        time.sleep(0.005)
    raise AssertionError(f"batch {batch_id} never reached the state asked for: {batch}")


def jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(text) for text in client.files.content(file_id).text.splitlines()]


def batch_lines(emu: RunningEmulator, batch_id: str) -> list[dict[str, Any]]:
    return [entry for entry in emu.ledger if entry["endpoint"] == "batch" and entry["batch_id"] == batch_id]


# ----- the happy path ----------------------------------------------------------------------


def test_a_batch_goes_validating_in_progress_finalizing_completed_with_true_counts(start: Start) -> None:
    emu, client = start(batch_line_s=0.01, batch_validating_s=0.05, batch_finalizing_s=0.05)
    lines = [line(f"row-{i}", body(f"question {i}")) for i in range(12)]
    created = submit(client, lines)
    assert created.status == "validating" and created.object == "batch" and created.id.startswith("batch_")
    assert (created.request_counts.total, created.request_counts.completed, created.request_counts.failed) == (0, 0, 0)
    assert created.metadata == {"ds_name": "job/0", "ds_description": "a test"}
    assert created.in_progress_at is None and created.output_file_id is None and created.expires_at is None
    seen: list[Any] = []
    done = poll(client, created.id, seen=seen)
    statuses = [b.status for b in seen]
    order = ["validating", "in_progress", "finalizing", "completed"]
    assert [s for s in order if s in statuses] == sorted(set(statuses), key=order.index)
    assert statuses == sorted(statuses, key=order.index), "statuses only move forward"
    assert {"in_progress", "finalizing"} <= set(statuses), "a test can see every step on this time scale"
    counts = [(b.request_counts.completed, b.request_counts.failed) for b in seen if b.status == "in_progress"]
    assert counts == sorted(counts) and all(b.request_counts.total == 12 for b in seen if b.status != "validating")
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (12, 12, 0)
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.output_file_id.startswith("file-batch_output-") and done.error_file_id is None
    output = jsonl(client, done.output_file_id)
    assert [item["custom_id"] for item in output] == [f"row-{i}" for i in range(12)]
    assert {item["custom_id"] for item in output} == {item["custom_id"] for item in lines}


def test_each_output_line_is_the_online_answer_to_the_same_body(start: Start) -> None:
    emu, client = start()
    requests = [body("Summarize the tea trade.", seed=3), body("请介绍一下杭州。", max_tokens=20),
                body("Reply in json: a list of two fruits.", response_format={"type": "json_object"})]
    done = poll(client, submit(client, [line(str(i), r) for i, r in enumerate(requests)]).id)
    output = jsonl(client, done.output_file_id)
    for item, request in zip(output, requests):
        assert set(item) == {"id", "custom_id", "response", "error"} and item["error"] is None
        response = item["response"]
        assert response["status_code"] == 200 and response["request_id"] == item["id"]
        online = client.chat.completions.create(**request).model_dump()
        answer = response["body"]
        assert answer["object"] == "chat.completion" and answer["model"] == "qwen-plus"
        assert answer["choices"][0]["message"] == {"role": "assistant", "content": online["choices"][0]["message"]["content"]}
        assert answer["choices"][0]["finish_reason"] == online["choices"][0]["finish_reason"]
        assert answer["usage"] == {key: online["usage"][key] for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert output[1]["response"]["body"]["choices"][0]["finish_reason"] == "length"


def test_a_thinking_body_is_answered_whole_as_its_stream_adds_up(start: Start) -> None:
    emu, client = start()
    request = body("Why is the sky blue?", model="qwen3.5-plus", enable_thinking=True)
    done = poll(client, submit(client, [line("t", request)]).id)
    answer = jsonl(client, done.output_file_id)[0]["response"]["body"]
    online = {key: value for key, value in request.items() if key != "enable_thinking"}
    stream = client.chat.completions.create(**online, extra_body={"enable_thinking": True}, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    thought = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    message = answer["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == (text, thought) and thought
    assert answer["usage"]["completion_tokens"] == chunks[-1].usage.completion_tokens


# ----- a file that breaks the documented limits ---------------------------------------------


def test_a_file_breaking_the_limits_fails_with_every_line_error_and_runs_nothing(start: Start) -> None:
    emu, client = start()
    lines = [line("a", body("one")), line("a", body("two")), line("b", body("three", model="qwen-max")),
             line("c", body("four"), url="/v1/chat/completion"), line("d", body("five", enable_thinking=False))]
    done = poll(client, submit(client, lines).id)
    assert done.status == "failed" and done.failed_at is not None and done.output_file_id is None
    errors = [(e.code, e.line, e.param) for e in done.errors.data]
    assert errors == [("duplicate_custom_id", 2, "custom_id"), ("mismatched_model", 3, "body.model"),
                      ("url_not_found", 4, "url"), ("mismatched_enable_thinking", 5, "body.enable_thinking")]
    messages = {e.code: e.message for e in done.errors.data}
    assert messages["url_not_found"] == "The provided url '/v1/chat/completion' is not supported by the Batch API."
    assert messages["mismatched_model"] == ("The model 'qwen-max' for this request does not match the rest of the "
                                            "batch. Each batch must contain requests for a single model.")
    assert messages["duplicate_custom_id"].startswith("The custom_id 'a' for this request is a duplicate")
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (0, 0, 0)
    assert batch_lines(emu, done.id) == []


@pytest.mark.parametrize(("limits", "code"), [
    ({"batch_max_lines": 2}, "too_many_requests"),
    ({"batch_max_file_bytes": 300}, "file_too_large"),
    ({"batch_max_line_bytes": 120}, "line_too_large"),
    ({"batch_max_custom_id_chars": 3}, "invalid_custom_id"),
])
def test_each_size_limit_fails_the_batch(start: Start, limits: dict[str, int], code: str) -> None:
    emu, client = start(**limits)
    lines = [line(f"id-{i}", body("x" * 40)) for i in range(3)]
    done = poll(client, submit(client, lines).id)
    assert done.status == "failed"
    assert code in [e.code for e in done.errors.data]
    assert batch_lines(emu, done.id) == []


def test_lines_that_are_not_requests_are_named_by_line_number(start: Start) -> None:
    emu, client = start()
    raw = (json.dumps(line("a", body("ok"))) + "\nnot json\n" + json.dumps({**line("b", body("x")), "method": "GET"})
           + "\n" + json.dumps({"custom_id": "c", "method": "POST", "url": CHAT}) + "\n").encode()
    done = poll(client, submit(client, raw).id)
    assert [(e.code, e.line) for e in done.errors.data] == [
        ("invalid_json_line", 2), ("invalid_method", 3), ("missing_required_parameter", 4)]


# ----- line errors -------------------------------------------------------------------------


def test_a_body_the_endpoint_refuses_gets_that_refusal_as_its_error_line(start: Start) -> None:
    emu, client = start()
    refused = body("hello", top_p=5)
    done = poll(client, submit(client, [line("ok", body("fine")), line("bad", refused)]).id)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    assert done.error_file_id.startswith("file-batch_error-")
    [error] = jsonl(client, done.error_file_id)
    with pytest.raises(openai.BadRequestError) as online:
        client.chat.completions.create(**refused)
    assert error["custom_id"] == "bad" and error["response"]["status_code"] == 400
    online_error = online.value.body
    assert error["response"]["body"]["error"]["message"] == online_error["message"]
    assert error["error"] == {"code": online_error["code"], "message": online_error["message"]}
    assert [item["custom_id"] for item in jsonl(client, done.output_file_id)] == ["ok"]


def test_batch_line_error_fails_once_with_a_500_and_succeeds_in_a_later_batch(start: Start) -> None:
    emu, client = start()
    flaky = line("f", body("[[emu: batch_line_error]] translate this"))
    stuck = line("s", body("[[emu: batch_line_error=always]] and this"))
    first = poll(client, submit(client, [flaky, stuck]).id)
    errors = {item["custom_id"]: item for item in jsonl(client, first.error_file_id)}
    assert set(errors) == {"f", "s"} and first.output_file_id is None
    assert errors["f"]["response"]["status_code"] == 500 and errors["f"]["error"]["code"] == "internal_error"
    second = poll(client, submit(client, [flaky, stuck], name="job/1").id)
    assert [item["custom_id"] for item in jsonl(client, second.output_file_id)] == ["f"]
    assert [item["custom_id"] for item in jsonl(client, second.error_file_id)] == ["s"]
    online = client.chat.completions.create(**flaky["body"])
    assert online.choices[0].message.content, "the directive is ignored online"


def test_an_unreadable_batch_directive_is_a_400_online_and_in_a_batch(start: Start) -> None:
    emu, client = start()
    request = body("[[emu: batch_line_error=often]] hi")
    with pytest.raises(openai.BadRequestError) as online:
        client.chat.completions.create(**request)
    assert "batch_line_error='often'" in online.value.body["message"]
    done = poll(client, submit(client, [line("x", request)]).id)
    [error] = jsonl(client, done.error_file_id)
    assert error["response"]["status_code"] == 400 and error["error"]["message"] == online.value.body["message"]


def test_the_error_code_shape_can_be_chosen(start: Start) -> None:
    emu, client = start(batch_error_shape="error_code", batch_error_file_prefix="file-batch_output-")
    done = poll(client, submit(client, [line("s", body("[[emu: batch_line_error=always]] x"))]).id)
    assert done.error_file_id.startswith("file-batch_output-") and done.output_file_id is None
    [error] = jsonl(client, done.error_file_id)
    assert set(error["error"]) == {"error_code", "error_message"} and error["error"]["error_code"] == "internal_error"


# ----- expiry ------------------------------------------------------------------------------


def test_a_batch_expires_after_n_lines_keeping_the_finished_ones(start: Start) -> None:
    emu, client = start(batch_expire_after_lines=3)
    lines = [line(f"r{i}", body(f"q {i}")) for i in range(7)]
    done = poll(client, submit(client, lines).id)
    assert done.status == "expired" and done.expired_at is not None and done.completed_at is None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (7, 3, 4)
    assert [item["custom_id"] for item in jsonl(client, done.output_file_id)] == ["r0", "r1", "r2"]
    errors = jsonl(client, done.error_file_id)
    assert [item["custom_id"] for item in errors] == ["r3", "r4", "r5", "r6"]
    assert all(item["response"] is None and item["error"] == {"code": "batch_expired", "message": EXPIRED_MESSAGE}
               for item in errors)
    assert [entry["custom_id"] for entry in batch_lines(emu, done.id)] == ["r0", "r1", "r2"], "the rest never ran"


def test_a_window_of_24h_expires_on_the_scaled_clock(start: Start) -> None:
    # 24 h x 0.05 s = 1.2 s, and each line takes 10 s: the window ends inside the first line.
    emu, client = start(batch_hour_s=0.05, batch_line_s=10.0)
    begun = time.monotonic()
    done = poll(client, submit(client, [line("a", body("a")), line("b", body("b"))]).id)
    assert done.status == "expired" and time.monotonic() - begun < 5
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (2, 0, 2)
    assert done.output_file_id is None and batch_lines(emu, done.id) == []


def test_a_longer_window_outlasts_the_same_work(start: Start) -> None:
    emu, client = start(batch_hour_s=0.05, batch_line_s=0.1)
    done = poll(client, submit(client, [line(str(i), body(str(i))) for i in range(15)], window="2d").id)
    assert done.status == "completed", "2d x 0.05 s = 2.4 s > 1.5 s of lines"


# ----- cancel ------------------------------------------------------------------------------


def test_cancel_goes_cancelling_then_cancelled_keeping_answered_lines(start: Start) -> None:
    emu, client = start(batch_line_s=0.05, batch_finalizing_s=0.2)
    lines = [line(f"r{i}", body(f"q {i}")) for i in range(40)]
    created = submit(client, lines)
    poll(client, created.id, until=lambda b: b.request_counts.completed >= 2)
    cancelling = client.batches.cancel(created.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    done = poll(client, created.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    counts = done.request_counts
    answered = jsonl(client, done.output_file_id)
    assert counts.total == 40 and counts.completed == len(answered) >= 2 and counts.failed == 40 - counts.completed
    never = jsonl(client, done.error_file_id)
    assert [i["custom_id"] for i in answered] + [i["custom_id"] for i in never] == [f"r{i}" for i in range(40)]
    assert all(i["error"] == {"code": "batch_cancelled", "message": CANCELLED_MESSAGE} for i in never)
    billed = [entry for entry in batch_lines(emu, done.id) if entry["billable"]]
    assert len(billed) == counts.completed, "answered lines are billed, never-started ones are free"


def test_the_line_in_flight_when_cancelled_finishes_and_is_billed(start: Start) -> None:
    emu, client = start(batch_line_s=0.5)
    created = submit(client, [line(str(i), body(f"q {i}")) for i in range(4)])
    poll(client, created.id, until=lambda b: b.status == "in_progress")
    cancelling = client.batches.cancel(created.id)
    assert cancelling.status == "cancelling"
    done = poll(client, created.id)
    assert done.request_counts.completed == cancelling.request_counts.completed + 1
    assert done.request_counts.failed == 4 - done.request_counts.completed
    assert sum(entry["billable"] for entry in batch_lines(emu, done.id)) == done.request_counts.completed


def test_cancel_while_validating_fails_every_row_like_the_capture(start: Start) -> None:
    emu, client = start(batch_validating_s=5.0, batch_error_file_prefix="file-batch_output-")
    created = submit(client, [line("1", body("a")), line("2", body("b"))])
    assert client.batches.cancel(created.id).status == "cancelling"
    done = poll(client, created.id)
    assert done.status == "cancelled" and done.output_file_id is None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (2, 0, 2)
    assert done.error_file_id.startswith("file-batch_output-")
    assert [item["custom_id"] for item in jsonl(client, done.error_file_id)] == ["1", "2"]


def test_a_cancel_while_finalizing_ends_cancelled_with_every_line_answered(start: Start) -> None:
    emu, client = start(batch_finalizing_s=1.0)
    created = submit(client, [line("1", body("a")), line("2", body("b"))])
    poll(client, created.id, until=lambda b: b.status == "finalizing")
    assert client.batches.cancel(created.id).status == "cancelling"
    done = poll(client, created.id)
    assert done.status == "cancelled" and (done.request_counts.completed, done.request_counts.failed) == (2, 0)
    assert len(jsonl(client, done.output_file_id)) == 2 and done.error_file_id is None


def test_a_finished_batch_cannot_be_cancelled(start: Start) -> None:
    emu, client = start()
    done = poll(client, submit(client, [line("1", body("a"))]).id)
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(done.id)
    assert client.batches.retrieve(done.id).status == "completed"


# ----- the test model ------------------------------------------------------------------------


def test_the_test_model_answers_its_fixed_text_for_free(start: Start) -> None:
    emu, client = start()
    lines = [line(str(i), body(f"q {i}", model="batch-test-model"), url="/v1/chat/ds-test") for i in range(3)]
    done = poll(client, submit(client, lines, endpoint="/v1/chat/ds-test").id)
    assert done.status == "completed" and done.endpoint == "/v1/chat/ds-test"
    for item in jsonl(client, done.output_file_id):
        answer = item["response"]["body"]
        assert answer["choices"][0]["message"]["content"] == TEST_ANSWER
        assert answer["usage"] == {"prompt_tokens": 20, "completion_tokens": 6, "total_tokens": 26}
    entries = batch_lines(emu, done.id)
    assert len(entries) == 3 and not any(entry["billable"] for entry in entries)
    assert (emu.stats()["billable"], emu.stats()["batch_billable"]) == (0, 0)


def test_the_test_model_takes_at_most_100_lines(start: Start) -> None:
    emu, client = start()
    lines = [line(str(i), body("q", model="batch-test-model"), url="/v1/chat/ds-test") for i in range(101)]
    done = poll(client, submit(client, lines, endpoint="/v1/chat/ds-test").id)
    assert done.status == "failed" and [e.code for e in done.errors.data] == ["too_many_requests"]


# ----- list, files, refusals ----------------------------------------------------------------


def test_list_by_ds_name_finds_a_batch_whose_id_was_lost(start: Start) -> None:
    emu, client = start()
    ids = {name: submit(client, [line("1", body(name))], name=name).id for name in ("run/a/0", "run/a/1", "run/b/0")}
    found = client.batches.list(extra_query={"ds_name": "run/a/1"})
    assert [b.id for b in found.data] == [ids["run/a/1"]]
    both = client.batches.list(extra_query={"ds_name": "run/a/"})
    assert [b.id for b in both.data] == [ids["run/a/1"], ids["run/a/0"]], "newest first"
    page = client.batches.list(limit=1)
    assert page.has_more and [b.id for b in page.data] == [ids["run/b/0"]]
    rest = client.batches.list(limit=2, after=page.data[0].id)
    assert [b.id for b in rest.data] == [ids["run/a/1"], ids["run/a/0"]] and not rest.has_more
    poll(client, ids["run/b/0"])
    done = client.batches.list(extra_query={"status": "completed,failed", "ds_name": "run/b"})
    assert [b.id for b in done.data] == [ids["run/b/0"]]


def test_a_batch_keeps_running_when_its_input_file_is_deleted(start: Start) -> None:
    emu, client = start(batch_validating_s=0.2)
    created = submit(client, [line("1", body("a")), line("2", body("b"))])
    client.files.delete(created.input_file_id)
    done = poll(client, created.id)
    assert done.status == "completed" and done.request_counts.completed == 2


def test_files_are_listed_newest_first_and_an_upload_is_hashed_in_the_ledger(start: Start) -> None:
    emu, client = start()
    content = (json.dumps(line("1", body("a"))) + "\n").encode()
    first, second = upload(client, content), upload(client, content)
    assert [f.id for f in client.files.list().data] == [second, first]
    assert [f.id for f in client.files.list(limit=1, after=second).data] == [first]
    uploads = [e for e in emu.ledger if e.get("action") == "upload"]
    assert [e["file_id"] for e in uploads] == [first, second]
    assert uploads[0]["body_sha256"] == hashlib.sha256(content).hexdigest()


def test_files_can_be_retrieved_deleted_and_only_results_downloaded(start: Start) -> None:
    emu, client = start()
    file_id = upload(client, [line("1", body("a"))])
    stored = client.files.retrieve(file_id)
    assert (stored.purpose, stored.status, stored.filename, stored.object) == ("batch", "processed", "input.jsonl", "file")
    assert stored.id.startswith("file-batch-") and stored.bytes > 0
    with pytest.raises(openai.BadRequestError):
        client.files.content(file_id)
    assert client.files.delete(file_id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


@pytest.mark.parametrize(("change", "param"), [
    ({"completion_window": "12h"}, "completion_window"),
    ({"completion_window": "15d"}, "completion_window"),
    ({"completion_window": "1.5d"}, "completion_window"),
    ({"endpoint": "/v1/embeddings"}, "endpoint"),
    ({"metadata": {"ds_name": "n" * 101}}, "metadata.ds_name"),
])
def test_create_refuses_what_the_service_does_not_take(start: Start, change: dict[str, Any], param: str) -> None:
    emu, client = start()
    request = {"input_file_id": upload(client, [line("1", body("a"))]), "endpoint": CHAT, "completion_window": "24h",
               **change}
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(**request)
    assert refused.value.body["param"] == param
    assert client.batches.list().data == []


def test_a_local_server_has_no_batch_api(start: Start) -> None:
    emu, client = start(server="vllm")
    with pytest.raises(openai.NotFoundError):
        client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    assert [entry["endpoint"] for entry in emu.ledger] == ["not-found"]


def test_every_call_needs_the_key_and_the_refusal_creates_nothing(start: Start) -> None:
    emu, client = start()
    wrong = openai.OpenAI(base_url=emu.compatible_base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    with pytest.raises(openai.AuthenticationError):
        wrong.batches.list()
    assert [(e["endpoint"], e["action"], e["status"]) for e in emu.ledger] == [
        ("files", "upload", 401), ("batches", "list", 401)]
    assert client.batches.list().data == []


# ----- the ledger ----------------------------------------------------------------------------


def test_the_ledger_bills_each_answered_line_once_and_counts_api_calls(start: Start) -> None:
    emu, client = start()
    lines = [line("a", body("one")), line("b", body("two", top_p=5)), line("c", body("three"))]
    done = poll(client, submit(client, lines).id)
    entries = batch_lines(emu, done.id)
    assert [(e["custom_id"], e["status"], e["billable"]) for e in entries] == [
        ("a", 200, True), ("b", 400, False), ("c", 200, True)]
    assert entries[1]["code"] == "InvalidParameter" and entries[0]["model"] == "qwen-plus"
    output = {item["custom_id"]: item for item in jsonl(client, done.output_file_id)}
    assert entries[0]["output_tokens"] == output["a"]["response"]["body"]["usage"]["completion_tokens"]
    assert entries[0]["request_id"] == output["a"]["id"]
    online = client.chat.completions.create(**body("an online one"))
    stats = emu.stats()
    assert (stats["billable"], stats["batch_billable"]) == (3, 2)
    batch_tokens = sum(output[c]["response"]["body"]["usage"]["completion_tokens"] for c in "ac")
    assert stats["batch_output_tokens"] == batch_tokens
    assert stats["output_tokens"] == batch_tokens + online.usage.completion_tokens
    assert stats["batch_input_tokens"] == sum(output[c]["response"]["body"]["usage"]["prompt_tokens"] for c in "ac")
    actions = [(e["endpoint"], e["action"]) for e in emu.ledger if e["endpoint"] in ("files", "batches")]
    assert actions.count(("batches", "create")) == 1 and actions.count(("files", "upload")) == 1
    create = next(e for e in emu.ledger if e.get("action") == "create")
    assert create["batch_id"] == done.id and create["status"] == 200


def test_the_batch_api_rate_limits_are_optional(start: Start) -> None:
    emu, client = start(batch_rate_limits=True)
    for _ in range(100):
        client.batches.list()
    with pytest.raises(openai.RateLimitError):
        client.batches.list()
    client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch")  # another limit's calls still go
    free_emu, free = start()
    for _ in range(101):
        free.batches.list()


def test_shutdown_stops_running_batches_promptly() -> None:
    thread = EmulatorThread(EmulatorConfig(batch_line_s=30.0, batch_validating_s=0.0))
    emu = thread.__enter__()
    client = openai.OpenAI(base_url=emu.compatible_base_url, api_key=emu.api_key, max_retries=0)
    created = submit(client, [line("1", body("a")), line("2", body("b"))])
    poll(client, created.id, until=lambda b: b.status == "in_progress")
    folder = emu.emulator.batch_api.files.new_path().parent
    assert any(folder.iterdir()), "the upload is on disk"
    begun = time.monotonic()
    thread.__exit__(None, None, None)
    assert time.monotonic() - begun < 5
    assert emu.emulator.batch_api.batches._tasks == set()
    assert not folder.exists(), "the files go with the emulator"


def test_the_batch_flags_reach_the_config() -> None:
    config = config_from_args(_parse(
        "--batch-validating", "0.5", "--batch-per-line", "0.01", "--batch-finalizing", "0.3", "--batch-hour", "0.05",
        "--batch-expire-after-lines", "4", "--batch-error-file-prefix", "file-batch_output-",
        "--batch-error-shape", "error_code", "--batch-max-lines", "10", "--batch-max-file-bytes", "1000",
        "--batch-max-line-bytes", "100", "--batch-max-custom-id-chars", "8", "--batch-rate-limits",
    ))
    assert config == EmulatorConfig(
        batch_validating_s=0.5, batch_line_s=0.01, batch_finalizing_s=0.3, batch_hour_s=0.05,
        batch_expire_after_lines=4, batch_error_file_prefix="file-batch_output-", batch_error_shape="error_code",
        batch_max_lines=10, batch_max_file_bytes=1000, batch_max_line_bytes=100, batch_max_custom_id_chars=8,
        batch_rate_limits=True)


def test_a_served_emulator_keeps_its_batches_for_a_client_that_comes_back(tmp_path: Any) -> None:
    """The shell's emulator takes the batch flags, and a second client (a rerun) finds the first one's batch."""
    ledger = tmp_path / "ledger.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(
        [sys.executable, "-m", "qwen_batch.emulator", "--port", "0", "--batch-validating", "0", "--batch-finalizing",
         "0", "--batch-expire-after-lines", "1", "--ledger", str(ledger)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        process.stdout.readline()
        process.stdout.readline()
        base = re.search(r"compatible base URL: (\S+)", process.stdout.readline()).group(1)
        first = openai.OpenAI(base_url=base, api_key="sk-emulator", max_retries=0)
        submit(first, [line("1", body("a")), line("2", body("b"))], name="run/7/0")
        first.close()
        again = openai.OpenAI(base_url=base, api_key="sk-emulator", max_retries=0)
        [found] = again.batches.list(extra_query={"ds_name": "run/7/0"}).data
        done = poll(again, found.id)
        assert done.status == "expired" and (done.request_counts.completed, done.request_counts.failed) == (1, 1)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
    entries = [json.loads(text) for text in ledger.read_text().splitlines()]
    assert [(e["custom_id"], e["billable"]) for e in entries if e["endpoint"] == "batch"] == [("1", True)]


@pytest.mark.parametrize("fields", [{"batch_hour_s": 0}, {"batch_line_s": -1}, {"batch_error_shape": "other"},
                                    {"batch_error_file_prefix": "batch_"}, {"batch_max_lines": 0}])
def test_impossible_batch_options_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EmulatorConfig(**fields)


@given(st.integers(0, 400), st.sampled_from(["h", "d"]))
def test_a_window_is_accepted_exactly_from_24h_to_336h(count: int, unit: str) -> None:
    hours = count * (24 if unit == "d" else 1)
    text = f"{count}{unit}"
    if 24 <= hours <= 336:
        assert window_hours(text) == hours
    else:
        with pytest.raises(FileApiError):
            window_hours(text)


@given(st.text(max_size=8))
def test_any_other_window_text_is_refused_or_a_whole_number_of_hours_in_range(text: str) -> None:
    try:
        hours = window_hours(text)
    except FileApiError as refused:
        assert refused.status == 400 and refused.param == "completion_window"
    else:
        assert 24 <= hours <= 336 and text.rstrip("hd").isdigit() and text.isascii()


@given(st.integers(0, 60), st.integers(1, 100))
def test_paging_with_after_visits_every_item_once_in_order(count: int, limit: int) -> None:
    items = [f"id-{i}" for i in range(count)]
    seen: list[str] = []
    after: str | None = None
    while True:
        page, more = page_after(items, after, limit, str)
        seen.extend(page)
        if not more:
            break
        assert len(page) == limit
        after = page[-1]
    assert seen == items
