"""Compatibility with runs in flight: fingerprints and checkpoints written before the neutral request.

The literal digests below are a compatibility contract, not golden results: they were computed
once with the code at tag ``pre13`` (whose Request carried the native body and hashed its
canonical JSON) on exactly these rows, before the request became protocol-neutral. Every
checkpoint and cache entry users have is keyed by such digests, so the new rendering must
give the same bytes for the dashscope protocol, or resumes would resend and caches miss.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from qwen_batch.catalog import builtin
from qwen_batch.render import Renderer
from qwen_batch.spec import JobSpec, resolve_model
from qwen_batch.types import Request
from qwen_batch.wire import DASHSCOPE, native_body

from .conftest import run_subprocess, sentences_job

# (spec, row, sha256 computed by pre13's Renderer.render on that row)
PRE13_FINGERPRINTS: list[tuple[dict[str, Any], dict[str, Any], str]] = [
    (
        {"model": "qwen-turbo", "input": {"path": "in.csv", "id_column": "id"}, "prompt": {"template": "Translate:\n{text}"}},
        {"id": "a1", "text": "你好"},
        "817e45491aa719baa81f14c49ba7337681f265380d4eabda7322409f57c191e8",
    ),
    (
        {
            "model": "qwen-plus",
            "input": {"path": "in.csv"},
            "prompt": {"system": "Be brief.", "template": "Q: {q} ({n})"},
            "parameters": {"seed": 7, "temperature": 0.3, "top_p": 0.9, "max_tokens": 100, "stop": ["\n\n"]},
        },
        {"q": 'what is "2+2"? {x} \\ \u2028', "n": 3},
        "72ffaee852902cd1ff2512a0bda1bf8f680f4fcd4d5425a2b0d7e036bcbe6e60",
    ),
    (
        {"model": "qwen-max", "input": {"path": "in.csv"}, "prompt": {"prompt_column": "p"}, "parameters": {"result_format": "message"}},
        {"p": "emoji 😀 tab\t nl\n"},
        "af7e018bc091f98a1dfe900aa16974d946bcd4fddf135e719c96729f8473a682",
    ),
    (
        {"model": "qwen-turbo", "input": {"path": "in.jsonl"}, "prompt": {"system": "Default.", "messages_column": "m"}},
        {"m": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye ü"}]},
        "8f34ec31eeedf6e4f3afff1902851423e6e9d78e52fd89eb36317838e77f9e69",
    ),
    (
        {"model": "my-custom-model", "input": {"path": "in.csv"}, "prompt": {"template": "{t}"}, "parameters": {"max_tokens": 5}},
        {"t": "x"},
        "04cebf20c73218a2767d37cfc69c36c69135cb244cf0dd6b3d4d9aa71022fbf4",
    ),
]

# The record fields pre13 wrote (checkpoint format 1 before records kept model and seed).
PRE13_RECORD_FIELDS = {
    "index", "fingerprint", "status", "request_id", "output_text", "finish_reason", "input_tokens",
    "output_tokens", "cost", "error_code", "error_message", "retryable", "attempts", "latency_s", "cached",
    "preflight_input_tokens",
}


def _renderer(spec_data: dict[str, Any]) -> Renderer:
    spec = JobSpec.model_validate(copy.deepcopy(spec_data))
    return Renderer(spec, resolve_model(spec, builtin()), protocol=DASHSCOPE)


@pytest.mark.parametrize(("spec_data", "row", "digest"), PRE13_FINGERPRINTS, ids=["template", "params", "prompt-column", "messages", "custom"])
def test_dashscope_fingerprints_are_those_pre13_computed(spec_data: dict[str, Any], row: dict[str, Any], digest: str) -> None:
    renderer = _renderer(spec_data)
    request = renderer.render(4, row)
    assert isinstance(request, Request)
    assert request.fingerprint == digest
    assert renderer.fingerprint(4, row) == (request.row_id, digest)


@pytest.mark.parametrize(("spec_data", "row", "digest"), PRE13_FINGERPRINTS, ids=["template", "params", "prompt-column", "messages", "custom"])
def test_the_dashscope_fingerprint_is_the_sha256_of_the_native_bodys_canonical_json(spec_data, row, digest) -> None:
    request = _renderer(spec_data).render(0, row)
    assert isinstance(request, Request)
    canonical = json.dumps(native_body(request), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashlib.sha256(canonical.encode("utf-8")).hexdigest() == request.fingerprint == digest


def test_a_checkpoint_in_the_pre13_record_format_resumes_with_nothing_sent(tmp_path: Path, job_env: dict[str, str], emulator: Any) -> None:
    """Records without model and seed (as pre13 wrote them) count as done; the output fills the job's."""
    job = sentences_job(tmp_path, [f"sentence {i}" for i in range(12)])
    output = tmp_path / "out" / "result.parquet"
    first = run_subprocess(["run", str(job), "--quiet", "--no-cache"], job_env)
    assert first.returncode == 0, first.stderr
    reference = pl.read_parquet(output)
    sent_before = len(emulator.ledger)
    assert sent_before == 12

    rows_path = tmp_path / "out" / "result.parquet.checkpoint" / "rows.jsonl"
    records = [json.loads(line) for line in rows_path.read_bytes().splitlines()]
    assert {(r["model"], r["seed"]) for r in records} == {("qwen-turbo", 7)}
    # pre13 records had neither model and seed nor issue 14's reasoning and first-token fields
    # nor issue 15's usage_source and JSON-mode fields.
    later = (
        "model", "seed", "reasoning_text", "reasoning_tokens", "first_token_s", "usage_source",
        "output_json", "parse_status", "parse_error", "reasks",
    )
    old = [{k: v for k, v in r.items() if k not in later} for r in records]
    assert all(set(r) == PRE13_RECORD_FIELDS for r in old)
    rows_path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in old))
    output.unlink()

    second = run_subprocess(["run", str(job), "--quiet", "--no-cache"], job_env)
    assert second.returncode == 0, second.stderr
    assert len(emulator.ledger) == sent_before
    assert_frame_equal(pl.read_parquet(output), reference)
