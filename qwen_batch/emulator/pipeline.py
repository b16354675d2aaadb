"""The one request pipeline every generation endpoint goes through, whatever its dialect.

A generation request goes: read → size check → auth → parse → note for the ledger →
validate → ``admit`` (scripted or random fault, generation, rate limits) → latency →
answer (whole, streamed, or spoiled by a fault), and leaves one ledger line whatever
happened. The steps and their order live here once; what a wire protocol changes (how a
body is noted and validated, how a reply, an error and a stream are encoded) is a
``Dialect`` (``native.py``, ``compatible.py``). A new protocol is a new dialect; a new
behaviour of the service is a new step here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Protocol

from aiohttp import web

from .. import tokens
from ..catalog import Catalog
from ..wire import REQUEST_ID_HEADER
from .config import EmulatorConfig, FaultRates
from . import structured
from .faults import NO_SCRIPT, DirectiveError, Fault, Script, decide, error_fault, read_script, unit
from .generate import Generation, Thinking, cut_to_tokens, draft_seed, generate
from .ledger import Ledger
from .limits import WindowLimiter
from .servers import SERVERS
from .validate import ApiError, ChatRequest, invalid, parse_body

JSON_CONTENT_TYPE = "application/json"
SSE_CONTENT_TYPE = "text/event-stream;charset=UTF-8"
_BEARER = "Bearer "
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as the service sends it."""
    return _dumps(obj).encode("utf-8")


def new_request_id() -> str:
    return str(uuid.uuid4())


class Exchange:
    """One request on its way through: its id, and what its ledger line will say.

    ``with Exchange(ledger, endpoint):`` counts the request in flight and writes its one
    ledger line on the way out, whatever happened in between.
    """

    __slots__ = ("ledger", "endpoint", "bills", "request_id", "sha", "model", "seed", "stream", "status", "code",
                 "input_tokens", "output_tokens", "fault", "extra")

    def __init__(self, ledger: Ledger, endpoint: str, *, bills: bool = True) -> None:
        self.ledger = ledger
        self.endpoint = endpoint
        # Whether a 200 on this endpoint is paid for (the tokenizer's is not).
        self.bills = bills
        self.request_id = str(uuid.uuid4())
        self.sha = ""
        self.model: str | None = None
        self.seed: Any = None
        self.stream = False
        self.status = 0
        self.code: str | None = None
        self.input_tokens = 0
        self.output_tokens = 0
        self.fault: str | None = None
        # Keys the ledger line gets after the common ones (batch lines, files and batches calls).
        self.extra: dict[str, Any] | None = None

    def __enter__(self) -> Exchange:
        self.ledger.started()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.ledger.finished()
        self.ledger.record(
            endpoint=self.endpoint,
            body_sha256=self.sha,
            model=self.model,
            seed=self.seed,
            stream=self.stream,
            status=self.status,
            code=self.code,
            request_id=self.request_id,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            fault=self.fault,
            billable=self.bills and self.status == 200 and self.fault is None,
            extra=self.extra,
        )


class ReplyStream(Protocol):
    """A dialect's SSE framing of one streamed reply; each method gives the bytes of one write."""

    headers: dict[str, str]

    def opening(self) -> Sequence[bytes]:
        """Events sent before the first piece of content."""

    def thought(self, cumulative: str, delta: str, reasoning_tokens: int) -> bytes:
        """The event of one piece of reasoning (the thought so far, what is new, its tokens so far)."""

    def piece(self, cumulative: str, delta: str, output_tokens: int) -> bytes:
        """The event of one piece of content (the text so far, what is new, tokens so far)."""

    def error(self, error: ApiError) -> bytes:
        """The event of an error that interrupts the stream."""

    def malformed(self) -> bytes:
        """An event that does not parse (the ``malformed`` fault)."""

    def closing(self) -> Sequence[bytes]:
        """Events after the last piece of content: finish reason, usage, end mark."""


class Dialect(Protocol):
    """What one wire protocol supplies to the pipeline."""

    endpoint: str
    """The ledger's name for the endpoint."""
    auth_message: str | None
    """The message of its 401 (None: the code's own)."""
    finish_reasons: frozenset[str]
    """The finish reasons its service gives (what ``[[emu: finish=...]]`` may ask for)."""

    def start(self, request: web.Request, exchange: Exchange) -> None:
        """Note what the headers say, before the body is read (native: whether to stream)."""

    def note(self, body: dict[str, Any], exchange: Exchange) -> None:
        """Note model, seed and stream for the ledger, from a body not yet validated."""

    def validate(self, body: dict[str, Any], stream: bool) -> ChatRequest:
        """The checked request (``stream``: what the headers asked), or ApiError in the service's order."""

    def error_response(self, error: ApiError, exchange: Exchange, headers: dict[str, str]) -> web.Response:
        """The refusal as this protocol sends it; ``headers`` go with it (Retry-After)."""

    def reply(self, chat: ChatRequest, generation: Generation, request_id: str, created: int) -> bytes:
        """The body of a whole (non-streamed) reply."""

    def reply_stream(self, chat: ChatRequest, generation: Generation, request_id: str, created: int) -> ReplyStream:
        """The framing of a streamed reply."""


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_NO_FAULTS = FaultRates()


class Pipeline:
    """The emulated service's state (catalog, ledger, limits, attempt counts) and the request steps."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.catalog: Catalog = config.catalog()
        self.ledger = Ledger(config.ledger_path)
        self.limiter = WindowLimiter(
            config.rpm_limit, config.tpm_limit, config.rate_window_s, other_load=config.other_load
        )
        self._first_request: float | None = None  # the clock of outages
        self._attempts: dict[str, int] = {}
        # Every generation body that parsed as JSON, in arrival order (for tests).
        self.received: list[dict[str, Any]] = []
        # Both fixed for the emulator's life, so a request pays for neither check.
        self._random_faults = config.faults.total() > 0
        self._rate_limited = self.limiter.active
        self.keyless = SERVERS[config.server].keyless
        # A local server queues what its slots cannot take (WAVE2 D.1 "Overload": no 429).
        self._slots = asyncio.Semaphore(config.max_running) if config.max_running else None

    def handler(self, dialect: Dialect) -> Handler:
        """The aiohttp handler of a generation endpoint speaking ``dialect``."""
        slots = self._slots

        async def handle(request: web.Request) -> web.StreamResponse:
            if slots is None:
                return await self.serve(request, dialect)
            async with slots:
                return await self.serve(request, dialect)

        return handle

    async def serve(self, request: web.Request, dialect: Dialect) -> web.StreamResponse:
        """Answer one generation request, from its first byte to its ledger line."""
        with Exchange(self.ledger, dialect.endpoint) as exchange:
            dialect.start(request, exchange)
            try:
                raw = await self.read(request, exchange)
                if not self.authorized(request):
                    raise ApiError("InvalidApiKey", dialect.auth_message)
                body = parse_body(raw)
                self.received.append(body)
                dialect.note(body, exchange)
                chat = dialect.validate(body, exchange.stream)
                exchange.input_tokens = chat.input_tokens
                script, attempt, fault, generation = self.admit(chat, exchange, dialect.finish_reasons)
            except ApiError as error:
                # In native "http200" stream mode the wire says 200, but the ledger keeps the error's status.
                exchange.status, exchange.code = error.status, error.code
                return dialect.error_response(error, exchange, self.retry_after(error.status))
            delay = self.latency(exchange.sha, attempt, script)
            if fault is not None:
                exchange.fault = fault.name
                if fault.kind in ("hang", "reset"):
                    return await self.drop(request, fault, delay)
            created = int(time.time())
            if exchange.stream:
                stream = dialect.reply_stream(chat, generation, exchange.request_id, created)
                return await self.stream(request, stream, exchange, chat, generation, fault, delay)
            if delay or self.config.latency_per_token_s:
                await asyncio.sleep(delay + self.config.latency_per_token_s * generation.output_tokens)
            payload = dialect.reply(chat, generation, exchange.request_id, created)
            exchange.output_tokens = generation.output_tokens
            return await self.deliver(request, payload, fault, exchange)

    # ----- steps --------------------------------------------------------------------

    def authorized(self, request: web.Request) -> bool:
        if self.keyless:
            return True
        header = request.headers.get("Authorization", "")
        if not header.startswith(_BEARER):
            return False
        key = header[len(_BEARER):].strip()
        if self.config.api_key is None:
            return bool(key)
        return key == self.config.api_key

    async def read(self, request: web.Request, exchange: Exchange) -> bytes:
        """The body, hashed for the ledger; over the size limit it is the service's 413."""
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError("BadRequest.TooLarge") from None
        exchange.sha = hashlib.sha256(raw).hexdigest()
        if len(raw) > self.config.max_body_bytes:
            raise ApiError("BadRequest.TooLarge")
        return raw

    def admit(
        self, chat: ChatRequest, exchange: Exchange, finish_reasons: frozenset[str] = frozenset(), *,
        online: bool = True,
    ) -> tuple[Script, int, Fault | None, Generation]:
        """Whether and how this attempt is served: its directives, attempt number, fault and reply.

        An injected error (unless it is due mid-stream) or a rate limit raises ApiError.
        Injected faults come before the rate limits, so a refused attempt does not count.
        ``finish_reasons``: those the endpoint's service gives (a ``finish=`` directive is checked against them).
        ``online=False`` (a batch line): no outages, random faults or RPM/TPM, which the Batch API is
        not subject to (reference section 7.8); scripted faults still apply.
        """
        script, attempt, fault = NO_SCRIPT, 0, None
        if self.config.directives:
            try:
                script = read_script([m["content"] for m in chat.messages])
            except DirectiveError as exc:
                raise invalid(str(exc)) from None
        if online and self.config.outages and self._in_outage():
            fault = error_fault("ModelUnavailable")
        elif script.directives or (online and self._random_faults):
            attempt = self._attempts.get(exchange.sha, 0) + 1
            self._attempts[exchange.sha] = attempt
            rates = self.config.faults if online else _NO_FAULTS
            fault = decide(script, rates, self.config.fault_seed, exchange.sha, attempt)
        finish = script.finish(attempt) if script.directives else None
        if finish is not None:
            if finish not in finish_reasons:
                raise invalid(f"finish={finish!r}: this server gives only {', '.join(sorted(finish_reasons))}")
            if finish == "error" and fault is None:
                # vLLM turns a finish_reason "error" into HTTP 500 (WAVE2 D.1); in a stream, an error event.
                fault = error_fault("InternalError", 500, midstream=True)
        if fault is not None and fault.kind == "error" and not (fault.midstream and exchange.stream):
            exchange.fault = fault.name
            raise fault_error(fault)
        if script.directives and script.no_usage():
            chat.send_usage = False
        generation = self.generate(chat, script)
        if finish is not None and finish != "error":
            generation = dataclasses.replace(generation, finish_reason=finish)
        if online and self._rate_limited:
            limited = self.limiter.admit(chat.model.name, chat.input_tokens + generation.output_tokens)
            if limited:
                raise ApiError(limited)
        return script, attempt, fault, generation

    def _in_outage(self) -> bool:
        """Whether now falls in one of the configured outages (seconds after the first request)."""
        now = time.monotonic()
        if self._first_request is None:
            self._first_request = now
        elapsed = now - self._first_request
        return any(start <= elapsed < end for start, end in self.config.outages)

    def generate(self, chat: ChatRequest, script: Script) -> Generation:
        config = self.config
        thinking = None
        if chat.thinking:
            thinking = Thinking(chat.thinking_budget, config.thinking_median_tokens, config.thinking_max_tokens,
                                script.think(), script.think_overflow())
        generation = self._generate(chat, script, thinking)
        if chat.json_mode is not None:
            return json_generation(chat, generation, script)
        if script.directives and script.broken_json():
            raise invalid("bad_json and bad_schema need response_format json_object or json_schema")
        return generation

    def _generate(self, chat: ChatRequest, script: Script, thinking: Thinking | None) -> Generation:
        config = self.config
        return generate(
            chat.model.name,
            chat.messages,
            chat.parameters,
            max_tokens=chat.max_tokens,
            median_tokens=config.reply_median_tokens,
            max_draft_tokens=config.reply_max_tokens,
            forced_tokens=script.length(),
            thinking=thinking,
        )

    def latency(self, sha: str, attempt: int, script: Script) -> float:
        config = self.config
        delay = config.latency_s + (script.latency(attempt) if script.directives else 0.0)
        if config.latency_jitter_s:
            delay += config.latency_jitter_s * unit(config.fault_seed, sha, attempt, "latency")
        return delay

    def retry_after(self, status: int) -> dict[str, str]:
        if status == 429 and self.config.retry_after is not None:
            return {"Retry-After": f"{self.config.retry_after:g}"}
        return {}

    async def deliver(
        self, request: web.Request, payload: bytes, fault: Fault | None, exchange: Exchange
    ) -> web.StreamResponse:
        """A 200 JSON answer, or its malformed or truncated version."""
        headers = {"Content-Type": JSON_CONTENT_TYPE, REQUEST_ID_HEADER: exchange.request_id}
        if fault is None or fault.kind == "error":
            exchange.status = 200
            return web.Response(body=payload, headers=headers)
        # The ledger's status is that of a usable answer: 0 for a spoiled one (see ledger).
        exchange.output_tokens = 0
        if fault.kind == "malformed":
            return web.Response(body=payload[: max(1, len(payload) // 2)] + b"<html>502 Bad Gateway</html>", headers=headers)
        # Truncated: promise the whole body, send half, then drop the connection.
        response = web.StreamResponse(status=200, headers=headers)
        response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload[: len(payload) // 2])
        abort(request)
        return response

    async def stream(
        self,
        request: web.Request,
        stream: ReplyStream,
        exchange: Exchange,
        chat: ChatRequest,
        generation: Generation,
        fault: Fault | None,
        delay: float,
    ) -> web.StreamResponse:
        """A streamed 200; a fault cuts it after half of the content (error, broken event or cut-off)."""
        response = web.StreamResponse(status=200, headers=stream.headers)
        response.enable_chunked_encoding()
        if delay:
            await asyncio.sleep(delay)
        await response.prepare(request)
        exchange.status = 200
        for event in stream.opening():
            await response.write(event)
        count, events = _content_events(stream, generation, self.config.stream_chunk_tokens, chat.model.name)
        stop_after = max(1, count // 2) if fault is not None else None
        per_token = self.config.latency_per_token_s
        for event in itertools.islice(events, stop_after):
            if per_token:
                await asyncio.sleep(per_token * self.config.stream_chunk_tokens)
            await response.write(event)
        if fault is not None:
            if fault.kind == "error":
                error = fault_error(fault)
                exchange.status, exchange.code = error.status, error.code
                await response.write(stream.error(error))
            elif fault.kind == "malformed":
                exchange.status = 0
                await response.write(stream.malformed())
            elif fault.kind == "truncated":
                exchange.status = 0
                abort(request)
                return response
            await response.write_eof()
            return response
        for event in stream.closing():
            await response.write(event)
        await response.write_eof()
        exchange.output_tokens = generation.output_tokens
        return response

    async def drop(self, request: web.Request, fault: Fault, delay: float) -> web.StreamResponse:
        """Never answer: hang until the client leaves or the server stops, or reset the connection."""
        if delay:
            await asyncio.sleep(delay)
        if fault.kind == "hang":
            await asyncio.get_running_loop().create_future()
        abort(request)
        # The connection is gone; aiohttp will not manage to send this.
        return web.Response(status=500)


def json_generation(chat: ChatRequest, generation: Generation, script: Script) -> Generation:
    """The reply of a json mode request: the JSON answer in place of the prose (same thought),
    spoiled while a ``bad_json``/``bad_schema`` directive is not yet fixed by re-asks, cut at max_tokens."""
    if generation.finish_reason == "length" and not generation.text:
        return generation  # the thought used every token: no answer to format
    spoil = None
    broken = script.broken_json() if script.directives else None
    if broken is not None:
        kind, fixed_after = broken
        if kind == "bad_schema" and chat.json_mode != "json_schema":
            raise invalid("bad_schema needs response_format json_schema")
        if structured.reask_turns(chat.messages) < fixed_after:
            spoil = kind
    model = chat.model.name
    seed = draft_seed(model, chat.messages, chat.parameters)
    text = structured.answer(chat.json_schema, seed, generation.text, spoil)
    ids = tokens.encode(text, model)
    finish = "stop"
    if len(ids) > chat.max_tokens:
        text, ids = cut_to_tokens(text, chat.max_tokens, model, ids)
        finish = "length"
    return Generation(text, finish, tuple(ids), generation.reasoning, generation.reasoning_ids)


def fault_error(fault: Fault) -> ApiError:
    """The ApiError an injected error fault answers with."""
    return ApiError(fault.code or "InternalError", fault.message, fault.status)


def abort(request: web.Request) -> None:
    """Drop the connection at once (a reset, a truncated answer)."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _content_events(
    stream: ReplyStream, generation: Generation, per_event: int, model: str
) -> tuple[int, Iterator[bytes]]:
    """How many content events a streamed reply has, and the events (built as they are sent,
    so that event numbers stay in order): the reasoning's first, then the answer's."""
    answer = _pieces(generation.text, generation.token_ids, per_event, model)
    if not generation.reasoning_ids:
        return len(answer), (stream.piece(*piece) for piece in answer)
    thought = _pieces(generation.reasoning, generation.reasoning_ids, per_event, model)
    spent = generation.reasoning_tokens
    events = itertools.chain(
        (stream.thought(*piece) for piece in thought),
        (stream.piece(cumulative, delta, spent + used) for cumulative, delta, used in answer),
    )
    return len(thought) + len(answer), events


def _pieces(text: str, ids: tuple[int, ...], per_event: int, model: str) -> list[tuple[str, str, int]]:
    """(cumulative text, delta, tokens so far) per stream event, cut on whole characters."""
    result: list[tuple[str, str, int]] = []
    previous = ""
    for end in range(per_event, len(ids) + per_event, per_event):
        end = min(end, len(ids))
        prefix = text if end == len(ids) else tokens.decode(ids[:end], model)
        if prefix.endswith("\ufffd") or not text.startswith(prefix):
            continue  # inside a multi-byte character: wait for the rest of it
        result.append((prefix, prefix[len(previous):], end))
        previous = prefix
    return result
