"""Frozen value types that every layer shares: UnitKey, Request, Reply, Outcome."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

Status = Literal["ok", "error"]
UsageSource = Literal["service", "estimated"]
"""Who counted a reply's tokens: the service, or the client (the service reported none)."""
ParseStatus = Literal["ok", "invalid_json", "schema_mismatch"]
"""What a JSON-mode answer is: JSON (and of the schema), not JSON, or JSON the schema refuses."""


class UnitKey(NamedTuple):
    """Which unit of work a request is: input row, variant (model/parameter sweep), sample.

    Units are numbered densely, ``(row * variants + variant) * samples + sample``, so the
    per-unit arrays of a resume stay flat. Today every job has one variant and one sample,
    so a unit's index is its row's position.
    """

    row: int
    variant: int = 0
    sample: int = 0

    def dense_index(self, variants: int = 1, samples: int = 1) -> int:
        """The dense unit index of this key in a job of ``variants`` x ``samples`` per row."""
        return (self.row * variants + self.variant) * samples + self.sample

    @classmethod
    def of_dense_index(cls, index: int, variants: int = 1, samples: int = 1) -> UnitKey:
        """The key whose dense index is ``index`` (the inverse of :meth:`dense_index`)."""
        rest, sample = divmod(index, samples)
        row, variant = divmod(rest, variants)
        return cls(row, variant, sample)


@dataclass(frozen=True, slots=True)
class Request:
    """One unit rendered into a protocol-neutral request: what to ask, not how to say it.

    ``messages`` and ``parameters`` are the spec-level ones (``parameters`` always holds
    ``seed``, ``max_tokens`` and ``result_format``); each backend encodes them into its own
    wire body. ``index`` is the unit's dense index (``unit.dense_index(...)``; today the row's
    position), the key of resume, cache and output join. ``fingerprint`` is a hash of the
    protocol's canonical encoding of the request, so two requests with equal fingerprints
    are the same request to the same kind of service. ``input_tokens`` is the exact count
    the service will bill; ``max_tokens`` bounds the visible answer and ``reasoning_cap`` the
    reasoning a thinking model may bill on top of it (0 when the request does not think).
    """

    index: int
    row_id: str
    model: str
    messages: list[dict[str, str]]
    parameters: dict[str, Any]
    fingerprint: str
    input_tokens: int
    max_tokens: int
    unit: UnitKey
    reasoning_cap: int = 0

    @property
    def seed(self) -> int | None:
        return self.parameters.get("seed")

    @property
    def worst_case_tokens(self) -> int:
        return self.input_tokens + self.max_tokens + self.reasoning_cap


@dataclass(frozen=True, slots=True)
class Reply:
    """What the service answered to one request.

    The fields after ``request_id`` are for streaming and thinking models: the reasoning
    text and its token count, the input tokens served from the service's prompt cache, and
    the seconds from sending to the first token of a stream. None when not reported.
    """

    text: str
    finish_reason: str
    input_tokens: int
    output_tokens: int
    request_id: str | None = None
    reasoning: str | None = None
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None
    first_token_s: float | None = None
    usage_source: UsageSource = "service"

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Outcome:
    """The final word on one unit, ok or error; errors are data, not exceptions.

    ``index`` is the unit's dense index (see ``UnitKey``); ``model`` and ``seed`` are what
    the unit was sent with (None in records written before they were kept, and for a row
    never rendered: the output then takes the job's). ``retryable`` says whether an error
    may pass if the unit is sent again (a resume retries those). ``cached`` is true when the
    reply came from the response cache and cost nothing this time.
    ``input_tokens``/``output_tokens`` are the usage the reply reported (a cache hit keeps
    its stored reply's); ``preflight_input_tokens`` is the exact count made before sending,
    kept apart so that a row never sent (over-long) has no usage. ``reasoning_text`` and
    ``reasoning_tokens`` are a thinking model's reasoning (``output_tokens`` includes its
    tokens; an answered row without reasoning has None and 0); ``first_token_s`` is the time
    from the final attempt's send to its first streamed token (None when not streamed).
    ``usage_source`` says who counted an answer's tokens (None for an error).
    In JSON mode (``structured.py``), ``output_json`` is the answer as canonical JSON,
    ``parse_status`` what it is and ``parse_error`` why it is not JSON (None when not JSON
    mode); ``reasks`` counts the requests that asked again, whose attempts, tokens and cost
    the other fields include.
    """

    index: int
    fingerprint: str
    status: Status
    request_id: str | None = None
    output_text: str | None = None
    finish_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    retryable: bool = False
    attempts: int = 0
    latency_s: float | None = None
    cached: bool = False
    preflight_input_tokens: int | None = None
    model: str | None = None
    seed: int | None = None
    reasoning_text: str | None = None
    reasoning_tokens: int | None = None
    first_token_s: float | None = None
    usage_source: UsageSource | None = None
    output_json: str | None = None
    parse_status: ParseStatus | None = None
    parse_error: str | None = None
    reasks: int = 0

    @classmethod
    def answered(
        cls,
        request: Request,
        reply: Reply,
        *,
        cost: float | None,
        attempts: int,
        latency_s: float,
        cached: bool = False,
    ) -> Outcome:
        """The ok outcome of ``request`` answered by ``reply`` (sent now, or from the cache)."""
        return cls.of_reply(
            reply,
            cost=cost,
            index=request.index,
            fingerprint=request.fingerprint,
            attempts=attempts,
            latency_s=latency_s,
            cached=cached,
            preflight_input_tokens=request.input_tokens,
            model=request.model,
            seed=request.seed,
        )

    @classmethod
    def of_reply(cls, reply: Reply, *, cost: float | None, **row: Any) -> Outcome:
        """The ok outcome ``reply`` gives, with ``row``'s own fields (index, fingerprint, attempts, ...):
        the one mapping of a reply onto an outcome, for a sent request and a batch line alike."""
        return cls(
            status="ok",
            request_id=reply.request_id,
            output_text=reply.text,
            finish_reason=reply.finish_reason,
            input_tokens=reply.input_tokens,
            output_tokens=reply.output_tokens,
            cost=cost,
            reasoning_text=reply.reasoning,
            reasoning_tokens=reply.reasoning_tokens or 0,
            first_token_s=reply.first_token_s,
            usage_source=reply.usage_source,
            **row,
        )

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def stored_reply(self) -> Reply:
        """What the cache keeps of an answered outcome: the reply, its reasoning included."""
        return Reply(
            self.output_text or "",
            self.finish_reason or "",
            self.input_tokens or 0,
            self.output_tokens or 0,
            self.request_id,
            reasoning=self.reasoning_text,
            reasoning_tokens=self.reasoning_tokens,
            usage_source=self.usage_source or "service",
        )

    @property
    def total_tokens(self) -> int | None:
        if self.input_tokens is None or self.output_tokens is None:
            return None
        return self.input_tokens + self.output_tokens

