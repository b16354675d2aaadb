"""Evaluation runs end to end (issue 17, the run side): samples, sweeps and ``run --redo``.

Every test runs the real CLI over loopback against the emulator, which answers each request
the same way every time, and reads the emulator's ledger to count what was sent.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

from qwen_batch.checkpoint import Checkpoint
from qwen_batch.cli import main
from qwen_batch.emulator import EmulatorConfig
from qwen_batch.redo import REDO_FILE, read_redo_log
from qwen_batch.testing import EmulatorThread

from .conftest import read_summary, run_subprocess, sentences_job
from .test_resume_e2e import _start, _wait_for_billed

ROWS = 20
MODELS = ["qwen-plus", "qwen3.5-flash"]
TEMPERATURES = [0.0, 0.7]
SAMPLES = 3
SEED = 7
SWEEP = {"model": MODELS, "parameters": {"temperature": TEMPERATURES}}
VARIANTS = [f"model={m},temperature={t}" for m in MODELS for t in TEMPERATURES]


def _texts(n: int) -> list[str]:
    return [f"question {i}: what is {i} + {i}?" for i in range(n)]


def _sweep_job(folder: Path, **overrides: Any) -> Path:
    return sentences_job(folder, _texts(ROWS), samples=SAMPLES, sweep=SWEEP, **overrides)


def _billed(emulator: Any) -> list[dict[str, Any]]:
    return [entry for entry in emulator.ledger if entry["status"] == 200]


def _output(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(folder / "out" / "result.parquet")


def test_a_sweep_of_two_models_two_temperatures_and_three_samples_gives_240_rows_in_order(
    tmp_path: Path, job_env: dict, emulator: Any
) -> None:
    job = _sweep_job(tmp_path)
    assert main(["run", str(job), "--quiet"]) == 0
    output = _output(tmp_path)
    assert output.height == ROWS * len(VARIANTS) * SAMPLES == 240
    expected = [
        (f"r{row:03d}", variant, sample, variant.split(",")[0].removeprefix("model="), SEED + sample)
        for row in range(ROWS)
        for variant in VARIANTS
        for sample in range(SAMPLES)
    ]
    assert list(output.select("id", "variant", "sample", "model", "seed").iter_rows()) == expected
    assert output["status"].to_list() == ["ok"] * 240
    # 240 different requests, each sent once: the cache never answered one sample with another's reply.
    billed = _billed(emulator)
    assert len(billed) == 240
    assert len({entry["body_sha256"] for entry in billed}) == 240
    assert output["request_sha256"].n_unique() == 240
    assert output["request_sha256"].str.contains(r"^[0-9a-f]{64}$").all()
    sent = sorted((entry["model"], entry["seed"]) for entry in billed)
    assert sent == sorted((m, SEED + s) for _ in range(ROWS) for m in MODELS for _t in TEMPERATURES for s in range(SAMPLES))


def test_the_summary_breaks_rows_tokens_and_cost_down_by_variant_and_model(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = sentences_job(tmp_path, _texts(5), samples=2, sweep={"model": ["qwen-plus", "qwen-turbo"]})
    assert main(["run", str(job), "--quiet"]) == 0
    summary = read_summary(tmp_path / "out" / "result.parquet")
    output = _output(tmp_path)
    assert summary["rows"]["total"] == 20
    assert list(summary["by_variant"]) == ["model=qwen-plus", "model=qwen-turbo"]
    for variant, entry in summary["by_variant"].items():
        rows = output.filter(pl.col("variant") == variant)
        assert entry["model"] == variant.removeprefix("model=")
        assert entry["rows"] == {"total": 10, "ok": 10, "error": 0}
        assert entry["tokens"] == {"input": rows["input_tokens"].sum(), "output": rows["output_tokens"].sum()}
        assert entry["cost"] == pytest.approx(rows["cost"].sum())
    by_model = output.group_by("model").agg(pl.col("cost").sum())
    assert summary["cost"]["by_model"] == pytest.approx(dict(by_model.iter_rows()))
    # Each model at its own price: the same tokens cost more on qwen-plus.
    assert summary["cost"]["by_model"]["qwen-plus"] > summary["cost"]["by_model"]["qwen-turbo"]
    # Started over, every unit is answered from the cache: the saving is each model's own cost.
    assert main(["run", str(job), "--fresh"]) == 0
    shown = capsys.readouterr().out
    assert "qwen-plus, qwen-turbo" in shown
    assert all(f"{variant} " in shown and "10 ok, 0 error of 10" in shown for variant in summary["by_variant"])
    again = read_summary(tmp_path / "out" / "result.parquet")
    assert again["cache"]["hits"] == 20
    assert again["cache"]["saved_cost"] == pytest.approx(summary["cost"]["total"])


def test_samples_without_a_sweep_have_an_empty_variant_and_consecutive_seeds(
    tmp_path: Path, job_env: dict, emulator: Any
) -> None:
    job = sentences_job(tmp_path, _texts(3), samples=2)
    assert main(["run", str(job), "--quiet"]) == 0
    output = _output(tmp_path)
    assert list(output.select("id", "variant", "sample", "seed").iter_rows()) == [
        (f"r{row:03d}", "", sample, SEED + sample) for row in range(3) for sample in range(2)
    ]
    assert len(_billed(emulator)) == 6


def test_a_sweep_killed_with_sigkill_resumes_without_sending_a_finished_unit_again(tmp_path: Path) -> None:
    reference_folder, killed_folder = tmp_path / "reference", tmp_path / "killed"
    reference_folder.mkdir()
    killed_folder.mkdir()
    with EmulatorThread(EmulatorConfig(latency_s=0.002)) as emu:
        env = {"DASHSCOPE_API_KEY": emu.api_key, "DASHSCOPE_HTTP_BASE_URL": emu.base_url}
        reference = run_subprocess(
            ["run", str(_sweep_job(reference_folder)), "--quiet"],
            {**env, "QWEN_BATCH_CACHE_DIR": str(tmp_path / "cache-reference")},
        )
        assert reference.returncode == 0, reference.stderr
    with EmulatorThread(EmulatorConfig(latency_s=0.002)) as emu:
        env = {
            "DASHSCOPE_API_KEY": emu.api_key,
            "DASHSCOPE_HTTP_BASE_URL": emu.base_url,
            "QWEN_BATCH_CACHE_DIR": str(tmp_path / "cache-killed"),
        }
        job = _sweep_job(killed_folder)
        process = _start(job, env)
        _wait_for_billed(emu, 100, process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        checkpoint = Checkpoint.open_readonly(killed_folder / "out" / "result.parquet.checkpoint")
        finished = checkpoint.done_frame().filter(pl.col("status") == "ok").height
        checkpoint.close()
        assert 0 < finished < 240
        billed_before = len(_billed(emu))
        resumed = run_subprocess(["run", str(job), "--quiet"], env)
        assert resumed.returncode == 0, resumed.stderr
        # The resume sends exactly the units the checkpoint did not hold: none finished twice.
        assert len(_billed(emu)) - billed_before == 240 - finished
    # qwen3.5-flash streams (it thinks): first_token_s is a timing too.
    volatile = ["request_id", "latency_s", "attempts", "first_token_s"]
    assert_frame_equal(_output(killed_folder).drop(volatile), _output(reference_folder).drop(volatile))


def _truncating_job(folder: Path, max_tokens: int) -> Path:
    """Rows 0, 3, 6, 9 ask for a 300-token answer, the rest for 10 tokens."""
    texts = [f"row {i} [[emu: length={300 if i % 3 == 0 else 10}]]" for i in range(10)]
    return sentences_job(folder, texts, samples=2, parameters={"seed": SEED, "max_tokens": max_tokens})


def _raise_max_tokens(job: Path, max_tokens: int) -> None:
    spec = yaml.safe_load(job.read_text(encoding="utf-8"))
    spec["parameters"]["max_tokens"] = max_tokens
    job.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")


def test_redo_of_truncated_rows_after_raising_max_tokens_sends_exactly_those_rows(
    tmp_path: Path, job_env: dict, emulator: Any
) -> None:
    job = _truncating_job(tmp_path, max_tokens=100)
    assert main(["run", str(job), "--quiet"]) == 0
    before = _output(tmp_path)
    truncated = before.filter(pl.col("finish_reason") == "length")
    assert truncated.height == 8  # 4 rows x 2 samples
    _raise_max_tokens(job, 1000)
    sent_before = len(emulator.ledger)
    assert main(["run", str(job), "--quiet", "--redo", "finish_reason = 'length'"]) == 0
    redone = emulator.ledger[sent_before:]
    assert len(redone) == truncated.height
    after = _output(tmp_path)
    assert after.height == before.height
    assert after["finish_reason"].to_list() == ["stop"] * after.height
    # Every other row is kept as it was, down to its request id and its request's fingerprint.
    kept = pl.col("finish_reason") != "length"
    keys = ["id", "variant", "sample"]
    untouched = before.with_row_index().filter(kept)
    assert after.with_row_index().filter(pl.col("index").is_in(untouched["index"].to_list())).equals(untouched)
    changed = after.join(truncated.select(*keys, pl.col("request_sha256").alias("old")), on=keys)
    assert changed.height == 8 and (changed["request_sha256"] != changed["old"]).all()
    assert sorted(entry["seed"] for entry in redone) == sorted(truncated["seed"].to_list())
    # The checkpoint records what was redone under which spec (the run manifest lists it).
    (record,) = read_redo_log(tmp_path / "out" / "result.parquet.checkpoint")
    assert record["where"] == "finish_reason = 'length'"
    assert record["request_manifest"]["parameters"]["max_tokens"] == 1000
    assert sorted((u["row_id"], u["sample"]) for u in record["units"]) == sorted(
        truncated.select("id", "sample").iter_rows()
    )
    # The checkpoint now belongs to the new spec: a plain run resumes, sending nothing.
    sent_before = len(emulator.ledger)
    assert main(["run", str(job), "--quiet"]) == 0
    assert len(emulator.ledger) == sent_before


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted((folder / "out").rglob("*")) if p.is_file()}


def test_a_changed_spec_without_redo_still_refuses_and_sends_nothing(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _truncating_job(tmp_path, max_tokens=100)
    assert main(["run", str(job), "--quiet"]) == 0
    _raise_max_tokens(job, 1000)
    files, sent_before = _snapshot(tmp_path), len(emulator.ledger)
    capsys.readouterr()
    assert main(["run", str(job), "--quiet"]) == 2
    assert "parameters.max_tokens: 100 -> 1000" in capsys.readouterr().err
    assert len(emulator.ledger) == sent_before
    assert _snapshot(tmp_path) == files


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("finish_reason = = 'length'", "is not a filter over"),
        ("no_such_column = 1", "is not a filter over"),
    ],
)
def test_a_redo_filter_that_is_not_sql_over_the_output_is_exit_2_and_sends_nothing(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str], where: str, expected: str
) -> None:
    job = _truncating_job(tmp_path, max_tokens=100)
    assert main(["run", str(job), "--quiet"]) == 0
    files, sent_before = _snapshot(tmp_path), len(emulator.ledger)
    capsys.readouterr()
    assert main(["run", str(job), "--quiet", "--redo", where]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --redo: ") and expected in err and "finish_reason = 'length'" in err
    assert len(err.strip().splitlines()) == 1
    assert len(emulator.ledger) == sent_before
    assert _snapshot(tmp_path) == files
    assert not (tmp_path / "out" / "result.parquet.checkpoint" / REDO_FILE).exists()


def test_redo_without_an_earlier_run_is_exit_2(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _truncating_job(tmp_path, max_tokens=100)
    assert main(["run", str(job), "--quiet", "--redo", "status = 'error'"]) == 2
    assert "no earlier output of this job" in capsys.readouterr().err
    assert emulator.ledger == []


def test_a_sweep_value_its_parameter_refuses_is_exit_2_naming_the_variant(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = sentences_job(tmp_path, _texts(2), sweep={"parameters": {"temperature": [0.5, 2.5]}})
    assert main(["run", str(job), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "sweep" in err and "temperature=2.5" in err
    assert len(err.strip().splitlines()) == 1
    assert emulator.ledger == []
    assert not (tmp_path / "out").exists()


def test_jobs_eval_yaml_runs_its_sweep_and_samples_on_the_emulator(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    spec = yaml.safe_load((repo / "jobs" / "eval.yaml").read_text(encoding="utf-8"))
    assert spec["samples"] > 1 and spec["sweep"]
    env = {"QWEN_BATCH_CACHE_DIR": str(tmp_path / "cache")}
    done = run_subprocess(
        ["run", str(repo / "jobs" / "eval.yaml"), "--emulate", "--quiet", "--output", str(tmp_path / "eval.parquet")],
        env,
    )
    assert done.returncode == 0, done.stderr
    output = pl.read_parquet(tmp_path / "eval.parquet")
    inputs = pl.read_parquet(repo / "jobs" / spec["input"]["path"])
    variants = 1
    for values in [spec["sweep"].get("model", [None]), *spec["sweep"].get("parameters", {}).values()]:
        variants *= len(values)
    assert output.height == inputs.height * variants * spec["samples"]
    assert json.loads(json.dumps(output["status"].unique().to_list())) == ["ok"]
