"""Frozen value types that every layer shares: Request, Reply, Outcome."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["ok", "error"]


@dataclass(frozen=True, slots=True)
class Request:
    """One row rendered into the exact DashScope request that will be sent.

    ``body`` is the native JSON body (model, input.messages, parameters); ``fingerprint``
    is a hash of it, so two requests with equal fingerprints are the same request.
    ``input_tokens`` is the exact count DashScope will bill; ``max_tokens`` bounds the reply.
    """

    index: int
    row_id: str
    body: dict[str, Any]
    fingerprint: str
    input_tokens: int
    max_tokens: int

    @property
    def model(self) -> str:
        return self.body["model"]

    @property
    def worst_case_tokens(self) -> int:
        return self.input_tokens + self.max_tokens


@dataclass(frozen=True, slots=True)
class Reply:
    """What the service answered to one request."""

    text: str
    finish_reason: str
    input_tokens: int
    output_tokens: int
    request_id: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Outcome:
    """The final word on one row, ok or error; errors are data, not exceptions.

    ``retryable`` says whether an error may pass if the row is sent again (a resume
    retries those). ``cached`` is true when the reply came from the response cache
    and cost nothing this time. ``input_tokens``/``output_tokens`` are the usage the
    reply reported (a cache hit keeps its stored reply's); ``preflight_input_tokens`` is
    the exact count made before sending, kept apart so that a row never sent (over-long)
    has no usage.
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
        return cls(
            index=request.index,
            fingerprint=request.fingerprint,
            status="ok",
            request_id=reply.request_id,
            output_text=reply.text,
            finish_reason=reply.finish_reason,
            input_tokens=reply.input_tokens,
            output_tokens=reply.output_tokens,
            cost=cost,
            attempts=attempts,
            latency_s=latency_s,
            cached=cached,
            preflight_input_tokens=request.input_tokens,
        )

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def total_tokens(self) -> int | None:
        if self.input_tokens is None or self.output_tokens is None:
            return None
        return self.input_tokens + self.output_tokens
