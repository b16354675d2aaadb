"""Today's Qwen models end to end: the real CLI over loopback against the emulator.

Stream-only and hybrid thinking models, the multimodal path of Qwen3.5+, thinking on and off,
reasoning kept apart from the answer, its tokens capped and priced at the thinking rate, the
budget's worst case, and the path switch for a model the catalog does not know.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from qwen_batch.catalog import ModelInfo, builtin
from qwen_batch.cli import main
from qwen_batch.emulator import EmulatorConfig
from qwen_batch.testing import EmulatorThread

from .conftest import read_summary, sentences_job

TEXTS = [f"问题 {i}: 为什么天空是蓝色的？ sentence {i}" for i in range(12)]
BUDGET = 40
LEDGER_ENDPOINT = {"text": "native", "multimodal": "multimodal"}  # the emulator's ledger names the path so


def _run(tmp_path: Path, model: str, parameters: dict[str, Any], **sections: Any) -> pl.DataFrame:
    job = sentences_job(tmp_path, TEXTS, model=model, parameters={"seed": 7, "max_tokens": 60, **parameters}, **sections)
    assert main(["run", str(job), "--quiet"]) == 0
    return pl.read_parquet(tmp_path / "out" / "result.parquet")


CASES = [
    # model, parameters, thinks, streamed, path
    ("qwq-plus", {}, True, True, "text"),
    ("qwen3-32b", {"thinking_budget": BUDGET}, True, True, "text"),
    ("qwen3-32b", {"enable_thinking": False}, False, False, "text"),
    ("qwen3.5-plus", {"thinking_budget": BUDGET}, True, True, "multimodal"),
    ("qwen3.5-flash", {"enable_thinking": False}, False, False, "multimodal"),
    ("qwen-plus", {"enable_thinking": True, "thinking_budget": BUDGET}, True, True, "text"),
    ("qwen-plus", {}, False, False, "text"),
]


@pytest.mark.parametrize(("model", "parameters", "thinks", "streamed", "path"), CASES)
def test_every_row_is_ok_with_reasoning_exactly_where_the_model_thinks(
    tmp_path: Path, job_env: dict[str, str], emulator: Any,
    model: str, parameters: dict[str, Any], thinks: bool, streamed: bool, path: str,
) -> None:
    frame = _run(tmp_path, model, parameters)
    assert frame["status"].to_list() == ["ok"] * len(TEXTS)
    assert all(text for text in frame["output_text"].to_list())  # the answer, never empty here
    sent = [entry for entry in emulator.ledger if entry["status"] == 200]
    assert len(sent) == len(TEXTS)
    assert {entry["endpoint"] for entry in sent} == {LEDGER_ENDPOINT[path]}
    assert {entry["stream"] for entry in sent} == {streamed}
    if thinks:
        assert frame["reasoning_text"].null_count() == 0
        assert (frame["reasoning_tokens"] > 0).all()
        assert (frame["output_tokens"] > frame["reasoning_tokens"]).all()
        if "thinking_budget" in parameters:
            assert (frame["reasoning_tokens"] <= BUDGET).all()
            assert (frame["reasoning_tokens"] == BUDGET).any()  # some thoughts are cut at the budget
    else:
        assert frame["reasoning_text"].null_count() == len(TEXTS)
        assert (frame["reasoning_tokens"] == 0).all()
    if streamed:
        assert frame["first_token_s"].null_count() == 0
        assert (frame["first_token_s"] <= frame["latency_s"]).all()
    else:
        assert frame["first_token_s"].null_count() == len(TEXTS)


def test_reasoning_is_priced_at_the_thinking_rate_and_summed_apart(tmp_path: Path, job_env: dict[str, str]) -> None:
    frame = _run(tmp_path, "qwen3-32b", {"thinking_budget": BUDGET})
    tier = builtin().models["qwen3-32b"].price.tiers[0]  # type: ignore[union-attr]
    assert tier.thinking_output_per_million is not None and tier.thinking_output_per_million != tier.output_per_million
    for row in frame.iter_rows(named=True):
        answer = row["output_tokens"] - row["reasoning_tokens"]
        expected = (
            row["input_tokens"] * tier.input_per_million
            + answer * tier.output_per_million
            + row["reasoning_tokens"] * tier.thinking_output_per_million
        ) / 1_000_000
        assert row["cost"] == pytest.approx(expected, rel=1e-12)
    summary = read_summary(tmp_path / "out" / "result.parquet")
    assert summary["tokens"]["reasoning"] == frame["reasoning_tokens"].sum()
    assert summary["cost"]["total"] == pytest.approx(frame["cost"].sum())


def test_the_budget_reserves_the_thinking_worst_case_so_it_is_never_exceeded(
    tmp_path: Path, job_env: dict[str, str]
) -> None:
    cap = 0.0025
    job = sentences_job(
        tmp_path, TEXTS * 4, model="qwen3-32b",
        parameters={"seed": 7, "max_tokens": 60, "thinking_budget": 200},
        execution={"concurrency": 8, "requests_per_minute": 600000},
        budget={"max_cost": cap},
    )
    code = main(["run", str(job), "--quiet"])
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert code != 0 and frame.filter(pl.col("status") == "ok").height < len(TEXTS) * 4  # the cap stopped it
    assert frame["cost"].fill_null(0).sum() <= cap


def test_a_thought_that_runs_out_of_tokens_is_flagged_not_counted_as_an_answer(
    tmp_path: Path, job_env: dict[str, str]
) -> None:
    texts = ["[[emu: think_overflow]] first", "a normal question", "[[emu: think_overflow]] third"]
    job = sentences_job(tmp_path, texts, model="qwen3-32b", parameters={"seed": 7, "max_tokens": 60})
    main(["run", str(job), "--quiet"])
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    overflowed = frame.filter(pl.col("finish_reason") == "length")
    assert overflowed["id"].to_list() == ["r000", "r002"]
    assert overflowed["output_text"].to_list() == ["", ""] and (overflowed["reasoning_tokens"] > 0).all()
    assert read_summary(tmp_path / "out" / "result.parquet")["rows"]["truncated_in_thinking"] == 2


def test_a_model_the_catalog_lacks_switches_to_the_other_path_once_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = "qwen3.6-plus-2026-11-30"  # a snapshot newer than the catalog: served on the multimodal path
    assert builtin().get(model) is None
    served = {model: ModelInfo(model, 262144, 196608, 65536, 65536, "message")}
    with EmulatorThread(EmulatorConfig(extra_models=served)) as emulator:
        monkeypatch.setenv("DASHSCOPE_API_KEY", emulator.api_key)
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", emulator.base_url)
        monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
        job = sentences_job(
            tmp_path, TEXTS, model=model, api={"allow_unknown_model": True},
            parameters={"seed": 7, "max_tokens": 60, "enable_thinking": False},
        )
        assert main(["run", str(job)]) == 0
        ledger = emulator.ledger
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["status"].to_list() == ["ok"] * len(TEXTS)
    text_path = [entry for entry in ledger if entry["endpoint"] == "native"]
    assert 1 <= len(text_path) <= 4 and {entry["status"] for entry in text_path} == {400}  # at most the first wave
    assert sum(entry["endpoint"] == "multimodal" and entry["status"] == 200 for entry in ledger) == len(TEXTS)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "url error" in line]
    assert len(warnings) == 1 and "multimodal" in warnings[0]
