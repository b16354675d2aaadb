"""JSON mode (``parameters.response_format``): parse and check an answer, and ask again.

An answer is parsed with ``json.loads`` (JSON's own grammar: no NaN or Infinity) and, for
``json_schema``, validated with ``jsonschema`` (Draft 2020-12 unless the schema's
``$schema`` names another). A parsed answer is kept re-serialised canonically, so two
equal answers are equal strings whatever their key order or spacing.

An answer that does not parse is asked again instructor-style (research-wave2 B.2): the
model's bad answer as an assistant turn, then a user turn with the error. That is a
different request, so a seeded request does not repeat its answer, and each attempt is
its own cache key. Nothing here is imported when JSON mode is off.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .types import Outcome, ParseStatus, Request

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

JSON_MODES = ("json_object", "json_schema")
ERROR_CODES: dict[str, str] = {"invalid_json": "InvalidJSON", "schema_mismatch": "SchemaMismatch"}
"""The row's ``error_code`` when its last answer still does not parse, by parse status."""
REASK_TEXT = "Correct your JSON ONLY RESPONSE, based on the following errors:\n{error}"
"""The re-ask turn, instructor's own wording (research-wave2 B.2)."""
REASK_ERROR_MAX_BYTES = 500
"""The most of a parse error a re-ask carries, in UTF-8 bytes: a schema error quotes the failing
value, which can be the whole answer, and a bounded error turn bounds the worst case."""
CUT_BY_LENGTH = " (the answer was cut at max_tokens, finish_reason length: not asked again; raise parameters.max_tokens)"
JSON_WORD = "json"
JSON_WORD_MISSING = (
    "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'."
)
"""DashScope's refusal of a json_object request without the word (research-wave2 B.1)."""

_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def canonical(value: Any) -> str:
    """``value`` as canonical JSON: sorted keys, no spaces, UTF-8 text (not ``\\u`` escapes)."""
    return _canonical(value)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str) -> Any:
    """The JSON value of ``text``; raises ValueError (``json.JSONDecodeError`` with a position)."""
    return json.loads(text, parse_constant=_refuse_constant)


@dataclass(frozen=True, slots=True)
class Parsed:
    """What one answer is in JSON mode: its status, its canonical JSON when it parsed, the error."""

    status: ParseStatus
    output_json: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def schema_validator(schema: dict[str, Any]) -> Validator:
    """A validator of ``schema``'s own draft (``$schema``), Draft 2020-12 when it names none;
    raises ``jsonschema.SchemaError`` for a schema that is not valid in that draft."""
    from jsonschema import Draft202012Validator, validators

    cls = validators.validator_for(schema, default=Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why ``schema`` is not a JSON Schema (path-qualified), or None when it is one."""
    from jsonschema import SchemaError

    try:
        schema_validator(schema)
    except SchemaError as error:
        return f"{error.json_path}: {error.message}"
    return None


class AnswerCheck:
    """Parses answers and checks them against one schema (None: any JSON value, ``json_object``)."""

    def __init__(self, schema: dict[str, Any] | None) -> None:
        self._validator = schema_validator(schema) if schema is not None else None

    def __call__(self, text: str) -> Parsed:
        try:
            value = parse_json(text)
        except ValueError as error:
            return Parsed("invalid_json", error=str(error))
        if self._validator is not None:
            problem = self.first_problem(value)
            if problem is not None:
                return Parsed("schema_mismatch", error=problem)
        return Parsed("ok", output_json=canonical(value))

    def first_problem(self, value: Any) -> str | None:
        """The most relevant schema error of ``value``, path-qualified (``$.age: 'x' is not ...``)."""
        from jsonschema.exceptions import best_match

        assert self._validator is not None
        error = best_match(self._validator.iter_errors(value))
        return None if error is None else f"{error.json_path}: {error.message}"


def _message_json(message: Mapping[str, Any]) -> str:
    return canonical({"content": message["content"], "role": message["role"]})


class JsonMode:
    """A run's JSON mode: how an answer is checked, and the follow-up request that asks again.

    ``retries`` is ``output.json_retries``. A follow-up's fingerprint is the protocol's
    canonical encoding of it (the same frame as a rendered request's), so it is its own
    cache key; its input tokens are counted like a rendered request's.
    """

    def __init__(
        self, kind: str, schema: dict[str, Any] | None, *, retries: int, protocol: str, format_tokens: int = 0
    ) -> None:
        self.kind = kind
        self._format_tokens = format_tokens
        self.retries = retries
        self.check = AnswerCheck(schema)
        self._protocol = protocol
        self._frame: tuple[int, str, str] | None = None

    def follow_up(self, request: Request, answer: str, parsed: Parsed) -> Request:
        """``request`` asked again: its messages, the bad ``answer``, and a turn with the error."""
        from .tokens import count_messages

        messages = [
            *request.messages,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": REASK_TEXT.format(error=reask_error(parsed.error or ""))},
        ]
        return replace(
            request,
            messages=messages,
            fingerprint=self._fingerprint(request, messages),
            input_tokens=count_messages(messages, request.model) + self._format_tokens,
        )

    def _fingerprint(self, request: Request, messages: Sequence[Mapping[str, Any]]) -> str:
        from .wire import CANONICAL_FRAMES

        # Every request of a run carries equal parameters: the frame is made once.
        if self._frame is None or self._frame[0] != id(request.parameters):
            head, tail = CANONICAL_FRAMES[self._protocol](request.model, request.parameters)
            self._frame = (id(request.parameters), head, tail)
        _, head, tail = self._frame
        text = head + ",".join(_message_json(m) for m in messages) + tail
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def reask_error(error: str) -> str:
    """``error`` as a re-ask carries it: at most ``REASK_ERROR_MAX_BYTES``, cut at a character."""
    data = error.encode("utf-8")
    if len(data) <= REASK_ERROR_MAX_BYTES:
        return error
    return data[: REASK_ERROR_MAX_BYTES - len("…".encode())].decode("utf-8", "ignore") + "…"


def reask_frame_tokens(model: str) -> int:
    """What one re-ask adds to the conversation it resends, beyond the answer: the two turns'
    framing, the re-ask's words and its error at most (a token is at least one byte), plus
    one token for each joint a token may span (answer/framing, words/error)."""
    from .tokens import GENERATION_PROMPT_TOKENS, count_messages

    turns = [{"role": "assistant", "content": ""}, {"role": "user", "content": REASK_TEXT.format(error="")}]
    return count_messages(turns, model) - GENERATION_PROMPT_TOKENS + REASK_ERROR_MAX_BYTES + 2


def has_json_word(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any message holds "json" in any case: what DashScope asks of json_object (B.1)."""
    return any(JSON_WORD in content.lower() for m in messages if isinstance(content := m.get("content"), str))


# -- one row's attempts -> its outcome ------------------------------------------------------


def settle(first: Request, attempts: Sequence[Outcome], parsed: Parsed | None) -> Outcome:
    """The row's one outcome from its attempts (the first request's, then each re-ask's).

    Every attempt was paid: ``attempts``, ``cost`` and the token counts are summed over them
    all (a cache hit costs 0 and, beside sent attempts, adds no tokens); the text, finish
    reason and request id are the last answer's.
    A row whose last answer does not parse is an error (``InvalidJSON`` / ``SchemaMismatch``)
    with its raw text kept; one whose re-ask failed to send is that send's error.
    """
    last = attempts[-1]
    answered = [o for o in attempts if o.ok]
    answer = answered[-1] if answered else last
    # A row part answered from the cache bills only what was sent; one all from the cache
    # keeps every attempt's usage (what the cache saved).
    billed = [o for o in answered if not o.cached] or answered
    costs = [o.cost for o in attempts if o.cost is not None]
    status, code, message, retryable = last.status, last.error_code, last.error_message, last.retryable
    if last.ok and parsed is not None and not parsed.ok:
        status, code, message, retryable = "error", ERROR_CODES[parsed.status], parsed.error, False
        if last.finish_reason == "length":
            message = f"{parsed.error}{CUT_BY_LENGTH}"
    return replace(
        answer,
        index=first.index,
        fingerprint=first.fingerprint,
        status=status,
        error_code=code,
        error_message=message,
        retryable=retryable,
        input_tokens=_total(o.input_tokens for o in billed),
        output_tokens=_total(o.output_tokens for o in billed),
        reasoning_tokens=_total(o.reasoning_tokens for o in billed),
        cost=sum(costs) if costs else None,
        attempts=sum(o.attempts for o in attempts),
        latency_s=sum(o.latency_s or 0.0 for o in attempts),
        cached=all(o.cached for o in attempts),
        preflight_input_tokens=first.input_tokens,
        model=first.model,
        seed=first.seed,
        usage_source=_usage_source(answered),
        output_json=parsed.output_json if parsed is not None else None,
        parse_status=parsed.status if parsed is not None else None,
        parse_error=parsed.error if parsed is not None else None,
        reasks=len(attempts) - 1,
    )


def _total(values: Any) -> int | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _usage_source(answered: Sequence[Outcome]) -> Any:
    sources = {o.usage_source for o in answered}
    if not sources:
        return None
    return "estimated" if "estimated" in sources else "service"
