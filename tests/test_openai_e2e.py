"""The openai protocol end to end through the real CLI code, over loopback against the emulator."""

from __future__ import annotations

import json

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
        # request_sha256 fingerprints the exact request, whose wire body is each protocol's own.
        assert_frame_equal(compatible.drop(*VOLATILE, "request_sha256"), native.drop(*VOLATILE, "request_sha256"))
        assert compatible["status"].to_list() == ["ok"] * 10
        assert compatible["request_sha256"].n_unique() == 10
        assert set(compatible["request_sha256"]).isdisjoint(native["request_sha256"])


def test_openai_rows_over_a_real_socket_reach_the_compatible_endpoint(tmp_path: Path, job_env: dict, emulator: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", emulator.compatible_base_url)
    job = sentences_job(tmp_path, ["one", "two", "three"], api=OPENAI)
    result = qwen_batch.run(job)
    assert result.exit_code == 0
    # api.server auto asks the loopback server's model list once, before any row
    assert [entry["endpoint"] for entry in emulator.ledger] == ["models"] + ["compatible"] * 3
    assert all("messages" in body and "input" not in body for body in emulator.received)


def _local_server(server: str, **config: Any) -> Any:
    """The emulator imitating a local server (its ``--server`` flag) over loopback, with no usage sent."""
    from qwen_batch.emulator import EmulatorConfig
    from qwen_batch.testing import EmulatorThread

    return EmulatorThread(EmulatorConfig(server=server, send_usage=False, **config))


def _models_asked(emulator: Any) -> int:
    return sum(entry["endpoint"] == "models" for entry in emulator.ledger)


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
    with _local_server("vllm") as emulator:
        result = qwen_batch.run(_local_job(tmp_path, emulator.compatible_base_url, "qwen-plus"))
        bodies, models_asked = emulator.received, _models_asked(emulator)
    assert result.exit_code == 0
    err = capsys.readouterr().err
    assert "speaking vllm's dialect" in err and models_asked == 1
    assert err.count("no price") == 1  # one note, not one warning per row
    assert all(body["chat_template_kwargs"] == {"enable_thinking": False} and "enable_thinking" not in body for body in bodies)
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["status"].to_list() == ["ok"] * 3
    assert frame["usage_source"].to_list() == ["estimated"] * 3
    assert frame["cost"].to_list() == [None] * 3
    assert all(tokens > 0 for tokens in frame["output_tokens"].to_list())
    assert result.summary["cost"]["total"] is None
    assert result.summary["tokens"]["estimated_rows"] == 3 and "exact" in result.summary["tokens"]["estimate"]
    manifest = json.loads((tmp_path / "out" / "result.parquet.manifest.json").read_text(encoding="utf-8"))
    assert manifest["catalog"]["qwen-plus"]["price_used"] is None  # nothing was billed at the catalog's price


def test_vllms_reasoning_field_becomes_reasoning_text(tmp_path: Path, monkeypatch: Any) -> None:
    """vLLM sends the thought as ``reasoning`` (DashScope: ``reasoning_content``), streamed or not."""
    monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL", raising=False)
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
    for streamed in (False, True):
        folder = tmp_path / f"stream-{streamed}"
        folder.mkdir()
        job = sentences_job(
            folder, ["alpha", "beta"], model="qwen3-32b",
            parameters={"seed": 7, "max_tokens": 300, "enable_thinking": True, "stream": streamed},
            api={"protocol": "openai", "key_env": None, "server": "vllm"},
        )
        with _local_server("vllm") as emulator:
            monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", emulator.compatible_base_url)
            assert qwen_batch.run(job).exit_code == 0
            bodies = emulator.received
        assert all(body["chat_template_kwargs"] == {"enable_thinking": True} for body in bodies)
        frame = pl.read_parquet(folder / "out" / "result.parquet")
        assert frame["status"].to_list() == ["ok", "ok"]
        assert all(text for text in frame["reasoning_text"].to_list())
        assert all(text and text not in reasoning for text, reasoning in zip(frame["output_text"], frame["reasoning_text"]))


def test_a_non_qwen_model_on_ollama_is_marked_an_estimate(tmp_path: Path, monkeypatch: Any) -> None:
    from qwen_batch.catalog import ModelInfo

    monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL", raising=False)
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
    served = {"llama3.2:1b": ModelInfo("llama3.2:1b", 131072, 128000, 8192, 8192, "message")}
    with _local_server("ollama", extra_models=served) as emulator:
        result = qwen_batch.run(_local_job(tmp_path, emulator.compatible_base_url, "llama3.2:1b", server="ollama"))
        bodies, models_asked = emulator.received, _models_asked(emulator)
    assert result.exit_code == 0 and models_asked == 0  # named, so not asked
    assert len(bodies) == 3 and all(body.get("reasoning_effort") == "none" for body in bodies)
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
    # --emulate imitates vLLM for a job aimed at a local server, and auto-detection finds it
    assert "api.server auto: speaking vllm's dialect" in capsys.readouterr().err
    frame = pl.read_parquet(output)
    assert frame.height > 0 and frame["status"].to_list() == ["ok"] * frame.height
    assert frame["usage_source"].to_list() == ["service"] * frame.height


def test_a_local_server_keeps_no_dashscope_quota(tmp_path: Path, monkeypatch: Any) -> None:
    """qwen-plus has DashScope's documented RPM/TPM; on a local server only the spec's own limits apply."""
    import anyio

    monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL", raising=False)
    with _local_server("sglang") as emulator:
        plan = qwen_batch.prepare(_local_job(tmp_path, emulator.compatible_base_url, "qwen-plus"))
        assert plan.rate_limits == (600000, 1200000)  # the job's RPM, the catalog's TPM (DashScope's)

        async def limits() -> Any:
            async with qwen_batch.OnlineExecutor().open(plan, sink=None) as execution:  # type: ignore[arg-type]
                return execution.rate_limits, execution.price

        assert anyio.run(limits) == ((600000, None), None)
        assert emulator.received == []  # opening sends no row
