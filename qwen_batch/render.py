"""(row, spec) -> a protocol-neutral Request, or a row problem. Pure: no I/O, no clock.

A Request holds the model, the messages and the spec-level parameters; each backend
encodes it into its own wire body (the native DashScope one is
``{"model": ..., "input": {"messages": [...]}, "parameters": {...}}``, ``wire.native_body``).

``parameters`` always carries ``seed`` (reproducibility must not depend on the service's
default), ``max_tokens`` (the spec's, else the model's default: it bounds cost and rate
budgeting) and ``result_format`` (the spec's, else the model's default); every other
parameter is sent only when the spec sets it.

Messages:

* ``template``: one user message, the template with each ``{column}`` replaced by the cell's
  text (``cell_text``: a string as it is, a number as the file writes it, ``true``/``false``). Rendering is concatenation of the parts parsed once at spec load, so cell text
  is never itself a template: braces, ``{x}`` look-alikes and ``%s`` are sent literally.
* ``prompt_column``: one user message, the cell as it is.
* ``messages_column``: the cell's list of ``{role, content}`` (a list, or a JSON string of
  one, as CSV can only hold text), checked by the service's role rules (§5). Only ``role``
  and ``content`` are sent; other keys are ignored.
* ``prompt.system`` becomes the first message; for a ``messages_column`` row that has its own
  system message, the row's wins (the row is the more specific instruction).

A row that cannot become a valid request is a ``RowProblem`` carrying the service's own
code and message, so it lands in the output as that row's error and the rest of the run goes on.

``fingerprint`` is the sha256 of the protocol's canonical encoding of the request
(``wire.CANONICAL_FRAMES``): model, messages and every parameter (seed included), never the
row's position. For the native protocol that is the body's canonical JSON (sorted keys,
compact, UTF-8), byte for byte what every earlier release hashed, so existing checkpoints
and cache entries keep resuming and hitting.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring  # the C string encoder json.dumps(ensure_ascii=False) uses
from typing import Any

from .catalog import ModelInfo
from .errors import SpecError
from .spec import JobSpec, check_against_model, max_output_tokens
from .tokens import GENERATION_PROMPT_TOKENS, count_messages, message_counter
from .types import Request, UnitKey
from .wire import CANONICAL_FRAMES, DASHSCOPE

INVALID_PARAMETER = "InvalidParameter"
DEFAULT_RESULT_FORMAT = "text"  # DashScope's default for models the catalog does not know

# The service's own texts (dashscope-protocol.md §1.3, §5.1).
MSG_ROLE_OR_EMPTY = "Role must be user or assistant and Content length must be greater than 0"
MSG_ALTERNATE = "User and assistant need to appear alternately in the message"
MSG_NO_USER = "The input messages do not contain elements with the role of user."
MSG_CONTENT_REQUIRED = "The content field is a required field."
MSG_CONTENT_STRING = "input content must be a string."
MSG_LAST_NOT_USER = "list index out of range"  # what the service answers (500) when the last message is not user
MSG_EMPTY_MESSAGES = "[] is too short"

_MSG_SURROGATE = "the row's text is not valid Unicode (lone surrogate)"

_ROLES = ("system", "user", "assistant")
# UnitKey(index) through its generated __new__ costs twice this (0.45 vs 0.25 us per row).
_new_unit = tuple.__new__


@dataclass(frozen=True, slots=True)
class RowProblem:
    """A row that cannot be sent as it is; recorded as that row's error, never sent."""

    index: int
    row_id: str
    code: str
    message: str


class _Problem(Exception):
    """Internal: a row's content is unusable. Never escapes ``Renderer.render``."""


class Renderer:
    """Renders rows of one job; build once per run, then call ``render`` per row.

    ``protocol`` names the service's protocol, whose canonical encoding the fingerprints
    hash (``wire.CANONICAL_FRAMES``). Raises SpecError when ``max_tokens`` exceeds the
    model's output limit, or when the model is unknown and neither ``parameters.max_tokens``
    nor ``model_limits.max_output_tokens`` is set. ``reasoning_cap`` is the most reasoning
    tokens a request may bill on top of its answer (``modes.Mode.reasoning_cap``), carried by
    every request for the budget's worst case; ``thinking`` says the requests think, so an
    unset ``result_format`` is "message" whatever the model's default. ``format_tokens`` is
    what the service adds to every request's input for its json mode (``jsonmode.format_tokens``).
    """

    def __init__(
        self,
        spec: JobSpec,
        model_info: ModelInfo | None,
        *,
        protocol: str = DASHSCOPE,
        reasoning_cap: int = 0,
        thinking: bool = False,
        variant: int = 0,
        sample: int = 0,
        slot: int = 0,
        units_per_row: int = 1,
        format_tokens: int = 0,
    ) -> None:
        check_against_model(spec, model_info)
        # Which unit of each row this renderer makes (variants.py): its dense index is
        # ``position * units_per_row + slot``.
        self._variant, self._sample = variant, sample
        self._units_per_row = units_per_row
        self._slot = slot

        params = spec.parameters.to_wire()
        max_tokens = spec.parameters.max_tokens
        if max_tokens is None and model_info is not None:
            max_tokens = model_info.default_max_tokens
        if max_tokens is None:
            max_tokens = max_output_tokens(spec, model_info)
        if max_tokens is None:
            raise SpecError(
                f"{spec.where}: parameters.max_tokens: model {spec.model!r} is not in the catalog, so its "
                "default is unknown; set parameters.max_tokens (or model_limits.max_output_tokens)"
            )
        params["max_tokens"] = max_tokens
        if "result_format" not in params:
            # The service answers a thinking request only in the message format.
            default = model_info.default_result_format if model_info else DEFAULT_RESULT_FORMAT
            params["result_format"] = "message" if thinking else default
        self.model = spec.model
        self.max_tokens = max_tokens
        self.reasoning_cap = reasoning_cap
        self._parameters = params
        prompt = spec.prompt
        self._system = prompt.system
        self._parts = prompt.template_parts
        self._prompt_column = prompt.prompt_column
        self._messages_column = prompt.messages_column
        self._id_column = spec.input.id_column
        # The canonical form is head + M + tail with everything but the messages M fixed per
        # run: the protocol writes head and tail once. M is built by hand from
        # {"content":...,"role":...} pieces (sorted keys), exactly as json.dumps would write it:
        # measured faster than dumping each request whole.
        self.protocol = protocol
        self._head, self._tail = CANONICAL_FRAMES[protocol](self.model, params)
        # The system prompt is the same on every template/prompt_column row: count its tokens once
        # (count_messages is a sum over messages plus the generation prompt).
        self._system_message = {"role": "system", "content": self._system} if self._system else None
        self._system_json = _message_json("system", self._system) + "," if self._system else ""
        self._system_tokens = (
            count_messages([self._system_message], self.model) - GENERATION_PROMPT_TOKENS
            if self._system_message
            else 0
        )
        self._count_message = message_counter(self.model)
        self._format_tokens = format_tokens

    @property
    def parameters(self) -> dict[str, Any]:
        """The parameters every request of this run carries (a copy)."""
        return dict(self._parameters)

    def render(self, position: int, row: Mapping[str, Any], input_tokens: int | None = None) -> Request | RowProblem:
        """The row at ``position`` -> this renderer's unit of it, a Request or a RowProblem;
        never raises on cell contents.

        The unit is ``UnitKey(position, variant, sample)``; its dense index (the Request's and
        RowProblem's ``index``) is ``position * units_per_row + slot`` (``position`` itself
        for a job of one variant and one sample).

        ``input_tokens``, when given, is the row's count from an earlier rendering of the same
        request (the preflight's): it is used as it is instead of counting again.
        """
        row_id = self.row_id(position, row)
        index = position * self._units_per_row + self._slot
        try:
            canonical, messages, content = self._canonical(row)
        except _Problem as problem:
            return RowProblem(index, row_id, INVALID_PARAMETER, str(problem))
        except UnicodeEncodeError:
            return RowProblem(index, row_id, INVALID_PARAMETER, _MSG_SURROGATE)
        model = self.model
        if input_tokens is None:
            if content is None:
                input_tokens = count_messages(messages, model) + self._format_tokens
            else:
                input_tokens = (
                    self._system_tokens + GENERATION_PROMPT_TOKENS + self._count_message("user", content) + self._format_tokens
                )
        return Request(
            index=index,
            row_id=row_id,
            model=model,
            messages=messages,
            parameters=dict(self._parameters),
            fingerprint=hashlib.sha256(canonical).hexdigest(),
            input_tokens=input_tokens,
            max_tokens=self.max_tokens,
            unit=_new_unit(UnitKey, (position, self._variant, self._sample)),
            reasoning_cap=self.reasoning_cap,
        )

    def fingerprint(self, position: int, row: Mapping[str, Any]) -> tuple[str, str] | RowProblem:
        """``(row_id, fingerprint)`` of the row's request, or its RowProblem, as ``render`` would
        give them, without building the request or counting its tokens (for checking rows an
        earlier run finished)."""
        row_id = self.row_id(position, row)
        index = position * self._units_per_row + self._slot
        try:
            canonical = self._canonical(row)[0]
        except _Problem as problem:
            return RowProblem(index, row_id, INVALID_PARAMETER, str(problem))
        except UnicodeEncodeError:
            return RowProblem(index, row_id, INVALID_PARAMETER, _MSG_SURROGATE)
        return row_id, hashlib.sha256(canonical).hexdigest()

    def row_id(self, index: int, row: Mapping[str, Any]) -> str:
        """The id a row is named by in messages: its id column, else its position."""
        return str(index) if self._id_column is None else str(row.get(self._id_column))

    def _canonical(self, row: Mapping[str, Any]) -> tuple[bytes, list[dict[str, str]], str | None]:
        """The request's canonical encoding, its messages, and the user content of a single-prompt row
        (None for a messages_column row); raises _Problem or UnicodeEncodeError."""
        if self._messages_column is not None:
            messages = self._conversation(row.get(self._messages_column))
            inner = ",".join([_message_json(m["role"], m["content"]) for m in messages])
            content = None
        else:
            content = self._content(row)
            user = {"role": "user", "content": content}
            inner = self._system_json + _message_json("user", content)
            messages = [dict(self._system_message), user] if self._system_message else [user]
        return (self._head + inner + self._tail).encode("utf-8"), messages, content

    def _content(self, row: Mapping[str, Any]) -> str:
        if self._prompt_column is not None:
            content = _cell_text(row, self._prompt_column)
        else:
            pieces: list[str] = []
            for literal, column in self._parts:
                pieces.append(literal)
                if column is not None:
                    pieces.append(_cell_text(row, column))
            content = "".join(pieces)
        if not content:
            raise _Problem(f"{MSG_ROLE_OR_EMPTY} (the prompt of this row is empty)")
        return content

    def _conversation(self, cell: Any) -> list[dict[str, str]]:
        messages = check_messages(cell, self._messages_column or "")
        if self._system_message and messages[0]["role"] != "system":
            messages.insert(0, dict(self._system_message))
        return messages


def _message_json(role: str, content: str) -> str:
    """One message as canonical JSON (keys sorted: content, role); roles are plain ASCII words."""
    return '{"content":' + encode_basestring(content) + ',"role":"' + role + '"}'


def _cell_text(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None:
        raise _Problem(f"column {column!r} is null in this row")
    return value if type(value) is str else cell_text(value)


def cell_text(value: Any) -> str:
    """A non-text cell as a prompt shows it: as the file writes it, else as JSON would.

    Integers are digits (never ``5.0``); a JSONL number keeps its text (``JsonNumber``);
    booleans are ``true``/``false`` and lists and structs JSON, as a JSONL file writes them,
    not Python's ``True`` or ``{'a': 1}``.
    """
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def check_messages(cell: Any, column: str = "messages") -> list[dict[str, str]]:
    """A messages cell as ``[{role, content}]``, checked by the service's rules; raises _Problem.

    The rules (§5.1, strict early-2024 form): roles are system, user, assistant; system only
    first; user and assistant alternate; there is a user message and the last one is user;
    content is a non-empty string.
    """
    if cell is None:
        raise _Problem(f"column {column!r} is null in this row")
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except ValueError:
            raise _Problem(f"column {column!r} is not a list of {{role, content}} messages (not JSON)") from None
    if not isinstance(cell, (list, tuple)):
        raise _Problem(f"column {column!r} is not a list of {{role, content}} messages")
    if not cell:
        raise _Problem(MSG_EMPTY_MESSAGES)
    messages: list[dict[str, str]] = []
    previous: str | None = None
    for position, item in enumerate(cell):
        if not isinstance(item, Mapping):
            raise _Problem(f"column {column!r}: message {position} is not a {{role, content}} mapping")
        role = item.get("role")
        if "content" not in item or item.get("content") is None:
            raise _Problem(MSG_CONTENT_REQUIRED)
        content = item["content"]
        if not isinstance(content, str):
            raise _Problem(MSG_CONTENT_STRING)
        if role not in _ROLES or not content or (role == "system" and position != 0):
            raise _Problem(MSG_ROLE_OR_EMPTY)
        if role != "system":
            if role == previous:
                raise _Problem(MSG_ALTERNATE)
            previous = role
        messages.append({"role": role, "content": content})
    if previous is None:
        raise _Problem(MSG_NO_USER)
    if previous != "user":
        raise _Problem(f"{MSG_LAST_NOT_USER} (the last message must have role user)")
    return messages
