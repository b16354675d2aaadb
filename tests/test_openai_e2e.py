"""The openai protocol end to end through the real CLI code, over loopback against the emulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from polars.testing import assert_frame_equal

import qwen_batch

from .conftest import sentences_job

VOLATILE = ["request_id", "latency_s", "attempts", "first_token_s"]
OPENAI = {"protocol": "openai"}


def test_the_same_job_on_both_protocols_gives_the_same_rows(tmp_path: Path, job_env: dict, monkeypatch: Any) -> None:
    monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL")  # --emulate starts its own emulator
    texts = [f"sentence {i} about lakes" for i in range(10)]
    for streamed in (False, True):
        parameters = {"seed": 7, "max_tokens": 120, "stream": streamed, "top_k": 5}
        native_folder, openai_folder = tmp_path / f"native-{streamed}", tmp_path / f"openai-{streamed}"
        native_folder.mkdir()
        openai_folder.mkdir()
        native_job = sentences_job(native_folder, texts, parameters=parameters)
        openai_job = sentences_job(openai_folder, texts, parameters=parameters, api=OPENAI)
        assert qwen_batch.run(native_job, emulate=True, no_cache=True).exit_code == 0
        assert qwen_batch.run(openai_job, emulate=True, no_cache=True).exit_code == 0
        native = pl.read_parquet(native_folder / "out" / "result.parquet")
        compatible = pl.read_parquet(openai_folder / "out" / "result.parquet")
        assert_frame_equal(compatible.drop(VOLATILE), native.drop(VOLATILE))
        assert compatible["status"].to_list() == ["ok"] * 10


def test_openai_rows_over_a_real_socket_reach_the_compatible_endpoint(tmp_path: Path, job_env: dict, emulator: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", emulator.compatible_base_url)
    job = sentences_job(tmp_path, ["one", "two", "three"], api=OPENAI)
    result = qwen_batch.run(job)
    assert result.exit_code == 0
    assert [entry["endpoint"] for entry in emulator.ledger] == ["compatible"] * 3
    assert all("messages" in body and "input" not in body for body in emulator.received)


class LocalServer:
    """A stand-in for a local vLLM or Ollama server over loopback (research-wave2 D.1): it lists its
    models with ``owned_by``, needs no key, answers with ``reasoning``, and reports no usage."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.bodies: list[dict[str, Any]] = []
        self.authorization: list[str | None] = []
        self.models_asked = 0

    def application(self) -> Any:
        from aiohttp import web

        async def models(request: web.Request) -> web.Response:
            self.models_asked += 1
            return web.json_response({"object": "list", "data": [{"id": "local-model", "object": "model", "owned_by": self.owner}]})

        async def chat(request: web.Request) -> web.Response:
            body = await request.json()
            self.bodies.append(body)
            self.authorization.append(request.headers.get("Authorization"))
            answer = "echo: " + body["messages"][-1]["content"]
            message = {"role": "assistant", "content": answer, "reasoning": "thought"}
            return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})

        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/chat/completions", chat)
        return app


def _serve(server: LocalServer) -> Any:
    import asyncio
    import threading
    from contextlib import contextmanager

    from aiohttp import web

    @contextmanager
    def serving() -> Any:
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(server.application())
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port = runner.addresses[0][1]
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()

    return serving()


def _local_job(folder: Path, base_url: str, model: str, **api: Any) -> Path:
    return sentences_job(
        folder, ["alpha", "beta", "gamma"], model=model,
        parameters={"seed": 7, "max_tokens": 50, "enable_thinking": False, "stream": False},
        api={"protocol": "openai", "base_url": base_url, "key_env": None, "allow_unknown_model": True, **api},
    )


def test_a_keyless_local_vllm_server_detected_estimated_and_unpriced(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL", raising=False)
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
    server = LocalServer("vllm")
    with _serve(server) as base_url:
        result = qwen_batch.run(_local_job(tmp_path, base_url, "qwen-plus"))
    assert result.exit_code == 0
    err = capsys.readouterr().err
    assert "speaking vllm's dialect" in err and server.models_asked == 1
    assert err.count("no price") == 1  # one note, not one warning per row
    assert server.authorization == [None] * 3
    assert all(body["chat_template_kwargs"] == {"enable_thinking": False} and "enable_thinking" not in body for body in server.bodies)
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["usage_source"].to_list() == ["estimated"] * 3
    assert frame["reasoning_text"].to_list() == ["thought"] * 3
    assert frame["cost"].to_list() == [None] * 3
    assert all(tokens > 0 for tokens in frame["output_tokens"].to_list())
    assert result.summary["cost"]["total"] is None
    assert result.summary["tokens"]["estimated_rows"] == 3 and "exact" in result.summary["tokens"]["estimate"]


def test_a_non_qwen_model_on_ollama_is_marked_an_estimate(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL", raising=False)
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
    server = LocalServer("library")
    with _serve(server) as base_url:
        result = qwen_batch.run(_local_job(tmp_path, base_url, "llama3.2:1b", server="ollama"))
    assert result.exit_code == 0 and server.models_asked == 0  # named, so not asked
    assert all(body.get("reasoning_effort") == "none" for body in server.bodies)
    assert "llama3.2:1b" in result.summary["tokens"]["estimate"] and "not a Qwen model" in result.summary["tokens"]["estimate"]
    assert result.summary["cost"]["total"] is None


def test_the_local_vllm_sample_job_runs_with_emulate(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    from qwen_batch.cli import main

    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL", raising=False)
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
    job = Path(__file__).resolve().parent.parent / "jobs" / "local-vllm.yaml"
    output = tmp_path / "local.parquet"
    assert main(["run", str(job), "--emulate", "--quiet", "--output", str(output)]) == 0
    assert "api.server auto: speaking" in capsys.readouterr().err
    frame = pl.read_parquet(output)
    assert frame.height > 0 and frame["status"].to_list() == ["ok"] * frame.height
    assert frame["usage_source"].to_list() == ["service"] * frame.height


def test_a_local_server_keeps_no_dashscope_quota(tmp_path: Path, monkeypatch: Any) -> None:
    """qwen-plus has DashScope's documented RPM/TPM; on a local server only the spec's own limits apply."""
    import anyio

    monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL", raising=False)
    server = LocalServer("sglang")
    with _serve(server) as base_url:
        plan = qwen_batch.prepare(_local_job(tmp_path, base_url, "qwen-plus"))
        assert plan.rate_limits == (600000, 1200000)  # the job's RPM, the catalog's TPM (DashScope's)

        async def limits() -> Any:
            async with qwen_batch.OnlineExecutor().open(plan, sink=None) as execution:  # type: ignore[arg-type]
                return execution.rate_limits, execution.price

        assert anyio.run(limits) == ((600000, None), None)
    assert server.bodies == []  # opening sends no row
