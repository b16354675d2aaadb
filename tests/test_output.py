"""The final Parquet: one row per input row, in order, exact types, replaced atomically."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_batch import output
from qwen_batch.checkpoint import Checkpoint
from qwen_batch.errors import InputError, StorageError
from qwen_batch.output import RESULT_SCHEMA, write_results, write_summary_json
from qwen_batch.types import Outcome

MANIFEST = {"model": "qwen-plus"}


def ok(index: int, text: str | None = None, **fields: object) -> Outcome:
    values: dict[str, object] = dict(
        request_id=f"req-{index}", finish_reason="stop", input_tokens=10, output_tokens=index,
        cost=0.001 * index, attempts=1, latency_s=0.5,
    )
    values.update(fields)
    return Outcome(index=index, fingerprint=f"fp{index}", status="ok", output_text=text or f"answer {index}", **values)  # type: ignore[arg-type]


def failed(index: int) -> Outcome:
    return Outcome(
        index=index, fingerprint=f"fp{index}", status="error", error_code="InvalidParameter",
        error_message="too long", attempts=1, retryable=False,
    )


def records_of(tmp_path: Path, outcomes: list[Outcome]) -> Checkpoint:
    checkpoint = Checkpoint.open(tmp_path / "out.parquet.checkpoint", MANIFEST)
    checkpoint.append(outcomes)
    return checkpoint


def input_frame(rows: int) -> pl.LazyFrame:
    return pl.LazyFrame({"id": [f"r{i}" for i in range(rows)], "text": [f"text {i}" for i in range(rows)]})


def test_one_row_per_input_row_in_input_order(tmp_path: Path) -> None:
    """Records finished out of order come out in input order, with the input columns first."""
    outcomes = [ok(i) for i in range(20)]
    random.Random(4).shuffle(outcomes)
    checkpoint = records_of(tmp_path, outcomes)
    stats = write_results(input_frame(20), checkpoint.log_lazy(), tmp_path / "out.parquet", model="qwen-plus", seed=7, batch_rows=6)
    result = pl.read_parquet(tmp_path / "out.parquet")
    assert result.columns == ["id", "text", *RESULT_SCHEMA.names]
    assert result["id"].to_list() == [f"r{i}" for i in range(20)]
    assert result["output_text"].to_list() == [f"answer {i}" for i in range(20)]
    assert result["total_tokens"].to_list() == [10 + i for i in range(20)]
    assert set(result["model"]) == {"qwen-plus"} and set(result["seed"]) == {7}
    assert (stats.rows, stats.ok, stats.errors, stats.missing) == (20, 20, 0, 0)


def test_missing_rows_get_the_given_error(tmp_path: Path) -> None:
    """A run stopped on its budget still writes every input row; unsent rows say why."""
    checkpoint = records_of(tmp_path, [ok(0), failed(2)])
    stats = write_results(
        input_frame(4), checkpoint.records_lazy(), tmp_path / "out.parquet", model="m", seed=1,
        missing=("BudgetExceeded", "not sent: the budget was reached"),
    )
    result = pl.read_parquet(tmp_path / "out.parquet")
    assert result["status"].to_list() == ["ok", "error", "error", "error"]
    assert result["error_code"].to_list() == [None, "BudgetExceeded", "InvalidParameter", "BudgetExceeded"]
    assert result["error_message"][1] == "not sent: the budget was reached"
    assert result["attempts"].to_list() == [1, 0, 1, 0]
    assert result["output_text"].to_list() == ["answer 0", None, None, None]
    assert (stats.rows, stats.ok, stats.errors, stats.missing) == (4, 1, 3, 2)


def test_missing_rows_without_a_status_are_refused_and_the_old_file_kept(tmp_path: Path) -> None:
    """Without `missing`, a row with no record is a bug to report, and the previous output stays."""
    out = tmp_path / "out.parquet"
    out.write_bytes(b"previous output")
    checkpoint = records_of(tmp_path, [ok(i) for i in range(10) if i != 7])
    with pytest.raises(ValueError, match="row 7"):
        write_results(input_frame(10), checkpoint.log_lazy(), out, model="m", seed=1, batch_rows=3)
    assert out.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet", "out.parquet.checkpoint"]


def test_last_record_per_index_wins(tmp_path: Path) -> None:
    """A row retried on resume has two records; the output shows the later one."""
    checkpoint = records_of(tmp_path, [failed(0), ok(1), ok(0, text="retried")])
    for records in (checkpoint.log_lazy(), checkpoint.records_lazy()):
        write_results(input_frame(2), records, tmp_path / "out.parquet", model="m", seed=1)
        result = pl.read_parquet(tmp_path / "out.parquet")
        assert result["status"].to_list() == ["ok", "ok"]
        assert result["output_text"].to_list() == ["retried", "answer 1"]


def test_result_columns_have_exact_arrow_types_even_when_all_null(tmp_path: Path) -> None:
    """Readers can rely on the types: no large_string, no null type, whatever the data."""
    checkpoint = records_of(tmp_path, [])
    write_results(input_frame(3), checkpoint.records_lazy(), tmp_path / "out.parquet", model="m", seed=0, missing=("NotRun", "x"))
    schema = pq.read_schema(tmp_path / "out.parquet")
    assert pa.schema(list(schema)[2:]).equals(RESULT_SCHEMA)
    assert schema.field("id").type == pa.string()
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("request_id").null_count == 3


def test_result_types_with_values(tmp_path: Path) -> None:
    """The same exact types when values are present; total_tokens is null when a part is unknown."""
    checkpoint = records_of(tmp_path, [ok(0), ok(1, output_tokens=None), failed(2)])
    write_results(input_frame(3), checkpoint.records_lazy(), tmp_path / "out.parquet", model="m", seed=3)
    table = pq.read_table(tmp_path / "out.parquet")
    assert pa.schema(list(table.schema)[2:]).equals(RESULT_SCHEMA)
    assert table.column("total_tokens").to_pylist() == [10, None, None]
    assert table.column("cost").to_pylist() == [0.0, 0.001, None]


def _typed_input() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "id": ["a", "b", "c"],
            "n32": pl.Series([1, 2, None], dtype=pl.Int32),
            "x": [1.5, None, 3.0],
            "flag": [True, False, None],
            "day": [dt.date(2024, 1, 1), dt.date(2024, 2, 29), None],
            "tags": [["x"], [], None],
            "nothing": pl.Series([None, None, None], dtype=pl.String),
        }
    )


@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl"])
def test_input_column_types_are_preserved(tmp_path: Path, kind: str) -> None:
    """Input columns come out as the input frame had them, whatever file they were read from."""
    frame = _typed_input()
    source = tmp_path / f"input.{kind}"
    if kind == "parquet":
        frame.write_parquet(source)
        lazy = pl.scan_parquet(source)
    elif kind == "csv":
        frame.drop("tags").write_csv(source)
        lazy = pl.scan_csv(source, try_parse_dates=True)
    else:
        frame.write_ndjson(source)
        lazy = pl.scan_ndjson(source)
    expected = lazy.collect_schema()
    checkpoint = records_of(tmp_path, [ok(0), ok(1), ok(2)])
    write_results(lazy, checkpoint.records_lazy(), tmp_path / "out.parquet", model="m", seed=1)
    result = pl.read_parquet(tmp_path / "out.parquet")
    assert result.select(expected.names()).schema == expected
    assert result.select(expected.names()).equals(lazy.collect())


def test_parquet_input_arrow_types_are_kept(tmp_path: Path) -> None:
    """A pyarrow-written input keeps its Arrow types (int32, string, date32, list<string>)."""
    table = pa.table(
        {
            "id": pa.array(["a", "b"], pa.string()),
            "n": pa.array([1, 2], pa.int32()),
            "day": pa.array([dt.date(2024, 1, 1), None], pa.date32()),
            "tags": pa.array([["x"], []], pa.list_(pa.string())),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    checkpoint = records_of(tmp_path, [ok(0), ok(1)])
    write_results(pl.scan_parquet(tmp_path / "in.parquet"), checkpoint.records_lazy(), tmp_path / "out.parquet", model="m", seed=1)
    schema = pq.read_schema(tmp_path / "out.parquet")
    for field in table.schema:
        assert schema.field(field.name).type == field.type


def test_an_empty_input_writes_an_empty_file_with_the_schema(tmp_path: Path) -> None:
    """Zero rows is still a valid result file with every column."""
    checkpoint = records_of(tmp_path, [])
    stats = write_results(input_frame(0), checkpoint.records_lazy(), tmp_path / "out.parquet", model="m", seed=1)
    assert stats.rows == 0
    assert pq.read_schema(tmp_path / "out.parquet").names == ["id", "text", *RESULT_SCHEMA.names]


def test_a_failure_midway_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while writing (here: the disk fails on the second batch) never tears the output."""
    out = tmp_path / "out.parquet"
    checkpoint = records_of(tmp_path, [ok(i) for i in range(10)])
    write_results(input_frame(10), checkpoint.records_lazy(), out, model="old", seed=1)
    previous = out.read_bytes()
    calls = {"n": 0}
    real_write_table = pq.ParquetWriter.write_table

    def failing_write_table(self: pq.ParquetWriter, table: pa.Table, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real_write_table(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", failing_write_table)
    with pytest.raises(StorageError, match="No space left"):
        write_results(input_frame(10), checkpoint.records_lazy(), out, model="new", seed=1, batch_rows=4)
    assert out.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet", "out.parquet.checkpoint"]


def test_an_unwritable_output_is_a_storage_error(tmp_path: Path) -> None:
    """An output under a file names the path in a one-line StorageError."""
    (tmp_path / "blocker").write_text("file")
    checkpoint = records_of(tmp_path, [ok(0)])
    with pytest.raises(StorageError, match="blocker"):
        write_results(input_frame(1), checkpoint.records_lazy(), tmp_path / "blocker" / "out.parquet", model="m", seed=1)


def test_input_columns_named_like_result_columns_are_refused(tmp_path: Path) -> None:
    """An input column called `status` would be shadowed; the user is told to rename it."""
    checkpoint = records_of(tmp_path, [ok(0)])
    with pytest.raises(InputError, match="'status'"):
        write_results(pl.LazyFrame({"status": ["x"]}), checkpoint.records_lazy(), tmp_path / "o.parquet", model="m", seed=1)
    output.check_input_columns(["id", "text"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.permutations(list(range(12))), st.integers(min_value=1, max_value=13), st.sets(st.integers(0, 11)))
def test_output_does_not_depend_on_finishing_order(
    tmp_path_factory: pytest.TempPathFactory, order: list[int], batch_rows: int, retried: set[int]
) -> None:
    """Any finishing order, any batch size, any retried rows: the same rows in input order."""
    tmp_path = tmp_path_factory.mktemp("out")
    outcomes = [failed(i) if i in retried else ok(i) for i in order] + [ok(i) for i in sorted(retried)]
    checkpoint = records_of(tmp_path, outcomes)
    write_results(input_frame(12), checkpoint.log_lazy(), tmp_path / "out.parquet", model="m", seed=1, batch_rows=batch_rows)
    result = pl.read_parquet(tmp_path / "out.parquet")
    assert result["id"].to_list() == [f"r{i}" for i in range(12)]
    assert result["output_text"].to_list() == [f"answer {i}" for i in range(12)]


def test_summary_json_is_written_atomically(tmp_path: Path) -> None:
    """The summary replaces the old one whole, keeps non-ASCII text, and leaves no temporary file."""
    path = tmp_path / "out.parquet.summary.json"
    path.write_text("old")
    write_summary_json(path, {"rows": {"ok": 3}, "model": "通义千问"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"rows": {"ok": 3}, "model": "通义千问"}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    (tmp_path / "blocker").write_text("file")
    with pytest.raises(StorageError, match="blocker"):
        write_summary_json(tmp_path / "blocker" / "s.json", {})


def test_model_and_seed_come_from_each_record_and_the_jobs_fill_older_records(tmp_path: Path) -> None:
    """A record that kept what it was sent with says so; one from before (no model/seed) takes the job's."""
    outcomes = [ok(0, model="qwen-max", seed=11), ok(1), ok(2, model="qwen-plus", seed=None), failed(3)]
    checkpoint = records_of(tmp_path, outcomes)
    write_results(input_frame(5), checkpoint.records_lazy(), tmp_path / "out.parquet", model="job-model", seed=7,
                  missing=("NotRun", "not sent"))
    table = pl.read_parquet(tmp_path / "out.parquet")
    assert table["model"].to_list() == ["qwen-max", "job-model", "qwen-plus", "job-model", "job-model"]
    assert table["seed"].to_list() == [11, 7, 7, 7, 7]
    assert pq.read_schema(tmp_path / "out.parquet").field("seed").type == pa.int64()
