"""Run records end to end: the manifest, `verify` and `diff`, the real CLI over loopback against the emulator."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from qwen_batch.cli import main
from qwen_batch.manifest import canonical_sha256

from .conftest import sentences_job, write_csv

TEXTS = [f"sentence number {i} about {topic}" for i, topic in enumerate(["tea", "rain", "maps", "owls", "jazz"] * 4)]


def billable(emulator: Any) -> list[dict[str, Any]]:
    return [entry for entry in emulator.ledger if entry["status"] == 200]


def run_job(job: Path, output: Path, *extra: str) -> int:
    return main(["run", str(job), "--quiet", "--output", str(output), *extra])


def manifest_of(output: Path) -> dict[str, Any]:
    return json.loads(output.with_name(output.name + ".manifest.json").read_text(encoding="utf-8"))


def diff_json(a: Path, b: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = main(["diff", str(a), str(b), "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def set_parameter(job: Path, key: str, value: Any) -> None:
    spec = yaml.safe_load(job.read_text(encoding="utf-8"))
    spec["parameters"][key] = value
    job.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")


def finished_job(folder: Path, **overrides: Any) -> tuple[Path, Path]:
    """A sentences job run once to the end: its spec and its output."""
    job = sentences_job(folder, TEXTS, **overrides)
    output = folder / "out" / "result.parquet"
    assert run_job(job, output) == 0
    return job, output


def run_twice(job: Path, *second: str, between: Callable[[], None] | None = None) -> tuple[Path, Path]:
    """Run ``job`` to out/a.parquet, then (after ``between``) with the ``second`` flags to out/b.parquet."""
    a, b = job.parent / "out" / "a.parquet", job.parent / "out" / "b.parquet"
    assert run_job(job, a) == 0
    if between is not None:
        between()
    assert run_job(job, b, *second) == 0
    return a, b


def verify_before_and_after_a_cell_changes(output: Path, input_csv: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """``verify`` exits 0, then 1 once row r003's text changes; what both printed."""
    capsys.readouterr()
    assert main(["verify", str(output)]) == 0
    changed = list(TEXTS)
    changed[3] = "a different sentence"
    write_csv(input_csv, ["id", "text"], [[f"r{i:03d}", text] for i, text in enumerate(changed)])
    assert main(["verify", str(output)]) == 1
    return capsys.readouterr().out


def test_every_run_writes_a_manifest_of_what_it_was(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job, output = finished_job(tmp_path)
    manifest = manifest_of(output)
    assert manifest["spec_sha256"] == canonical_sha256(manifest["spec"])
    assert manifest["input"]["sha256"] == hashlib.sha256((tmp_path / "input.csv").read_bytes()).hexdigest()
    assert manifest["input"]["rows"] == len(TEXTS)
    assert manifest["prompt"]["template"] == "Say something about: {text}"
    assert manifest["service"] == {
        "protocol": "dashscope", "mode": "online", "base_url": emulator.base_url, "emulated": False
    }
    [variant] = manifest["variants"]
    assert variant["service_defaults"] == {}  # qwen-turbo without thinking: none documented
    # Defaults the spec left out are resolved: the model's result_format, the seed.
    assert variant["parameters"]["result_format"] == "text" and variant["parameters"]["seed"] == 7
    assert manifest["catalog"]["qwen-turbo"]["price_used"]["source"]
    assert manifest["job"]["git_commit"] is None  # tmp_path is in no repository
    assert manifest["started_at"] <= manifest["ended_at"]
    assert emulator.api_key not in output.with_name(output.name + ".manifest.json").read_text(encoding="utf-8")


def test_verify_passes_then_fails_with_exit_1_after_one_input_cell_changes(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job, output = finished_job(tmp_path)
    sent = len(emulator.ledger)
    out = verify_before_and_after_a_cell_changes(output, tmp_path / "input.csv", capsys)
    assert "ok: spec, input and 20 of 20 requests match" in out
    assert "differs: input:" in out and "input.csv" in out
    assert "differs: requests: 1 of 20 units render to another request now: r003" in out
    assert len(emulator.ledger) == sent  # verify sends nothing


def test_verify_lists_a_changed_spec_setting(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job, output = finished_job(tmp_path)
    set_parameter(job, "max_tokens", 300)
    capsys.readouterr()
    assert main(["verify", str(output)]) == 1
    out = capsys.readouterr().out
    assert "differs: spec:" in out and "parameters.max_tokens" in out
    assert "differs: requests: 20 of 20 units" in out


def test_verify_without_a_manifest_is_exit_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "old.parquet"
    pl.DataFrame({"id": ["a"], "output_text": ["x"]}).write_parquet(output)
    assert main(["verify", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "old.parquet.manifest.json" in err and "\n" not in err


def test_diff_of_a_missing_output_is_exit_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'a.parquet'}: no such output file; name the Parquet file a qwen-batch run wrote"


def test_verify_resend_counts_identical_answers(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job, output = finished_job(tmp_path)
    before = len(billable(emulator))
    capsys.readouterr()
    assert main(["verify", str(output), "--resend", "3"]) == 0
    assert "resend: 3 of 3 answers identical" in capsys.readouterr().out
    assert len(billable(emulator)) == before + 3


def test_diff_of_two_identical_emulator_runs_exits_0_with_zero_changed_outputs(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = run_twice(sentences_job(tmp_path, TEXTS), "--no-cache")
    assert len(billable(emulator)) == 2 * len(TEXTS)  # the second run really sent
    code, report = diff_json(a, b, capsys)
    assert code == 0
    assert report["verdict"] == "identical configuration"
    counts = report["counts"]
    assert counts["changed_output"] == 0 and counts["identical_output"] == len(TEXTS)
    assert counts["only_in_a"] == 0 and counts["only_in_b"] == 0
    assert report["deltas"]["output_tokens"]["delta"]["sum"] == 0
    assert main(["diff", str(a), str(b)]) == 0
    assert "changed_output: 0" in capsys.readouterr().out


def test_diff_after_changing_the_temperature_is_comparable_lists_it_and_exits_1(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = sentences_job(tmp_path, TEXTS)
    a, b = run_twice(job, between=lambda: set_parameter(job, "temperature", 0.7))
    texts_a = pl.read_parquet(a)["output_text"]
    texts_b = pl.read_parquet(b)["output_text"]
    changed = int((texts_a != texts_b).sum())
    assert changed > 0  # the emulator answers another request with another text
    code, report = diff_json(a, b, capsys)
    assert code == 1
    assert report["verdict"] == "comparable"
    assert "parameters.temperature" in report["differing_settings"]
    assert report["counts"]["changed_output"] == changed
    assert report["counts"]["identical_output"] == len(TEXTS) - changed
    html = tmp_path / "diff.html"
    assert main(["diff", str(a), str(b), "--html", str(html)]) == 1
    text = capsys.readouterr().out
    assert "verdict: comparable" in text and "  parameters.temperature" in text
    assert f"changed_output: {changed}" in text
    assert "parameters.temperature" in html.read_text(encoding="utf-8")


def test_diff_of_runs_over_another_input_is_not_comparable_exit_2(
    tmp_path: Path, job_env: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    a, b = first / "out" / "a.parquet", second / "out" / "b.parquet"
    assert run_job(sentences_job(first, TEXTS), a) == 0
    assert run_job(sentences_job(second, TEXTS[:-1]), b) == 0
    code, report = diff_json(a, b, capsys)
    assert code == 2
    assert report["verdict"] == "not comparable"
    assert any("another input" in reason for reason in report["not_comparable_because"])


def test_diff_score_column_missing_is_exit_2(
    tmp_path: Path, job_env: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    job = sentences_job(tmp_path, TEXTS)
    a, b = run_twice(job)
    capsys.readouterr()
    assert main(["diff", str(a), str(b), "--score", "correct"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "'correct'" in err and "a.parquet" in err


SWEEP = {"model": ["qwen-turbo", "qwen-plus"], "parameters": {"temperature": [0.0, 0.7]}}


def test_a_sweep_is_recorded_verified_and_diffed_unit_by_unit(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """2 models x 2 temperatures x 3 samples over 20 rows: 240 units in the manifest, verify and diff."""
    a, b = run_twice(sentences_job(tmp_path, TEXTS, samples=3, sweep=SWEEP), "--no-cache")
    manifest = manifest_of(a)
    assert manifest["units_per_row"] == 12 and manifest["samples"] == 3
    assert [v["id"] for v in manifest["variants"]] == [
        "model=qwen-turbo,temperature=0.0", "model=qwen-turbo,temperature=0.7",
        "model=qwen-plus,temperature=0.0", "model=qwen-plus,temperature=0.7",
    ]
    assert {v["model"] for v in manifest["variants"]} == set(manifest["catalog"]) == {"qwen-turbo", "qwen-plus"}
    code, report = diff_json(a, b, capsys)
    assert code == 0 and report["verdict"] == "identical configuration"
    assert report["counts"]["identical_output"] == 240 and report["counts"]["same_request"] == 240
    out = verify_before_and_after_a_cell_changes(a, tmp_path / "input.csv", capsys)
    assert "240 of 240 requests match" in out
    first_two = "r003 (model=qwen-turbo,temperature=0.0, sample 0), r003 (model=qwen-turbo,temperature=0.0, sample 1)"
    assert f"differs: requests: 12 of 240 units render to another request now: {first_two}," in out


def test_the_manifest_lists_the_units_a_redo_sent_again(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job, output = finished_job(tmp_path, parameters={"seed": 7, "max_tokens": 8})
    truncated = set(pl.read_parquet(output).filter(pl.col("finish_reason") == "length")["id"])
    assert truncated  # the emulator's filler runs past 8 tokens on some rows
    assert manifest_of(output)["redone"] == []
    set_parameter(job, "max_tokens", 400)
    assert run_job(job, output, "--redo", "finish_reason = 'length'") == 0
    [record] = manifest_of(output)["redone"]
    assert record["where"] == "finish_reason = 'length'"
    assert {unit["row_id"] for unit in record["units"]} == truncated
    assert manifest_of(output)["spec"]["parameters"]["max_tokens"] == 400
