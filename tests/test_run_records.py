"""Run records without a service: the diff's verdict and alignment over synthetic outputs, the paired tests."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import given, strategies as st

from qwen_batch.diff import diff_outputs, exit_code, verdict
from qwen_batch.manifest import changed_keys, flatten
from qwen_batch.paired import exact_binomial_two_sided, mcnemar, paired_bootstrap, paired_test


def manifest(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "format": 1,
        "run_id": "r",
        "input": {"sha256": "ab" * 32, "id_column": "id", "rows": 3},
        "spec": {"model": "qwen-plus", "parameters": {"seed": 1, "temperature": 0.0},
                 "output": {"path": "/x/a.parquet"}, "execution": {"concurrency": 4}},
        "units_per_row": 2,
        "variants": [{"id": "", "model": "qwen-plus", "parameters": {"seed": 1, "temperature": 0.0, "max_tokens": 99},
                      "mode": {"stream": False}}],
        "service": {"protocol": "dashscope", "emulated": True, "base_url": None},
        "catalog": {"qwen-plus": {"price_used": {"tiers": [1.0]}}},
    }
    for key, value in changes.items():
        base[key] = value
    return base


def write_output(path: Path, frame: pl.DataFrame, record: dict[str, Any]) -> Path:
    frame.write_parquet(path)
    path.with_name(path.name + ".manifest.json").write_text(json.dumps(record), encoding="utf-8")
    return path


def frame(texts: list[str | None], **columns: list[Any]) -> pl.DataFrame:
    n = len(texts)
    data: dict[str, Any] = {
        "id": [f"q{i // 2}" for i in range(n)],
        "variant": [""] * n,
        "sample": [i % 2 for i in range(n)],
        "request_sha256": [f"{i:064x}" for i in range(n)],
        "output_text": texts,
        "status": ["ok"] * n,
        "finish_reason": ["stop"] * n,
        "input_tokens": [10] * n,
        "output_tokens": [5] * n,
        "cost": [0.5] * n,
        "latency_s": [1.0] * n,
    }
    data.update(columns)
    return pl.DataFrame(data)


def test_the_verdict_ignores_paths_and_pacing_and_lists_each_differing_setting() -> None:
    a = manifest()
    paced = manifest(spec={**a["spec"], "output": {"path": "/y/b.parquet"}, "execution": {"concurrency": 64}})
    assert verdict(a, paced) == ("identical configuration", [])
    warmer = manifest(spec={**a["spec"], "parameters": {"seed": 1, "temperature": 0.7}})
    assert verdict(a, warmer) == ("comparable", ["parameters.temperature"])
    resolved = manifest(variants=[{**a["variants"][0], "parameters": {"seed": 1, "temperature": 0.0, "max_tokens": 50}}])
    assert verdict(a, resolved) == ("comparable", ["variant[default].parameters.max_tokens"])
    other = manifest(input={**a["input"], "sha256": "cd" * 32})
    outcome, reasons = verdict(a, other)
    assert outcome == "not comparable" and "another input" in reasons[0]


def test_rows_align_by_id_variant_and_sample_whatever_their_order(tmp_path: Path) -> None:
    texts = ["a0", "a1", "b0", "b1", "c0", "c1"]
    a = write_output(tmp_path / "a.parquet", frame(texts), manifest())
    changed = frame(["a0", "A1!", "b0", "b1", "c0", "c1"],
                    status=["ok", "error", "ok", "ok", "ok", "ok"],
                    finish_reason=["stop", None, "stop", "length", "stop", "stop"],
                    output_tokens=[5, 0, 5, 9, 5, 5])
    # B in another order, its last row missing, and a row A lacks.
    reordered = changed.reverse().head(5)
    extra = changed.head(1).with_columns(id=pl.lit("q9"))
    b = write_output(tmp_path / "b.parquet", pl.concat([reordered, extra]), manifest())
    report = diff_outputs(a, b)
    counts = report["counts"]
    assert counts["identical_output"] == 4 and counts["changed_output"] == 1  # text and status changed on q0/1
    assert counts["only_in_a"] == 1 and counts["only_in_b"] == 1
    assert counts["same_request"] == 5
    assert report["status_transitions"] == [{"a": "ok", "b": "error", "rows": 1}]
    assert {"a": "stop", "b": "length", "rows": 1} in report["finish_reason_transitions"]
    assert report["most_changed"][0]["id"] == "q0" and report["most_changed"][0]["sample"] == 1
    assert report["deltas"]["output_tokens"]["delta"]["sum"] == -1.0  # -5 on q0/1, +4 on q1/1
    assert exit_code(report) == 1


def test_an_older_output_without_the_unit_columns_reads_as_variant_empty_sample_0(tmp_path: Path) -> None:
    old = frame(["x", "y"]).drop("variant", "sample", "request_sha256").with_columns(id=pl.Series(["q0", "q1"]))
    record = manifest(units_per_row=1)
    a = write_output(tmp_path / "a.parquet", old, record)
    b = write_output(tmp_path / "b.parquet", old, record)
    report = diff_outputs(a, b)
    assert report["counts"]["identical_output"] == 2 and report["counts"]["same_request"] == 0
    assert exit_code(report) == 0


def test_score_runs_mcnemar_on_a_0_1_column(tmp_path: Path) -> None:
    texts = [f"t{i}" for i in range(40)]
    ids = {"id": [f"q{i}" for i in range(40)], "sample": [0] * 40}
    before = [1] * 20 + [0] * 20
    after = [1] * 18 + [0] * 2 + [1] * 8 + [0] * 12
    a = write_output(tmp_path / "a.parquet", frame(texts, correct=before, **ids), manifest(units_per_row=1))
    b = write_output(tmp_path / "b.parquet", frame(texts, correct=after, **ids), manifest(units_per_row=1))
    score = diff_outputs(a, b, score="correct")["score"]
    assert score["test"] == "mcnemar-exact" and score["n"] == 40
    assert (score["a_only"], score["b_only"]) == (2, 8)
    assert score["p_value"] == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert score["difference"] == pytest.approx(6 / 40)


def test_exact_binomial_matches_the_sum_by_hand() -> None:
    assert exact_binomial_two_sided(1, 10) == pytest.approx(2 * 11 / 1024)
    assert exact_binomial_two_sided(0, 0) == 1.0
    assert exact_binomial_two_sided(5, 10) == 1.0  # capped: the two tails overlap at the middle
    # Large n stays finite (log space): 400 discordant pairs split 150 / 250.
    assert 0 < exact_binomial_two_sided(150, 400) < 1e-5


@given(st.integers(0, 60), st.integers(0, 60))
def test_mcnemar_is_a_probability_and_symmetric_in_its_sides(a_only: int, b_only: int) -> None:
    tied = 5
    a = pl.Series([1.0] * a_only + [0.0] * b_only + [1.0] * tied)
    b = pl.Series([0.0] * a_only + [1.0] * b_only + [1.0] * tied)
    forward, backward = mcnemar(a, b), mcnemar(b, a)
    assert 0.0 <= forward["p_value"] <= 1.0
    assert forward["p_value"] == pytest.approx(backward["p_value"])
    assert forward["difference"] == pytest.approx(-backward["difference"])
    low, high = forward["ci"]
    assert low <= forward["difference"] <= high


def test_the_paired_bootstrap_is_seeded_and_its_interval_holds_the_mean() -> None:
    a = pl.Series([float(i % 7) for i in range(200)])
    b = a + pl.Series([0.5 + (i % 3) * 0.1 for i in range(200)])
    first, second = paired_bootstrap(a, b), paired_bootstrap(a, b)
    assert first == second
    low, high = first["ci"]
    assert low <= first["difference"] <= high and low > 0
    assert first["p_value"] == 0.0
    assert "warning" not in paired_test(a, b)


def test_a_small_n_gets_a_warning() -> None:
    result = paired_test(pl.Series([0.2, 0.4, 0.9]), pl.Series([0.3, 0.4, 1.0]))
    assert result["test"] == "paired-bootstrap" and "small n (3" in result["warning"]
    assert math.isfinite(result["ci"][0])


def test_changed_keys_name_nested_settings() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}}) == {"a.b": 1, "a.c": [1, 2]}
    assert changed_keys({"a": {"b": 1}, "x": 1}, {"a": {"b": 2}, "y": 1}) == ["a.b", "x", "y"]


def test_the_service_defaults_recorded_follow_the_mode_and_leave_out_what_was_sent() -> None:
    from qwen_batch.manifest import service_defaults

    thinking = service_defaults("qwen-plus", True, {"temperature": 0.0, "seed": 1})
    assert {key: thinking[key] for key in ("top_p", "top_k")} == {"top_p": 0.95, "top_k": 20}
    assert "temperature" not in thinking and "A.4" in thinking["source"]
    assert service_defaults("qwen3.5-flash", False, {})["temperature"] == 0.7
    assert service_defaults("qwq-plus", True, {})["top_k"] == 40
    assert service_defaults("qwen-turbo", False, {}) == {}  # no documented defaults for the family
