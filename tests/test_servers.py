"""Server dialects (research-wave2 D.1) and the one-time auto-detection of ``api.server``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from qwen_batch.backends import collect
from qwen_batch.backends.openai import OpenAIBackend
from qwen_batch.errors import ConfigError
from qwen_batch.servers import DIALECTS, check_dialect, detect_server, server_of_models
from qwen_batch.wire import COMPATIBLE_NOT_SENT

from .test_openai_backend import make_request

EXTENSIONS = {"seed": 1, "max_tokens": 9, "result_format": "message", "top_k": 5, "repetition_penalty": 1.1, "enable_thinking": False, "thinking_budget": 50}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_dashscope_reads_every_extension_at_the_top_level() -> None:
    body = DIALECTS["dashscope"].body_parameters(EXTENSIONS, COMPATIBLE_NOT_SENT)
    assert body == {"seed": 1, "max_tokens": 9, "top_k": 5, "repetition_penalty": 1.1, "enable_thinking": False, "thinking_budget": 50}


def test_vllm_reads_the_thinking_switch_in_chat_template_kwargs_and_renames_the_budget() -> None:
    body = DIALECTS["vllm"].body_parameters(EXTENSIONS, COMPATIBLE_NOT_SENT)
    assert "enable_thinking" not in body and body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["thinking_token_budget"] == 50 and "thinking_budget" not in body
    assert body["top_k"] == 5 and body["repetition_penalty"] == 1.1


def test_sglang_and_llamacpp_use_chat_template_kwargs_and_llamacpp_its_penalty_name() -> None:
    params = {"seed": 1, "enable_thinking": True, "repetition_penalty": 1.2}
    assert DIALECTS["sglang"].body_parameters(params, COMPATIBLE_NOT_SENT) == {
        "seed": 1, "repetition_penalty": 1.2, "chat_template_kwargs": {"enable_thinking": True},
    }
    assert DIALECTS["llamacpp"].body_parameters(params, COMPATIBLE_NOT_SENT) == {
        "seed": 1, "repeat_penalty": 1.2, "chat_template_kwargs": {"enable_thinking": True},
    }


def test_ollama_turns_thinking_off_with_reasoning_effort_none() -> None:
    ollama = DIALECTS["ollama"]
    assert ollama.body_parameters({"seed": 1, "enable_thinking": False}, COMPATIBLE_NOT_SENT) == {"seed": 1, "reasoning_effort": "none"}
    assert ollama.body_parameters({"seed": 1, "enable_thinking": True}, COMPATIBLE_NOT_SENT) == {"seed": 1}


@pytest.mark.parametrize(
    ("server", "parameter"),
    [("vllm", "enable_search"), ("sglang", "thinking_budget"), ("ollama", "top_k"), ("ollama", "repetition_penalty"), ("llamacpp", "thinking_budget")],
)
def test_a_parameter_the_server_does_not_read_is_refused(server: str, parameter: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_dialect("job.yaml", server, {"seed": 1, parameter: 1})
    assert f"parameters.{parameter}" in str(caught.value) and server in str(caught.value)
    check_dialect("job.yaml", "dashscope", {"seed": 1, parameter: 1})  # DashScope reads them all


@pytest.mark.anyio
async def test_the_vllm_body_on_the_wire() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = {"choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
        return httpx.Response(200, content=json.dumps(body).encode())

    client = OpenAIBackend("http://gpu.test/v1", None, timeout_s=5, max_connections=1, transport=httpx.MockTransport(handler), dialect=DIALECTS["vllm"])
    await collect(client.stream(make_request(dict(EXTENSIONS))))
    body = json.loads(seen[0].read())
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and "enable_thinking" not in body
    assert "result_format" not in body and body["messages"][1]["role"] == "user"


@pytest.mark.parametrize(
    ("owner", "server"), [("vllm", "vllm"), ("sglang", "sglang"), ("library", "ollama"), ("llamacpp", "llamacpp"), ("system", None), ("openai", None)]
)
def test_owned_by_names_the_server(owner: str, server: str | None) -> None:
    assert server_of_models({"object": "list", "data": [{"id": "Qwen/Qwen3-0.6B", "object": "model", "owned_by": owner}]}) == server
    assert server_of_models({"data": []}) is None and server_of_models("not json") is None


async def _serve_models(owner: str | None) -> AsyncIterator[str]:
    hits: list[str] = []

    async def models(request: web.Request) -> web.Response:
        hits.append(request.headers.get("Authorization", ""))
        if owner is None:
            return web.Response(status=404)
        return web.json_response({"object": "list", "data": [{"id": "qwen3", "object": "model", "owned_by": owner}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()
    assert len(hits) == 1  # asked once


@pytest.mark.anyio
@pytest.mark.parametrize(("owner", "expected"), [("vllm", "vllm"), ("library", "ollama"), (None, "dashscope")])
async def test_auto_detection_asks_get_models_once_over_loopback(owner: str | None, expected: str) -> None:
    async for base_url in _serve_models(owner):
        server, why = await detect_server(base_url, None, timeout_s=5)
    assert server == expected and f"{base_url}/models" in why


@pytest.mark.anyio
async def test_a_dashscope_host_is_decided_by_its_name_without_asking() -> None:
    server, why = await detect_server("https://dashscope-intl.aliyuncs.com/compatible-mode/v1", "sk-x", timeout_s=1)
    assert server == "dashscope" and "DashScope host" in why


def test_validate_refuses_an_unsupported_parameter_for_a_named_server(tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from qwen_batch.cli import main

    from .conftest import sentences_job

    job = sentences_job(
        tmp_path, ["one"], parameters={"seed": 1, "max_tokens": 20, "top_k": 3},
        api={"protocol": "openai", "server": "ollama", "base_url": "http://127.0.0.1:9/v1", "key_env": None},
    )
    assert main(["validate", str(job)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "parameters.top_k" in error and "ollama" in error
    assert emulator.ledger == []
