"""``response_format``: its checks, and a JSON answer built from the schema's types.

DashScope's rules (WAVE2 B.1, PROTO §1.3): ``json_object`` needs the word "json" somewhere in
the messages; a json mode with thinking is refused (validate.check_thinking). The answer is a
pure function of the request, like every reply: the values are drawn from a generator seeded
by the draft seed, and strings are taken from the words of the reply the model would have
given. The ``bad_json`` and ``bad_schema`` directives spoil the answer until the conversation
holds enough re-ask turns (a user message after the model's answer), so a client's re-ask
can be tested against a seeded request.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .faults import DIRECTIVE_MARK

JSON_WORD_MISSING = ("'messages' must contain the word 'json' in some form, to use 'response_format' of type "
                     "'json_object'.")
# Not documented: the reference gives no text for a malformed response_format.
FORMAT_TYPES = ("text", "json_object", "json_schema")
FORMAT_INVALID = "'response_format.type' must be one of 'text', 'json_object', 'json_schema'"
SCHEMA_MISSING = "'response_format.json_schema.schema' must be an object when type is 'json_schema'"
_SALT = 0x6A736F6E
_WORD = re.compile(r"\w+")
_FALLBACK_WORDS = ("value",)
_MAX_DEPTH = 6


class FormatError(ValueError):
    """A response_format the service refuses (the message is the service's text)."""


def json_mode(params: Mapping[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """(``json_object`` | ``json_schema`` | None, its schema) of a request's ``response_format``."""
    fmt = params.get("response_format")
    if fmt is None:
        return None, None
    if not isinstance(fmt, dict) or fmt.get("type") not in FORMAT_TYPES:
        raise FormatError(FORMAT_INVALID)
    kind = fmt["type"]
    if kind == "text":
        return None, None
    if kind == "json_object":
        return kind, None
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise FormatError(SCHEMA_MISSING)
    return kind, schema


def check_json_word(messages: Sequence[Mapping[str, Any]]) -> None:
    """json_object needs "json" in the messages, in any case (WAVE2 B.1)."""
    if not any("json" in (m.get("content") or "").lower() for m in messages if isinstance(m.get("content"), str)):
        raise FormatError(JSON_WORD_MISSING)


def reask_turns(messages: Sequence[Mapping[str, Any]]) -> int:
    """User turns after the model's first answer that follows the directive's message."""
    start = next((i for i, m in enumerate(messages) if DIRECTIVE_MARK in (m.get("content") or "")), 0)
    answered = False
    turns = 0
    for message in messages[start + 1:]:
        role = message.get("role")
        if role == "assistant":
            answered = True
        elif role == "user" and answered:
            turns += 1
    return turns


def answer(schema: dict[str, Any] | None, seed: int, draft: str, spoil: str | None = None) -> str:
    """The JSON text of the answer: valid, not JSON (``bad_json``) or breaking the schema (``bad_schema``)."""
    rng = random.Random(seed ^ _SALT)
    words = tuple(_WORD.findall(draft)) or _FALLBACK_WORDS
    if schema is None:
        value: Any = {"answer": _text(rng, words, 3, 12)}
    else:
        value = value_for(schema, rng, words)
    if spoil == "bad_schema" and schema is not None:
        value = breaking(schema, value)
    text = json.dumps(value, ensure_ascii=False)
    if spoil == "bad_json":
        # A reply a model gives when it forgets the format: prose, then a JSON cut short.
        return "Here is the JSON you asked for: " + text[: max(1, len(text) - 1)]
    return text


def value_for(schema: Mapping[str, Any], rng: random.Random, words: Sequence[str], depth: int = 0) -> Any:
    """A value of ``schema``'s type (enum, const, type, properties, items, bounds; the first of anyOf/oneOf)."""
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return value_for(schema[key][0], rng, words, depth + 1)
    kind = _type_of(schema)
    if kind == "object":
        properties = schema.get("properties")
        if depth >= _MAX_DEPTH or not isinstance(properties, dict):
            return {}
        return {name: value_for(sub, rng, words, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        low = int(schema.get("minItems", 1))
        high = max(low, min(int(schema.get("maxItems", 3)), low + 3))
        items = schema.get("items")
        if not isinstance(items, dict):
            items = {"type": "string"}
        if depth >= _MAX_DEPTH:
            return []
        return [value_for(items, rng, words, depth + 1) for _ in range(rng.randint(low, high))]
    if kind == "integer":
        least, most = _bounds(schema, 0, 100)
        return rng.randint(math.ceil(least), max(math.ceil(least), math.floor(most)))
    if kind == "number":
        least, most = _bounds(schema, 0.0, 100.0)
        return min(most, max(least, round(rng.uniform(least, most), 2)))
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return _string(schema, rng, words)


def breaking(schema: Mapping[str, Any], valid: Any) -> Any:
    """A JSON value that ``schema`` refuses: a wrong type for the first property, or for the whole."""
    properties = schema.get("properties")
    if _type_of(schema) == "object" and isinstance(properties, dict) and properties and isinstance(valid, dict):
        name, sub = next(iter(properties.items()))
        return {**valid, name: _wrong_type(sub)}
    return _wrong_type(schema)


def _wrong_type(schema: Mapping[str, Any]) -> Any:
    kind = _type_of(schema)
    if kind == "string" or isinstance(schema.get("enum"), list) or "const" in schema:
        return [12345]
    return "not a " + kind


def _type_of(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    if "properties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return "string"


def _bounds(schema: Mapping[str, Any], low: float, high: float) -> tuple[float, float]:
    """The inclusive range of a number: the schema's bounds, the defaults where it has none."""
    minimum = float(schema.get("minimum", low))
    maximum = float(schema.get("maximum", max(high, minimum)))
    return minimum, max(minimum, maximum)


def _string(schema: Mapping[str, Any], rng: random.Random, words: Sequence[str]) -> str:
    text = _text(rng, words, 1, 6)
    low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
    while len(text) < low:
        text += " " + rng.choice(words)
    return text[: int(high)] if high is not None else text


def _text(rng: random.Random, words: Sequence[str], low: int, high: int) -> str:
    start = rng.randrange(len(words))
    count = rng.randint(low, high)
    return " ".join(words[(start + i) % len(words)] for i in range(count))
