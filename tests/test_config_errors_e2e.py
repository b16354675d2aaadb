"""A configuration error stops the run at the first requests that show it, as a refused key does.

The real CLI over loopback against the emulator: exit 3, one ``error:`` line naming what is
wrong and the fix, no more than ``concurrency`` requests sent (the emulator's ledger), the
rows not sent left not done in the checkpoint, and a re-run after the fix finishes them.
What the catalog can tell is refused before sending (exit 2, nothing sent).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from qwen_batch.catalog import builtin
from qwen_batch.checkpoint import Checkpoint
from qwen_batch.cli import main
from qwen_batch.emulator import EmulatorConfig
from qwen_batch.testing import EmulatorThread
from qwen_batch.wire import NATIVE_PATH

from .conftest import read_summary, run_subprocess, sentences_job

ROWS = 40
CONCURRENCY = 4
TEXTS = [f"row number {i}" for i in range(ROWS)]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def checkpoint_rows(output: Path) -> int:
    with Checkpoint.open_readonly(output.with_name(output.name + ".checkpoint")) as checkpoint:
        return checkpoint.done_frame().height


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_stopped_within_the_requests_in_flight(tmp_path: Path, emulator: Any) -> None:
    """At most ``concurrency`` requests went out, and none of their rows is recorded as done."""
    output = tmp_path / "out" / "result.parquet"
    assert 1 <= len(emulator.ledger) <= CONCURRENCY
    assert checkpoint_rows(output) == 0
    assert not output.exists()
    summary = read_summary(output)
    assert summary["stopped"] == "configuration"
    assert summary["rows"] == {"total": ROWS, "ok": 0, "error": 0, "not_done": ROWS, "truncated_in_thinking": 0}


def assert_a_rerun_finishes_every_row(tmp_path: Path, job: Path, emulator: Any) -> None:
    sent_before = len(emulator.ledger)
    assert main(["run", str(job), "--quiet"]) == 0
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["status"].to_list() == ["ok"] * ROWS
    new = emulator.ledger[sent_before:]
    assert len(new) == ROWS and {entry["status"] for entry in new} == {200}


def test_a_wrong_base_url_path_stops_with_exit_3_and_a_fixed_rerun_finishes(
    tmp_path: Path, job_env: dict, emulator: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL")
    wrong = emulator.root_url + "/wrong/path"
    job = sentences_job(tmp_path, TEXTS, api={"base_url": wrong}, execution={"concurrency": CONCURRENCY})
    assert main(["run", str(job), "--quiet"]) == 3
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert f"{wrong}{NATIVE_PATH} answered HTTP 404" in line
    assert f"api.base_url in {job}" in line and "https://dashscope.aliyuncs.com/api/v1" in line
    assert job_env["DASHSCOPE_API_KEY"] not in err
    assert {(entry["endpoint"], entry["status"]) for entry in emulator.ledger} == {("not-found", 404)}
    assert_stopped_within_the_requests_in_flight(tmp_path, emulator)

    sentences_job(tmp_path, TEXTS, api={"base_url": emulator.base_url}, execution={"concurrency": CONCURRENCY})
    assert_a_rerun_finishes_every_row(tmp_path, job, emulator)


def test_a_wrong_base_url_from_the_environment_is_named_as_such(
    tmp_path: Path, job_env: dict, emulator: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", emulator.root_url + "/compatible-mode/v1")
    job = sentences_job(tmp_path, TEXTS, execution={"concurrency": CONCURRENCY})
    assert main(["run", str(job), "--quiet"]) == 3
    (line,) = error_lines(capsys.readouterr().err)
    assert f"DASHSCOPE_HTTP_BASE_URL ({emulator.root_url}/compatible-mode/v1) looks wrong" in line
    assert_stopped_within_the_requests_in_flight(tmp_path, emulator)


def test_an_unknown_model_set_deliberately_stops_at_the_first_requests(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = sentences_job(tmp_path, TEXTS, model="qwen turbo", api={"allow_unknown_model": True},
                        execution={"concurrency": CONCURRENCY})
    assert main(["run", str(job), "--quiet"]) == 3
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(
        "error: the service does not know model 'qwen turbo' (HTTP 400 InvalidParameter: Model not exist.); "
        f"did you mean 'qwen-turbo'? Fix model: in {job}"
    )
    assert {(entry["status"], entry["code"]) for entry in emulator.ledger} == {(400, "InvalidParameter")}
    assert_stopped_within_the_requests_in_flight(tmp_path, emulator)

    # The fix changes the job; the checkpoint holds no row yet, so the fixed job takes it over.
    sentences_job(tmp_path, TEXTS, model="qwen-turbo", execution={"concurrency": CONCURRENCY})
    assert main(["status", str(job)]) == 0
    status = capsys.readouterr().out
    assert f"remaining: {ROWS}" in status and "the spec changed" not in status
    assert_a_rerun_finishes_every_row(tmp_path, job, emulator)


@pytest.mark.parametrize("command", ["validate", "run", "estimate"])
def test_an_unknown_model_is_refused_before_sending_with_a_suggestion(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    job = sentences_job(tmp_path, TEXTS, model="qwen turbo")
    before = folder_bytes(tmp_path)
    assert main([command, str(job)]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [
        f"error: {job}: model: 'qwen turbo' is not in the built-in catalog; did you mean 'qwen-turbo'? "
        f"Fix model: in {job}, or set api.allow_unknown_model: true if the service has this model and the "
        "catalog does not"
    ]
    assert emulator.ledger == []
    assert folder_bytes(tmp_path) == before


def test_the_sample_jobs_name_catalog_models() -> None:
    """The shipped jobs must pass the check without the deliberate key."""
    import yaml

    jobs = sorted((Path(__file__).resolve().parent.parent / "jobs").glob("*.yaml"))
    assert jobs
    for path in jobs:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert builtin().get(spec["model"]) is not None or spec.get("api", {}).get("allow_unknown_model"), path


@pytest.fixture
def strict_emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An emulator whose qwen-turbo allows 100 output and 40 input tokens: the service changed
    its limits and the built-in catalog (1500 / 6000) is stale."""
    turbo = builtin().get("qwen-turbo")
    assert turbo is not None
    changed = turbo.with_overrides(max_output_tokens=100, default_max_tokens=100, max_input_tokens=40)
    with EmulatorThread(EmulatorConfig(extra_models={"qwen-turbo": changed})) as emu:
        monkeypatch.setenv("DASHSCOPE_API_KEY", emu.api_key)
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", emu.base_url)
        monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
        monkeypatch.delenv("DASHSCOPE_API_KEY_FILE_PATH", raising=False)
        yield emu


def test_a_parameter_refused_for_every_request_stops_with_exit_3(
    tmp_path: Path, strict_emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = sentences_job(tmp_path, TEXTS, parameters={"seed": 7, "max_tokens": 200}, execution={"concurrency": CONCURRENCY})
    assert main(["run", str(job), "--quiet"]) == 3
    (line,) = error_lines(capsys.readouterr().err)
    assert "the service refuses parameters.max_tokens = 200 for model 'qwen-turbo' in every request" in line
    assert "Range of max_tokens should be [1, 100]" in line and f"fix parameters.max_tokens in {job}" in line
    assert_stopped_within_the_requests_in_flight(tmp_path, strict_emulator)

    sentences_job(tmp_path, TEXTS, parameters={"seed": 7, "max_tokens": 50}, execution={"concurrency": CONCURRENCY})
    assert_a_rerun_finishes_every_row(tmp_path, job, strict_emulator)


def test_a_row_specific_400_stays_that_rows_error_and_the_run_goes_on(tmp_path: Path, strict_emulator: Any) -> None:
    """Regression guard: the service's input-length refusal of one row is not a configuration error."""
    texts = [*TEXTS[:10], "a very long row " * 30, *TEXTS[10:20]]
    job = sentences_job(tmp_path, texts, parameters={"seed": 7, "max_tokens": 50}, execution={"concurrency": CONCURRENCY})
    assert main(["run", str(job), "--quiet"]) == 1
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["status"].to_list() == ["ok"] * 10 + ["error"] + ["ok"] * 10
    assert frame["error_code"][10] == "InvalidParameter"
    assert frame["error_message"][10] == "Range of input length should be [1, 40]"
    assert len(strict_emulator.ledger) == len(texts)
    assert read_summary(tmp_path / "out" / "result.parquet")["stopped"] is None


def test_a_real_process_stops_with_exit_3_and_one_line_without_the_key(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    """The installed entry point, stdout and stderr together: one error line, and the key nowhere."""
    env = {**job_env, "DASHSCOPE_HTTP_BASE_URL": emulator.root_url + "/v2/wrong"}
    job = sentences_job(tmp_path, TEXTS, execution={"concurrency": CONCURRENCY})
    result = run_subprocess(["run", str(job)], env)
    assert result.returncode == 3, result.stderr
    (line,) = error_lines(result.stderr)
    assert f"{emulator.root_url}/v2/wrong{NATIVE_PATH} answered HTTP 404 (404: Not Found)" in line
    assert line.endswith(f"after the fix the same command sends the rest: qwen-batch run {job}")
    assert job_env["DASHSCOPE_API_KEY"] not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert_stopped_within_the_requests_in_flight(tmp_path, emulator)



@pytest.mark.parametrize("command", ["validate", "run"])
def test_the_compatible_mode_base_url_is_refused_before_sending(
    tmp_path: Path, job_env: dict, emulator: Any, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], command: str,
) -> None:
    monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL")
    job = sentences_job(tmp_path, TEXTS, api={"base_url": "https://dashscope.aliyuncs.com/compatible-mode/v1"})
    before = folder_bytes(tmp_path)
    assert main([command, str(job)]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: api.base_url in {job}: https://dashscope.aliyuncs.com/compatible-mode/v1 is a DashScope host, "
        "but qwen-batch speaks the native API under /api/v1 (compatible-mode is the OpenAI-style one); "
        "write https://dashscope.aliyuncs.com/api/v1"
    ]
    assert emulator.ledger == []
    assert folder_bytes(tmp_path) == before
