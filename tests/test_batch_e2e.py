"""Batch mode end to end: the real CLI over loopback against the emulator's Batch API.

Each job makes several files (a small ``batch.max_requests_per_file``). The emulator's ledger
is the judge of money: a billed batch line is ``endpoint == "batch"`` and ``billable``; the
account's batches, listed through the Batch API itself, say how many were created per
``ds_name``. The kill tests run the CLI as a process that SIGKILLs itself at a named step
(``QWEN_BATCH_KILL_AT``) and rerun it against the same emulator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from qwen_batch.cli import main
from qwen_batch.diff import diff_outputs
from qwen_batch.emulator import EmulatorConfig
from qwen_batch.testing import EmulatorThread

from .conftest import read_summary, sentences_job
from .refusal import refused

FAST = {"batch_validating_s": 0.02, "batch_finalizing_s": 0.02, "batch_line_s": 0.001}
VOLATILE = ["request_id", "latency_s", "attempts", "first_token_s", "cost"]
ROWS = 10
PER_FILE = 3  # 10 rows: 4 files


def _texts(count: int, **special: str) -> list[str]:
    return [special.get(str(i), f"sentence number {i} about rivers") for i in range(count)]


def _batch_job(folder: Path, texts: list[str], **overrides: Any) -> Path:
    batch = {"max_requests_per_file": PER_FILE, "poll_interval_s": 0.05, **overrides.pop("batch", {})}
    execution = {"mode": "batch", "max_retries": 3, **overrides.pop("execution", {})}
    return sentences_job(folder, texts, batch=batch, execution=execution, cache={"enabled": False}, **overrides)


@pytest.fixture
def emulator(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The emulator on a fast batch time scale (conftest's ``job_env`` points runs at it);
    a test changes it with ``@pytest.mark.parametrize("emulator", [{...}], indirect=True)``."""
    options = {**FAST, **getattr(request, "param", {})}
    with EmulatorThread(EmulatorConfig(**options)) as emu:
        yield emu


def _billed(emu: Any) -> Counter[str]:
    """Billed batch lines per custom_id."""
    return Counter(e["custom_id"] for e in emu.ledger if e["endpoint"] == "batch" and e.get("billable"))


def _creates(emu: Any) -> int:
    return sum(1 for e in emu.ledger if e["endpoint"] == "batches" and e.get("action") == "create")


def _uploads(emu: Any) -> int:
    return sum(1 for e in emu.ledger if e["endpoint"] == "files" and e.get("action") == "upload")


def _batches_by_name(emu: Any) -> Counter[str]:
    """How many batches the account holds per ``metadata.ds_name``, read through the Batch API."""
    names: Counter[str] = Counter()
    params: dict[str, Any] = {"limit": 100}
    with httpx.Client(base_url=emu.compatible_base_url, headers={"Authorization": f"Bearer {emu.api_key}"}) as client:
        while True:
            page = client.get("/batches", params=params).json()
            names.update(batch["metadata"]["ds_name"] for batch in page["data"])
            if not page["has_more"]:
                return names
            params["after"] = page["last_id"]


def _output(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(folder / "out" / "result.parquet")


def test_a_job_of_several_files_answers_every_row_once_at_half_price_as_online_would(
    tmp_path: Path, job_env: dict[str, str], emulator: Any
) -> None:
    online_folder, folder = tmp_path / "online", tmp_path / "batch"
    online_folder.mkdir()
    folder.mkdir()
    online_job = sentences_job(online_folder, _texts(ROWS), cache={"enabled": False})
    assert main(["run", str(online_job), "--quiet"]) == 0
    online_lines = len(emulator.ledger)
    job = _batch_job(folder, _texts(ROWS))
    assert main(["run", str(job), "--quiet"]) == 0
    online, batch = _output(online_folder), _output(folder)
    assert batch.columns == online.columns
    assert batch["id"].to_list() == [f"r{i:03d}" for i in range(ROWS)]  # input order
    assert_frame_equal(batch.drop(VOLATILE), online.drop(VOLATILE))
    assert (batch["status"] == "ok").all() and (batch["attempts"] == 1).all()
    assert batch["cost"].to_list() == pytest.approx([cost / 2 for cost in online["cost"].to_list()])
    billed = _billed(emulator)
    assert sorted(billed) == sorted(str(i) for i in range(ROWS)) and set(billed.values()) == {1}
    assert _creates(emulator) == 4
    assert sorted(_batches_by_name(emulator).values()) == [1, 1, 1, 1]
    assert {e["endpoint"] for e in emulator.ledger[online_lines:]} == {"batch", "files", "batches"}  # nothing online
    summary = read_summary(folder / "out" / "result.parquet")
    assert summary["rows"]["ok"] == ROWS
    assert summary["cost"]["price_source"].startswith("billed as batch")
    assert summary["cost"]["total"] == pytest.approx(read_summary(online_folder / "out" / "result.parquet")["cost"]["total"] / 2)


def test_a_sweep_with_samples_in_batch_mode_answers_every_unit_once_as_online_would(
    tmp_path: Path, job_env: dict[str, str], emulator: Any
) -> None:
    """Two models x 2 samples over 4 rows: 16 units, one model per file, each unit's custom_id
    ``row.variant.sample`` read back to its own output row, each model at its own batch price."""
    rows, sweep = 4, {"model": ["qwen-turbo", "qwen-plus"]}
    online_folder, folder = tmp_path / "online", tmp_path / "batch"
    online_folder.mkdir()
    folder.mkdir()
    online_job = sentences_job(online_folder, _texts(rows), cache={"enabled": False}, samples=2, sweep=sweep)
    assert main(["run", str(online_job), "--quiet"]) == 0
    job = _batch_job(folder, _texts(rows), samples=2, sweep=sweep)
    assert main(["run", str(job), "--quiet"]) == 0
    online, batch = _output(online_folder), _output(folder)
    assert batch.height == rows * 2 * 2
    assert_frame_equal(batch.drop(VOLATILE), online.drop(VOLATILE))
    assert batch["sample"].to_list()[:4] == [0, 1, 0, 1]
    assert batch["model"].to_list()[:4] == ["qwen-turbo", "qwen-turbo", "qwen-plus", "qwen-plus"]
    assert batch["cost"].to_list() == pytest.approx([cost / 2 for cost in online["cost"].to_list()])
    billed = _billed(emulator)
    expected = {str(r) if (v, s) == (0, 0) else f"{r}.{v}.{s}" for r in range(rows) for v in range(2) for s in range(2)}
    assert set(billed) == expected and set(billed.values()) == {1}
    # The emulator refuses a line whose model is not its file's (mismatched_model): one model per
    # file, 8 units each, 3 lines a file.
    assert _creates(emulator) == 6
    summary = read_summary(folder / "out" / "result.parquet")
    assert summary["rows"]["ok"] == rows * 4
    assert set(summary["by_variant"]) == {"model=qwen-turbo", "model=qwen-plus"}
    manifest = json.loads((folder / "out" / "result.parquet.manifest.json").read_text(encoding="utf-8"))
    online_manifest = json.loads((online_folder / "out" / "result.parquet.manifest.json").read_text(encoding="utf-8"))
    assert manifest["service"]["mode"] == "batch" and online_manifest["service"]["mode"] == "online"
    assert manifest["service"]["base_url"].endswith("/compatible-mode/v1")
    for model in ("qwen-turbo", "qwen-plus"):
        assert manifest["catalog"][model]["price_used"]["source"].startswith("billed as batch")
    compared = diff_outputs(online_folder / "out" / "result.parquet", folder / "out" / "result.parquet")
    assert compared["verdict"] == "comparable" and "service.mode" in compared["differing_settings"]
    assert compared["counts"]["identical_output"] == rows * 4


def _start(job: Path, env: dict[str, str], *extra: str, kill_at: str | None = None) -> subprocess.Popen[str]:
    full = {**os.environ, **env}
    full.pop("QWEN_BATCH_KILL_AT", None)
    if kill_at is not None:
        full["QWEN_BATCH_KILL_AT"] = kill_at
    return subprocess.Popen(
        [sys.executable, "-m", "qwen_batch", "run", str(job), "--quiet", *extra],
        env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.parametrize("step", ["after_upload", "after_create", "polling", "downloading", "before_output"])
def test_a_kill_at_any_step_then_a_rerun_creates_no_batch_twice_and_bills_no_row_twice(
    tmp_path: Path, job_env: dict[str, str], emulator: Any, step: str
) -> None:
    job = _batch_job(tmp_path, _texts(ROWS))
    killed = _start(job, job_env, kill_at=step)
    assert killed.wait(timeout=60) == -9, killed.communicate()
    assert not (tmp_path / "out" / "result.parquet").exists()
    rerun = _start(job, job_env)
    assert rerun.wait(timeout=60) == 0, rerun.communicate()
    by_name = _batches_by_name(emulator)
    assert len(by_name) == 4 and set(by_name.values()) == {1}
    assert _creates(emulator) == 4
    if step == "after_upload":  # the saved file is reused, not uploaded again
        assert _uploads(emulator) == 4
    billed = _billed(emulator)
    assert len(billed) == ROWS and set(billed.values()) == {1}
    output = _output(tmp_path)
    assert output["id"].to_list() == [f"r{i:03d}" for i in range(ROWS)]
    assert (output["status"] == "ok").all()
    assert read_summary(tmp_path / "out" / "result.parquet")["rows"]["ok"] == ROWS


def test_line_errors_are_sent_again_until_they_pass_and_refusals_are_row_errors(
    tmp_path: Path, job_env: dict[str, str], emulator: Any
) -> None:
    texts = _texts(
        ROWS,
        **{
            "1": "flaky once [[emu: batch_line_error]]",
            "4": "flaky twice [[emu: batch_line_error=2]]",
            "6": "never passes [[emu: batch_line_error=always]]",
            "8": "refused [[emu: always=DataInspectionFailed]]",
        },
    )
    job = _batch_job(tmp_path, texts, execution={"max_retries": 2})
    assert main(["run", str(job), "--quiet"]) == 1
    output = _output(tmp_path).select("id", "status", "error_code", "attempts")
    rows = {row["id"]: row for row in output.iter_rows(named=True)}
    assert rows["r001"]["status"] == "ok" and rows["r001"]["attempts"] == 2
    assert rows["r004"]["status"] == "ok" and rows["r004"]["attempts"] == 3
    assert rows["r006"]["status"] == "error" and rows["r006"]["error_code"] == "internal_error"
    assert rows["r006"]["attempts"] == 3  # the first batch and max_retries more
    assert rows["r008"]["status"] == "error" and rows["r008"]["error_code"] == "data_inspection_failed"
    assert rows["r008"]["attempts"] == 1  # a refusal is not sent again
    assert sum(row["status"] == "ok" for row in rows.values()) == ROWS - 2
    billed = _billed(emulator)
    assert set(billed.values()) == {1} and len(billed) == ROWS - 2
    summary = read_summary(tmp_path / "out" / "result.parquet")
    assert summary["rows"] == {**summary["rows"], "ok": ROWS - 2, "error": 2, "not_done": 0}


@pytest.mark.parametrize("emulator", [{"batch_expire_after_lines": 2}], indirect=True)
def test_rows_of_an_expired_batch_end_ok_in_a_new_one_counted_once(
    tmp_path: Path, job_env: dict[str, str], emulator: Any
) -> None:
    job = _batch_job(tmp_path, _texts(ROWS))
    assert main(["run", str(job), "--quiet"]) == 0
    output = _output(tmp_path)
    assert (output["status"] == "ok").all() and output.height == ROWS
    # Lines run in order and a batch expires after 2: r002, r005, r008 expire in the first files;
    # sent again together, r008 is a third line again and expires once more.
    attempts = dict(zip(output["id"].to_list(), output["attempts"].to_list()))
    assert {row: count for row, count in attempts.items() if count > 1} == {"r002": 2, "r005": 2, "r008": 3}
    billed = _billed(emulator)
    assert len(billed) == ROWS and set(billed.values()) == {1}
    assert read_summary(tmp_path / "out" / "result.parquet")["rows"]["ok"] == ROWS


def _wait_for(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("emulator", [{"batch_line_s": 0.5}], indirect=True)
def test_no_wait_exits_75_cancel_keeps_answered_rows_and_a_rerun_collects_the_rest(
    tmp_path: Path, job_env: dict[str, str], emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _batch_job(tmp_path, _texts(6), batch={"max_requests_per_file": 6})
    assert main(["run", str(job), "--no-wait"]) == 75
    err = capsys.readouterr().err
    assert "submitted, not finished: run the same command again to collect" in err
    assert not (tmp_path / "out" / "result.parquet").exists()
    _wait_for(lambda: len(_billed(emulator)) >= 1)  # 6 lines take 3 s: the cancel comes well before the end
    assert main(["cancel", str(job)]) == 0
    assert "cancelling" in capsys.readouterr().out
    assert main(["status", str(job)]) == 0
    status = capsys.readouterr().out
    assert "s00001 batch_" in status and "deadline" in status
    answered_before = set(_billed(emulator))
    assert 1 <= len(answered_before) < 6
    assert main(["run", str(job), "--quiet"]) == 0
    output = _output(tmp_path)
    assert (output["status"] == "ok").all()
    attempts = dict(zip(output["id"].to_list(), output["attempts"].to_list()))
    assert {attempts[f"r{int(c):03d}"] for c in answered_before} == {1}  # kept, not sent again
    billed = _billed(emulator)
    assert len(billed) == 6 and set(billed.values()) == {1}
    assert _creates(emulator) == 2


def _files(folder: Path) -> dict[Path, bytes]:
    """Every file's bytes, less SQLite's own -wal/-shm companions (a reader creates them)."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


@pytest.mark.parametrize("emulator", [{"batch_line_s": 0.5}], indirect=True)
def test_fresh_refuses_while_a_batch_may_still_bill_and_starts_over_once_it_is_cancelled(
    tmp_path: Path, job_env: dict[str, str], emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _batch_job(tmp_path, _texts(6), batch={"max_requests_per_file": 6})
    assert main(["run", str(job), "--no-wait"]) == 75
    checkpoint = tmp_path / "out" / "result.parquet.checkpoint"
    before = _files(checkpoint)
    capsys.readouterr()
    assert main(["run", str(job), "--fresh", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fresh would leave 1 batch(es)" in err[0] and "qwen-batch cancel" in err[0]
    assert _files(checkpoint) == before  # nothing moved aside or rewritten
    assert _creates(emulator) == 1
    assert main(["cancel", str(job)]) == 0
    assert main(["run", str(job), "--fresh", "--quiet"]) == 0
    assert (_output(tmp_path)["status"] == "ok").all()
    assert list(tmp_path.glob("out/result.parquet.old-*"))  # the old run set aside, not deleted


@pytest.mark.parametrize("emulator", [{"batch_line_s": 0.3}], indirect=True)
def test_a_second_no_wait_run_exits_75_again_then_a_waiting_run_collects(
    tmp_path: Path, job_env: dict[str, str], emulator: Any
) -> None:
    job = _batch_job(tmp_path, _texts(ROWS))
    assert main(["run", str(job), "--no-wait", "--quiet"]) == 75
    assert main(["run", str(job), "--no-wait", "--quiet"]) in (0, 75)
    assert main(["run", str(job), "--quiet"]) == 0
    assert _creates(emulator) == 4
    billed = _billed(emulator)
    assert len(billed) == ROWS and set(billed.values()) == {1}
    assert (_output(tmp_path)["status"] == "ok").all()


@pytest.mark.parametrize("emulator", [{"batch_line_s": 0.25}], indirect=True)
def test_rows_unanswered_after_online_after_are_cancelled_and_sent_online_once(
    tmp_path: Path, job_env: dict[str, str], emulator: Any
) -> None:
    # 12 lines take 3 s; created_at is in whole seconds, so the cancel comes 1 to 2 s in.
    job = _batch_job(tmp_path, _texts(12), batch={"max_requests_per_file": 12, "online_after": "2s"})
    assert main(["run", str(job), "--quiet"]) == 0
    output = _output(tmp_path)
    assert (output["status"] == "ok").all() and output.height == 12
    in_batch = _billed(emulator)
    online = [e for e in emulator.ledger if e["endpoint"] == "native" and e["status"] == 200]
    assert 1 <= len(in_batch) < 12 and len(online) == 12 - len(in_batch)
    assert set(in_batch.values()) == {1}
    assert _creates(emulator) == 1  # the rest went online, not into a new batch
    assert any(e["endpoint"] == "batches" and e.get("action") == "cancel" for e in emulator.ledger)
    # qwen-turbo has one flat price per token: a batch row costs half of it, an online row all of it.
    per_1k = output.select("id", (pl.col("cost") / pl.col("total_tokens") * 1000).alias("per_1k"))
    batch_rows = {f"r{int(c):03d}" for c in in_batch}
    for row, price in per_1k.iter_rows():
        assert price == pytest.approx(0.004 if row in batch_rows else 0.008)


def test_a_row_whose_line_is_too_long_is_its_error_before_anything_is_sent(
    tmp_path: Path, job_env: dict[str, str], emulator: Any
) -> None:
    job = _batch_job(tmp_path, _texts(4, **{"2": "long " * 200}), batch={"max_line_bytes": 600})
    assert main(["run", str(job), "--quiet"]) == 1
    output = _output(tmp_path)
    assert output.filter(pl.col("id") == "r002")["error_code"].to_list() == ["BatchLineTooLarge"]
    assert (output.filter(pl.col("id") != "r002")["status"] == "ok").all()
    assert "2" not in _billed(emulator) and len(_billed(emulator)) == 3


def test_dry_run_sends_the_jobs_lines_to_the_test_model_and_writes_nothing(
    tmp_path: Path, job_env: dict[str, str], emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _batch_job(tmp_path, _texts(ROWS))
    assert main(["run", str(job), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{ROWS} line(s) sent to batch-test-model, {ROWS} answered" in out
    lines = [e for e in emulator.ledger if e["endpoint"] == "batch"]
    assert len(lines) == ROWS and {e["model"] for e in lines} == {"batch-test-model"}
    assert not any(e.get("billable") for e in lines)
    assert not (tmp_path / "out").exists()


def test_cancel_and_status_of_a_job_that_never_ran_in_batch_mode_send_nothing(
    tmp_path: Path, job_env: dict[str, str], emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _batch_job(tmp_path, _texts(2))
    assert main(["cancel", str(job)]) == 0
    assert "no batches" in capsys.readouterr().out
    assert main(["run", str(job), "--mode", "online", "--quiet"]) == 0
    sent = len(emulator.ledger)
    assert main(["cancel", str(job)]) == 0
    assert main(["status", str(job)]) == 0
    out = capsys.readouterr().out
    assert "no batches" in out and "batches:" not in out
    assert len(emulator.ledger) == sent
    assert not (tmp_path / "out" / "result.parquet.checkpoint" / "batch.sqlite").exists()


@pytest.mark.parametrize(
    ("batch", "key"),
    [
        ({"completion_window": "12h"}, "batch.completion_window"),
        ({"completion_window": "15d"}, "batch.completion_window"),
        ({"completion_window": "1.5d"}, "batch.completion_window"),
        ({"max_requests_per_file": 50_001}, "batch.max_requests_per_file"),
        ({"max_file_bytes": 0}, "batch.max_file_bytes"),
        ({"max_line_bytes": 7_000_000}, "batch.max_line_bytes"),
        ({"poll_interval_s": 0}, "batch.poll_interval_s"),
        ({"online_after": "soon"}, "batch.online_after"),
        ({"base_url": "http://example.com/compatible-mode/v1"}, "batch.base_url"),
        ({"max_lines": 5}, "batch: unknown key 'max_lines'"),
    ],
)
def test_bad_batch_values_exit_2_naming_the_key_with_nothing_sent(
    tmp_path: Path, job_env: dict[str, str], emulator: Any, capsys: pytest.CaptureFixture[str], batch: dict, key: str
) -> None:
    job = sentences_job(tmp_path, _texts(2), execution={"mode": "batch"}, batch=batch)
    line = refused(["run", str(job)], tmp_path, emulator, capsys)
    assert key in line


def test_no_wait_and_dry_run_need_batch_mode(
    tmp_path: Path, job_env: dict[str, str], emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = sentences_job(tmp_path, _texts(2))
    for flag in ("--no-wait", "--dry-run"):
        line = refused(["run", str(job), flag], tmp_path, emulator, capsys)
        assert flag in line and "--mode batch" in line


def test_mode_batch_on_the_command_line_overrides_an_online_spec(
    tmp_path: Path, job_env: dict[str, str], emulator: Any
) -> None:
    job = sentences_job(tmp_path, _texts(3), batch={"poll_interval_s": 0.05}, cache={"enabled": False})
    assert main(["run", str(job), "--mode", "batch", "--quiet"]) == 0
    assert len(_billed(emulator)) == 3
    assert not any(e["endpoint"] == "native" for e in emulator.ledger)


def test_estimate_shows_the_online_and_the_batch_cost_side_by_side(
    tmp_path: Path, job_env: dict[str, str], emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _batch_job(tmp_path, _texts(ROWS))
    assert main(["estimate", str(job), "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)["cost"]
    for key in ("min", "expected", "max"):
        assert cost[key] > 0 and cost["batch"][key] == pytest.approx(cost[key] / 2, abs=1e-6)
    assert "50%" in cost["batch"]["source"]
    assert main(["estimate", str(job)]) == 0
    assert "cost in batch mode" in capsys.readouterr().out
    assert emulator.ledger == []


def test_the_sample_batch_job_runs_on_the_emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
    job = Path(__file__).resolve().parent.parent / "jobs" / "nightly-batch.yaml"
    output = tmp_path / "out.parquet"
    assert main(["run", str(job), "--emulate", "--quiet", "--output", str(output)]) == 0
    result = pl.read_parquet(output)
    assert result.height > 0 and (result["status"] == "ok").all()
    assert read_summary(output)["cost"]["price_source"].startswith("billed as batch")
    # The run report says the run was batch, and its rows match the output.
    assert main(["report", str(output), "--json"]) == 0
    header = json.loads(output.with_name(output.name + ".report.json").read_text(encoding="utf-8"))["header"]
    assert header["mode"] == "batch" and header["rows"]["ok"] == result.height


@pytest.mark.parametrize("emulator", [{"batch_line_s": 0.3}], indirect=True)
def test_polling_waits_at_least_poll_interval_between_looks(tmp_path: Path, job_env: dict[str, str], emulator: Any) -> None:
    job = _batch_job(tmp_path, _texts(5), batch={"max_requests_per_file": 5, "poll_interval_s": 0.1})
    assert main(["run", str(job), "--quiet"]) == 0
    looks = [e["time"] for e in emulator.ledger if e["endpoint"] == "batches" and e.get("action") == "retrieve"]
    span = looks[-1] - looks[0]
    assert span >= 1.5  # five lines of 0.3 s
    gaps = [later - earlier for earlier, later in zip(looks, looks[1:])]
    assert min(gaps) >= 0.09  # never sooner than poll_interval_s after the last look, even after a change
    assert max(gaps) <= 0.4 + 0.3  # backed off at most to 4 x poll_interval_s (and one call's time)


def test_a_refused_key_stops_batch_mode_with_exit_3_and_never_shows_the_key(
    tmp_path: Path, job_env: dict[str, str], emulator: Any, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    wrong = "sk-wrong-key-0123456789abcdef"
    monkeypatch.setenv("DASHSCOPE_API_KEY", wrong)
    job = _batch_job(tmp_path, _texts(3))
    assert main(["run", str(job)]) == 3
    captured = capsys.readouterr()
    assert "API key was refused" in captured.err
    assert wrong not in captured.err + captured.out
    assert _creates(emulator) == 0 and not _billed(emulator)
