"""json_object's extra input tokens: DashScope bills 2 more (reference section 9), so the preflight
counts them where DashScope's rules bind, and a local server, which adds none, is counted without
them. Judged against what the emulator bills, over loopback with the real CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from qwen_batch.cli import main
from qwen_batch.emulator import EmulatorConfig
from qwen_batch.testing import EmulatorThread
from qwen_batch.tokens import JSON_OBJECT_INPUT_TOKENS

from .conftest import sentences_job

TEXTS = ["lakes", "rivers and their deltas", "hills"]


def _job(folder: Path, fmt: str, **more: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {
        "prompt": {"system": "Answer in JSON.", "template": "Describe: {text}"},
        "parameters": {"seed": 7, "max_tokens": 100, "response_format": {"type": fmt}},
        "cache": {"enabled": False},
    }
    return sentences_job(folder, TEXTS, **{**spec, **more})


def _counted_and_billed(folder: Path, ledger: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """The preflight's count of each row (kept in the output) and what the emulator billed for it."""
    frame = pl.read_parquet(folder / "out" / "result.parquet").sort("id")
    assert frame["status"].to_list() == ["ok"] * len(TEXTS)
    # Row by row, the count made before sending is the usage the service reported.
    assert frame["input_tokens"].to_list() == frame["preflight_input_tokens"].to_list()
    billed = sorted(entry["input_tokens"] for entry in ledger if entry["status"] == 200)
    return sorted(frame["preflight_input_tokens"].to_list()), billed


@pytest.mark.parametrize("protocol", ["dashscope", "openai"])
def test_dashscope_json_object_rows_are_counted_with_the_tokens_it_adds(
    tmp_path: Path, job_env: dict, emulator: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any, protocol: str
) -> None:
    if protocol == "openai":
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", emulator.compatible_base_url)
    api = {"api": {"protocol": "openai", "server": "dashscope"}} if protocol == "openai" else {}
    as_json = _job(tmp_path / "json", "json_object", **api)
    as_text = _job(tmp_path / "text", "text", **api)
    assert main(["run", str(as_json)]) == 0
    counted, billed = _counted_and_billed(tmp_path / "json", emulator.ledger)
    assert counted == billed
    emulator_seen = len(emulator.ledger)
    assert main(["run", str(as_text)]) == 0
    text_counted, _ = _counted_and_billed(tmp_path / "text", emulator.ledger[emulator_seen:])
    assert [a - b for a, b in zip(counted, text_counted)] == [JSON_OBJECT_INPUT_TOKENS] * len(TEXTS)


def test_a_local_server_json_object_row_is_counted_without_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    job = _job(
        tmp_path, "json_object", model="qwen3-32b", api={"protocol": "openai", "key_env": None, "server": "vllm"},
        parameters={"seed": 7, "max_tokens": 100, "enable_thinking": False, "response_format": {"type": "json_object"}},
        execution={"concurrency": 4, "max_retries": 2, "request_timeout_s": 10},
    )
    with EmulatorThread(EmulatorConfig(server="vllm")) as emulator:
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", emulator.compatible_base_url)
        assert main(["run", str(job)]) == 0
        counted, billed = _counted_and_billed(tmp_path, emulator.ledger)
    assert counted == billed
