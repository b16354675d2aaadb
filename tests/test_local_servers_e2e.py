"""Each local server's dialect through the real run, over loopback against the emulator's ``--server``
imitation: its error body, its finish reasons, its reasoning field, missing usage, no key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

import qwen_batch
from qwen_batch.emulator import EmulatorConfig
from qwen_batch.testing import EmulatorThread

from .conftest import sentences_job

ROWS = [
    "plain",
    "[[emu: fail=InternalError times=1]] a server error in this server's own error body, then an answer",
    "[[emu: finish=length]] cut by max_tokens",
    "[[emu: reset times=1]] a dropped connection, then an answer",
]
VLLM_ROWS = [
    "[[emu: finish=abort times=1]] the engine dropped it once",
    "[[emu: finish=repetition]] stopped by the repetition check",
    "[[emu: finish=error times=1]] an engine error (HTTP 500), then an answer",
]


def _run(tmp_path: Path, monkeypatch: Any, server: str, texts: list[str], *, streamed: bool, **parameters: Any) -> tuple[Any, pl.DataFrame, list[dict[str, Any]]]:
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    job = sentences_job(
        tmp_path, texts, model="qwen3-32b",
        parameters={"seed": 7, "max_tokens": 200, "stream": streamed, "enable_thinking": False, **parameters},
        api={"protocol": "openai", "key_env": None, "server": "auto"},
        execution={"concurrency": 4, "max_retries": 2, "request_timeout_s": 10},
    )
    with EmulatorThread(EmulatorConfig(server=server, send_usage=False)) as emulator:
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", emulator.compatible_base_url)
        result = qwen_batch.run(job)
        ledger = emulator.ledger
    return result, pl.read_parquet(tmp_path / "out" / "result.parquet"), ledger


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("server", ["vllm", "sglang", "ollama", "llamacpp"])
def test_each_local_server_dialect_is_detected_retried_and_estimated(tmp_path: Path, monkeypatch: Any, capsys: Any, server: str, streamed: bool) -> None:
    result, frame, ledger = _run(tmp_path, monkeypatch, server, ROWS, streamed=streamed)
    assert result.exit_code == 0
    assert f"speaking {server}'s dialect" in capsys.readouterr().err
    assert frame["status"].to_list() == ["ok"] * 4
    assert frame["attempts"].to_list() == [1, 2, 1, 2]
    assert frame["finish_reason"].to_list() == ["stop", "stop", "length", "stop"]
    assert frame["usage_source"].to_list() == ["estimated"] * 4
    assert frame["cost"].to_list() == [None] * 4
    assert [entry["endpoint"] for entry in ledger].count("models") == 1


@pytest.mark.parametrize("streamed", [False, True])
def test_vllms_own_finish_reasons(tmp_path: Path, monkeypatch: Any, streamed: bool) -> None:
    """abort and error are retried as server errors; repetition is an answer, kept as given."""
    result, frame, _ = _run(tmp_path, monkeypatch, "vllm", VLLM_ROWS, streamed=streamed)
    assert result.exit_code == 0
    assert frame["status"].to_list() == ["ok"] * 3
    assert frame["attempts"].to_list() == [2, 1, 2]
    assert frame["finish_reason"].to_list() == ["stop", "repetition", "stop"]


def test_an_abort_every_time_ends_the_row_as_a_server_error(tmp_path: Path, monkeypatch: Any) -> None:
    result, frame, _ = _run(tmp_path, monkeypatch, "vllm", ["plain", "[[emu: finish=abort]] dropped on every attempt"], streamed=False)
    assert result.exit_code == 1
    assert frame["status"].to_list() == ["ok", "error"]
    assert frame["error_code"].to_list()[1] == "finish_reason:abort"
    assert frame["attempts"].to_list() == [1, 3]


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("server", ["vllm", "sglang", "ollama", "llamacpp"])
def test_each_servers_reasoning_field_becomes_reasoning_text(tmp_path: Path, monkeypatch: Any, server: str, streamed: bool) -> None:
    """vLLM and Ollama send the thought as ``reasoning``, SGLang and llama.cpp as ``reasoning_content``
    (WAVE2 D.1); a local server thinks in a whole reply too (DashScope's stream-only rule is its own)."""
    result, frame, _ = _run(tmp_path, monkeypatch, server, ["a lake", "a hill"], streamed=streamed, enable_thinking=True, max_tokens=400)
    assert result.exit_code == 0
    assert all(frame["reasoning_text"].to_list()) and all(frame["output_text"].to_list())


WIRE_CASES = {
    # server: (spec parameters, what the body must hold, what it must not)
    "vllm": (
        {"top_k": 5, "repetition_penalty": 1.1, "enable_thinking": True, "thinking_budget": 64},
        {"top_k": 5, "repetition_penalty": 1.1, "chat_template_kwargs": {"enable_thinking": True}, "thinking_token_budget": 64},
        ("enable_thinking", "thinking_budget"),
    ),
    "sglang": (
        {"top_k": 5, "repetition_penalty": 1.1, "enable_thinking": False},
        {"top_k": 5, "repetition_penalty": 1.1, "chat_template_kwargs": {"enable_thinking": False}},
        ("enable_thinking",),
    ),
    "llamacpp": (
        {"top_k": 5, "repetition_penalty": 1.1, "enable_thinking": False},
        {"top_k": 5, "repeat_penalty": 1.1, "chat_template_kwargs": {"enable_thinking": False}},
        ("repetition_penalty", "enable_thinking"),
    ),
    "ollama": ({"enable_thinking": False}, {"reasoning_effort": "none"}, ("enable_thinking", "chat_template_kwargs")),
}


@pytest.mark.parametrize("server", sorted(WIRE_CASES))
def test_every_spec_field_reaches_the_wire_where_the_server_reads_it(tmp_path: Path, monkeypatch: Any, server: str) -> None:
    parameters, present, absent = WIRE_CASES[server]
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
    job = sentences_job(
        tmp_path, ["alpha"], model="qwen3-32b",
        parameters={"seed": 7, "max_tokens": 300, "temperature": 0.3, "top_p": 0.9, **parameters},
        api={"protocol": "openai", "key_env": None, "server": server},
    )
    with EmulatorThread(EmulatorConfig(server=server)) as emulator:
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", emulator.compatible_base_url)
        assert qwen_batch.run(job).exit_code == 0
        (body,) = emulator.received
    assert {key: body.get(key) for key in present} == present
    assert {"seed": 7, "max_tokens": 300, "temperature": 0.3, "top_p": 0.9}.items() <= body.items()
    assert [key for key in absent if key in body] == []


def test_dashscope_compatible_mode_gets_its_extensions_at_the_top_level(tmp_path: Path, job_env: dict, emulator: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", emulator.compatible_base_url)
    job = sentences_job(
        tmp_path, ["alpha"], model="qwen3-32b",
        parameters={"seed": 7, "max_tokens": 300, "top_k": 5, "repetition_penalty": 1.1, "enable_search": False,
                    "enable_thinking": True, "thinking_budget": 64},
        api={"protocol": "openai", "server": "dashscope"},
    )
    assert qwen_batch.run(job).exit_code == 0
    (body,) = emulator.received
    expected = {"top_k": 5, "repetition_penalty": 1.1, "enable_search": False, "enable_thinking": True, "thinking_budget": 64}
    assert {key: body.get(key) for key in expected} == expected
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert "chat_template_kwargs" not in body
