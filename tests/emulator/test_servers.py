"""``server=vllm|sglang|ollama|llamacpp``: each local server's differences from DashScope (WAVE2 D.1,
NOTES.md), judged by the ``openai`` SDK over loopback."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import httpx
import openai
import pytest

from qwen_batch.emulator import EmulatorConfig, FaultRates, RunningEmulator
from qwen_batch.testing import EmulatorThread

# qwen3-8b is a hybrid thinking model (open Qwen3): it thinks unless switched off.
THINKER = "qwen3-8b"
ASK = [{"role": "user", "content": "Why is the sky blue?"}]
OWNERS = {"vllm": "vllm", "sglang": "sglang", "ollama": "library", "llamacpp": "llamacpp"}
REASONING_FIELD = {"vllm": "reasoning", "sglang": "reasoning_content", "ollama": "reasoning",
                   "llamacpp": "reasoning_content"}


def _client(emu: RunningEmulator) -> openai.OpenAI:
    # Any key will do: a local server started without --api-key checks none.
    return openai.OpenAI(base_url=emu.compatible_base_url, api_key="unused", max_retries=0, timeout=10)


@pytest.fixture(params=sorted(OWNERS))
def local(request: pytest.FixtureRequest, start_emulator: Any) -> RunningEmulator:
    return start_emulator(server=request.param)


def _reasoning(message: Any, field: str) -> Any:
    return (message.model_extra or {}).get(field)


def test_the_listing_says_which_server_and_needs_no_key(local: RunningEmulator) -> None:
    server = local.config.server
    assert local.compatible_base_url == local.root_url + "/v1"
    response = httpx.get(local.compatible_base_url + "/models", timeout=5)  # no Authorization at all
    assert response.status_code == 200
    owners = {entry["owned_by"] for entry in response.json()["data"]}
    assert owners == {OWNERS[server]}
    models = _client(local).models.list()
    assert "qwen-plus" in [model.id for model in models.data]


def test_only_the_v1_routes_exist(local: RunningEmulator) -> None:
    body = {"model": "qwen-plus", "messages": ASK}
    assert httpx.post(local.compatible_base_url + "/chat/completions", json=body, timeout=5).status_code == 200
    assert httpx.post(local.root_url + "/compatible-mode/v1/chat/completions", json=body, timeout=5).status_code == 404
    native = httpx.post(local.root_url + "/api/v1/services/aigc/text-generation/generation", json=body, timeout=5)
    assert native.status_code == 404


def test_each_server_names_the_reasoning_its_own_way(local: RunningEmulator) -> None:
    field = REASONING_FIELD[local.config.server]
    other = ({"reasoning", "reasoning_content"} - {field}).pop()
    client = _client(local)
    message = client.chat.completions.create(model=THINKER, messages=ASK).choices[0].message
    assert _reasoning(message, field) and _reasoning(message, other) is None
    chunks = list(client.chat.completions.create(model=THINKER, messages=ASK, stream=True))
    thought = "".join(_reasoning(c.choices[0].delta, field) or "" for c in chunks if c.choices)
    assert thought == _reasoning(message, field)
    assert all(_reasoning(c.choices[0].delta, other) is None for c in chunks if c.choices)


@pytest.mark.parametrize(("server", "switch", "thinks"), [
    ("vllm", {"enable_thinking": False}, True),  # a top-level enable_thinking is ignored
    ("vllm", {"chat_template_kwargs": {"enable_thinking": False}}, False),
    ("vllm", {"reasoning_effort": "none"}, False),
    ("vllm", {"reasoning_effort": "none", "chat_template_kwargs": {"enable_thinking": True}}, True),  # kwargs win
    ("sglang", {"chat_template_kwargs": {"enable_thinking": False}}, False),
    ("ollama", {"chat_template_kwargs": {"enable_thinking": False}}, True),  # Ollama ignores the kwargs
    ("ollama", {"reasoning_effort": "none"}, False),
    ("ollama", {"reasoning": {"effort": "none"}}, False),
    ("llamacpp", {"chat_template_kwargs": {"enable_thinking": False}}, False),
    ("llamacpp", {"enable_thinking": False}, True),
])
def test_the_thinking_switch_is_read_where_the_server_reads_it(
    start_emulator: Any, server: str, switch: dict[str, Any], thinks: bool
) -> None:
    emu = start_emulator(server=server)
    completion = _client(emu).chat.completions.create(model=THINKER, messages=ASK, extra_body=switch)
    reasoning = _reasoning(completion.choices[0].message, REASONING_FIELD[server])
    assert bool(reasoning) is thinks
    details = completion.usage.completion_tokens_details
    assert (details is not None and details.reasoning_tokens > 0) is thinks


def test_vllm_reads_thinking_token_budget_not_thinking_budget(start_emulator: Any) -> None:
    client = _client(start_emulator(server="vllm"))
    budgeted = client.chat.completions.create(model=THINKER, messages=ASK, extra_body={"thinking_token_budget": 5})
    assert budgeted.usage.completion_tokens_details.reasoning_tokens == 5
    ignored = client.chat.completions.create(model=THINKER, messages=ASK, extra_body={"thinking_budget": 5})
    assert ignored.usage.completion_tokens_details.reasoning_tokens > 5


def test_vllm_ignores_dashscope_only_fields_in_what_it_says(start_emulator: Any) -> None:
    client = _client(start_emulator(server="vllm"))
    plain = client.chat.completions.create(model="qwen-plus", messages=ASK, seed=3)
    extended = client.chat.completions.create(model="qwen-plus", messages=ASK, seed=3, extra_body={"enable_search": True})
    sampled = client.chat.completions.create(model="qwen-plus", messages=ASK, seed=3, extra_body={"top_k": 5})
    assert extended.choices[0].message.content == plain.choices[0].message.content
    assert sampled.choices[0].message.content != plain.choices[0].message.content


def test_error_bodies_take_each_servers_shape(local: RunningEmulator) -> None:
    server = local.config.server
    with pytest.raises(openai.NotFoundError) as caught:
        _client(local).chat.completions.create(model="no-such-model", messages=ASK)
    raw = httpx.post(local.compatible_base_url + "/chat/completions", json={"model": "no-such-model", "messages": ASK},
                     timeout=5).json()
    message = "The model `no-such-model` does not exist."
    expected = {
        "vllm": {"error": {"message": message, "type": "NotFoundError", "param": None, "code": 404}},
        "sglang": {"object": "error", "message": message, "type": "NotFoundError", "param": None, "code": 404},
        "ollama": {"error": {"message": message, "type": "api_error", "param": None, "code": None}},
        "llamacpp": {"error": {"code": 404, "message": message, "type": "not_found_error"}},
    }[server]
    assert raw == expected
    assert caught.value.message.endswith(message) or message in str(caught.value)


def test_vllm_refuses_an_over_long_prompt_with_its_own_text(start_emulator: Any) -> None:
    client = _client(start_emulator(server="vllm"))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="qwen-turbo", messages=[{"role": "user", "content": "word " * 7000}])
    assert caught.value.body["code"] == 400
    assert caught.value.body["message"].startswith("This model's maximum context length is 6000 tokens. However, your "
                                                   "prompt contains ")


def test_ollama_takes_an_over_long_prompt(start_emulator: Any) -> None:
    client = _client(start_emulator(server="ollama"))
    completion = client.chat.completions.create(model="qwen-turbo", messages=[{"role": "user", "content": "word " * 7000}])
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("reason", ["abort", "repetition", "length", "tool_calls"])
def test_vllm_finish_reasons_come_from_directives(start_emulator: Any, reason: str) -> None:
    client = _client(start_emulator(server="vllm"))
    completion = client.chat.completions.create(model="qwen-plus", messages=[
        {"role": "user", "content": f"go [[emu: finish={reason}]]"}])
    assert completion.choices[0].finish_reason == reason
    assert completion.choices[0].model_extra["stop_reason"] is None


def test_vllm_abort_once_then_a_retry_finishes(start_emulator: Any) -> None:
    client = _client(start_emulator(server="vllm"))
    messages = [{"role": "user", "content": "go [[emu: finish=abort times=1]]"}]
    reasons = [client.chat.completions.create(model="qwen-plus", messages=messages).choices[0].finish_reason
               for _ in range(2)]
    assert reasons == ["abort", "stop"]


def test_vllm_finish_error_is_an_http_500_or_an_error_event(start_emulator: Any) -> None:
    client = _client(start_emulator(server="vllm"))
    messages = [{"role": "user", "content": "go [[emu: finish=error]]"}]
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="qwen-plus", messages=messages)
    assert caught.value.status_code == 500 and caught.value.body["code"] == 500
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="qwen-plus", messages=messages, stream=True))


def test_a_finish_reason_the_server_never_gives_is_refused(start_emulator: Any) -> None:
    client = _client(start_emulator(server="ollama"))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="qwen-plus", messages=[{"role": "user", "content": "[[emu: finish=abort]] go"}])
    assert "only length, stop" in caught.value.body["message"]


def test_a_local_stream_without_the_usage_chunk_and_with_it(local: RunningEmulator) -> None:
    client = _client(local)
    bare = list(client.chat.completions.create(model="qwen-plus", messages=ASK, stream=True))
    assert all(c.usage is None for c in bare)
    counted = list(client.chat.completions.create(model="qwen-plus", messages=ASK, stream=True,
                                                  stream_options={"include_usage": True}))
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens > 0


def test_a_local_server_never_answers_429() -> None:
    with pytest.raises(ValueError, match="never answers 429"):
        EmulatorConfig(server="vllm", rpm_limit=10)
    with pytest.raises(ValueError, match="never answers 429"):
        EmulatorConfig(server="sglang", faults=FaultRates(rate_quota=0.1))
    with pytest.raises(ValueError, match="server must be one of"):
        EmulatorConfig(server="tgi")  # type: ignore[arg-type]


def test_a_local_server_queues_beyond_its_slots() -> None:
    config = EmulatorConfig(server="vllm", max_running=2, latency_s=0.2)
    with EmulatorThread(config) as emu:
        client = _client(emu)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client.chat.completions.create, model="qwen-plus",
                                   messages=[{"role": "user", "content": f"question {i}"}]) for i in range(6)]
            reasons = [future.result(timeout=20).choices[0].finish_reason for future in futures]
        assert reasons == ["stop"] * 6
        stats = emu.stats()
        assert stats["peak_in_flight"] == 2 and stats["by_status"] == {"200": 6}


def test_sglang_errors_are_flat_but_nested_inside_a_stream(start_emulator: Any) -> None:
    emu = start_emulator(server="sglang")
    url = emu.compatible_base_url + "/chat/completions"
    body = {"model": "qwen-plus", "messages": [{"role": "user", "content": "go [[emu: fail=InternalError midstream]]"}]}
    whole = httpx.post(url, json=body, timeout=5)
    assert whole.status_code == 500 and whole.json()["object"] == "error" and whole.json()["code"] == 500
    streamed = httpx.post(url, json={**body, "stream": True}, timeout=5)
    assert streamed.status_code == 200
    last = streamed.text.rstrip("\n").split("\n\n")[-1]
    assert last.startswith('data: {"error":') and '"code":500' in last
    assert "[DONE]" not in streamed.text
