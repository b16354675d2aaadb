"""Which fault an attempt meets: scripted by prompt directives, or drawn from the fault seed.

Every decision is a pure function of (fault seed, sha256 of the request body, attempt
number of that exact body), so the nth attempt of a request meets the same fault in every
run, whatever order requests arrive in.

Directive syntax (anywhere in any message's content, one directive per brackets)::

    [[emu: fail=CODE [times=N] [status=NNN] [midstream]]]
    [[emu: always=CODE]]                 same as fail=CODE with no times
    [[emu: hang|reset|malformed|truncated [times=N]]]
    [[emu: latency=SECONDS [times=N]]]
    [[emu: length=TOKENS]]
    [[emu: think=TOKENS]]                a thinking reply's natural reasoning length
    [[emu: think_overflow]]              a thinking reply runs out of tokens inside its thinking:
                                         finish_reason "length", an empty answer
    [[emu: finish=REASON [times=N]]]     the reply ends with this finish_reason (one the emulated
                                         server gives; vLLM's ``error`` is its HTTP 500)
    [[emu: no_usage]]                    compatible endpoint: the reply carries no usage
    [[emu: bad_json[=N|always]]]         JSON mode: the answer is not valid JSON until the
                                         conversation holds N re-ask turns (default 1)
    [[emu: bad_schema[=N|always]]]       json_schema mode: valid JSON that breaks the schema, the same way
    [[emu: batch_line_error[=N|always]]] a Batch API line: a 500 line error in the first N batches
                                         that carry this exact body (default 1); ignored online

``times=N`` limits a directive to the first N attempts of that exact body (default: all).
The first directive (in text order) that applies to an attempt decides its fault.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from ..wire import ERRORS
from .config import FaultRates

FaultKind = Literal["error", "reset", "hang", "malformed", "truncated"]
DIRECTIVE_MARK = "[[emu:"
_DIRECTIVE = re.compile(r"\[\[emu:([^\]]*)\]\]")
_ACTIONS = frozenset({"fail", "always", "hang", "reset", "malformed", "truncated", "latency", "length", "think",
                      "think_overflow", "finish", "no_usage", "bad_json", "bad_schema",
                      "batch_line_error"})
# bad_json=always: the answer never parses, however often the model is re-asked.
NEVER_FIXED = 1 << 30
# What an output-side DataInspectionFailed says when it interrupts a stream.
OUTPUT_INSPECTION_MESSAGE = "Output data may contain inappropriate content."


class DirectiveError(ValueError):
    """A ``[[emu: ...]]`` directive the emulator cannot read; answered as a 400."""


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault to inject: an error answer, or one of the transport-level misbehaviours."""

    kind: FaultKind
    code: str | None = None
    status: int | None = None
    message: str | None = None
    midstream: bool = False

    @property
    def name(self) -> str:
        """The ledger's name for it: the error code, or the kind."""
        return self.code if self.kind == "error" and self.code else self.kind


def error_fault(code: str, status: int | None = None, *, midstream: bool = False) -> Fault:
    spec = ERRORS.get(code)
    resolved_status = status or (spec.status if spec else 500)
    message = spec.message if spec else code
    if midstream and code == "DataInspectionFailed":
        message = OUTPUT_INSPECTION_MESSAGE
    return Fault("error", code, resolved_status, message, midstream)


@dataclass(frozen=True, slots=True)
class Directive:
    """One parsed ``[[emu: ...]]``."""

    action: str
    value: str | None = None
    times: int | None = None
    status: int | None = None
    midstream: bool = False

    def applies(self, attempt: int) -> bool:
        return self.times is None or attempt <= self.times


def parse_directive(inner: str) -> Directive:
    """One directive's inside text → Directive; DirectiveError says what is wrong."""
    words = inner.split()
    if not words:
        raise DirectiveError("empty emulator directive")
    action, _, value = words[0].partition("=")
    if action not in _ACTIONS:
        raise DirectiveError(f"unknown emulator directive {words[0]!r}")
    times: int | None = None
    status: int | None = None
    midstream = False
    for word in words[1:]:
        key, _, option = word.partition("=")
        try:
            if key == "times":
                times = int(option)
            elif key == "status":
                status = int(option)
            elif key == "midstream" and not option:
                midstream = True
            else:
                raise DirectiveError(f"unknown emulator directive option {word!r}")
        except ValueError:
            raise DirectiveError(f"emulator directive option {word!r} needs an integer") from None
    if action in ("fail", "always", "latency", "length", "think", "finish") and not value:
        raise DirectiveError(f"emulator directive {action!r} needs a value ({action}=...)")
    if action == "always":
        action, times = "fail", None
    if action == "latency":
        try:
            float(value)
        except ValueError:
            raise DirectiveError(f"latency={value!r} is not a number of seconds") from None
    if action in ("length", "think") and not value.isdigit():
        raise DirectiveError(f"{action}={value!r} is not a token count")
    if action == "batch_line_error" and value and value != "always" and not value.isdigit():
        raise DirectiveError(f"batch_line_error={value!r} is not a number of batches (or 'always')")
    if action in ("bad_json", "bad_schema") and value and value != "always" and not value.isdigit():
        raise DirectiveError(f"{action}={value!r} is not a number of re-asks (or 'always')")
    return Directive(action, value or None, times, status, midstream)


@dataclass(frozen=True, slots=True)
class Script:
    """The directives of one request, in text order."""

    directives: tuple[Directive, ...] = ()

    def fault(self, attempt: int) -> Fault | None:
        for d in self.directives:
            if not d.applies(attempt):
                continue
            if d.action == "fail":
                return error_fault(d.value or "InternalError", d.status, midstream=d.midstream)
            if d.action in ("hang", "reset", "malformed", "truncated"):
                return Fault(d.action)  # type: ignore[arg-type]
        return None

    def latency(self, attempt: int) -> float:
        return sum(float(d.value or 0) for d in self.directives if d.action == "latency" and d.applies(attempt))

    def length(self) -> int | None:
        return self._count("length")

    def think(self) -> int | None:
        return self._count("think")

    def think_overflow(self) -> bool:
        return any(d.action == "think_overflow" for d in self.directives)

    def finish(self, attempt: int) -> str | None:
        """The finish_reason a ``finish=`` directive imposes on this attempt, if any."""
        for d in self.directives:
            if d.action == "finish" and d.applies(attempt):
                return d.value
        return None

    def no_usage(self) -> bool:
        return any(d.action == "no_usage" for d in self.directives)

    def broken_json(self) -> tuple[str, int] | None:
        """(``bad_json`` or ``bad_schema``, the re-ask turns that fix it), from the first such directive."""
        for d in self.directives:
            if d.action in ("bad_json", "bad_schema"):
                fixed_after = NEVER_FIXED if d.value == "always" else int(d.value or 1)
                return d.action, fixed_after
        return None

    def batch_line_error(self, batch_attempt: int) -> bool:
        """Whether a batch line with this body fails in its ``batch_attempt``-th batch."""
        for d in self.directives:
            if d.action == "batch_line_error":
                return d.value == "always" or batch_attempt <= int(d.value or 1)
        return False

    def _count(self, action: str) -> int | None:
        for d in self.directives:
            if d.action == action:
                return int(d.value or 0)
        return None


NO_SCRIPT = Script()


def read_script(texts: list[str]) -> Script:
    """The directives found in message contents (cheap when there are none)."""
    found: list[Directive] = []
    for text in texts:
        if DIRECTIVE_MARK in text:
            found.extend(parse_directive(match) for match in _DIRECTIVE.findall(text))
    return Script(tuple(found)) if found else NO_SCRIPT


def unit(fault_seed: int, body_sha256: str, attempt: int, purpose: str) -> float:
    """A uniform number in [0, 1) fixed by the seed, the body, the attempt and what it is for."""
    digest = hashlib.blake2b(f"{fault_seed}:{body_sha256}:{attempt}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# The order in which the probability mass is laid out; changing it changes every draw.
_RANDOM_FAULTS: tuple[tuple[str, Fault], ...] = (
    ("rate_quota", error_fault("Throttling.RateQuota")),
    ("allocation_quota", error_fault("Throttling.AllocationQuota")),
    ("burst_rate", error_fault("Throttling.BurstRate")),
    ("internal_error", error_fault("InternalError")),
    ("unavailable", error_fault("ModelUnavailable")),
    ("reset", Fault("reset")),
    ("hang", Fault("hang")),
    ("malformed", Fault("malformed")),
    ("truncated", Fault("truncated")),
)


def random_fault(rates: FaultRates, fault_seed: int, body_sha256: str, attempt: int) -> Fault | None:
    """The seeded random fault of this attempt, if its draw lands in one fault's share."""
    draw = unit(fault_seed, body_sha256, attempt, "fault")
    edge = 0.0
    for name, fault in _RANDOM_FAULTS:
        edge += getattr(rates, name)
        if draw < edge:
            return fault
    return None


def decide(script: Script, rates: FaultRates, fault_seed: int, body_sha256: str, attempt: int) -> Fault | None:
    """Scripted faults first, then the random draw."""
    return script.fault(attempt) or (
        random_fault(rates, fault_seed, body_sha256, attempt) if rates.total() else None
    )
