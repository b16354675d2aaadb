"""`run --shard I/N` and `merge` end to end: the real CLI over loopback against the emulator."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from qwen_batch.cli import main
from qwen_batch.emulator import EmulatorConfig
from qwen_batch.sharding import Shard
from qwen_batch.testing import EmulatorThread

from .conftest import read_summary, sentences_job

VOLATILE = ["request_id", "latency_s", "first_token_s"]
# The run's own timing: the only figures of a summary that differ between two runs of a job.
TIMING = ("wall_time_s", "rows_per_second")


def texts(n: int) -> list[str]:
    return [f"row {i}: 请把这句话翻译成英文 {i}" for i in range(n)]


def output_of(job: Path) -> Path:
    return job.parent / "out" / "result.parquet"


def results(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path).drop(VOLATILE)


def without_timing(summary: dict[str, Any]) -> dict[str, Any]:
    summary = json.loads(json.dumps(summary))
    for section in (summary, summary["this_run"]):
        for key in TIMING:
            section.pop(key)
    summary.pop("output")
    return summary


def single_run(tmp_path: Path, rows: int, **overrides: Any) -> Path:
    """The same job run in one process, without the cache: what a merge must equal."""
    folder = tmp_path / "single"
    folder.mkdir()
    job = sentences_job(folder, texts(rows), **overrides)
    assert main(["run", str(job), "--quiet", "--no-cache"]) in (0, 1)
    return output_of(job)


def sharded_job(tmp_path: Path, rows: int, **overrides: Any) -> Path:
    folder = tmp_path / "sharded"
    folder.mkdir()
    return sentences_job(folder, texts(rows), **overrides)


def test_four_shards_merge_into_what_one_run_writes(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    """Each shard sends only its units and writes its part; merge joins them in input order,
    equal to a single run's output and summary."""
    reference = single_run(tmp_path, 60)
    job = sharded_job(tmp_path, 60)
    sent_before = len(emulator.ledger)
    for index in range(4):
        assert main(["run", str(job), "--quiet", "--no-cache", "--shard", f"{index}/4"]) == 0
    assert len(emulator.ledger) - sent_before == 60  # every unit sent once, by one shard
    output = output_of(job)
    assert not output.exists()
    parts = [Shard(i, 4).part_path(output) for i in range(4)]
    for shard, part in zip((Shard(i, 4) for i in range(4)), parts, strict=True):
        ids = pl.read_parquet(part)["id"].to_list()
        assert ids and all(shard.holds(row_id) for row_id in ids)
        assert read_summary(part)["rows"]["total"] == len(ids)
    assert sum(pl.read_parquet(part).height for part in parts) == 60

    assert main(["merge", str(job)]) == 0
    assert_frame_equal(results(output), results(reference))
    assert without_timing(read_summary(output)) == without_timing(read_summary(reference))
    manifest = json.loads(output.with_name(output.name + ".manifest.json").read_text())
    assert [part["shard"]["index"] for part in manifest["parts"]] == [0, 1, 2, 3]
    assert manifest["input"]["rows"] == 60 and "shard" not in manifest
    assert main(["verify", str(output)]) == 0  # the merged output checks out as one run's does


def test_a_sweep_with_samples_spreads_a_rows_units_over_shards_and_merges_in_unit_order(
    tmp_path: Path, job_env: dict, emulator: Any
) -> None:
    sweep = {"sweep": {"parameters": {"temperature": [0.2, 0.9]}}, "samples": 2}
    reference = single_run(tmp_path, 12, **sweep)
    job = sharded_job(tmp_path, 12, **sweep)
    for index in range(3):
        assert main(["run", str(job), "--quiet", "--no-cache", "--shard", f"{index}/3"]) == 0
    parts = [pl.read_parquet(Shard(i, 3).part_path(output_of(job))) for i in range(3)]
    for index, part in enumerate(parts):
        assert all(Shard(index, 3).holds(*unit) for unit in part.select("id", "variant", "sample").iter_rows())
    # Units of one row land in different shards: the hash is of the unit, not of the row.
    assert any(len({i for i, part in enumerate(parts) if row_id in part["id"].to_list()}) > 1 for row_id in ("r000", "r001"))
    assert main(["merge", str(job)]) == 0
    assert_frame_equal(results(output_of(job)), results(reference))
    assert without_timing(read_summary(output_of(job))) == without_timing(read_summary(reference))


def test_a_missing_shard_makes_merge_exit_2_naming_it(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = sharded_job(tmp_path, 30)
    for index in (0, 2):
        assert main(["run", str(job), "--quiet", "--shard", f"{index}/4"]) == 0
    output = output_of(job)
    output.parent.mkdir(exist_ok=True)
    output.write_bytes(b"an earlier output")
    capsys.readouterr()
    assert main(["merge", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "part-1-of-4" in err and "part-3-of-4" in err and "part-0-of-4" not in err
    assert output.read_bytes() == b"an earlier output"


def two_shards_run(tmp_path: Path) -> Path:
    """A 20-row job run as shards 0/2 and 1/2: both parts written."""
    job = sharded_job(tmp_path, 20)
    for index in range(2):
        assert main(["run", str(job), "--quiet", "--shard", f"{index}/2"]) == 0
    return job


def test_a_unit_in_two_parts_is_refused_naming_its_row(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A part whose rows were also written into another (a hand-copied file) is named, and nothing is written."""
    job = two_shards_run(tmp_path)
    first, second = (Shard(i, 2).part_path(output_of(job)) for i in range(2))
    doubled = pl.concat([pl.read_parquet(second), pl.read_parquet(first).head(1)]).sort("__qwen_batch_unit__")
    doubled.write_parquet(second)
    capsys.readouterr()
    assert main(["merge", str(job)]) == 2
    err = capsys.readouterr().err
    row_id = pl.read_parquet(first)["id"][0]
    assert f"row id {row_id!r} is in part-0-of-2 and part-1-of-2" in err
    assert not output_of(job).exists()


def test_a_unit_missing_from_its_part_is_refused_naming_its_row_and_part(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = two_shards_run(tmp_path)
    output = output_of(job)
    output.write_bytes(b"an earlier output")
    second = Shard(1, 2).part_path(output)
    part = pl.read_parquet(second)
    part.filter(pl.int_range(pl.len()) != 2).write_parquet(second)
    capsys.readouterr()
    assert main(["merge", str(job)]) == 2
    err = capsys.readouterr().err
    assert f"row id {part['id'][2]!r} is missing from part-1-of-2: rerun " in err and err.count("\n") == 1
    assert output.read_bytes() == b"an earlier output"


def test_a_bad_shard_is_exit_2_and_sends_nothing(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = sharded_job(tmp_path, 5)
    for bad, message in (("4/4", "--shard 4/4: shards are numbered 0 to N-1"), ("1of4", "--shard '1of4': expected I/N")):
        for command in ("run", "validate", "estimate"):
            assert main([command, str(job), "--shard", bad]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert emulator.ledger == []
    assert not (job.parent / "out").exists()


def test_validate_and_estimate_count_the_shards_share(tmp_path: Path, job_env: dict, capsys: pytest.CaptureFixture[str]) -> None:
    job = sharded_job(tmp_path, 40, execution={"requests_per_minute": 600, "tokens_per_minute": 80000})
    held = [sum(Shard(i, 4).holds(f"r{row:03d}") for row in range(40)) for i in range(4)]
    for index in range(4):
        assert main(["validate", str(job), "--shard", f"{index}/4"]) == 0
        assert f"ok: {held[index]} rows" in capsys.readouterr().out
    assert main(["estimate", str(job), "--shard", "1/4", "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    assert estimate["requests_to_send"] == held[1]
    assert (estimate["time"]["requests_per_minute"], estimate["time"]["tokens_per_minute"]) == (150, 20000)


def body_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_shards_with_their_own_accounts_send_each_to_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``shards:`` gives each shard its base URL and key: each account sees only its shard's
    units, at the shard's own limit (not half the job's), and the merge equals one run."""
    monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL", raising=False)
    monkeypatch.setenv("QWEN_BATCH_CACHE_DIR", str(tmp_path / "cache"))
    with EmulatorThread(EmulatorConfig(api_key="sk-account-a-0001")) as first, \
            EmulatorThread(EmulatorConfig(api_key="sk-account-b-0002")) as second:
        monkeypatch.setenv("KEY_A", first.api_key)
        monkeypatch.setenv("KEY_B", second.api_key)
        monkeypatch.setenv("DASHSCOPE_API_KEY", first.api_key)
        shards = [
            {"api": {"base_url": first.base_url, "key_env": "KEY_A"}, "execution": {"requests_per_minute": 60000}},
            {"api": {"base_url": second.base_url, "key_env": "KEY_B"}},
        ]
        reference_folder = tmp_path / "single"
        reference_folder.mkdir()
        reference = sentences_job(reference_folder, texts(24), api={"base_url": first.base_url})
        assert main(["run", str(reference), "--quiet", "--no-cache"]) == 0
        sent_to_first = len(first.ledger)
        job = sharded_job(tmp_path, 24, shards=shards, api={"base_url": first.base_url})
        for index in range(2):
            assert main(["run", str(job), "--quiet", "--no-cache", "--shard", f"{index}/2"]) == 0
        output = output_of(job)
        for index, emu, ledger_start in ((0, first, sent_to_first), (1, second, 0)):
            part = pl.read_parquet(Shard(index, 2).part_path(output))
            assert len(emu.ledger) - ledger_start == part.height
            manifest = json.loads(Shard(index, 2).part_path(output).with_suffix(".parquet.manifest.json").read_text())
            assert manifest["spec"]["api"]["key_env"] == ("KEY_A", "KEY_B")[index]
        assert main(["run", str(job), "--shard", "0/3"]) == 2
        assert "shards: lists 2 shards, but --shard 0/3 is one of 3" in capsys.readouterr().err
        assert main(["estimate", str(job), "--shard", "1/2", "--json"]) == 0
        # Shard 1 has no limit of its own: the job's in full (one account each), not half of it.
        assert json.loads(capsys.readouterr().out)["time"]["requests_per_minute"] == 600000
        assert main(["merge", str(job)]) == 0
    assert_frame_equal(results(output), results(reference_folder / "out" / "result.parquet"))


def test_a_shard_stopped_by_its_budget_resumes_from_its_own_checkpoint(
    tmp_path: Path, job_env: dict, emulator: Any
) -> None:
    reference = single_run(tmp_path, 40)
    job = sharded_job(tmp_path, 40, execution={"concurrency": 1})
    output = output_of(job)
    held = pl.read_parquet(reference).filter(
        pl.col("id").map_elements(lambda row_id: Shard(1, 2).holds(row_id), return_dtype=pl.Boolean)
    ).height
    before = len(emulator.ledger)
    assert main(["run", str(job), "--quiet", "--no-cache", "--shard", "1/2", "--max-cost", "0.002"]) == 3
    paid_first = len(emulator.ledger) - before
    assert 0 < paid_first < held
    part = Shard(1, 2).part_path(output)
    assert read_summary(part)["rows"]["not_done"] == held - paid_first
    assert (part.parent / (part.name + ".checkpoint")).is_dir()
    assert main(["run", str(job), "--quiet", "--no-cache", "--shard", "1/2"]) == 0
    assert len(emulator.ledger) - before == held  # the rerun paid only what the first left
    assert main(["run", str(job), "--quiet", "--no-cache", "--shard", "0/2"]) == 0
    assert main(["merge", str(job)]) == 0
    assert_frame_equal(results(output), results(reference))


def test_redo_fresh_and_limit_work_per_shard(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = sharded_job(tmp_path, 30)
    output = output_of(job)
    for index in range(2):
        assert main(["run", str(job), "--quiet", "--no-cache", "--shard", f"{index}/2"]) == 0
    first, second = (Shard(i, 2).part_path(output) for i in range(2))
    kept = second.read_bytes()
    row_id = pl.read_parquet(first)["id"][3]
    sent = len(emulator.ledger)
    assert main(["run", str(job), "--quiet", "--no-cache", "--shard", "0/2", "--redo", f"id = '{row_id}'"]) == 0
    assert len(emulator.ledger) == sent + 1
    assert pl.read_parquet(first).height == read_summary(first)["rows"]["total"]
    assert main(["run", str(job), "--quiet", "--no-cache", "--shard", "0/2", "--fresh"]) == 0
    assert len(emulator.ledger) == sent + 1 + pl.read_parquet(first).height  # sent again, all of shard 0's
    assert second.read_bytes() == kept  # another shard's part is never touched
    assert main(["merge", str(job)]) == 0
    assert pl.read_parquet(output)["id"].to_list() == [f"r{i:03d}" for i in range(30)]

    (tmp_path / "limited").mkdir()
    limited = sharded_job(tmp_path / "limited", 30)
    for index in range(3):
        assert main(["run", str(limited), "--quiet", "--no-cache", "--shard", f"{index}/3", "--limit", "12"]) == 0
    assert main(["merge", str(limited)]) == 2  # the parts cover 12 rows, the job 30
    assert main(["merge", str(limited), "--limit", "12"]) == 0
    assert pl.read_parquet(output_of(limited))["id"].to_list() == [f"r{i:03d}" for i in range(12)]


def test_batch_mode_runs_per_shard_and_merges_as_online_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each shard submits its own units' batches (its own batch state in its checkpoint); the
    merge equals a single online run but for the half price."""
    fast = {"batch_validating_s": 0.02, "batch_finalizing_s": 0.02, "batch_line_s": 0.001}
    with EmulatorThread(EmulatorConfig(**fast)) as emu:
        for name, value in {"DASHSCOPE_API_KEY": emu.api_key, "DASHSCOPE_HTTP_BASE_URL": emu.base_url,
                            "QWEN_BATCH_CACHE_DIR": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(name, value)
        reference = single_run(tmp_path, 14)
        job = sharded_job(tmp_path, 14, batch={"max_requests_per_file": 3, "poll_interval_s": 0.05},
                          execution={"mode": "batch"})
        output = output_of(job)
        for index in range(2):
            billed_before = sum(1 for e in emu.ledger if e["endpoint"] == "batch" and e.get("billable"))
            assert main(["run", str(job), "--quiet", "--no-cache", "--shard", f"{index}/2"]) == 0
            billed = sum(1 for e in emu.ledger if e["endpoint"] == "batch" and e.get("billable")) - billed_before
            assert billed == pl.read_parquet(Shard(index, 2).part_path(output)).height
        assert main(["merge", str(job)]) == 0
    merged, single = results(output), results(reference)
    assert_frame_equal(merged.drop("cost"), single.drop("cost"))
    assert merged["cost"].to_list() == pytest.approx([cost / 2 for cost in single["cost"].to_list()])


def test_status_reports_each_shard_and_the_missing_ones(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    job = sharded_job(tmp_path, 30, execution={"concurrency": 1})
    sizes = [sum(Shard(i, 3).holds(f"r{row:03d}") for row in range(30)) for i in range(3)]
    assert main(["run", str(job), "--quiet", "--shard", "0/3"]) == 0
    before = len(emulator.ledger)
    assert main(["run", str(job), "--quiet", "--shard", "1/3", "--max-cost", "0.002"]) == 3
    stopped_after = len(emulator.ledger) - before
    capsys.readouterr()
    assert main(["status", str(job)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "test-job: 30 rows in the input"
    assert lines[1].startswith(f"  part-0-of-3: {sizes[0]} done ({sizes[0]} ok, 0 error), 0 remaining, ")
    assert lines[1].endswith("; part written")
    assert lines[2].startswith(f"  part-1-of-3: {stopped_after} done ({stopped_after} ok, 0 error), "
                               f"{sizes[1] - stopped_after} remaining, ")
    assert lines[3] == f"  part-2-of-3: missing (not started; run with --shard 2/3): {sizes[2]} units"
    assert len(emulator.ledger) == before + stopped_after  # status sent nothing
