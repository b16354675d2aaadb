"""Thinking models through the official dashscope SDK (2.0.2) and the openai package.

What is checked comes from the protocol references: the stream-only 400s (research-wave2
A.1), reasoning deltas before content deltas with cumulative ``reasoning_tokens``
(A.2, [CNB single-generation-message-reasoning-sse]), the parameter texts of section 1.3.
"""

from __future__ import annotations

import json
from typing import Any

import dashscope
import openai
import pytest

from emu_helpers import native, sse_events
from qwen_batch import tokens
from qwen_batch.emulator import RunningEmulator

QWQ_MESSAGE = "This model only support stream mode, please enable the stream parameter to access the model. "
THINKING_NEEDS_STREAM = "parameter.enable_thinking must be set to false for non-streaming calls"


def _call(sdk: RunningEmulator, model: str, prompt: str = "What is 1+1?", **parameters: Any) -> Any:
    return dashscope.Generation.call(model=model, prompt=prompt, api_key=sdk.api_key, **parameters)


def _stream(sdk: RunningEmulator, model: str, prompt: str = "What is 1+1?", **parameters: Any) -> list[Any]:
    return list(_call(sdk, model, prompt, stream=True, incremental_output=True, **parameters))


def _split(events: list[Any]) -> tuple[str, str]:
    """The reasoning and the answer of a streamed reply, checking the reasoning comes first."""
    messages = [event.output.choices[0].message for event in events]
    first_answer = next((i for i, m in enumerate(messages) if m.content), len(messages))
    assert all(m.content == "" for m in messages[:first_answer])
    assert all(m.reasoning_content == "" for m in messages[first_answer:])
    return "".join(m.reasoning_content for m in messages), "".join(m.content for m in messages)


def test_qwq_refuses_every_call_without_a_stream_with_the_documented_text(sdk: RunningEmulator) -> None:
    response = _call(sdk, "qwq-plus")
    assert (response.status_code, response.code, response.message) == (400, "InvalidParameter", QWQ_MESSAGE)
    assert sdk.stats()["billable"] == 0


def test_qwen3_open_thinks_by_default_so_a_call_without_a_stream_is_refused(sdk: RunningEmulator) -> None:
    response = _call(sdk, "qwen3-32b")
    assert (response.status_code, response.code, response.message) == (400, "InvalidParameter", THINKING_NEEDS_STREAM)
    off = _call(sdk, "qwen3-235b-a22b", enable_thinking=False)
    assert off.status_code == 200
    message = off.output.choices[0].message
    assert "reasoning_content" not in message and "output_tokens_details" not in off.usage
    assert off.usage.output_tokens == tokens.count_text(message.content)


def test_a_thinking_stream_sends_reasoning_first_then_the_answer_with_cumulative_usage(sdk: RunningEmulator) -> None:
    events = _stream(sdk, "qwq-plus", seed=4)
    assert all(event.status_code == 200 for event in events)
    reasoning, answer = _split(events)
    assert reasoning and answer
    details = [event.usage.output_tokens_details["reasoning_tokens"] for event in events]
    outputs = [event.usage.output_tokens for event in events]
    assert details == sorted(details) and outputs == sorted(outputs)
    assert details[-1] == tokens.count_text(reasoning)
    assert outputs[-1] == details[-1] + tokens.count_text(answer)
    assert [e.output.choices[0].finish_reason for e in events] == ["null"] * (len(events) - 1) + ["stop"]
    assert sdk.ledger[-1]["output_tokens"] == outputs[-1]


def test_thinking_budget_caps_the_reasoning_exactly_and_max_tokens_only_the_answer(sdk: RunningEmulator) -> None:
    prompt = "Explain tea. [[emu: think=200]] [[emu: length=50]]"
    free = _stream(sdk, "qwen3-32b", prompt)
    capped = _stream(sdk, "qwen3-32b", prompt, thinking_budget=30, max_tokens=10)
    free_reasoning, free_answer = _split(free)
    reasoning, answer = _split(capped)
    assert free[-1].usage.output_tokens_details["reasoning_tokens"] == 200
    assert capped[-1].usage.output_tokens_details["reasoning_tokens"] == 30 == tokens.count_text(reasoning)
    assert free_reasoning.startswith(reasoning)
    assert tokens.count_text(answer) == 10 and free_answer.startswith(answer)
    assert capped[-1].usage.output_tokens == 40 and capped[-1].output.choices[0].finish_reason == "length"


def test_reasoning_length_varies_per_request_and_small_budgets_are_reached(sdk: RunningEmulator) -> None:
    counts = [_stream(sdk, "qwen3-8b", f"Question {i}?", thinking_budget=50)[-1].usage.output_tokens_details["reasoning_tokens"]
              for i in range(12)]
    assert 50 in counts and any(count < 50 for count in counts)
    again = _stream(sdk, "qwen3-8b", "Question 3?", thinking_budget=50)
    assert again[-1].usage.output_tokens_details["reasoning_tokens"] == counts[3]


def test_commercial_hybrid_models_think_only_when_asked_and_then_need_incremental_output(sdk: RunningEmulator) -> None:
    plain = _call(sdk, "qwen-plus", result_format="message")
    assert plain.status_code == 200 and "reasoning_content" not in plain.output.choices[0].message
    cumulative = list(_call(sdk, "qwen-plus", stream=True, enable_thinking=True, result_format="message"))
    assert (cumulative[-1].status_code, cumulative[-1].code) == (400, "InvalidParameter")
    assert cumulative[-1].message == 'The incremental_output parameter must be "true" when enable_thinking is true'
    text_format = _stream(sdk, "qwen-plus", enable_thinking=True)
    assert text_format[-1].message == 'The result_format parameter must be "message" when enable_thinking is true'
    thinking = _stream(sdk, "qwen-plus", enable_thinking=True, result_format="message")
    reasoning, answer = _split(thinking)
    assert reasoning and answer
    assert _call(sdk, "qwen-flash", enable_thinking=True, result_format="message").message == THINKING_NEEDS_STREAM


@pytest.mark.parametrize(("model", "parameters", "code", "message"), [
    ("qwen-max", {"enable_thinking": True}, "InvalidParameter.NotSupportEnableThinking",
     "The model qwen-max does not support enable_thinking."),
    ("qwen3-235b-a22b-instruct-2507", {"enable_thinking": True}, "InvalidParameter.NotSupportEnableThinking",
     "The model qwen3-235b-a22b-instruct-2507 does not support enable_thinking."),
    ("qwen3-32b", {"thinking_budget": 0}, "InvalidParameter",
     "The thinking_budget parameter must be a positive integer and not greater than 38912"),
    ("qwen3-32b", {"thinking_budget": 38913}, "InvalidParameter",
     "The thinking_budget parameter must be a positive integer and not greater than 38912"),
    ("qwen3-32b", {"thinking_budget": "20"}, "InvalidParameter",
     "The thinking_budget parameter must be a positive integer and not greater than 38912"),
    ("qwen3-32b", {"response_format": {"type": "json_object"}}, "InvalidParameter",
     "Json mode response is not supported when enable_thinking is true"),
    ("qwen3-32b", {"incremental_output": False}, "InvalidParameter",
     "The incremental_output parameter of this model cannot be set to False."),
])
def test_bad_thinking_combinations_get_the_documented_400(
    sdk: RunningEmulator, model: str, parameters: dict[str, Any], code: str, message: str
) -> None:
    body = {"model": model, "input": {"messages": [{"role": "user", "content": "json please"}]},
            "parameters": {"result_format": "message", "incremental_output": True, **parameters}}
    response = native(sdk, body, stream=True)
    event = sse_events(response.text)[-1]
    assert response.status_code == 400 and event["event"] == "error"
    data = json.loads(event["data"])
    assert (data["code"], data["message"]) == (code, message)
    assert sdk.stats()["billable"] == 0


def test_a_thinking_only_model_ignores_enable_thinking_false(sdk: RunningEmulator) -> None:
    reasoning, answer = _split(_stream(sdk, "qwen3-30b-a3b-thinking-2507", enable_thinking=False))
    assert reasoning and answer


def test_think_overflow_runs_out_of_tokens_inside_the_thinking(sdk: RunningEmulator) -> None:
    events = _stream(sdk, "qwq-plus", "Long puzzle [[emu: think=500]] [[emu: think_overflow]]", thinking_budget=64)
    reasoning, answer = _split(events)
    assert answer == "" and tokens.count_text(reasoning) == 64
    last = events[-1]
    assert last.output.choices[0].finish_reason == "length"
    assert last.usage.output_tokens == last.usage.output_tokens_details["reasoning_tokens"] == 64


def test_a_mid_stream_error_can_cut_a_thinking_reply_inside_its_reasoning(sdk: RunningEmulator) -> None:
    events = _stream(sdk, "qwq-plus", "x [[emu: think=400]] [[emu: length=8]] [[emu: fail=InternalError midstream times=1]]")
    assert (events[-1].status_code, events[-1].code) == (400, "InternalError")
    assert events[0].output.choices[0].message.reasoning_content
    retried = _stream(sdk, "qwq-plus", "x [[emu: think=400]] [[emu: length=8]] [[emu: fail=InternalError midstream times=1]]")
    assert retried[-1].output.choices[0].finish_reason == "stop"
    assert retried[-1].usage.output_tokens == 408


# ----- OpenAI-compatible mode ---------------------------------------------------------------


def _openai(emu: RunningEmulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=emu.compatible_base_url, api_key=emu.api_key, max_retries=0)


def test_openai_thinking_stream_has_reasoning_deltas_first_and_reasoning_tokens_in_usage(emu: RunningEmulator) -> None:
    chunks = list(_openai(emu).chat.completions.create(
        model="qwen3.6-plus", messages=[{"role": "user", "content": "Why is the sky blue?"}], stream=True,
        stream_options={"include_usage": True}, extra_body={"thinking_budget": 25},
    ))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    kinds = ["reasoning" if getattr(d, "reasoning_content", None) else "content" if d.content else "" for d in deltas]
    kinds = [k for k in kinds if k]
    assert kinds == sorted(kinds, reverse=True) and kinds[0] == "reasoning" and kinds[-1] == "content"
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    answer = "".join(d.content or "" for d in deltas)
    usage = chunks[-1].usage
    assert usage.completion_tokens_details.reasoning_tokens == 25 == tokens.count_text(reasoning, "qwen3.6-plus")
    assert usage.completion_tokens == 25 + tokens.count_text(answer, "qwen3.6-plus")


def test_openai_non_stream_refusals_are_the_compatible_400s(emu: RunningEmulator) -> None:
    client = _openai(emu)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as qwq:
        client.chat.completions.create(model="qwq-plus", messages=messages)
    assert qwq.value.code == "invalid_parameter_error" and qwq.value.body["message"] == QWQ_MESSAGE
    with pytest.raises(openai.BadRequestError) as qwen3:
        client.chat.completions.create(model="qwen3-32b", messages=messages)
    assert qwen3.value.body["message"] == THINKING_NEEDS_STREAM
    off = client.chat.completions.create(model="qwen3-32b", messages=messages, extra_body={"enable_thinking": False})
    assert off.choices[0].message.content and getattr(off.choices[0].message, "reasoning_content", None) is None


def test_openai_non_stream_thinking_on_qwen35_carries_message_reasoning_content(emu: RunningEmulator) -> None:
    completion = _openai(emu).chat.completions.create(
        model="qwen3.5-flash", messages=[{"role": "user", "content": "hi"}], extra_body={"thinking_budget": 12})
    message = completion.choices[0].message
    assert tokens.count_text(message.reasoning_content, "qwen3.5-flash") == 12
    assert completion.usage.completion_tokens_details.reasoning_tokens == 12


def test_an_unreadable_think_directive_is_a_400_naming_it(emu: RunningEmulator) -> None:
    body = {"model": "qwq-plus", "input": {"prompt": "x [[emu: think=lots]]"}, "parameters": {}}
    response = native(emu, body, stream=True)
    assert response.status_code == 400
    assert "think='lots' is not a token count" in json.loads(sse_events(response.text)[0]["data"])["message"]
