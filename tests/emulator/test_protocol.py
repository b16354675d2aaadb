"""Byte-level protocol: bodies, headers, SSE framing, error shapes and validation texts."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from emu_helpers import compatible, native, prompt_body, sse_events
from qwen_batch import tokens
from qwen_batch.emulator import RunningEmulator


def test_a_text_answer_has_output_usage_and_request_id_also_in_the_header(emu: RunningEmulator) -> None:
    response = native(emu, prompt_body())
    body = response.json()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert set(body) == {"output", "usage", "request_id"}
    assert set(body["output"]) == {"finish_reason", "text"}
    assert response.headers["X-Request-ID"] == body["request_id"]
    usage = body["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_message_format_answers_with_choices(emu: RunningEmulator) -> None:
    body = native(emu, prompt_body(result_format="message")).json()
    choice = body["output"]["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "stop"
    assert body["usage"]["output_tokens"] == tokens.count_text(choice["message"]["content"])


def test_the_same_request_gets_a_byte_identical_reply_and_another_seed_another(emu: RunningEmulator) -> None:
    first = native(emu, prompt_body(seed=1)).json()
    again = native(emu, prompt_body(seed=1)).json()
    other = native(emu, prompt_body(seed=2)).json()
    assert first["output"] == again["output"] and first["usage"] == again["usage"]
    assert first["request_id"] != again["request_id"]
    assert other["output"]["text"] != first["output"]["text"]


def test_raw_usage_mode_counts_content_tokens_only(start_emulator: Any) -> None:
    emu = start_emulator(usage_mode="raw-2024q1")
    body = {"model": "qwen-turbo", "input": {"messages": [
        {"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "如何做西红柿炒鸡蛋？"}]}, "parameters": {}}
    assert native(emu, body).json()["usage"]["input_tokens"] == 12  # the seed page's own example


def test_sse_framing_is_exact_and_cumulative_by_default(emu: RunningEmulator) -> None:
    response = native(emu, prompt_body(seed=9, max_tokens=30), stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream;charset=UTF-8"
    events = sse_events(response.text)
    assert [e["id"] for e in events] == [str(i) for i in range(1, len(events) + 1)]
    assert {e["event"] for e in events} == {"result"} and {e["status"] for e in events} == {"200"}
    datas = [json.loads(e["data"]) for e in events]
    assert all(" " not in e["data"][:12] for e in events)  # compact JSON
    assert [d["output"]["finish_reason"] for d in datas] == ["null"] * (len(datas) - 1) + ["length"]
    texts = [d["output"]["text"] for d in datas]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    outputs = [d["usage"]["output_tokens"] for d in datas]
    assert outputs == sorted(outputs) and outputs[-1] == 30
    assert {d["request_id"] for d in datas} == {response.headers["X-Request-ID"]}
    whole = native(emu, prompt_body(seed=9, max_tokens=30)).json()
    assert texts[-1] == whole["output"]["text"]


def test_incremental_stream_in_message_format_ends_with_an_empty_final_event(emu: RunningEmulator) -> None:
    response = native(emu, prompt_body(result_format="message", incremental_output=True), stream=True)
    datas = [json.loads(e["data"]) for e in sse_events(response.text)]
    last = datas[-1]["output"]["choices"][0]
    assert last == {"message": {"content": "", "role": "assistant"}, "finish_reason": "stop"}
    whole = native(emu, prompt_body(result_format="message")).json()
    joined = "".join(d["output"]["choices"][0]["message"]["content"] for d in datas)
    assert joined == whole["output"]["choices"][0]["message"]["content"]


def test_accept_event_stream_alone_also_streams(emu: RunningEmulator) -> None:
    response = native(emu, prompt_body(), headers={"Accept": "text/event-stream"})
    assert response.headers["content-type"].startswith("text/event-stream")


def test_a_streaming_request_refused_before_generation_gets_its_status_and_an_error_event(emu: RunningEmulator) -> None:
    response = native(emu, prompt_body(), stream=True, key="sk-wrong")
    assert response.status_code == 401
    [event] = sse_events(response.text)
    assert (event["id"], event["event"], event["status"]) == ("1", "error", "401")
    assert json.loads(event["data"])["code"] == "InvalidApiKey"


def test_http200_mode_sends_pre_generation_stream_errors_with_200(start_emulator: Any) -> None:
    emu = start_emulator(stream_error_mode="http200")
    response = native(emu, prompt_body(top_p=2.0), stream=True)
    assert response.status_code == 200
    [event] = sse_events(response.text)
    assert event["event"] == "error" and event["status"] == "400"
    assert emu.ledger[-1]["status"] == 400  # the ledger keeps the error's own status


def test_error_body_is_code_message_request_id(emu: RunningEmulator) -> None:
    response = native(emu, prompt_body(), key="sk-wrong")
    body = response.json()
    assert response.status_code == 401
    assert body == {"code": "InvalidApiKey", "message": "Invalid API-key provided.", "request_id": response.headers["X-Request-ID"]}


def test_any_key_mode_accepts_any_bearer_but_not_none(start_emulator: Any) -> None:
    emu = start_emulator(api_key=None)
    assert native(emu, prompt_body(), key="sk-anything").status_code == 200
    response = httpx.post(emu.base_url + "/services/aigc/text-generation/generation", json=prompt_body())
    assert response.status_code == 401


def _messages(*pairs: tuple[str, str]) -> dict[str, Any]:
    return {"model": "qwen-turbo", "input": {"messages": [{"role": r, "content": c} for r, c in pairs]}, "parameters": {}}


ROLE_ERROR = "Role must be user or assistant and Content length must be greater than 0"

INVALID = [
    (b"{not json", 400, "InvalidParameter", "Required body invalid, please check the request body format."),
    ({"input": {"prompt": "x"}}, 400, "BadRequest.EmptyModel", 'Required parameter "model" missing from request.'),
    ({"model": "qwen-turbo"}, 400, "BadRequest.EmptyInput", "Required input parameter missing from request."),
    ({"model": "qwen-turbo", "input": "x"}, 400, "BadRequest.IllegalInput", "The input parameter requires json format."),
    ({"model": "qwen-nope", "input": {"prompt": "x"}}, 400, "InvalidParameter", "Model not exist."),
    ({"model": "qwen-turbo", "input": {}}, 400, "InvalidParameter", 'Either "prompt" or "messages" must exist and cannot both be none'),
    (_messages(("user", "")), 400, "InvalidParameter", ROLE_ERROR),
    (_messages(("robot", "hi")), 400, "InvalidParameter", ROLE_ERROR),
    (_messages(("user", "a"), ("system", "b"), ("user", "c")), 400, "InvalidParameter", ROLE_ERROR),
    (_messages(("user", "a"), ("user", "b")), 400, "InvalidParameter", "User and assistant need to appear alternately in the message"),
    (_messages(("system", "a"), ("assistant", "b")), 400, "InvalidParameter", "The input messages do not contain elements with the role of user."),
    (_messages(("user", "a"), ("assistant", "b")), 500, "InternalError.Algo", "list index out of range"),
    (prompt_body(top_p=0), 400, "InvalidParameter", "Range of top_p should be (0.0, 1.0]"),
    (prompt_body(top_p="high"), 400, "InvalidParameter", "'top_p' must be Float"),
    (prompt_body(temperature=2.0), 400, "InvalidParameter", "Temperature should be in [0.0, 2.0)"),
    (prompt_body(top_k=-1), 400, "InvalidParameter", "Parameter top_k be greater than or equal to 0"),
    (prompt_body(repetition_penalty=0), 400, "InvalidParameter", "Repetition_penalty should be greater than 0.0"),
    (prompt_body(presence_penalty=2.5), 400, "InvalidParameter", "Presence_penalty should be in [-2.0, 2.0]"),
    (prompt_body(seed=-1), 400, "InvalidParameter", "Range of seed should be [0, 9223372036854775807]"),
    (prompt_body(stop=["a", 1]), 400, "InvalidParameter", 'The "stop" parameter must be of type "str", "list[str]", "list[int]", or "list[list[int]]", and all elements within the list must be of the same type.'),
    (prompt_body(max_tokens=1501), 400, "InvalidParameter", "Range of max_tokens should be [1, 1500]"),
    (prompt_body(max_tokens=0), 400, "InvalidParameter", "Range of max_tokens should be [1, 1500]"),
]


@pytest.mark.parametrize(("body", "status", "code", "message"), INVALID)
def test_invalid_requests_get_the_service_code_status_and_text(emu: RunningEmulator, body: Any, status: int, code: str, message: str) -> None:
    response = native(emu, body)
    assert (response.status_code, response.json()["code"], response.json()["message"]) == (status, code, message)


def test_lenient_roles_accept_what_strict_refuses(start_emulator: Any) -> None:
    emu = start_emulator(role_rules="lenient")
    assert native(emu, _messages(("user", "a"), ("user", "b"))).status_code == 200
    assert native(emu, _messages(("user", "a"), ("system", "b"), ("user", "c"))).status_code == 200


def test_a_partial_assistant_message_may_end_the_conversation(emu: RunningEmulator) -> None:
    body = _messages(("user", "Write a poem"))
    body["input"]["messages"].append({"role": "assistant", "content": "Roses", "partial": True})
    assert native(emu, body).status_code == 200


def test_max_tokens_limits_follow_the_model(emu: RunningEmulator) -> None:
    assert native(emu, {**prompt_body(max_tokens=2048), "model": "qwen-plus"}).status_code == 200
    assert native(emu, {**prompt_body(max_tokens=2049), "model": "qwen-plus"}).json()["message"] == "Range of max_tokens should be [1, 2048]"


def test_a_body_over_16_mib_is_413_too_large(emu: RunningEmulator) -> None:
    response = native(emu, b"x" * (16 * 1024 * 1024 + 1))
    assert (response.status_code, response.json()["code"]) == (413, "BadRequest.TooLarge")


def test_get_on_the_generation_path_is_refused(emu: RunningEmulator) -> None:
    response = httpx.get(emu.base_url + "/services/aigc/text-generation/generation")
    assert response.json()["message"] == "Request method 'GET' is not supported."


def test_added_models_come_from_a_json_file(start_emulator: Any, tmp_path: Any) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": {"my-model": {"max_input_tokens": 50, "max_output_tokens": 10}}}))
    emu = start_emulator(models_path=path)
    assert native(emu, {**prompt_body(max_tokens=10), "model": "my-model"}).status_code == 200
    too_long = native(emu, {**prompt_body("word " * 60), "model": "my-model"}).json()
    assert too_long["message"] == "Range of input length should be [1, 50]"
    assert native(emu, {**prompt_body(), "model": "qwen-max-longcontext"}).status_code == 200


def test_tokenizer_endpoint_returns_the_documented_ids(emu: RunningEmulator) -> None:
    response = httpx.post(emu.base_url + "/tokenizer", json={"model": "qwen-turbo", "input": {"prompt": "通义千问具有强大的能力。"}, "parameters": {}},
                          headers={"Authorization": f"Bearer {emu.api_key}"})
    assert response.json()["output"]["token_ids"] == [31935, 64559, 99320, 56007, 100629, 104795, 99788, 1773]


def test_compatible_stream_framing_ends_with_done(emu: RunningEmulator) -> None:
    body = {"model": "qwen-turbo", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    response = compatible(emu, body)
    lines = response.text.split("\n\n")
    assert lines[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(line[6:]) for line in lines[:-2]]
    assert all(line.startswith("data: ") for line in lines[:-1])
    assert all(c["usage"] is None for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)


def test_compatible_errors_have_the_openai_shape(emu: RunningEmulator) -> None:
    wrong = compatible(emu, {"model": "qwen-turbo", "messages": [{"role": "user", "content": "hi"}]}, key="sk-wrong")
    assert wrong.status_code == 401
    assert wrong.json()["error"] == {"message": "Incorrect API key provided. ", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
    unknown = compatible(emu, {"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    seed = compatible(emu, {"model": "qwen-turbo", "messages": [{"role": "user", "content": "hi"}], "seed": -1})
    assert seed.json()["error"]["message"] == "-1 is lesser than the minimum of 0 - 'seed'"


def test_both_endpoints_give_the_same_reply_to_the_same_request(emu: RunningEmulator) -> None:
    messages = [{"role": "user", "content": "Same question"}]
    via_native = native(emu, {"model": "qwen-turbo", "input": {"messages": messages}, "parameters": {"seed": 4}}).json()
    via_compatible = compatible(emu, {"model": "qwen-turbo", "messages": messages, "seed": 4}).json()
    assert via_compatible["choices"][0]["message"]["content"] == via_native["output"]["text"]
    assert via_compatible["usage"]["prompt_tokens"] == via_native["usage"]["input_tokens"]
