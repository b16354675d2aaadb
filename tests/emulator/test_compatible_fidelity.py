"""DashScope's compatible mode as the references capture it (PROTO §6), judged by the ``openai`` SDK
and, where the SDK would hide it, by the raw bytes."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from qwen_batch.emulator import RunningEmulator

from emu_helpers import compatible, native

MESSAGES = [{"role": "user", "content": "Tell me about green tea, as JSON please."}]


def _client(emu: RunningEmulator, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=emu.compatible_base_url, api_key=key or emu.api_key, max_retries=0, timeout=10)


def _raw_stream(emu: RunningEmulator, body: dict[str, Any]) -> str:
    response = httpx.post(emu.compatible_base_url + "/chat/completions", json={**body, "stream": True},
                          headers={"Authorization": f"Bearer {emu.api_key}"}, timeout=10)
    assert response.status_code == 200
    return response.text


def test_the_model_listing_names_the_catalog_and_needs_the_key(emu: RunningEmulator) -> None:
    models = _client(emu).models.list()
    ids = [model.id for model in models.data]
    assert "qwen-plus" in ids and "qwen-turbo" in ids
    assert {(model.object, model.owned_by) for model in models.data} == {("model", "system")}
    assert all(isinstance(model.created, int) for model in models.data)
    with pytest.raises(openai.AuthenticationError) as caught:
        _client(emu, "sk-wrong").models.list()
    assert caught.value.code == "invalid_api_key"
    listings = [line for line in emu.ledger if line["endpoint"] == "models"]
    assert [line["status"] for line in listings] == [200, 401]
    assert emu.stats()["billable"] == 0  # a listing is not paid for


def test_a_stream_without_include_usage_has_no_usage_anywhere(emu: RunningEmulator) -> None:
    chunks = list(_client(emu).chat.completions.create(model="qwen-plus", messages=MESSAGES, stream=True, seed=2))
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)  # no trailing choices=[] chunk
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stream_framing_is_data_space_json_blank_line_and_done(emu: RunningEmulator) -> None:
    raw = _raw_stream(emu, {"model": "qwen-plus", "messages": MESSAGES, "stream_options": {"include_usage": True}})
    assert raw.endswith("data: [DONE]\n\n")
    blocks = raw[:-2].split("\n\n")
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks)
    chunks = [json.loads(block[6:]) for block in blocks[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"content": "", "role": "assistant"}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-2]] == [None] * (len(chunks) - 2)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-2]["choices"][0]["delta"]["content"] == ""
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")


def test_an_unknown_model_is_404_model_not_found(emu: RunningEmulator) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        _client(emu).chat.completions.create(model="qwen-nonesuch", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    assert caught.value.body["message"] == "Model not exist."


def test_json_object_needs_the_word_json_in_the_messages(emu: RunningEmulator) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _client(emu).chat.completions.create(model="qwen-plus", messages=[{"role": "user", "content": "Describe tea."}],
                                             response_format={"type": "json_object"})
    assert caught.value.code == "invalid_parameter_error"
    assert caught.value.body["message"] == ("'messages' must contain the word 'json' in some form, to use "
                                            "'response_format' of type 'json_object'.")


def test_json_mode_with_thinking_is_refused(emu: RunningEmulator) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _client(emu).chat.completions.create(model="qwen-plus", messages=MESSAGES, stream=True,
                                             response_format={"type": "json_object"},
                                             extra_body={"enable_thinking": True})
    assert caught.value.body["message"] == "Json mode response is not supported when enable_thinking is true"


def test_json_object_adds_two_input_tokens(emu: RunningEmulator) -> None:
    client = _client(emu)
    plain = client.chat.completions.create(model="qwen-plus", messages=MESSAGES)
    as_json = client.chat.completions.create(model="qwen-plus", messages=MESSAGES, response_format={"type": "json_object"})
    assert as_json.usage.prompt_tokens == plain.usage.prompt_tokens + 2
    assert isinstance(json.loads(as_json.choices[0].message.content), dict)


def test_a_finish_directive_sets_a_dashscope_finish_reason_and_refuses_a_foreign_one(emu: RunningEmulator) -> None:
    client = _client(emu)
    done = client.chat.completions.create(model="qwen-plus", messages=[{"role": "user", "content": "x [[emu: finish=tool_calls]]"}])
    assert done.choices[0].finish_reason == "tool_calls"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="qwen-plus", messages=[{"role": "user", "content": "x [[emu: finish=abort]]"}])
    assert "finish='abort'" in caught.value.body["message"]


def test_the_no_usage_directive_drops_usage_whole_and_streamed(emu: RunningEmulator) -> None:
    client = _client(emu)
    messages = [{"role": "user", "content": "count me yourself [[emu: no_usage]]"}]
    assert client.chat.completions.create(model="qwen-plus", messages=messages).usage is None
    chunks = list(client.chat.completions.create(model="qwen-plus", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_server_that_sends_no_usage(start_emulator: Any) -> None:
    emu = start_emulator(send_usage=False)
    client = _client(emu)
    assert client.chat.completions.create(model="qwen-plus", messages=MESSAGES).usage is None
    chunks = list(client.chat.completions.create(model="qwen-plus", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))
    assert [c for c in chunks if not c.choices] == []


def test_native_and_compatible_give_the_same_json_answer(emu: RunningEmulator) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "score": {"type": "integer"}},
              "required": ["name", "score"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "tea", "schema": schema, "strict": True}}
    over_compat = compatible(emu, {"model": "qwen-plus", "messages": MESSAGES, "seed": 7, "response_format": fmt})
    over_native = native(emu, {"model": "qwen-plus", "input": {"messages": MESSAGES},
                               "parameters": {"seed": 7, "response_format": fmt, "result_format": "message"}})
    answer = over_compat.json()["choices"][0]["message"]["content"]
    assert answer == over_native.json()["output"]["choices"][0]["message"]["content"]
    assert set(json.loads(answer)) == {"name", "score"}
    assert over_compat.json()["usage"]["prompt_tokens"] == over_native.json()["usage"]["input_tokens"]
