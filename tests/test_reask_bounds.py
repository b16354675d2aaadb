"""JSON mode's re-asks in the worst case: ``estimate`` says them and its maximum bounds what a run of
rows that never parse really sends and pays (the real CLI over loopback against the emulator)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen_batch.cli import main
from qwen_batch.structured import REASK_ERROR_MAX_BYTES, reask_error

from .conftest import read_summary, sentences_job

SCHEMA = {
    "type": "object",
    "properties": {"topic": {"type": "string"}, "score": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["topic", "score"],
}


def _job(folder: Path, texts: list[str], retries: int) -> Path:
    fmt = {"type": "json_schema", "json_schema": {"name": "topic", "schema": SCHEMA}}
    folder.mkdir(parents=True, exist_ok=True)
    return sentences_job(
        folder,
        texts,
        prompt={"system": "Answer in JSON.", "template": "Rate the topic of: {text}"},
        parameters={"seed": 7, "max_tokens": 120, "response_format": fmt},
        output={"path": "out/result.parquet", "json_retries": retries},
        cache={"enabled": False},
    )


def _estimate(job: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["estimate", str(job), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("directive", ["bad_json=always", "bad_schema=always"])
def test_the_estimate_bounds_a_run_whose_answers_never_parse(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str], directive: str
) -> None:
    texts = [f"topic number {i} [[emu: {directive}]]" for i in range(6)]
    job = _job(tmp_path, texts, retries=2)
    estimate = _estimate(job, capsys)
    reasks = estimate["json_reasks"]
    assert reasks["per_row_max"] == 2 and reasks["requests_max"] == 2 * len(texts)
    assert "output.json_retries" in reasks["basis"]
    without = _estimate(_job(tmp_path / "no-reasks", texts, retries=0), capsys)
    assert without["json_reasks"] is None and without["cost"]["max"] < estimate["cost"]["max"]

    main(["run", str(job)])
    sent = [entry for entry in emulator.ledger if entry["status"] == 200]
    assert len(sent) == len(texts) * 3  # every row: the first answer and both re-asks
    first = estimate["input_tokens"]["to_send"]
    reask_input = sum(entry["input_tokens"] for entry in sent) - first
    assert 0 < reask_input <= reasks["input_tokens_max"]
    summary = read_summary(tmp_path / "out" / "result.parquet")
    assert 0 < summary["cost"]["total"] <= estimate["cost"]["max"]


def test_the_run_reports_estimate_and_the_text_estimate_name_the_reasks(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _job(tmp_path, ["lakes", "hills"], retries=3)
    capsys.readouterr()
    assert main(["estimate", str(job)]) == 0
    text = capsys.readouterr().out
    assert "JSON re-asks" in text and "0 .. 6 requests (3 a row at most)" in text
    assert emulator.ledger == []


@given(st.text(min_size=0, max_size=400))
def test_a_reask_carries_at_most_its_bytes_of_the_error_cut_at_a_character(error: str) -> None:
    error = error * 3
    carried = reask_error(error)
    assert len(carried.encode("utf-8")) <= REASK_ERROR_MAX_BYTES
    if len(error.encode("utf-8")) <= REASK_ERROR_MAX_BYTES:
        assert carried == error
    else:
        assert carried.endswith("…") and error.startswith(carried[:-1])
