"""Rows to JSONL shard files, each within every limit the Batch API documents.

A shard holds at most ``max_lines`` lines and ``max_file_bytes`` bytes, lines of one model
and one thinking mode only (dashscope-protocol.md section 7.2); a line longer than
``max_line_bytes`` is refused before anything is written. Lines stream to an open file per
(model, thinking) key, so a job of any size holds one line in memory at a time; a full file
is closed, fsynced and handed to ``on_sealed`` (which records it durably) before the next
line of its key opens another; ``on_units`` takes each few thousand lines' units on the way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..backends.openai import chat_body
from ..servers import DIALECTS
from ..types import Request
from ..wire import COMPATIBLE_NOT_SENT
from .ids import custom_id

UNITS_IN_MEMORY = 2_000
"""Units a shard holds before ``on_units`` takes them (a whole file's would grow with its size)."""
CHAT_URL = "/v1/chat/completions"
"""Each line's ``url`` and the batch's ``endpoint`` for chat models (section 7.2)."""


@dataclass(frozen=True, slots=True)
class UnitLine:
    """What the state keeps of one line: enough to build the row's outcome from a downloaded answer."""

    index: int
    fingerprint: str
    input_tokens: int
    model: str
    seed: int | None


@dataclass
class Shard:
    """One JSONL file being written, then sealed: its lines' units, its size, its key."""

    name: str
    path: Path
    model: str
    thinking: bool
    lines: int = 0
    bytes: int = 0
    units: list[UnitLine] = field(default_factory=list)


class LineTooLarge(ValueError):
    """A request whose line would exceed ``max_line_bytes``: the row's error, never sent."""


def render_line(request: Request, url: str = CHAT_URL, model: str | None = None) -> bytes:
    """The JSONL line of ``request`` (with its newline): the body an online openai request posts.

    ``model`` replaces the request's (the dry run's test model).
    """
    body = chat_body(request, DIALECTS["dashscope"].body_parameters(request.parameters, COMPATIBLE_NOT_SENT))
    if model is not None:
        body["model"] = model
    line = {"custom_id": custom_id(request.unit), "method": "POST", "url": url, "body": body}
    return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)


def unit_line(request: Request) -> UnitLine:
    return UnitLine(request.index, request.fingerprint, request.input_tokens, request.model, request.seed)


class ShardWriter:
    """Writes lines into shard files under ``folder``, named by ``next_name``, sealed through ``on_sealed``."""

    def __init__(
        self,
        folder: Path,
        *,
        max_lines: int,
        max_file_bytes: int,
        max_line_bytes: int,
        next_name: Callable[[], str],
        on_sealed: Callable[[Shard], None],
        on_units: Callable[[Shard], None] | None = None,
    ) -> None:
        self._folder = folder
        self._max_lines = max_lines
        self._max_file_bytes = max_file_bytes
        self.max_line_bytes = max_line_bytes
        self._next_name = next_name
        self._on_sealed = on_sealed
        self._on_units = on_units
        self._open: dict[tuple[str, bool], tuple[Shard, Any]] = {}

    def add(self, line: bytes, unit: UnitLine, *, thinking: bool) -> None:
        """Append ``line`` to the open shard of its key, sealing that shard first when it is full.

        Raises LineTooLarge for a line over ``max_line_bytes`` (or one no file could hold).
        """
        size = len(line)
        if size > self.max_line_bytes or size > self._max_file_bytes:
            raise LineTooLarge(size)
        key = (unit.model, thinking)
        current = self._open.get(key)
        if current is not None:
            shard, _ = current
            if shard.lines >= self._max_lines or shard.bytes + size > self._max_file_bytes:
                self._seal(key)
                current = None
        if current is None:
            current = self._start(key)
        shard, handle = current
        handle.write(line)
        shard.lines += 1
        shard.bytes += size
        shard.units.append(unit)
        if self._on_units is not None and len(shard.units) >= UNITS_IN_MEMORY:
            self._on_units(shard)

    def _start(self, key: tuple[str, bool]) -> tuple[Shard, Any]:
        name = self._next_name()
        path = self._folder / f"{name}.jsonl"
        self._folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle = open(path, "wb")  # noqa: SIM115 - closed by _seal
        opened = (Shard(name, path, key[0], key[1]), handle)
        self._open[key] = opened
        return opened

    def _seal(self, key: tuple[str, bool]) -> None:
        shard, handle = self._open.pop(key)
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        self._on_sealed(shard)

    def close(self) -> None:
        """Seal every open shard (each is recorded by ``on_sealed``)."""
        for key in list(self._open):
            self._seal(key)

    def abandon(self) -> None:
        """Close the open files without recording them (they are rewritten on the next run)."""
        for shard, handle in self._open.values():
            handle.close()
            shard.path.unlink(missing_ok=True)
        self._open.clear()
