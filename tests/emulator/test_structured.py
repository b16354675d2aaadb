"""``response_format``: JSON answers that match the schema, the directives that spoil them until a
re-ask, and the refusals (WAVE2 B.1); judged with ``jsonschema`` and the ``openai`` SDK."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_batch.emulator import RunningEmulator
from qwen_batch.emulator.structured import answer, breaking, reask_turns, value_for

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
        "mood": {"enum": ["calm", "busy", "odd"]},
        "price": {"type": ["number", "null"], "minimum": 0},
        "ok": {"type": "boolean"},
    },
    "required": ["title", "rating", "tags", "mood", "price", "ok"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA, "strict": True}}


def _client(emu: RunningEmulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=emu.compatible_base_url, api_key=emu.api_key, max_retries=0, timeout=10)


def _ask(emu: RunningEmulator, messages: list[dict[str, Any]], **extra: Any) -> str:
    completion = _client(emu).chat.completions.create(model="qwen-plus", messages=messages, seed=11, **extra)
    return completion.choices[0].message.content or ""


def _valid(text: str, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


# ----- the generator over a schema's types ----------------------------------------------

_LEAVES = st.one_of(
    st.just({"type": "string"}),
    st.integers(-50, 50).flatmap(lambda low: st.integers(low, low + 100).map(
        lambda high: {"type": "integer", "minimum": low, "maximum": high})),
    st.just({"type": "number", "minimum": 0.5, "maximum": 9.5}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=4, unique=True).map(lambda e: {"enum": e}),
    st.integers(1, 8).map(lambda n: {"type": "string", "minLength": n, "maxLength": n + 10}),
)
_SCHEMAS = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), inner, min_size=1, max_size=4).map(
            lambda props: {"type": "object", "properties": props, "required": sorted(props),
                           "additionalProperties": False}),
        inner.map(lambda items: {"type": "array", "items": items, "minItems": 1, "maxItems": 3}),
        st.lists(inner, min_size=1, max_size=2).map(lambda options: {"anyOf": options}),
    ),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(schema=_SCHEMAS, seed=st.integers(0, 2**64 - 1))
def test_the_generated_value_matches_any_schema_of_the_supported_keywords(schema: dict[str, Any], seed: int) -> None:
    value = value_for(schema, random.Random(seed), ("tea", "leaf", "cup"))
    jsonschema.validate(value, schema)


@settings(max_examples=100, deadline=None)
@given(schema=_SCHEMAS.filter(lambda s: "type" in s), seed=st.integers(0, 2**32))
def test_a_breaking_value_is_refused_by_every_typed_schema(schema: dict[str, Any], seed: int) -> None:
    valid = value_for(schema, random.Random(seed), ("tea",))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(breaking(schema, valid), schema)


def test_bad_json_is_not_json_and_the_rest_is() -> None:
    assert _valid(answer(SCHEMA, 5, "some words here"), SCHEMA)
    with pytest.raises(ValueError):
        json.loads(answer(SCHEMA, 5, "some words here", "bad_json"))
    assert not _valid(answer(SCHEMA, 5, "some words here", "bad_schema"), SCHEMA)
    json.loads(answer(SCHEMA, 5, "some words here", "bad_schema"))  # still JSON


def test_reask_turns_count_user_turns_after_the_answer() -> None:
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q [[emu: bad_json]]"}]
    assert reask_turns(first) == 0
    again = first + [{"role": "assistant", "content": "{oops"}, {"role": "user", "content": "fix it"}]
    assert reask_turns(again) == 1
    assert reask_turns(again + [{"role": "assistant", "content": "{x"}, {"role": "user", "content": "again"}]) == 2


# ----- over the wire --------------------------------------------------------------------


def test_a_json_schema_answer_matches_and_is_deterministic(emu: RunningEmulator) -> None:
    messages = [{"role": "user", "content": "Review this tea house."}]
    text = _ask(emu, messages, response_format=FORMAT)
    assert _valid(text, SCHEMA)
    assert _ask(emu, messages, response_format=FORMAT) == text
    other = _ask(emu, [{"role": "user", "content": "Review this noodle bar."}], response_format=FORMAT)
    assert other != text


def test_a_json_object_answer_is_an_object(emu: RunningEmulator) -> None:
    text = _ask(emu, [{"role": "user", "content": "Answer in JSON: what is tea?"}], response_format={"type": "json_object"})
    assert isinstance(json.loads(text), dict)


def test_bad_json_parses_after_one_reask(emu: RunningEmulator) -> None:
    messages = [{"role": "user", "content": "Review this tea house. [[emu: bad_json]]"}]
    first = _ask(emu, messages, response_format=FORMAT)
    with pytest.raises(ValueError):
        json.loads(first)
    reasked = messages + [{"role": "assistant", "content": first},
                          {"role": "user", "content": "Correct your JSON: Expecting ',' delimiter"}]
    assert _valid(_ask(emu, reasked, response_format=FORMAT), SCHEMA)
    # The same first request again is bad again: a seeded retry of the identical request does not help.
    assert _ask(emu, messages, response_format=FORMAT) == first


def test_bad_json_always_never_parses(emu: RunningEmulator) -> None:
    messages = [{"role": "user", "content": "Review it. [[emu: bad_json=always]]"}]
    for _ in range(3):
        text = _ask(emu, messages, response_format=FORMAT)
        with pytest.raises(ValueError):
            json.loads(text)
        messages = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": "Correct it."}]


def test_bad_schema_is_json_that_breaks_the_schema_until_two_reasks(emu: RunningEmulator) -> None:
    messages = [{"role": "user", "content": "Review it. [[emu: bad_schema=2]]"}]
    answers = []
    for _ in range(3):
        text = _ask(emu, messages, response_format=FORMAT)
        answers.append(text)
        messages = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": "Match the schema."}]
    assert [_valid(text, SCHEMA) for text in answers] == [False, False, True]
    assert all(isinstance(json.loads(text), dict) for text in answers)


def test_a_json_answer_cut_by_max_tokens_ends_length(emu: RunningEmulator) -> None:
    completion = _client(emu).chat.completions.create(model="qwen-plus", messages=[{"role": "user", "content": "Review"}],
                                                      response_format=FORMAT, max_tokens=5)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    assert not _valid(completion.choices[0].message.content or "", SCHEMA)


def test_a_json_answer_streams_to_the_same_text(emu: RunningEmulator) -> None:
    messages = [{"role": "user", "content": "Review this tea house."}]
    chunks = _client(emu).chat.completions.create(model="qwen-plus", messages=messages, seed=11, stream=True,
                                                  response_format=FORMAT)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == _ask(emu, messages,
                                                                                          response_format=FORMAT)


@pytest.mark.parametrize(("content", "fmt", "needle"), [
    ("Review it [[emu: bad_schema]]", {"type": "json_object"}, "must contain the word 'json'"),  # the service's check first
    ("Review it as json [[emu: bad_schema]]", {"type": "json_object"}, "bad_schema needs response_format json_schema"),
    ("Review it [[emu: bad_json]]", None, "need response_format"),
    ("Review it", {"type": "yaml"}, "'response_format.type' must be one of"),
    ("Review it", {"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema' must be an object"),
])
def test_misused_directives_and_formats_are_400(emu: RunningEmulator, content: str, fmt: Any, needle: str) -> None:
    extra = {"response_format": fmt} if fmt is not None else {}
    with pytest.raises(openai.BadRequestError) as caught:
        _ask(emu, [{"role": "user", "content": content}], **extra)
    assert needle in caught.value.body["message"]


def test_a_local_server_takes_json_object_without_the_word_and_with_thinking(start_emulator: Any) -> None:
    emu = start_emulator(server="vllm")
    client = openai.OpenAI(base_url=emu.compatible_base_url, api_key="unused", max_retries=0, timeout=10)
    completion = client.chat.completions.create(model="qwen3-8b", messages=[{"role": "user", "content": "Describe tea."}],
                                                response_format={"type": "json_object"})
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)
    assert completion.choices[0].message.model_extra["reasoning"]
