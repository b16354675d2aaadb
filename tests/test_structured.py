"""structured.py: parsing, schema checks, the canonical form, the re-ask request, a row's one outcome."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_batch.render import Renderer
from qwen_batch.spec import JobSpec
from qwen_batch.structured import AnswerCheck, JsonMode, Parsed, canonical, parse_json, schema_problem, settle
from qwen_batch.types import Outcome, Reply

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "integer"}}},
    "required": ["name"],
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_the_canonical_form_parses_back_to_the_same_value(value: Any) -> None:
    assert parse_json(canonical(value)) == value


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6), st.randoms())
def test_the_canonical_form_does_not_depend_on_key_order_or_spacing(value: dict[str, Any], rng: Any) -> None:
    keys = list(value)
    rng.shuffle(keys)
    reordered = {key: value[key] for key in keys}
    spaced = json.dumps(reordered, indent=2, ensure_ascii=True)
    assert AnswerCheck(None)(spaced).output_json == canonical(value)


def test_canonical_is_compact_sorted_and_keeps_unicode() -> None:
    assert canonical({"b": 1, "a": ["é", None]}) == '{"a":["é",null],"b":1}'


def test_an_answer_that_is_not_json_is_invalid_json_with_the_decode_position() -> None:
    parsed = AnswerCheck(SCHEMA)('Here is the JSON: {"name": "x"')
    assert parsed == Parsed("invalid_json", None, "Expecting value: line 1 column 1 (char 0)")


def test_nan_and_infinity_are_not_json() -> None:
    for text in ("NaN", '{"x": Infinity}', "-Infinity"):
        assert AnswerCheck(None)(text).status == "invalid_json"


def test_a_schema_mismatch_names_the_path_of_the_first_error() -> None:
    check = AnswerCheck(SCHEMA)
    assert check('{"name": "x", "tags": [1, "two"]}') == Parsed("schema_mismatch", None, "$.tags[1]: 'two' is not of type 'integer'")
    assert check('{"tags": []}').error == "$: 'name' is a required property"
    assert check('{"name": "x", "tags": [3]}') == Parsed("ok", '{"name":"x","tags":[3]}')


def test_the_schemas_own_draft_is_used() -> None:
    # Draft 4's exclusiveMaximum is a boolean; 2020-12 would call this schema invalid.
    draft4 = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "number", "maximum": 5, "exclusiveMaximum": True}
    assert schema_problem(draft4) is None
    assert AnswerCheck(draft4)("5").status == "schema_mismatch"
    assert AnswerCheck(draft4)("4").status == "ok"
    assert schema_problem({"type": "number", "exclusiveMaximum": True}) is not None


def test_schema_problem_names_where_the_schema_is_wrong() -> None:
    assert schema_problem({"type": "objekt"}) is not None
    assert "properties" in (schema_problem({"properties": {"a": {"type": 3}}}) or "")
    assert schema_problem(SCHEMA) is None


def _renderer(protocol: str) -> Renderer:
    spec = JobSpec.model_validate(
        {
            "model": "qwen-turbo",
            "input": {"path": "x.csv"},
            "prompt": {"system": "Answer in JSON.", "template": "{text}"},
            "parameters": {"seed": 3, "max_tokens": 50, "response_format": {"type": "json_object"}},
        }
    )
    from qwen_batch.catalog import builtin

    return Renderer(spec, builtin().get("qwen-turbo"), protocol=protocol)


def test_a_follow_up_is_the_conversation_plus_the_answer_and_the_error_with_its_own_fingerprint() -> None:
    for protocol in ("dashscope", "openai"):
        renderer = _renderer(protocol)
        first = renderer.render(0, {"text": "hello"})
        mode = JsonMode("json_object", None, retries=1, protocol=protocol)
        follow = mode.follow_up(first, "not json", Parsed("invalid_json", error="Expecting value"))  # type: ignore[arg-type]
        assert follow.messages[:2] == first.messages  # type: ignore[union-attr]
        assert follow.messages[2] == {"role": "assistant", "content": "not json"}
        assert follow.messages[3]["role"] == "user" and "Expecting value" in follow.messages[3]["content"]
        assert follow.parameters == first.parameters and follow.index == first.index  # type: ignore[union-attr]
        assert follow.fingerprint != first.fingerprint  # type: ignore[union-attr]
        # The fingerprint is the one a rendered request with those messages would have.
        same = _renderer(protocol)
        as_rendered = same.render(0, {"text": "hello"})
        assert mode.follow_up(as_rendered, "not json", Parsed("invalid_json", error="Expecting value")).fingerprint == follow.fingerprint  # type: ignore[arg-type]
        assert follow.input_tokens > first.input_tokens  # type: ignore[union-attr]


def test_settle_sums_every_attempt_and_keeps_the_last_answer() -> None:
    first = _renderer("dashscope").render(0, {"text": "hello"})
    one = Outcome.answered(first, Reply("bad", "stop", 10, 5, "id1"), cost=0.1, attempts=2, latency_s=1.0)  # type: ignore[arg-type]
    two = Outcome.answered(first, Reply('{"a":1}', "stop", 20, 6, "id2"), cost=0.2, attempts=1, latency_s=0.5)  # type: ignore[arg-type]
    outcome = settle(first, [one, two], Parsed("ok", '{"a":1}'))  # type: ignore[arg-type]
    assert (outcome.status, outcome.output_text, outcome.request_id) == ("ok", '{"a":1}', "id2")
    assert (outcome.input_tokens, outcome.output_tokens, outcome.attempts, outcome.reasks) == (30, 11, 3, 1)
    assert abs(outcome.cost - 0.3) < 1e-12 and outcome.latency_s == 1.5  # type: ignore[operator]
    assert outcome.fingerprint == first.fingerprint  # type: ignore[union-attr]
    failed = settle(first, [one], Parsed("invalid_json", error="Expecting value"))  # type: ignore[arg-type]
    assert (failed.status, failed.error_code, failed.output_text, failed.parse_status) == ("error", "InvalidJSON", "bad", "invalid_json")
    assert failed.retryable is False and failed.cost == 0.1


def test_json_mode_off_imports_no_jsonschema() -> None:
    code = (
        "import sys, qwen_batch.runner, qwen_batch.work, qwen_batch.spec, qwen_batch.structured;"
        "print('jsonschema' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
