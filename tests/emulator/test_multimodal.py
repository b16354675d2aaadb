"""The multimodal-generation path: which models answer there, content parts, streams and faults.

Facts from research-wave2 §1 and A.1 (Qwen3.5+ and QVQ answer only on this path; the other
path says 400 "url error", on a stream as an HTTP 200 SSE error event) and the
[CNB multimodal-generation-vl-*] captures (content as ``[{"text": ...}]``).
"""

from __future__ import annotations

import json
from typing import Any

import dashscope
import httpx
import pytest

from emu_helpers import native, sse_events
from qwen_batch import tokens
from qwen_batch.emulator import RunningEmulator

MULTIMODAL_PATH = "/services/aigc/multimodal-generation/generation"
URL_ERROR = "url error, please check url！"


def _converse(sdk: RunningEmulator, model: str, content: Any, **parameters: Any) -> Any:
    messages = [{"role": "user", "content": content}]
    return dashscope.MultiModalConversation.call(model=model, messages=messages, api_key=sdk.api_key, **parameters)


def _multimodal(emu: RunningEmulator, body: Any, *, stream: bool = False, timeout: float = 5.0) -> httpx.Response:
    headers = {"Authorization": f"Bearer {emu.api_key}"}
    if stream:
        headers["X-DashScope-SSE"] = "enable"
    return httpx.post(emu.base_url + MULTIMODAL_PATH, json=body, headers=headers, timeout=timeout)


def _body(text: str, model: str = "qwen3.6-flash", **parameters: Any) -> dict[str, Any]:
    return {"model": model, "input": {"messages": [{"role": "user", "content": [{"text": text}]}]},
            "parameters": parameters}


def _text(message: Any) -> str:
    return "".join(part["text"] for part in message.content)


def test_a_string_or_parts_prompt_gets_a_reply_of_content_parts_with_reasoning(sdk: RunningEmulator) -> None:
    response = _converse(sdk, "qwen3.5-plus", "Describe the sea.", seed=2)
    assert response.status_code == 200
    message = response.output.choices[0].message
    assert isinstance(message.content, list) and set(message.content[0]) == {"text"}
    details = response.usage["output_tokens_details"]["reasoning_tokens"]
    assert details == tokens.count_text(message.reasoning_content, "qwen3.5-plus") > 0  # thinks by default
    assert response.usage.output_tokens == details + tokens.count_text(_text(message), "qwen3.5-plus")
    as_parts = _converse(sdk, "qwen3.5-plus", [{"text": "Describe "}, {"text": "the sea."}], seed=2)
    assert as_parts.output.choices[0].message == message
    assert sdk.ledger[-1]["endpoint"] == "multimodal" and sdk.ledger[-1]["status"] == 200


def test_the_stream_sends_parts_reasoning_first_and_adds_up_to_the_whole_reply(sdk: RunningEmulator) -> None:
    events = list(_converse(sdk, "qwen3.7-max", "Tell me about tea.", stream=True, incremental_output=True, seed=6))
    assert all(event.status_code == 200 for event in events)
    messages = [event.output.choices[0].message for event in events]
    first_answer = next(i for i, m in enumerate(messages) if m.content)
    assert all(m.content == [] and m.reasoning_content for m in messages[:first_answer])
    assert all(m.reasoning_content == "" for m in messages[first_answer:])
    whole = _converse(sdk, "qwen3.7-max", "Tell me about tea.", seed=6).output.choices[0].message
    assert "".join(_text(m) for m in messages) == _text(whole)
    assert "".join(m.reasoning_content for m in messages) == whole.reasoning_content
    assert events[-1].output.choices[0].finish_reason == "stop"


def test_with_thinking_off_there_is_no_reasoning_and_usage_has_no_total(sdk: RunningEmulator) -> None:
    response = _converse(sdk, "qwen3.8-flash", "hi", enable_thinking=False)
    message = response.output.choices[0].message
    assert "reasoning_content" not in message and "output_tokens_details" not in response.usage
    assert "total_tokens" not in response.usage  # as the multimodal captures
    events = list(_converse(sdk, "qwen3.8-flash", "hi", stream=True, enable_thinking=False))
    assert "".join(_text(e.output.choices[0].message) for e in events) == _text(message)


def test_qvq_thinks_always_and_only_streams(sdk: RunningEmulator) -> None:
    refused = _converse(sdk, "qvq-plus", "hi")
    assert (refused.status_code, refused.code) == (400, "InvalidParameter")
    assert refused.message.startswith("This model only support stream mode")
    events = list(_converse(sdk, "qvq-plus", "hi", stream=True))
    assert events[0].output.choices[0].message.reasoning_content


def test_a_qwen35_model_on_the_text_path_is_a_url_error_and_a_text_model_here_too(sdk: RunningEmulator) -> None:
    wrong = dashscope.Generation.call(model="qwen3.5-plus", prompt="hi", api_key=sdk.api_key)
    assert (wrong.status_code, wrong.code, wrong.message) == (400, "InvalidParameter", URL_ERROR)
    other = _converse(sdk, "qwen-plus", [{"text": "hi"}])
    assert (other.status_code, other.code, other.message) == (400, "InvalidParameter", URL_ERROR)
    assert sdk.stats()["billable"] == 0


def test_on_a_stream_the_url_error_is_an_http_200_error_event(emu: RunningEmulator) -> None:
    body = {"model": "qwen3.6-plus", "input": {"messages": [{"role": "user", "content": "hi"}]}, "parameters": {}}
    response = native(emu, body, stream=True)
    assert response.status_code == 200
    (event,) = sse_events(response.text)
    assert event["event"] == "error" and json.loads(event["data"])["message"] == URL_ERROR
    plain = native(emu, body)
    assert plain.status_code == 400 and plain.json()["code"] == "InvalidParameter"


def test_image_parts_are_refused_with_a_clear_error_and_nothing_billed(emu: RunningEmulator) -> None:
    body = _body("What is this?")
    body["input"]["messages"][0]["content"].insert(0, {"image": "https://example.com/a.png"})
    response = _multimodal(emu, body)
    assert response.status_code == 400
    assert "content part 'image' is not supported" in response.json()["message"]
    assert emu.stats()["billable"] == 0


def test_faults_work_on_the_multimodal_path(emu: RunningEmulator) -> None:
    cut = _multimodal(emu, _body("x [[emu: fail=DataInspectionFailed midstream]]"), stream=True)
    events = sse_events(cut.text)
    assert events[0]["event"] == "result" and events[-1]["event"] == "error"
    assert json.loads(events[-1]["data"])["code"] == "DataInspectionFailed"
    with pytest.raises(httpx.RemoteProtocolError):
        _multimodal(emu, _body("x [[emu: truncated]]"), stream=True)
    with pytest.raises(httpx.TransportError):
        _multimodal(emu, _body("x [[emu: reset times=1]]"), stream=True)
    retried = _multimodal(emu, _body("x [[emu: reset times=1]]"), stream=True)
    assert retried.status_code == 200
    final = json.loads(sse_events(retried.text)[-1]["data"])
    assert final["output"]["choices"][0]["finish_reason"] == "stop"
    throttled = _multimodal(emu, _body("x [[emu: fail=Throttling.RateQuota times=1]]"))
    assert throttled.status_code == 429 and throttled.json()["code"] == "Throttling.RateQuota"


def test_a_new_snapshot_of_a_multimodal_family_is_bound_to_its_path(start_emulator: Any) -> None:
    from qwen_batch.catalog import ModelInfo

    name = "qwen3.6-plus-2026-09-01"
    emu = start_emulator(extra_models={name: ModelInfo(name, 262144, 196608, 65536, 65536, "message")})
    assert _multimodal(emu, _body("hi", model=name)).status_code == 200
    wrong = native(emu, {"model": name, "input": {"prompt": "hi"}, "parameters": {}})
    assert wrong.status_code == 400 and wrong.json()["message"] == URL_ERROR
