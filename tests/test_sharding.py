"""Sharding's pieces: the stable unit hash, the shard mask, and the spec's ``shards:`` entries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_batch.errors import SpecError
from qwen_batch.sharding import Shard, ShardError, shard_mask, shard_sizes, unit_shard, unit_shards
from qwen_batch.spec import load_spec

row_ids = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=40, unique=True)
slots = st.lists(st.tuples(st.sampled_from(["", "model=qwen-plus", "seed=1", "temperature=0.7"]), st.integers(0, 3)),
                 min_size=1, max_size=4, unique=True)


@settings(max_examples=200, deadline=None)
@given(ids=row_ids, units=slots, count=st.integers(1, 64))
def test_every_unit_is_in_exactly_one_shard_for_any_n(ids: list[str], units: list[tuple[str, int]], count: int) -> None:
    masks = [shard_mask(ids, units, Shard(index, count)) for index in range(count)]
    assert all(len(mask) == len(ids) * len(units) for mask in masks)
    assert [sum(column) for column in zip(*masks, strict=True)] == [1] * (len(ids) * len(units))
    assert shard_sizes(ids, units, count) == [mask.count(1) for mask in masks]


@settings(max_examples=100, deadline=None)
@given(ids=row_ids, units=slots, count=st.integers(1, 64))
def test_a_units_shard_depends_on_its_identity_only_never_on_order(
    ids: list[str], units: list[tuple[str, int]], count: int
) -> None:
    forward = dict(zip(((r, v, s) for r in ids for v, s in units), unit_shards(ids, units, count), strict=True))
    backward_ids, backward_units = ids[::-1], units[::-1]
    backward = zip(((r, v, s) for r in backward_ids for v, s in backward_units),
                   unit_shards(backward_ids, backward_units, count), strict=True)
    assert dict(backward) == forward
    assert all(Shard(shard, count).holds(*unit) for unit, shard in forward.items())


def test_the_hash_is_stable_across_releases() -> None:
    """Fixed values: a changed hash would send every unit of a half-done sharded job again."""
    assert [unit_shard(f"r{i:03d}", "", 0, 4) for i in range(8)] == [
        unit_shard(f"r{i:03d}", "", 0, 4) for i in range(8)
    ]
    assert unit_shard("r000", "", 0, 4) == int.from_bytes(
        __import__("hashlib").blake2b(b"r000\x1f\x1f0", digest_size=8).digest(), "big"
    ) % 4
    assert [unit_shard("q1", "", sample, 1000) for sample in range(3)] == [
        unit_shard("q1", "", sample, 1000) for sample in range(3)
    ]


def test_the_hash_spreads_units_evenly() -> None:
    sizes = shard_sizes([f"row-{i}" for i in range(40_000)], [("", 0)], 4)
    assert all(9_500 <= size <= 10_500 for size in sizes), sizes


@pytest.mark.parametrize("text", ["4/4", "-1/4", "1/0", "1 of 4", "١/٤", "1/4/2", "", "0/65537"])
def test_a_bad_shard_value_is_one_line_naming_it(text: str) -> None:
    with pytest.raises(ShardError) as caught:
        Shard.parse(text)
    message = str(caught.value)
    assert message.startswith("--shard ") and "\n" not in message and "0 to N-1" in message


def test_a_part_path_is_beside_the_output(tmp_path: Path) -> None:
    assert Shard(2, 8).part_path(tmp_path / "out.parquet") == tmp_path / "out.parquet.parts" / "part-2-of-8.parquet"


BASE: dict[str, Any] = {
    "model": "qwen-turbo",
    "input": {"path": "in.csv", "id_column": "id"},
    "prompt": {"template": "Say: {text}"},
    "execution": {"requests_per_minute": 600},
}


def spec_file(tmp_path: Path, shards: Any, **extra: Any) -> Path:
    (tmp_path / "in.csv").write_text("id,text\na,x\n", encoding="utf-8")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**BASE, **extra, "shards": shards}), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("shards", "message"),
    [
        ([{"api": {"base_ur": "https://a.example/api/v1"}}], "shards[0].api: unknown key 'base_ur' (did you mean 'base_url'?)"),
        ([{}, {"api": {"base_url": "http://a.example/api/v1"}}], "shards[1].api.base_url: 'http://a.example/api/v1' would send"),
        ([{"api": {"key_env": "not a name"}}], "shards[0].api.key_env: "),
        ([{"execution": {"requests_per_minute": 0}}], "shards[0].execution.requests_per_minute: must be > 0, got 0"),
        ([{"execution": {"concurrency": 4}}], "shards[0].execution: unknown key 'concurrency'"),
        ([{"region": "cn"}], "shards[0]: unknown key 'region' (valid keys: api, execution)"),
        ([], "shards: must not be empty"),
        ({"api": {}}, "shards: must be a list"),
    ],
)
def test_a_bad_shards_entry_is_one_line_naming_its_key(tmp_path: Path, shards: Any, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        load_spec(spec_file(tmp_path, shards))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith(str(tmp_path / "job.yaml"))


def test_a_shards_entry_lays_its_keys_over_the_jobs(tmp_path: Path) -> None:
    shards = [
        {"api": {"key_env": "KEY_A"}, "execution": {"requests_per_minute": 100}},
        {"api": {"base_url": "https://b.example/api/v1", "key_env": "KEY_B"}},
    ]
    spec = load_spec(spec_file(tmp_path, shards, api={"base_url": "https://a.example/api/v1"}))
    first, second = spec.for_shard(0, 2), spec.for_shard(1, 2)
    assert (first.api.base_url, first.api.key_env, first.execution.requests_per_minute) == (
        "https://a.example/api/v1", "KEY_A", 100)
    assert (second.api.base_url, second.api.key_env, second.execution.requests_per_minute) == (
        "https://b.example/api/v1", "KEY_B", 600)
    assert first.job is spec and second.job is spec and first.path == spec.path
    assert spec.api.key_env == "DASHSCOPE_API_KEY"  # the job's own spec is unchanged


def test_shard_n_must_be_the_number_of_entries(tmp_path: Path) -> None:
    spec = load_spec(spec_file(tmp_path, [{}, {}]))
    with pytest.raises(SpecError, match=r"shards: lists 2 shards, but --shard 0/3 is one of 3; run --shard I/2"):
        spec.for_shard(0, 3)
