"""The public surface of ``qwen_batch``: exactly these names, cheap to import, and each doing its job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import qwen_batch
from qwen_batch.testing import FakeBackend

from .conftest import read_summary, sentences_job

PUBLIC = {
    "ConfigError",
    "InputError",
    "JobPlan",
    "JobResult",
    "OnlineExecutor",
    "QwenBatchError",
    "SpecError",
    "StorageError",
    "UsageError",
    "__version__",
    "prepare",
    "run",
    "run_async",
}
HEAVY = ("polars", "pyarrow", "httpx", "aiohttp", "anyio", "pydantic", "yaml", "tenacity", "aiolimiter")


def test_the_public_names_are_exactly_these() -> None:
    assert set(qwen_batch.__all__) == PUBLIC
    assert len(qwen_batch.__all__) == len(PUBLIC)


def test_every_public_name_resolves_and_an_unknown_one_is_an_attribute_error() -> None:
    for name in qwen_batch.__all__:
        assert getattr(qwen_batch, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'prepare_job'"):
        qwen_batch.prepare_job  # noqa: B018 - the attribute access is the test


def test_the_error_classes_are_the_error_tree() -> None:
    for name in ("UsageError", "StorageError"):
        assert issubclass(getattr(qwen_batch, name), qwen_batch.QwenBatchError)
    for name in ("SpecError", "InputError", "ConfigError"):
        assert issubclass(getattr(qwen_batch, name), qwen_batch.UsageError)


def test_importing_the_package_loads_no_heavy_library() -> None:
    code = f"import sys, json, qwen_batch; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == []


def test_prepare_checks_the_whole_job_and_sends_nothing(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = sentences_job(tmp_path, ["one", "", "three"])
    plan = qwen_batch.prepare(job, limit=2)
    assert isinstance(plan, qwen_batch.JobPlan)
    assert (plan.rows, plan.preflight.requests, plan.preflight.row_problems) == (2, 1, 1)
    assert [request.index for request in plan.requests()] == [0]
    assert emulator.ledger == [] and not plan.output_path.exists()


def test_a_bad_spec_is_a_usage_error_naming_the_key(tmp_path: Path) -> None:
    job = sentences_job(tmp_path, ["one"], modle="qwen-turbo")
    with pytest.raises(qwen_batch.SpecError, match="modle"):
        qwen_batch.prepare(job)


def test_run_sends_every_row_and_writes_the_output_and_the_summary(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = sentences_job(tmp_path, ["one", "two", "three"])
    result = qwen_batch.run(job)
    assert isinstance(result, qwen_batch.JobResult)
    assert (result.exit_code, result.stop_reason, result.wrote_output) == (0, None, True)
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["status"].to_list() == ["ok"] * 3
    assert len(emulator.ledger) == 3
    assert read_summary(tmp_path / "out" / "result.parquet") == result.summary


def test_run_takes_a_prepared_plan_but_not_options_for_it_as_well(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    plan = qwen_batch.prepare(sentences_job(tmp_path, ["one"]))
    with pytest.raises(TypeError, match="limit"):
        qwen_batch.run(plan, limit=1)
    assert emulator.ledger == []
    assert qwen_batch.run(plan).summary["rows"]["ok"] == 1


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_run_async_runs_on_the_callers_event_loop(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    result = await qwen_batch.run_async(sentences_job(tmp_path, ["one", "two"]), limit=1)
    assert result.summary["rows"] == {"total": 1, "ok": 1, "error": 0, "not_done": 0, "truncated_in_thinking": 0}
    assert len(emulator.ledger) == 1


def test_an_injected_backend_runs_the_job_without_a_service_and_never_answers_a_real_one(
    tmp_path: Path, job_env: dict, emulator: Any
) -> None:
    job = sentences_job(tmp_path, ["one", "two"])
    fake = FakeBackend("canned", output_tokens=3)
    result = qwen_batch.run(job, executor=qwen_batch.OnlineExecutor(fake))
    assert result.exit_code == 0 and fake.sent == 2 and emulator.ledger == []
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["output_text"].to_list() == ["canned", "canned"]
    assert frame["output_tokens"].to_list() == [3, 3]
    # The fake's replies are in the shared cache under their own service: the real one is asked.
    again = qwen_batch.run(job, fresh=True)
    assert again.summary["cache"]["hits"] == 0 and len(emulator.ledger) == 2
    assert pl.read_parquet(tmp_path / "out" / "result.parquet")["output_text"].to_list() != ["canned", "canned"]
