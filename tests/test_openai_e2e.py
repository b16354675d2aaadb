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
