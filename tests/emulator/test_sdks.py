"""The official clients work against the emulator unchanged: dashscope 2.0.2 and openai."""

from __future__ import annotations

from typing import Any

import dashscope
import openai
import pytest

from qwen_batch import tokens
from qwen_batch.emulator import RunningEmulator


def test_generation_call_with_messages_returns_text_and_chatml_usage(sdk: RunningEmulator) -> None:
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "你是谁？"}]
    response = dashscope.Generation.call(model="qwen-turbo", messages=messages, api_key=sdk.api_key)
    assert response.status_code == 200
    assert response.output.finish_reason == "stop"
    assert response.usage.input_tokens == 22  # the documented ChatML count of this exact request
    assert response.usage.output_tokens == tokens.count_text(response.output.text)
    assert response.request_id == sdk.ledger[-1]["request_id"]


def test_generation_call_with_prompt_counts_it_as_one_user_message(sdk: RunningEmulator) -> None:
    response = dashscope.Generation.call(model="qwen-max", prompt="请问 1+1 是多少？", api_key=sdk.api_key, result_format="message")
    assert response.status_code == 200
    choice = response.output.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert response.usage.input_tokens == 16  # recorded on the real service


def test_cjk_prompts_get_cjk_replies(sdk: RunningEmulator) -> None:
    response = dashscope.Generation.call(model="qwen-plus", prompt="请介绍一下杭州的历史和文化。", api_key=sdk.api_key)
    text = response.output.text
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in text) > len(text) / 2


def test_streaming_with_incremental_output_concatenates_to_the_full_reply(sdk: RunningEmulator) -> None:
    body: dict[str, Any] = {"model": "qwen-turbo", "prompt": "Tell me about tea.", "api_key": sdk.api_key, "seed": 3}
    events = list(dashscope.Generation.call(stream=True, incremental_output=True, **body))
    assert all(event.status_code == 200 for event in events)
    assert [e.output.finish_reason for e in events[:-1]] == ["null"] * (len(events) - 1)
    assert events[-1].output.finish_reason == "stop"
    whole = dashscope.Generation.call(**body)
    assert "".join(e.output.text for e in events) == whole.output.text
    assert events[-1].usage.output_tokens == whole.usage.output_tokens
    assert [e.usage.input_tokens for e in events] == [whole.usage.input_tokens] * len(events)


def test_over_long_input_is_invalid_parameter_400(sdk: RunningEmulator) -> None:
    response = dashscope.Generation.call(model="qwen-turbo", prompt="word " * 7000, api_key=sdk.api_key)
    assert response.status_code == 400
    assert response.code == "InvalidParameter"
    assert response.message == "Range of input length should be [1, 6000]"


def test_a_wrong_key_is_401_invalid_api_key(sdk: RunningEmulator) -> None:
    response = dashscope.Generation.call(model="qwen-turbo", prompt="hi", api_key="sk-wrong")
    assert (response.status_code, response.code, response.message) == (401, "InvalidApiKey", "Invalid API-key provided.")


def test_a_scripted_429_comes_twice_then_the_request_succeeds(sdk: RunningEmulator) -> None:
    prompt = "flaky [[emu: fail=Throttling.RateQuota times=2]]"
    results = [dashscope.Generation.call(model="qwen-turbo", prompt=prompt, api_key=sdk.api_key) for _ in range(3)]
    assert [r.status_code for r in results] == [429, 429, 200]
    assert results[0].code == "Throttling.RateQuota"
    assert results[0].message == "Requests rate limit exceeded, please try again later."


def test_a_mid_stream_error_reaches_the_sdk_as_an_error_event(sdk: RunningEmulator) -> None:
    prompt = "tell me [[emu: fail=DataInspectionFailed midstream]]"
    events = list(dashscope.Generation.call(model="qwen-turbo", prompt=prompt, api_key=sdk.api_key, stream=True, incremental_output=True))
    assert events[0].status_code == 200
    assert (events[-1].status_code, events[-1].code) == (400, "DataInspectionFailed")
    assert events[-1].message == "Output data may contain inappropriate content."


def test_openai_non_stream_answers_with_usage(emu: RunningEmulator) -> None:
    client = openai.OpenAI(base_url=emu.compatible_base_url, api_key=emu.api_key, max_retries=0)
    completion = client.chat.completions.create(model="qwen-plus", messages=[{"role": "user", "content": "你是谁？"}])
    assert completion.usage.prompt_tokens == 11  # recorded on the real service in 2025
    assert completion.usage.completion_tokens == tokens.count_text(completion.choices[0].message.content)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.id.startswith("chatcmpl-")


def test_openai_stream_with_include_usage_ends_with_a_usage_chunk(emu: RunningEmulator) -> None:
    client = openai.OpenAI(base_url=emu.compatible_base_url, api_key=emu.api_key, max_retries=0)
    messages = [{"role": "user", "content": "Say hi"}]
    chunks = list(client.chat.completions.create(
        model="qwen-plus", messages=messages, stream=True, stream_options={"include_usage": True}, seed=5
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-2].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="qwen-plus", messages=messages, seed=5)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_openai_errors_are_openai_shaped(emu: RunningEmulator) -> None:
    client = openai.OpenAI(base_url=emu.compatible_base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="qwen-plus", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "invalid_api_key"
    good = openai.OpenAI(base_url=emu.compatible_base_url, api_key=emu.api_key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught_400:
        good.chat.completions.create(model="qwen-plus", messages=[{"role": "user", "content": "hi"}], max_tokens=100000)
    assert caught_400.value.code == "invalid_parameter_error"
    assert "Range of max_tokens should be [1, 2048]" in str(caught_400.value)
