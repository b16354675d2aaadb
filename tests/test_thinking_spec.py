"""Issue 14, the spec side: the new keys, the mode decision at validate/run, thinking costs in
preflight and estimate, the summary's reasoning figures, user catalogs and ``qwen-batch models``."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_batch.catalog import Price, PriceTier, builtin
from qwen_batch.checkpoint import RECORD_SCHEMA
from qwen_batch.cli import main
from qwen_batch.errors import SpecError
from qwen_batch.job import prepare
from qwen_batch.modes import Mode
from qwen_batch.plan import JobOptions
from qwen_batch.report import render_summary
from qwen_batch.runner import RunStatistics
from qwen_batch.spec import Parameters, load_spec, price_for, resolve_model
from qwen_batch.summary import build_summary
from qwen_batch.user_catalog import CATALOG_ENV, for_job, with_user_files

from .conftest import write_csv, write_job
from .refusal import refused, spec

ROWS = [["a", "one"], ["b", "two"], ["c", "three"]]


def job(folder: Path, name: str = "job.yaml", **sections: Any) -> Path:
    write_csv(folder / "in.csv", ["id", "text"], ROWS)
    return write_job(folder, spec("thinking", **sections), name)


# --- spec keys ------------------------------------------------------------------------------


def test_the_new_keys_leave_an_old_jobs_wire_parameters_unchanged() -> None:
    assert Parameters().to_wire() == {"seed": 1234}
    assert Parameters(stream=True).to_wire() == {"seed": 1234}  # how to send, not what to ask


def test_thinking_keys_are_sent_as_written_when_set() -> None:
    wire = Parameters(enable_thinking=True, thinking_budget=64, stream=False).to_wire()
    assert wire == {"seed": 1234, "enable_thinking": True, "thinking_budget": 64}


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"parameters": {"stream": "yes"}}, "parameters.stream: must be auto, true or false, got 'yes' (str)"),
        ({"parameters": {"enable_thinking": "true"}}, "parameters.enable_thinking: must be true or false"),
        ({"parameters": {"thinking_budget": 0}}, "parameters.thinking_budget: must be >= 1, got 0"),
        ({"api": {"endpoint": "vision"}}, "api.endpoint: must be one of 'auto', 'text' or 'multimodal'"),
        ({"catalog": 5}, "catalog: must be a path string"),
    ],
)
def test_a_bad_value_of_a_new_key_is_one_line_naming_it(tmp_path: Path, section: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError) as caught:
        load_spec(job(tmp_path, **section))
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_catalog_key_is_taken_from_the_job_files_folder(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    write_csv(tmp_path / "jobs" / "in.csv", ["id", "text"], ROWS)
    (tmp_path / "models.json").write_text('{"models": {}}', encoding="utf-8")
    path = write_job(tmp_path / "jobs", spec("x", catalog="../models.json"))
    assert load_spec(path).catalog == tmp_path / "models.json"


# --- the mode, decided before anything is sent ----------------------------------------------------


@pytest.mark.parametrize(
    ("model", "parameters", "mode"),
    [
        ("qwq-plus", {}, Mode(True, True, "text", True, 32768)),
        ("qwen3-32b", {"thinking_budget": 100}, Mode(True, True, "text", True, 100)),
        ("qwen3-32b", {"enable_thinking": False}, Mode(False, False, "text", True, 0)),
        ("qwen-plus", {}, Mode(False, False, "text", True, 0)),
        ("qwen-plus", {"enable_thinking": True, "thinking_budget": 500}, Mode(True, True, "text", True, 500)),
        ("qwen3.5-plus", {"thinking_budget": 200}, Mode(True, True, "multimodal", True, 200)),
    ],
)
def test_prepare_puts_the_resolved_mode_on_the_plan(
    tmp_path: Path, model: str, parameters: dict[str, Any], mode: Mode
) -> None:
    path = job(tmp_path, model=model, parameters={"max_tokens": 50, **parameters})
    assert prepare(path, JobOptions(no_cache=True)).mode == mode


@pytest.mark.parametrize(
    ("model", "parameters", "key"),
    [
        ("qwq-plus", {"stream": False}, "parameters.stream"),
        ("qwen3-32b", {"stream": False}, "parameters.stream"),
        ("qwen-max", {"enable_thinking": True}, "parameters.enable_thinking"),
        ("qwq-plus", {"enable_thinking": False}, "parameters.enable_thinking"),
        ("qwen3-32b", {"enable_thinking": False, "thinking_budget": 10}, "parameters.thinking_budget"),
        ("qwen3-32b", {"thinking_budget": 10, "result_format": "text"}, "parameters.result_format"),
        ("qwen3-235b-a22b-thinking-2507", {}, "parameters.thinking_budget"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_mode_every_request_would_be_refused_for_exits_2_with_nothing_sent(
    tmp_path: Path,
    job_env: dict[str, str],
    emulator: Any,
    capsys: pytest.CaptureFixture[str],
    command: str,
    model: str,
    parameters: dict[str, Any],
    key: str,
) -> None:
    path = job(tmp_path, model=model, parameters={"max_tokens": 50, **parameters})
    line = refused([command, str(path)], tmp_path, emulator, capsys)
    assert line.startswith(f"error: {path}: {key}: ")


def test_a_known_model_without_an_output_limit_asks_for_max_tokens(
    tmp_path: Path, job_env: dict[str, str], emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = job(tmp_path, model="qwen3.5-plus", parameters={"thinking_budget": 10})
    line = refused(["validate", str(path)], tmp_path, emulator, capsys)
    assert "parameters.max_tokens: the catalog does not know qwen3.5-plus's output limit" in line


# --- costs with thinking ------------------------------------------------------------------------------


def test_the_spec_price_may_give_a_thinking_price_and_falls_back_to_the_output_price(tmp_path: Path) -> None:
    priced = load_spec(job(tmp_path, pricing={"input_per_1k": 0.001, "output_per_1k": 0.002, "thinking_output_per_1k": 0.008}))
    tier = price_for(priced, None).tiers[0]  # type: ignore[union-attr]
    assert (tier.output_per_million, tier.reasoning_per_million) == (2.0, 8.0)
    plain = load_spec(job(tmp_path, "plain.yaml", pricing={"input_per_1k": 0.001, "output_per_1k": 0.002}))
    assert price_for(plain, None).tiers[0].reasoning_per_million == 2.0  # type: ignore[union-attr]


def test_preflight_and_estimate_reserve_the_thinking_budget_at_the_thinking_price(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = job(tmp_path, model="qwen3-32b", parameters={"max_tokens": 50, "thinking_budget": 100})
    plan = prepare(path, JobOptions(no_cache=True))
    report = plan.preflight
    # qwen3-32b: 2 CNY/M input, 8 output, 20 thinking.
    expected_max = sum(r.input_tokens * 2 + 50 * 8 + 100 * 20 for r in plan.requests()) / 1e6
    assert report.to_send_cost_max == pytest.approx(expected_max)
    assert main(["estimate", str(path), "--json", "--no-cache"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    assert estimate["reasoning_tokens"] == {
        "min": 0,
        "expected": 300,
        "max": 300,
        "per_row_cap": 100,
        "expected_basis": "assumption: every row thinks up to its cap (thinking length cannot be told from the prompt)",
    }
    assert estimate["cost"]["max"] == pytest.approx(expected_max, abs=1e-6)
    without_reasoning = report.to_send_cost_min + estimate["output_tokens"]["expected"] * 8 / 1e6
    assert estimate["cost"]["expected"] == pytest.approx(without_reasoning + 300 * 20 / 1e6, abs=1e-6)


def test_a_job_that_does_not_think_reserves_no_reasoning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = job(tmp_path, model="qwen3-32b", parameters={"max_tokens": 50, "enable_thinking": False})
    assert main(["estimate", str(path), "--json", "--no-cache"]) == 0
    reasoning = json.loads(capsys.readouterr().out)["reasoning_tokens"]
    assert (reasoning["max"], reasoning["expected_basis"]) == (0, "the job does not think")


# --- the summary ---------------------------------------------------------------------------------------


def _log(records: list[dict[str, Any]], drop: tuple[str, ...] = ()) -> pl.LazyFrame:
    schema = {k: v for k, v in RECORD_SCHEMA.items() if k not in drop}
    rows = [{k: r.get(k) for k in schema} for r in records]
    frame = pl.DataFrame(rows, schema=schema)
    for name in drop:  # an older log read with today's schema: the column is all null
        frame = frame.with_columns(pl.lit(None, dtype=RECORD_SCHEMA[name]).alias(name))
    return frame.lazy()


def _plan(rows: int, price: Price | None) -> Any:
    spec = SimpleNamespace(name="j", model="m", parameters=SimpleNamespace(response_format=None))
    return SimpleNamespace(
        rows=rows, units=rows, own_units=rows, units_per_row=1, samples=1, variants=(), price=price, spec=spec,
        output_path=Path("o.parquet"),
    )


STATS = RunStatistics(3, 3, 3, 0, {}, 0, 0.0, 0, 0, 0.0, 0, 0, 0, 1.0)
TIERED = Price((PriceTier(100, 1.0, 2.0, 8.0), PriceTier(None, 2.0, 4.0, 16.0)))


def _ok(index: int, **fields: Any) -> dict[str, Any]:
    return {"index": index, "fingerprint": "f", "status": "ok", "cached": False, "finish_reason": "stop", **fields}


def test_the_summary_counts_reasoning_tokens_prices_them_by_tier_and_flags_rows_truncated_in_thinking() -> None:
    log = _log(
        [
            _ok(0, input_tokens=10, output_tokens=30, reasoning_tokens=20, output_text="answer", cost=0.0),
            _ok(1, input_tokens=500, output_tokens=40, reasoning_tokens=40, output_text="", finish_reason="length"),
            _ok(2, input_tokens=10, output_tokens=5, reasoning_tokens=0, output_text="", finish_reason="length"),
        ]
    )
    summary = build_summary(_plan(3, TIERED), log, STATS, None)
    assert summary["tokens"]["reasoning"] == 60
    assert summary["cost"]["reasoning"] == pytest.approx((20 * 8.0 + 40 * 16.0) / 1e6)
    # Row 2 ran out of tokens without thinking: a short answer, not a thought cut off.
    assert summary["rows"]["truncated_in_thinking"] == 1
    out = io.StringIO()
    render_summary(summary, out)
    assert "warning: 1 row(s) ran out of tokens inside their thinking and have no answer" in out.getvalue()


def test_an_older_log_without_reasoning_counts_none() -> None:
    log = _log([_ok(0, input_tokens=10, output_tokens=30, output_text="", finish_reason="length")], drop=("reasoning_tokens",))
    summary = build_summary(_plan(1, TIERED), log, STATS, None)
    assert (summary["tokens"]["reasoning"], summary["cost"]["reasoning"], summary["rows"]["truncated_in_thinking"]) == (0, 0.0, 0)
    out = io.StringIO()
    render_summary(summary, out)
    assert "warning" not in out.getvalue()


# --- user catalogs ----------------------------------------------------------------------------------------


def _catalog(path: Path, models: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"models": models}), encoding="utf-8")
    return path


NEW_MODEL = {"max_output_tokens": 4096, "thinking": "only", "thinking_needs_stream": True, "max_thinking_tokens": 1000}


def test_a_model_of_the_specs_catalog_is_known_and_thinks_as_the_file_says(tmp_path: Path) -> None:
    _catalog(tmp_path / "models.json", {"qwen9-plus": NEW_MODEL})
    path = job(tmp_path, model="qwen9-plus", catalog="models.json", parameters={"max_tokens": 50})
    plan = prepare(path, JobOptions(no_cache=True))  # no api.allow_unknown_model needed
    assert plan.mode == Mode(True, True, "text", True, 1000)
    assert plan.model_info is not None and plan.model_info.max_output_tokens == 4096


def test_a_partial_entry_overrides_only_its_keys_and_the_specs_file_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = _catalog(tmp_path / "env.json", {"qwen3-32b": {"max_thinking_tokens": 500, "max_output_tokens": 4000}})
    _catalog(tmp_path / "job.json", {"qwen3-32b": {"max_thinking_tokens": 700}})
    monkeypatch.setenv(CATALOG_ENV, str(env_file))
    path = job(tmp_path, model="qwen3-32b", catalog="job.json", parameters={"max_tokens": 50})
    info = resolve_model(load_spec(path), for_job(load_spec(path).catalog))
    built = builtin().get("qwen3-32b")
    assert info is not None and built is not None
    assert (info.max_thinking_tokens, info.max_output_tokens) == (700, 4000)
    assert (info.price, info.thinking, info.context_tokens) == (built.price, built.thinking, built.context_tokens)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"models": {"qwen3-32b": {"thinking": "sometimes"}}}, "models.qwen3-32b.thinking: must be one of 'none', 'hybrid' or 'only', got \"sometimes\""),
        ({"models": {"qwen3-32b": {"max_thinking_token": 5}}}, "models.qwen3-32b: unknown key 'max_thinking_token' (did you mean 'max_thinking_tokens'?)"),
        ({"models": {"x": {"price": {"tiers": [{"input": 1, "outptu": 2}]}}}}, "models.x.price.tiers.0: unknown key 'outptu'"),
        ({"qwen3-32b": {}}, 'a user catalog is a JSON object {"models"'),
    ],
)
def test_a_bad_user_catalog_exits_2_naming_the_file_and_key(
    tmp_path: Path,
    job_env: dict[str, str],
    emulator: Any,
    capsys: pytest.CaptureFixture[str],
    content: dict[str, Any],
    expected: str,
) -> None:
    catalog = tmp_path / "models.json"
    catalog.write_text(json.dumps(content), encoding="utf-8")
    path = job(tmp_path, catalog="models.json")
    line = refused(["run", str(path)], tmp_path, emulator, capsys)
    assert line.startswith(f"error: {catalog}: ") and expected in line


def test_a_user_catalog_that_is_not_json_is_refused_with_its_line(
    tmp_path: Path, job_env: dict[str, str], emulator: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = tmp_path / "models.json"
    catalog.write_text('{"models": {\n  "x": {,}\n}}', encoding="utf-8")
    monkeypatch.setenv(CATALOG_ENV, str(catalog))
    line = refused(["validate", str(job(tmp_path))], tmp_path, emulator, capsys)
    assert line.startswith(f"error: {catalog}: the user catalog is not valid JSON") and "line 2" in line


# --- qwen-batch models ------------------------------------------------------------------------------------


def test_models_json_lists_every_model_with_its_thinking_path_limits_prices_and_sources(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {model["name"]: model for model in data["models"]}
    assert sorted(by_name) == builtin().names()
    plus = by_name["qwen-plus-latest"]
    assert plus["thinking"]["mode"] == "hybrid" and plus["thinking"]["default"] is False
    assert [t["thinking_output_per_million"] for t in plus["price"]["tiers"]] == [8.0, 24.0, 64.0]
    assert plus["price"]["source"] and plus["limits"]["source"] and plus["rate_limits"]["source"]
    qwen35 = by_name["qwen3.5-plus"]
    assert (qwen35["native_path"], qwen35["family"], qwen35["thinking"]["default"]) == ("multimodal", "qwen3.5", True)
    assert "max_thinking_tokens" in qwen35["unconfirmed"]
    assert by_name["qwq-plus"]["stream_only"] is True
    for family in ("qwen3.5", "qwen3.6", "qwen3.7", "qwen3.8", "qwen3-2507"):
        assert any(model["family"] == family for model in data["models"]), family
    assert "qwen3-max-2026-01-23" in by_name


def test_models_merges_the_users_catalog_and_marks_its_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env_file = _catalog(tmp_path / "env.json", {"qwen9-plus": NEW_MODEL})
    flag_file = _catalog(tmp_path / "flag.json", {"qwen-max": {"max_output_tokens": 9999}})
    monkeypatch.setenv(CATALOG_ENV, str(env_file))
    assert main(["models", "qwen9-plus", "qwen-max", "--json", "--catalog", str(flag_file)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["origin"]) for m in data["models"]] == [("qwen9-plus", str(env_file)), ("qwen-max", str(flag_file))]
    assert data["models"][1]["limits"]["max_output_tokens"] == 9999
    assert main(["models", "qwen9-plus"]) == 0
    table = capsys.readouterr().out
    assert "qwen9-plus (user)" in table and "sources and dates" in table


def test_models_table_marks_unconfirmed_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "qwq-plus"]) == 0
    out = capsys.readouterr().out
    assert "32,768*" in out and "ragflow#5912" in out


def test_models_refuses_a_name_the_catalog_lacks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "qwen3.5-pluss"]) == 2
    assert "error: models: 'qwen3.5-pluss' is not in the catalog; did you mean 'qwen3.5-plus'?" in capsys.readouterr().err


# A value of each scalar key a user entry may give, differing from every built-in model's.
OVERRIDES: dict[str, Any] = {
    "context_tokens": 123457,
    "max_input_tokens": 100001,
    "max_output_tokens": 4321,
    "default_max_tokens": 1234,
    "limits_source": "my notes, 2026-12",
    "default_result_format": "message",
    "thinking_default": True,
    "thinking_needs_stream": True,
    "stream_only": True,
    "native_path": "multimodal",
    "max_thinking_tokens": 777,
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=st.sampled_from(builtin().names()), keys=st.sets(st.sampled_from(sorted(OVERRIDES))))
def test_a_partial_entry_changes_exactly_the_keys_it_gives(tmp_path: Path, model: str, keys: set[str]) -> None:
    catalog = _catalog(tmp_path / f"{len(keys)}.json", {model: {key: OVERRIDES[key] for key in keys}})
    merged = with_user_files([catalog]).get(model)
    built = builtin().get(model)
    assert merged is not None and built is not None
    for key in OVERRIDES:
        assert getattr(merged, key) == (OVERRIDES[key] if key in keys else getattr(built, key)), key
    assert (merged.price, merged.rate_limits, merged.thinking) == (built.price, built.rate_limits, built.thinking)


def test_the_estimate_table_shows_reasoning_tokens_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = job(tmp_path, model="qwq-plus", parameters={"max_tokens": 50, "thinking_budget": 40})
    assert main(["estimate", str(path), "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "reasoning tokens" in out and "0 .. 120 (expected 120, at most 40 a row)" in out


def test_validate_says_how_a_thinking_job_is_sent(
    tmp_path: Path, job_env: dict[str, str], emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = job(tmp_path, model="qwen3-32b", parameters={"max_tokens": 50, "thinking_budget": 64})
    assert main(["validate", str(path)]) == 0
    assert "  requests: streamed, thinking up to 64 reasoning tokens a row, on the text-generation path" in capsys.readouterr().out
    assert emulator.ledger == []
    plain = job(tmp_path, "plain.yaml", model="qwen3-32b", parameters={"max_tokens": 50, "enable_thinking": False})
    assert main(["validate", str(plain)]) == 0
    assert "requests:" not in capsys.readouterr().out
