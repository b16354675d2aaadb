"""Variants and units (variants.py): sweep order, ids, per-sample seeds, unit keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen_batch import catalog
from qwen_batch.errors import SpecError
from qwen_batch.render import Renderer
from qwen_batch.spec import load_spec
from qwen_batch.types import UnitKey
from qwen_batch.variants import (
    NO_SWEEP,
    all_renderers,
    build_variants,
    split_unit_key,
    sweep_settings,
    unit_key,
    variant_id,
)

from .conftest import sentences_job


def _spec(tmp_path: Path, **overrides: Any) -> Any:
    return load_spec(sentences_job(tmp_path, ["a", "b"], **overrides))


def test_without_a_sweep_there_is_one_variant_with_an_empty_id(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    assert sweep_settings(spec) == [{}]
    (variant,) = build_variants(spec, catalog.builtin(), emulate=True)
    assert variant.id == NO_SWEEP == ""
    assert variant.model == "qwen-turbo" and variant.seed == 7


def test_the_sweep_is_crossed_in_order_model_then_seed_then_parameters(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        sweep={"parameters": {"top_p": [0.5, 0.9]}, "seed": [1, 2], "model": ["qwen-plus", "qwen-turbo"]},
    )
    ids = [variant_id(settings) for settings in sweep_settings(spec)]
    assert ids == [
        f"model={m},seed={s},top_p={p}" for m in ("qwen-plus", "qwen-turbo") for s in (1, 2) for p in (0.5, 0.9)
    ]


def test_each_variant_sends_its_own_values_and_each_sample_the_next_seed(tmp_path: Path) -> None:
    spec = _spec(tmp_path, samples=3, sweep={"model": ["qwen-plus", "qwen-turbo"], "parameters": {"temperature": [0.2]}})
    variants = build_variants(spec, catalog.builtin(), emulate=True)
    renderers = all_renderers(variants)
    assert len(renderers) == 6
    row = {"id": "x", "text": "hello"}
    requests = [renderer.render(4, row) for renderer in renderers]
    assert [r.index for r in requests] == [24, 25, 26, 27, 28, 29]  # row 4 x 6 units + slot
    assert [r.unit for r in requests] == [UnitKey(4, v, s) for v in range(2) for s in range(3)]
    assert [(r.model, r.seed, r.parameters["temperature"]) for r in requests] == [
        (m, 7 + s, 0.2) for m in ("qwen-plus", "qwen-turbo") for s in range(3)
    ]
    assert len({r.fingerprint for r in requests}) == 6
    assert all(r.unit.dense_index(2, 3) == r.index for r in requests)


def test_a_single_renderer_job_keeps_the_row_position_as_its_unit_index(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    plain = Renderer(spec, catalog.builtin().get("qwen-turbo"))
    (variant,) = build_variants(spec, catalog.builtin(), emulate=True)
    row = {"id": "x", "text": "hello"}
    assert variant.renderers[0].render(9, row) == plain.render(9, row)


def test_each_model_of_a_sweep_has_its_own_price_and_catalog_entry(tmp_path: Path) -> None:
    spec = _spec(tmp_path, sweep={"model": ["qwen-plus", "qwen-turbo"]})
    plus, turbo = build_variants(spec, catalog.builtin(), emulate=True)
    assert plus.model_info is not None and plus.model_info.name == "qwen-plus"
    assert plus.price is not None and turbo.price is not None
    assert plus.price.tiers[0].input_per_million != turbo.price.tiers[0].input_per_million


def test_a_value_the_parameter_refuses_names_the_variant(tmp_path: Path) -> None:
    spec = _spec(tmp_path, sweep={"parameters": {"temperature": [0.1, 2.0]}})
    with pytest.raises(SpecError, match=r"sweep: variant 'temperature=2.0'"):
        build_variants(spec, catalog.builtin(), emulate=True)


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"parameters": {"temprature": [0.1]}}, "unknown parameter"),
        ({"parameters": {"seed": [1]}}, "sweep.seed sweeps the seed"),
        ({"model": []}, "at least one value"),
        ({"seed": [1, 1]}, "a value twice"),
        ({"colour": ["red"]}, "colour"),
    ],
)
def test_a_bad_sweep_is_refused_when_the_spec_loads(tmp_path: Path, sweep: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _spec(tmp_path, sweep=sweep)


def test_samples_must_be_a_whole_number_of_at_least_one(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="samples"):
        _spec(tmp_path, samples=0)


ids = st.text(st.characters(blacklist_characters="\x1f", blacklist_categories=("Cs",)), max_size=20)


@given(row_id=ids, variant=ids, sample=st.integers(0, 10_000))
def test_a_unit_key_reads_back_as_its_parts(row_id: str, variant: str, sample: int) -> None:
    assert split_unit_key(unit_key(row_id, variant, sample)) == (row_id, variant, sample)


@given(
    a=st.tuples(ids, ids, st.integers(0, 100)),
    b=st.tuples(ids, ids, st.integers(0, 100)),
)
def test_different_units_have_different_keys(a: tuple[str, str, int], b: tuple[str, str, int]) -> None:
    assert (unit_key(*a) == unit_key(*b)) == (a == b)


@given(rows=st.integers(1, 50), variants=st.integers(1, 6), samples=st.integers(1, 6))
def test_dense_indexes_run_in_output_order_without_gaps(rows: int, variants: int, samples: int) -> None:
    keys = [UnitKey(r, v, s) for r in range(rows) for v in range(variants) for s in range(samples)]
    assert [key.dense_index(variants, samples) for key in keys] == list(range(len(keys)))
    assert [UnitKey.of_dense_index(i, variants, samples) for i in range(len(keys))] == keys
