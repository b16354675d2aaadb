"""The Ray engine's driver logic without Ray: which limiter each shard sends through, the job's
progress from the workers' reports, a dead worker's resumed task, and the flags refused up front."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qwen_batch.catalog import builtin
from qwen_batch.cli import main
from qwen_batch.engines.ray_engine import account_limits, combined, resumed, shard_tasks
from qwen_batch.engines.ray_worker import ShardProgress
from qwen_batch.job import prepare
from qwen_batch.plan import JobOptions
from qwen_batch.runner import RunStatistics
from qwen_batch.sharding import Shard

from .conftest import sentences_job

RPM = 600000  # sentences_job's
TPM = builtin().models["qwen-turbo"].rate_limits.tokens_per_minute  # the catalog's default


@pytest.fixture
def no_base_url_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL", raising=False)
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-test-0000000001")
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))


def test_without_shards_every_worker_spends_the_jobs_one_quota_at_its_whole_limit(
    tmp_path: Path, no_base_url_override: None
) -> None:
    job = sentences_job(tmp_path, ["a", "b", "c"], api={"base_url": "https://a.example.com/api/v1"})
    plan = prepare(job, JobOptions())
    accounts, limits = account_limits(plan, 4)
    account = ("https://a.example.com/api/v1", "DASHSCOPE_API_KEY")
    assert accounts == [account] * 4
    assert limits == {(account, "qwen-turbo"): (RPM, TPM)}  # not a quarter each


def test_shards_of_their_own_accounts_each_get_a_limiter_and_shared_accounts_add_up(
    tmp_path: Path, no_base_url_override: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEY_B", "sk-test-0000000002")
    shards = [{}, {"execution": {"requests_per_minute": 1000}}, {"api": {"key_env": "KEY_B"}, "execution": {"requests_per_minute": 500}}]
    job = sentences_job(tmp_path, ["a", "b", "c"], api={"base_url": "https://a.example.com/api/v1"}, shards=shards)
    accounts, limits = account_limits(prepare(job, JobOptions()), 3)
    a, b = ("https://a.example.com/api/v1", "DASHSCOPE_API_KEY"), ("https://a.example.com/api/v1", "KEY_B")
    assert accounts == [a, a, b]
    # Shards 0 and 1 spend one quota: together what their two `run --shard` processes would send.
    assert limits == {(a, "qwen-turbo"): (RPM + 1000, 2 * TPM), (b, "qwen-turbo"): (500, TPM)}


def test_each_shard_task_has_absolute_paths_its_shard_and_only_one_is_killed(
    tmp_path: Path, no_base_url_override: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QWEN_BATCH_RAY_KILL", "2:10")
    monkeypatch.chdir(tmp_path)
    job = sentences_job(tmp_path, ["a", "b", "c"])
    plan = prepare(Path("job.yaml"), JobOptions(fresh=True))
    tasks = shard_tasks(Path("job.yaml"), plan, 3, [{}] * 3)
    assert [task.options.shard for task in tasks] == [Shard(0, 3), Shard(1, 3), Shard(2, 3)]
    assert all(task.job == job and Path(str(task.options.output)).is_absolute() for task in tasks)
    assert [task.exit_after for task in tasks] == [None, None, 10]
    again = resumed(tasks[2])
    assert (again.exit_after, again.options.fresh, again.options.shard) == (None, False, Shard(2, 3))


def _stats(**values: Any) -> RunStatistics:
    base: dict[str, Any] = dict(
        rows_total=10, rows_done=0, ok=0, errors=0, errors_by_code={}, cached=0, cache_saved_cost=0.0,
        input_tokens=0, output_tokens=0, cost=0.0, retries=0, throttled=0, in_flight=0, elapsed_s=1.0,
    )
    return RunStatistics(**(base | values))


def test_the_jobs_progress_adds_up_every_shards_rows_done_before_and_now() -> None:
    parts = [
        ShardProgress(_stats(rows_done=5, ok=4, errors=1, errors_by_code={"X": 1}, cost=0.5, in_flight=3), 10),
        ShardProgress(_stats(rows_done=2, ok=2, cost=0.25, in_flight=1, cooling_down_s=1.5), 0),
    ]
    stats = combined(parts, 40, 7.0)
    assert (stats.rows_total, stats.rows_done, stats.ok, stats.errors, stats.errors_by_code) == (40, 17, 6, 1, {"X": 1})
    assert (stats.cost, stats.in_flight, stats.cooling_down_s, stats.elapsed_s) == (0.75, 4, 1.5, 7.0)


@pytest.mark.parametrize(("flags", "message"), [
    (["--ray-workers", "3"], "--ray-workers is for the Ray engine: add --engine ray"),
    (["--ray-address", "auto"], "--ray-address is for the Ray engine: add --engine ray"),
    (["--engine", "ray", "--redo", "status = 'error'"], "drop --redo"),
    (["--engine", "ray", "--shard", "0/2"], "drop --shard"),
    (["--engine", "ray", "--mode", "batch"], "drop --mode batch"),
])
def test_ray_flags_out_of_place_are_exit_2_before_anything_is_sent(
    tmp_path: Path, job_env: dict[str, str], emulator: Any, capsys: pytest.CaptureFixture[str],
    flags: list[str], message: str,
) -> None:
    job = sentences_job(tmp_path, ["a", "b"])
    assert main(["run", str(job), *flags]) == 2
    assert message in capsys.readouterr().err
    assert emulator.ledger == []
    assert not (tmp_path / "out").exists()


def test_another_worker_count_than_the_earlier_runs_is_refused_before_ray_starts(
    tmp_path: Path, job_env: dict[str, str], emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = sentences_job(tmp_path, ["a", "b"])
    earlier = tmp_path / "out" / "result.parquet.parts" / "part-1-of-3.parquet.checkpoint"
    earlier.mkdir(parents=True)
    assert main(["run", str(job), "--engine", "ray", "--ray-workers", "4"]) == 2
    assert "an earlier run has 3 shards; resume with --ray-workers 3" in capsys.readouterr().err
    assert emulator.ledger == []
    assert [path.name for path in earlier.parent.iterdir()] == [earlier.name]
