"""`qwen-batch run` end to end: the real client over loopback against the emulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest

from qwen_batch import tokens
from qwen_batch.cli import main

from .conftest import read_summary, sentences_job, write_job

RESULT_COLUMNS = [
    "request_id", "output_text", "finish_reason", "input_tokens", "output_tokens", "total_tokens",
    "cost", "status", "error_code", "error_message", "attempts", "latency_s", "model", "seed",
    "preflight_input_tokens",
    "reasoning_text", "reasoning_tokens", "first_token_s", "usage_source",
    "output_json", "parse_status", "parse_error",
    "variant", "sample", "request_sha256",
]
TEXTS = ["今天天气很好。", "The quick brown fox.", "数据 {text} 和 {{braces}} 以及 %s", "Hello again, world."]


def billable(emulator: Any) -> list[dict[str, Any]]:
    return [entry for entry in emulator.ledger if entry["status"] == 200]


def test_run_writes_one_ok_row_per_input_row_in_order(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    """Every input row comes back once, in order, with input columns first and the result columns typed."""
    job = sentences_job(tmp_path, TEXTS)
    assert main(["run", str(job), "--quiet"]) == 0
    output = tmp_path / "out" / "result.parquet"
    table = pq.read_table(output)
    assert table.column_names == ["id", "text", *RESULT_COLUMNS]
    types = {field.name: str(field.type) for field in table.schema}
    assert types["input_tokens"] == "int64" and types["cost"] == "double" and types["seed"] == "int64"
    assert types["error_code"] == "string" and types["attempts"] == "int64"
    assert (types["reasoning_text"], types["reasoning_tokens"], types["first_token_s"]) == ("string", "int64", "double")
    assert types["usage_source"] == "string" and table.column("usage_source").to_pylist() == ["service"] * len(TEXTS)
    frame = pl.read_parquet(output)
    assert frame["id"].to_list() == [f"r{i:03d}" for i in range(len(TEXTS))]
    assert frame["status"].to_list() == ["ok"] * len(TEXTS)
    assert frame["error_code"].null_count() == len(TEXTS)
    assert all(frame["output_text"].str.len_chars() > 0)
    assert (frame["total_tokens"] == frame["input_tokens"] + frame["output_tokens"]).all()
    assert frame["preflight_input_tokens"].to_list() == frame["input_tokens"].to_list()
    assert frame["model"].unique().to_list() == ["qwen-turbo"] and frame["seed"].unique().to_list() == [7]
    # A model that does not think, not streamed: no reasoning, 0 reasoning tokens, no first-token time.
    assert frame["reasoning_text"].null_count() == frame["first_token_s"].null_count() == len(TEXTS)
    assert frame["reasoning_tokens"].to_list() == [0] * len(TEXTS)
    assert len(billable(emulator)) == len(TEXTS)


def test_cost_is_the_price_table_times_the_reported_usage(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    """qwen-turbo costs 0.008 CNY per 1K tokens in and out (seed-era table); the summary adds it up."""
    job = sentences_job(tmp_path, TEXTS)
    assert main(["run", str(job), "--quiet"]) == 0
    output = tmp_path / "out" / "result.parquet"
    frame = pl.read_parquet(output)
    expected = [(i + o) * 0.008 / 1000 for i, o in zip(frame["input_tokens"], frame["output_tokens"])]
    assert frame["cost"].to_list() == pytest.approx(expected)
    summary = read_summary(output)
    assert summary["rows"] == {"total": 4, "ok": 4, "error": 0, "not_done": 0, "truncated_in_thinking": 0}
    assert summary["cost"]["currency"] == "CNY"
    assert summary["cost"]["total"] == pytest.approx(sum(expected))
    assert summary["tokens"]["input"] == frame["input_tokens"].sum()
    assert summary["tokens"]["total"] == frame["total_tokens"].sum()


def test_pricing_override_in_the_spec_is_used(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = sentences_job(tmp_path, TEXTS[:2], pricing={"currency": "USD", "input_per_1k": 1.0, "output_per_1k": 2.0})
    assert main(["run", str(job), "--quiet"]) == 0
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    expected = [(i * 1.0 + o * 2.0) / 1000 for i, o in zip(frame["input_tokens"], frame["output_tokens"])]
    assert frame["cost"].to_list() == pytest.approx(expected)
    assert read_summary(tmp_path / "out" / "result.parquet")["cost"]["currency"] == "USD"


def test_the_estimated_input_tokens_equal_the_billed_ones(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    """The client's exact count (tokens.count_messages) is what the emulator bills."""
    job = sentences_job(tmp_path, TEXTS)
    assert main(["run", str(job), "--quiet"]) == 0
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    for text, billed in zip(frame["text"], frame["input_tokens"]):
        messages = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": f"Say something about: {text}"},
        ]
        assert tokens.count_messages(messages) == billed


@pytest.mark.parametrize("result_format", ["text", "message"])
def test_both_result_formats_give_the_same_columns(tmp_path: Path, job_env: dict, emulator: Any, result_format: str) -> None:
    job = sentences_job(tmp_path, TEXTS[:2], parameters={"seed": 7, "max_tokens": 200, "result_format": result_format})
    assert main(["run", str(job), "--quiet"]) == 0
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["status"].to_list() == ["ok", "ok"]
    assert set(frame["finish_reason"].to_list()) <= {"stop", "length"}


def test_max_tokens_truncates_with_finish_reason_length(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = sentences_job(tmp_path, ["Tell a long story [[emu: length=300]]"], parameters={"seed": 7, "max_tokens": 5})
    assert main(["run", str(job), "--quiet"]) == 0
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["finish_reason"].to_list() == ["length"]
    assert frame["output_tokens"].to_list() == [5]


@pytest.mark.parametrize(
    "directive",
    [
        "[[emu: fail=Throttling.RateQuota times=2]]",
        "[[emu: fail=Throttling.AllocationQuota times=2]]",
        "[[emu: fail=Throttling.BurstRate times=2]]",
        "[[emu: fail=InternalError times=2]]",
        "[[emu: fail=ModelUnavailable times=2]]",
        "[[emu: reset times=2]]",
        "[[emu: malformed times=2]]",
        "[[emu: truncated times=2]]",
    ],
)
def test_each_retryable_fault_is_retried_then_succeeds(tmp_path: Path, job_env: dict, emulator: Any, directive: str) -> None:
    job = sentences_job(tmp_path, [f"flaky row {directive}", "steady row"])
    assert main(["run", str(job), "--quiet"]) == 0
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["status"].to_list() == ["ok", "ok"]
    assert frame["attempts"].to_list() == [3, 1]
    assert len(billable(emulator)) == 2
    assert read_summary(tmp_path / "out" / "result.parquet")["retries"] == 2


def test_a_hang_is_cut_by_the_request_timeout_and_retried(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = sentences_job(
        tmp_path, ["hangs once [[emu: hang times=1]]"], execution={"request_timeout_s": 0.5, "max_retries": 2}
    )
    assert main(["run", str(job), "--quiet"]) == 0
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["status"].to_list() == ["ok"] and frame["attempts"].to_list() == [2]


def test_a_400_is_recorded_without_a_retry_and_exits_1(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = sentences_job(tmp_path, ["bad row [[emu: always=DataInspectionFailed]]", "good row"])
    assert main(["run", str(job), "--quiet"]) == 1
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["status"].to_list() == ["error", "ok"]
    assert frame["error_code"].to_list() == ["DataInspectionFailed", None]
    assert frame["attempts"].to_list() == [1, 1]
    assert frame["output_text"][0] is None and frame["cost"][0] is None
    failed = [entry for entry in emulator.ledger if entry["code"] == "DataInspectionFailed"]
    assert len(failed) == 1
    assert read_summary(tmp_path / "out" / "result.parquet")["errors_by_code"] == {"DataInspectionFailed": 1}


def test_retries_spent_records_the_last_error(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = sentences_job(tmp_path, ["always busy [[emu: always=ModelUnavailable]]"], execution={"max_retries": 2})
    assert main(["run", str(job), "--quiet"]) == 1
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["error_code"].to_list() == ["ModelUnavailable"]
    assert frame["attempts"].to_list() == [3]
    assert len(emulator.ledger) == 3


def test_a_refused_key_aborts_the_run_with_exit_3(tmp_path: Path, job_env: dict, emulator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-wrong-key-0000")
    job = sentences_job(tmp_path, TEXTS * 10, execution={"concurrency": 2})
    assert main(["run", str(job), "--quiet"]) == 3
    assert not (tmp_path / "out" / "result.parquet").exists()
    assert len(emulator.ledger) <= 2
    assert {entry["status"] for entry in emulator.ledger} == {401}


def test_a_missing_key_is_exit_2_and_sends_nothing(tmp_path: Path, job_env: dict, emulator: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY")
    job = sentences_job(tmp_path, TEXTS)
    assert main(["run", str(job)]) == 2
    assert "DASHSCOPE_API_KEY" in capsys.readouterr().err
    assert emulator.ledger == []


def test_the_requests_per_minute_limit_is_honoured(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    """1,200 requests per minute = one every 50 ms: 21 rows take at least one second on the server's clock."""
    job = sentences_job(tmp_path, [f"row {i}" for i in range(21)], execution={"concurrency": 8, "requests_per_minute": 1200})
    assert main(["run", str(job), "--quiet"]) == 0
    times = sorted(entry["time"] for entry in emulator.ledger)
    assert times[-1] - times[0] >= 20 * 0.05 * 0.98
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.05 * 0.5


def test_every_spec_parameter_reaches_the_wire(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    parameters = {
        "seed": 99, "max_tokens": 321, "temperature": 0.3, "top_p": 0.9, "top_k": 20,
        "repetition_penalty": 1.05, "presence_penalty": 0.5, "stop": ["###", "END"],
        "enable_search": False, "result_format": "message",
    }
    job = sentences_job(tmp_path, ["one row"], model="qwen-plus", parameters=parameters)
    assert main(["run", str(job), "--quiet"]) == 0
    (body,) = emulator.received
    assert body["model"] == "qwen-plus"
    assert body["parameters"] == parameters
    assert body["input"]["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something about: one row"},
    ]


def test_data_is_never_read_as_a_template(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = sentences_job(tmp_path, ["{text} {0} {{x}} %s %(name)s {text!r:>10}"])
    assert main(["run", str(job), "--quiet"]) == 0
    (body,) = emulator.received
    assert body["input"]["messages"][-1]["content"] == "Say something about: {text} {0} {{x}} %s %(name)s {text!r:>10}"


def test_a_null_prompt_cell_is_that_rows_error_not_a_crash(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    path = tmp_path / "input.jsonl"
    path.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": null}\n{"id": "c", "text": "also fine"}\n')
    spec = {
        "model": "qwen-turbo",
        "input": {"path": "input.jsonl", "id_column": "id"},
        "prompt": {"prompt_column": "text"},
        "output": {"path": "out/result.parquet"},
    }
    job = write_job(tmp_path, spec)
    assert main(["run", str(job), "--quiet"]) == 1
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["status"].to_list() == ["ok", "error", "ok"]
    assert len(billable(emulator)) == 2


def test_limit_and_output_flags(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = sentences_job(tmp_path, TEXTS)
    other = tmp_path / "elsewhere" / "x.parquet"
    assert main(["run", str(job), "--quiet", "--limit", "2", "--output", str(other)]) == 0
    assert pl.read_parquet(other).height == 2
    assert len(billable(emulator)) == 2


def test_emulate_flag_needs_no_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL", raising=False)
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
    job = sentences_job(tmp_path, TEXTS)
    assert main(["run", str(job), "--emulate", "--quiet"]) == 0
    assert pl.read_parquet(tmp_path / "out" / "result.parquet")["status"].to_list() == ["ok"] * 4


@pytest.mark.parametrize("job_name", ["translate.yaml", "summarize.yaml", "eval.yaml", "reasoning.yaml"])
def test_the_sample_jobs_run_on_the_emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, job_name: str) -> None:
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
    repo_jobs = Path(__file__).resolve().parent.parent / "jobs"
    output = tmp_path / "out.parquet"
    assert main(["run", str(repo_jobs / job_name), "--emulate", "--quiet", "--output", str(output)]) == 0
    source = pl.read_parquet(output)
    assert source.height > 0 and (source["status"] == "ok").all()


def test_replies_of_the_built_in_emulator_never_answer_a_real_run(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    """The cache is shared across jobs but kept per service: --emulate text must not leak into a real run."""
    job = sentences_job(tmp_path, TEXTS[:2])
    assert main(["run", str(job), "--emulate", "--quiet", "--output", str(tmp_path / "emulated.parquet")]) == 0
    assert main(["run", str(job), "--quiet"]) == 0
    assert len(billable(emulator)) == 2
    assert read_summary(tmp_path / "out" / "result.parquet")["cache"]["hits"] == 0
