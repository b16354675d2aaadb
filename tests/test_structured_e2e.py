"""Structured output end to end: the real CLI and ``qwen_batch.run`` over loopback against the emulator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import qwen_batch
from qwen_batch import pricing
from qwen_batch.catalog import builtin
from qwen_batch.emulator import EmulatorConfig
from qwen_batch.testing import EmulatorThread

from .conftest import run_subprocess, sentences_job
from .refusal import refused

SCHEMA = {
    "type": "object",
    "properties": {"topic": {"type": "string"}, "score": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["topic", "score"],
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "topic", "schema": SCHEMA, "strict": True}}
SYSTEM = "Answer in JSON."


def _job(folder: Path, texts: list[str], *, fmt: dict[str, Any] = JSON_SCHEMA, retries: int | None = None, **more: Any) -> Path:
    output: dict[str, Any] = {"path": "out/result.parquet"}
    if retries is not None:
        output["json_retries"] = retries
    return sentences_job(
        folder,
        texts,
        prompt={"system": SYSTEM, "template": "Rate the topic of: {text}"},
        parameters={"seed": 7, "max_tokens": 200, "response_format": fmt},
        output=output,
        **more,
    )


def _rows(folder: Path) -> dict[str, dict[str, Any]]:
    frame = pl.read_parquet(folder / "out" / "result.parquet")
    return {row["id"]: row for row in frame.iter_rows(named=True)}


def _billed(emulator: Any) -> list[dict[str, Any]]:
    return [entry for entry in emulator.ledger if entry["status"] == 200]


def _ledger_cost(entries: list[dict[str, Any]]) -> float:
    price = builtin().get("qwen-turbo").price  # type: ignore[union-attr]
    return sum(pricing.cost(price, e["input_tokens"], e["output_tokens"], 0) or 0.0 for e in entries)


@pytest.mark.parametrize("protocol", ["dashscope", "openai"])
@pytest.mark.parametrize("directive", ["bad_json", "bad_schema"])
def test_a_spoiled_answer_is_reasked_once_and_ends_ok_with_both_attempts_paid(
    tmp_path: Path, job_env: dict, emulator: Any, monkeypatch: Any, protocol: str, directive: str
) -> None:
    if protocol == "openai":
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", emulator.compatible_base_url)
    texts = ["lakes", f"rivers [[emu: {directive}]]", "hills"]
    api = {"protocol": "openai", "server": "dashscope"} if protocol == "openai" else {}
    job = _job(tmp_path, texts, **({"api": api} if api else {}))
    result = qwen_batch.run(job)
    assert result.exit_code == 0
    rows = _rows(tmp_path)
    bad, good = rows["r001"], [rows["r000"], rows["r002"]]
    assert bad["status"] == "ok" and bad["parse_status"] == "ok" and bad["parse_error"] is None
    assert bad["attempts"] == 2
    value = json.loads(bad["output_json"])
    assert set(value) == {"topic", "score"} and 1 <= value["score"] <= 5
    assert all(row["attempts"] == 1 and row["parse_status"] == "ok" for row in good)
    billed = _billed(emulator)
    assert len(billed) == 4  # one bill per good row, two for the re-asked one
    # The re-asked row's tokens and cost are the sums of its two bills: what is left once the good rows' are taken.
    good_input = sum(row["input_tokens"] for row in good)
    assert bad["input_tokens"] == sum(e["input_tokens"] for e in billed) - good_input
    assert bad["output_tokens"] == sum(e["output_tokens"] for e in billed) - sum(row["output_tokens"] for row in good)
    total_cost = sum(row["cost"] for row in rows.values())
    assert total_cost == pytest.approx(_ledger_cost(billed))
    assert bad["cost"] == pytest.approx(total_cost - sum(row["cost"] for row in good))
    assert bad["cost"] > max(row["cost"] for row in good)
    assert result.summary["rows"]["parse_status"] == {"ok": 3, "invalid_json": 0, "schema_mismatch": 0}
    assert result.summary["rows"]["reasks"] == 1
    assert result.summary["cost"]["total"] == pytest.approx(_ledger_cost(billed))
    # The re-ask is the conversation plus the bad answer and a user turn naming the error.
    reask = [body for body in emulator.received if len(_messages(body)) == 4]
    assert len(reask) == 1
    messages = _messages(reask[0])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "Correct your JSON" in messages[3]["content"]


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    return body["messages"] if "messages" in body else body["input"]["messages"]


@pytest.mark.parametrize("protocol", ["dashscope", "openai"])
def test_response_format_is_on_the_wire_where_each_protocol_reads_it(
    tmp_path: Path, job_env: dict, emulator: Any, monkeypatch: Any, protocol: str
) -> None:
    api = {}
    if protocol == "openai":
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", emulator.compatible_base_url)
        api = {"api": {"protocol": "openai", "server": "dashscope"}}
    assert qwen_batch.run(_job(tmp_path, ["one", "two"], **api)).exit_code == 0
    bodies = emulator.received
    assert len(bodies) == 2
    for body in bodies:
        where = body if protocol == "openai" else body["parameters"]
        assert where["response_format"] == JSON_SCHEMA
        assert "response_format" not in (body.get("parameters", {}) if protocol == "openai" else body)


def test_an_answer_that_never_parses_is_an_error_with_its_raw_text_and_two_bills(
    tmp_path: Path, job_env: dict, emulator: Any
) -> None:
    job = _job(tmp_path, ["fine", "broken [[emu: bad_json=always]]"], retries=1)
    result = qwen_batch.run(job)
    assert result.exit_code == 1
    row = _rows(tmp_path)["r001"]
    assert row["status"] == "error" and row["error_code"] == "InvalidJSON"
    assert row["parse_status"] == "invalid_json" and row["output_json"] is None
    assert row["output_text"].startswith("Here is the JSON you asked for:")
    assert row["parse_error"] and row["parse_error"] in row["error_message"]
    assert row["attempts"] == 2
    billed = _billed(emulator)
    assert len(billed) == 3
    # Never parsed, still paid: its tokens and cost are in the row and in the summary's totals.
    assert row["input_tokens"] > 0 and row["cost"] > 0
    assert result.summary["cost"]["total"] == pytest.approx(_ledger_cost(billed))
    assert result.summary["tokens"]["input"] == sum(e["input_tokens"] for e in billed)
    assert result.summary["rows"]["parse_status"] == {"ok": 1, "invalid_json": 1, "schema_mismatch": 0}


def test_json_retries_0_sends_no_reask(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = _job(tmp_path, ["wrong type [[emu: bad_schema]]"], retries=0)
    result = qwen_batch.run(job)
    assert result.exit_code == 1
    row = _rows(tmp_path)["r000"]
    assert row["status"] == "error" and row["parse_status"] == "schema_mismatch" and row["attempts"] == 1
    assert row["error_code"] == "SchemaMismatch" and row["parse_error"].startswith("$.topic: ")
    assert len(_billed(emulator)) == 1
    assert result.summary["rows"]["reasks"] == 0


def test_an_answer_cut_by_max_tokens_is_not_reasked(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = _job(tmp_path, ["long [[emu: length=400]]"])
    job.write_text(job.read_text().replace("max_tokens: 200", "max_tokens: 5"))
    result = qwen_batch.run(job)
    row = _rows(tmp_path)["r000"]
    assert row["finish_reason"] == "length" and row["parse_status"] == "invalid_json"
    assert row["status"] == "error" and "max_tokens" in row["error_message"]
    assert len(_billed(emulator)) == 1 and result.summary["rows"]["reasks"] == 0


def test_a_text_job_has_null_parse_columns(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = _job(tmp_path, ["plain"], fmt={"type": "text"})
    assert qwen_batch.run(job).exit_code == 0
    row = _rows(tmp_path)["r000"]
    assert row["status"] == "ok" and (row["output_json"], row["parse_status"], row["parse_error"]) == (None, None, None)
    assert emulator.received[0]["parameters"]["response_format"] == {"type": "text"}


def test_a_rerun_from_the_cache_replays_the_reask_chain_without_sending(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    texts = ["calm", "spoiled [[emu: bad_json]]"]
    first = tmp_path / "first"
    second = tmp_path / "second"
    first.mkdir()
    second.mkdir()
    assert qwen_batch.run(_job(first, texts)).exit_code == 0
    sent = len(emulator.ledger)
    assert sent == 3
    result = qwen_batch.run(_job(second, texts))
    assert result.exit_code == 0
    assert len(emulator.ledger) == sent  # both attempts of the re-asked row came from the cache
    a, b = _rows(first), _rows(second)
    assert b["r001"]["output_json"] == a["r001"]["output_json"] and b["r001"]["parse_status"] == "ok"
    assert b["r001"]["cost"] == 0 and b["r001"]["attempts"] == 0
    assert result.summary["cache"]["hits"] == 2


def test_json_object_rows_without_the_word_json_are_row_errors_not_sent(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = sentences_job(
        tmp_path,
        ["give json please", "no word here"],
        prompt={"template": "{text}"},
        parameters={"seed": 7, "max_tokens": 100, "response_format": {"type": "json_object"}},
    )
    assert qwen_batch.run(job).exit_code == 1
    rows = _rows(tmp_path)
    assert rows["r000"]["status"] == "ok" and rows["r000"]["parse_status"] == "ok"
    assert rows["r001"]["status"] == "error" and rows["r001"]["error_code"] == "InvalidParameter"
    assert "must contain the word 'json'" in rows["r001"]["error_message"]
    assert len(emulator.ledger) == 1


def test_a_local_server_is_not_held_to_dashscopes_json_word(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL", raising=False)
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
    with EmulatorThread(EmulatorConfig(server="vllm")) as emulator:
        job = sentences_job(
            tmp_path,
            ["no word here"],
            prompt={"template": "{text}"},
            parameters={"seed": 7, "max_tokens": 100, "response_format": {"type": "json_object"}, "enable_thinking": False},
            api={"protocol": "openai", "base_url": emulator.compatible_base_url, "server": "vllm", "key_env": None},
        )
        assert qwen_batch.run(job).exit_code == 0
        bodies = emulator.received
    assert bodies[0]["response_format"] == {"type": "json_object"}
    assert _rows(tmp_path)["r000"]["parse_status"] == "ok"


# -- refusals: exit 2, nothing sent, nothing changed ------------------------------------------


def _refused_job(tmp_path: Path, **overrides: Any) -> Path:
    return sentences_job(tmp_path, ["one", "two"], **overrides)


def test_json_mode_with_thinking_is_refused_before_sending(tmp_path: Path, job_env: dict, emulator: Any, capsys: Any) -> None:
    job = _refused_job(
        tmp_path,
        model="qwen-plus",
        parameters={"seed": 7, "max_tokens": 100, "enable_thinking": True, "thinking_budget": 100, "response_format": JSON_SCHEMA},
    )
    for command in ("validate", "run"):
        line = refused([command, str(job)], tmp_path, emulator, capsys)
        assert "parameters.response_format" in line and "enable_thinking: false" in line


def test_json_object_without_json_in_any_row_is_refused(tmp_path: Path, job_env: dict, emulator: Any, capsys: Any) -> None:
    job = _refused_job(tmp_path, parameters={"seed": 7, "max_tokens": 100, "response_format": {"type": "json_object"}})
    line = refused(["run", str(job)], tmp_path, emulator, capsys)
    assert "parameters.response_format" in line and "'json'" in line and "prompt.system" in line


@pytest.mark.parametrize(
    ("fmt", "key"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}, "json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "json_schema.name"),
        ({"type": "json_schema"}, "json_schema"),
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": SCHEMA}}, "json_schema.name: must be"),
        ({"type": "json_schema", "json_schema": {"nme": "x", "schema": SCHEMA}}, "did you mean 'name'"),
        ({"type": "json_object", "json_schema": {"name": "x", "schema": SCHEMA}}, "set type: json_schema"),
    ],
)
def test_a_bad_response_format_is_refused_naming_the_key(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: Any, fmt: dict[str, Any], key: str
) -> None:
    job = _refused_job(tmp_path, parameters={"seed": 7, "max_tokens": 100, "response_format": fmt})
    line = refused(["validate", str(job)], tmp_path, emulator, capsys)
    assert "parameters.response_format" in line and key in line


def test_json_retries_out_of_range_is_refused(tmp_path: Path, job_env: dict, emulator: Any, capsys: Any) -> None:
    job = _refused_job(tmp_path, output={"path": "out/result.parquet", "json_retries": -1})
    line = refused(["run", str(job)], tmp_path, emulator, capsys)
    assert "output.json_retries" in line


# -- crash safety -------------------------------------------------------------------------------


def test_resume_after_a_kill_keeps_the_parse_columns(tmp_path: Path) -> None:
    rows = 40
    texts = [f"item {i}" + (" [[emu: bad_schema]]" if i % 3 == 0 else "") for i in range(rows)]
    folder = tmp_path / "killed"
    folder.mkdir()
    job = _job(folder, texts, execution={"concurrency": 2, "max_retries": 3, "request_timeout_s": 10})
    with EmulatorThread(EmulatorConfig(latency_s=0.01)) as emu:
        env = {
            "DASHSCOPE_API_KEY": emu.api_key,
            "DASHSCOPE_HTTP_BASE_URL": emu.base_url,
            "QWEN_BATCH_CACHE_DIR": str(tmp_path / "cache"),
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "qwen_batch", "run", str(job), "--quiet"],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while emu.stats()["billable"] < 15 and process.poll() is None and time.monotonic() < deadline:
            emu.wait_for_request(timeout=1.0)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        lines = (folder / "out" / "result.parquet.checkpoint" / "rows.jsonl").read_bytes().splitlines()
        records = [json.loads(line) for line in lines if line.endswith(b"}")]
        assert 0 < len(records) < rows  # killed part-way
        assert all(r["parse_status"] == "ok" and r["output_json"] for r in records)
        before = {f"r{r['index']:03d}": r["output_json"] for r in records}
        resumed = run_subprocess(["run", str(job), "--quiet"], env)
        assert resumed.returncode == 0, resumed.stderr
    frame = pl.read_parquet(folder / "out" / "result.parquet")
    assert frame["status"].to_list() == ["ok"] * rows
    assert frame["parse_status"].to_list() == ["ok"] * rows
    assert all(json.loads(text)["score"] in range(1, 6) for text in frame["output_json"])
    # The rows finished before the kill keep their parse columns as recorded.
    kept = dict(zip(frame["id"], frame["output_json"]))
    assert all(kept[row_id] == output_json for row_id, output_json in before.items())
    reasked = frame.filter(pl.col("id").is_in([f"r{i:03d}" for i in range(0, rows, 3)]))
    assert set(reasked["attempts"].to_list()) <= {0, 1, 2} and 2 in reasked["attempts"].to_list()


def test_the_sample_extract_job_runs_with_emulate(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL", raising=False)
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
    job = Path(__file__).resolve().parent.parent / "jobs" / "extract.yaml"
    output = tmp_path / "extract.parquet"
    result = qwen_batch.run(job, emulate=True, output=output)
    assert result.exit_code == 0
    frame = pl.read_parquet(output)
    assert frame["parse_status"].to_list() == ["ok"] * frame.height and frame.height == 5
    for text in frame["output_json"]:
        value = json.loads(text)
        assert value["sentiment"] in {"positive", "negative", "neutral"} and 1 <= value["rating"] <= 5


def test_the_same_json_job_on_both_protocols_gives_the_same_answers(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL", raising=False)
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
    texts = ["lakes", "rivers [[emu: bad_schema]]", "hills [[emu: bad_json]]"]
    frames = []
    for protocol in ("dashscope", "openai"):
        folder = tmp_path / protocol
        folder.mkdir()
        api = {"api": {"protocol": "openai"}} if protocol == "openai" else {}
        assert qwen_batch.run(_job(folder, texts, **api), emulate=True, no_cache=True).exit_code == 0
        frames.append(pl.read_parquet(folder / "out" / "result.parquet"))
    native, compatible = frames
    columns = ["id", "output_text", "output_json", "parse_status", "attempts", "input_tokens", "output_tokens", "cost"]
    assert native.select(columns).to_dicts() == compatible.select(columns).to_dicts()
    assert native["attempts"].to_list() == [1, 2, 2]
