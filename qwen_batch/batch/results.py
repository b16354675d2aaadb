"""Output and error lines of a finished batch, read into each row's answer or error.

An output line is ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}`` (dashscope-protocol.md section 7.6). The error file's line shape is unconfirmed
(research-wave2.md E.5): its error may be ``{code, message}`` or ``{error_code,
error_message}``, in ``error`` or in the response's body; every one is read, and the
downloaded files are kept next to the shard, so the raw line survives. An error is the row's
for good when the service refused the request itself (a 4xx other than 408 and 429, or a
refusal code of the batch's own validation); any other failure may pass in a new batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..backends.openai import finish_problem
from ..errors import BackendError
from ..types import Reply
from ..wire import ERRORS, MalformedReply, compatible_usage, read_compatible_choice
from .ids import dense_index_of

REFUSAL_CODES = frozenset({"mismatched_model", "duplicate_custom_id", "url_not_found"})
"""The batch's own line validation (section 7.2): sending the line again gives the same answer."""
_STATUS_OF_CODE = {spec.compatible_code: spec.status for spec in ERRORS.values()} | {
    spec.code: spec.status for spec in ERRORS.values()
}


@dataclass(frozen=True, slots=True)
class LineError:
    """A line the service did not answer: its code, message and whether a new batch may pass."""

    code: str
    message: str
    retryable: bool
    request_id: str | None = None


LineResult = Reply | LineError


def read_lines(
    path: Path, units_per_row: tuple[int, int] = (1, 1), *, estimate: Any = None
) -> Iterator[tuple[int, LineResult]]:
    """``(unit index, result)`` for each line of a downloaded file; lines naming no unit of ours are skipped.

    ``units_per_row`` is the job's ``(variants, samples)``: the unit's dense index is over them.

    ``estimate(row, text, reasoning) -> (input, output, reasoning)`` counts a reply the
    service reported no usage for (None: such a reply is an error line).
    """
    with path.open("rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            index = dense_index_of(str(line.get("custom_id")), units_per_row) if isinstance(line, dict) else None
            if index is None:
                continue
            yield index, read_line(line, index, estimate)


def read_line(line: dict[str, Any], row: int, estimate: Any = None) -> LineResult:
    """One line's answer, or its error."""
    response: dict[str, Any] = line["response"] if isinstance(line.get("response"), dict) else {}
    status = response.get("status_code")
    body = response.get("body")
    request_id = response.get("request_id") or line.get("id")
    request_id = str(request_id) if request_id is not None else None
    if status == 200 and isinstance(body, dict) and "choices" in body and not line.get("error"):
        try:
            return _reply(body, request_id, row, estimate)
        except BackendError as error:
            return LineError(error.code, error.message, error.retryable, request_id)
        except MalformedReply as error:
            return LineError("MalformedReply", str(error), True, request_id)
    return _line_error(line, body, status if isinstance(status, int) else None, request_id)


def _reply(body: dict[str, Any], request_id: str | None, row: int, estimate: Any) -> Reply:
    text, reasoning, finish_reason = read_compatible_choice(body)
    if finish_reason is None:
        raise MalformedReply("the chat completion has no finish_reason")
    if (problem := finish_problem(finish_reason, request_id)) is not None:
        raise problem
    usage = compatible_usage(body.get("usage"))
    source = "service"
    if usage is None:
        if estimate is None:
            raise MalformedReply("the answer has no usage")
        usage = (*estimate(row, text, reasoning), None)
        source = "estimated"
    input_tokens, output_tokens, reasoning_tokens, cached = usage
    return Reply(
        text, finish_reason, input_tokens, output_tokens, request_id,
        reasoning=reasoning, reasoning_tokens=reasoning_tokens, cached_tokens=cached, usage_source=source,  # type: ignore[arg-type]
    )


def _line_error(line: dict[str, Any], body: Any, status: int | None, request_id: str | None) -> LineError:
    fields = _error_fields(line.get("error"))
    if fields is None and isinstance(body, dict):
        fields = _error_fields(body.get("error")) or _error_fields(body)
    code, message = fields or (f"HTTP{status}" if status else "BatchLineFailed", "the batch gave no answer for this line")
    if status is None:
        status = _STATUS_OF_CODE.get(code)
    permanent = code in REFUSAL_CODES or (status is not None and 400 <= status < 500 and status not in (408, 429))
    return LineError(code, message, not permanent, request_id)


def _error_fields(error: Any) -> tuple[str, str] | None:
    """``(code, message)`` of an error object of either documented shape, or None."""
    if not isinstance(error, dict):
        return None
    code = error.get("code") if error.get("code") is not None else error.get("error_code")
    message = error.get("message") if error.get("message") is not None else error.get("error_message")
    if code is None and message is None:
        return None
    return str(code if code is not None else "BatchLineFailed"), str(message or "")
