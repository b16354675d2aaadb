"""The emulator's HTTP side: routes, auth, SSE framing, fault delivery, and ``open_emulator``.

Routes (reference section 10):

- ``POST /api/v1/services/aigc/text-generation/generation``  native; SSE with ``X-DashScope-SSE: enable``
- ``POST /api/v1/tokenizer``                                   token ids of the content
- ``POST /compatible-mode/v1/chat/completions``                OpenAI-compatible, stream or not
- ``GET  /compatible-mode/v1/models``                          the catalog's names
- ``GET  /emulator/stats``, ``GET /emulator/ledger``            statistics and the billing ledger
- any other path or method: 404 ``404: Not Found`` (the service's body is not documented), recorded
  in the ledger as endpoint ``not-found``, so a wrong base URL shows in what was sent

Each request: read → size check → auth → validate → fault decision → generate → rate
limits → latency → answer, and one ledger line whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .. import tokens
from ..wire import API_PREFIX, COMPATIBLE_PATH, NATIVE_PATH, REQUEST_ID_HEADER, SSE_HEADER
from .config import EmulatorConfig
from .faults import DirectiveError, Fault, Script, decide, error_fault, read_script, unit
from .generate import Generation, generate
from .ledger import Ledger
from .limits import WindowLimiter
from .validate import ApiError, ChatRequest, invalid, parse_body, validate_compatible, validate_native

NATIVE_ROUTE = API_PREFIX + NATIVE_PATH
TOKENIZER_ROUTE = API_PREFIX + "/tokenizer"
STATS_ROUTE = "/emulator/stats"
LEDGER_ROUTE = "/emulator/ledger"
MODELS_ROUTE = "/compatible-mode/v1/models"
# Hung handlers get this long to finish at shutdown before they are cancelled.
SHUTDOWN_GRACE_S = 0.5
COMPAT_AUTH_MESSAGE = "Incorrect API key provided. "
SSE_CONTENT_TYPE = "text/event-stream;charset=UTF-8"
JSON_CONTENT_TYPE = "application/json"
_BEARER = "Bearer "
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _json_bytes(obj: Any) -> bytes:
    return _dumps(obj).encode("utf-8")


class _Record:
    """What the ledger line of the current request will say; filled in as the request goes."""

    __slots__ = ("sha", "model", "seed", "stream", "status", "code", "input_tokens", "output_tokens", "fault")

    def __init__(self) -> None:
        self.sha = ""
        self.model: str | None = None
        self.seed: Any = None
        self.stream = False
        self.status = 0
        self.code: str | None = None
        self.input_tokens = 0
        self.output_tokens = 0
        self.fault: str | None = None


class Emulator:
    """One emulator's state (config, catalog, ledger, limiter, attempt counts) and its handlers."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self.catalog = self.config.catalog()
        self.ledger = Ledger(self.config.ledger_path)
        self.limiter = WindowLimiter(
            self.config.rpm_limit, self.config.tpm_limit, self.config.rate_window_s, other_load=self.config.other_load
        )
        self._first_request: float | None = None  # the clock of outages
        self._attempts: dict[str, int] = {}
        # Every generation body that parsed as JSON, in arrival order (for tests).
        self.received: list[dict[str, Any]] = []
        self._random_faults = self.config.faults.total() > 0

    def warm_up(self) -> None:
        """Load the vocabulary and word pools now, so the first request is not the slow one."""
        generate("qwen-turbo", [{"role": "user", "content": "warm up"}], {}, max_tokens=16)
        generate("qwen-turbo", [{"role": "user", "content": "预热一下"}], {}, max_tokens=16)
        generate("qwen-turbo", [{"role": "user", "content": "ウォームアップ"}], {}, max_tokens=16)

    def application(self) -> web.Application:
        # Above the service's own limit, so that the service's 413 comes from our check.
        app = web.Application(client_max_size=self.config.max_body_bytes * 4)
        app.router.add_post(NATIVE_ROUTE, self.native)
        app.router.add_get(NATIVE_ROUTE, self.wrong_method)
        app.router.add_post(TOKENIZER_ROUTE, self.tokenizer)
        app.router.add_post(COMPATIBLE_PATH, self.compatible)
        app.router.add_get(MODELS_ROUTE, self.models)
        app.router.add_get(STATS_ROUTE, self.stats)
        app.router.add_get(LEDGER_ROUTE, self.ledger_lines)
        # Last: routes are matched in order, so this takes only the requests no route above takes.
        app.router.add_route("*", "/{path:.*}", self.not_found)
        return app

    # ----- small routes -------------------------------------------------------------

    async def stats(self, request: web.Request) -> web.Response:
        return web.Response(body=_json_bytes(self.ledger.statistics()), content_type=JSON_CONTENT_TYPE)

    async def ledger_lines(self, request: web.Request) -> web.Response:
        return web.Response(text=self.ledger.jsonl(), content_type="application/x-ndjson")

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "owned_by": "system"} for name in self.catalog.names()]
        return web.Response(body=_json_bytes({"object": "list", "data": data}), content_type=JSON_CONTENT_TYPE)

    async def not_found(self, request: web.Request) -> web.Response:
        """A path (or method) the service does not have: aiohttp's plain 404, with a ledger line."""
        record = _Record()
        rid = str(uuid.uuid4())
        self.ledger.started()
        try:
            record.sha = hashlib.sha256(await request.read()).hexdigest()
            record.status = 404
            return web.Response(status=404, text="404: Not Found")
        finally:
            self.ledger.finished()
            self._record("not-found", record, rid)

    async def wrong_method(self, request: web.Request) -> web.Response:
        rid = str(uuid.uuid4())
        error = invalid(f"Request method '{request.method}' is not supported.")
        return self._native_error(error, rid, stream=False)

    # ----- shared steps -------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith(_BEARER):
            return False
        key = header[len(_BEARER):].strip()
        if self.config.api_key is None:
            return bool(key)
        return key == self.config.api_key

    async def _read(self, request: web.Request, record: _Record) -> bytes:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError("BadRequest.TooLarge") from None
        record.sha = hashlib.sha256(raw).hexdigest()
        if len(raw) > self.config.max_body_bytes:
            raise ApiError("BadRequest.TooLarge")
        return raw

    def _attempt(self, sha: str) -> int:
        attempt = self._attempts.get(sha, 0) + 1
        self._attempts[sha] = attempt
        return attempt

    def _in_outage(self) -> bool:
        now = time.monotonic()
        if self._first_request is None:
            self._first_request = now
        elapsed = now - self._first_request
        return any(start <= elapsed < end for start, end in self.config.outages)

    def _plan(self, chat: ChatRequest, record: _Record) -> tuple[Script, int, Fault | None]:
        """Directives, attempt number and the fault of this attempt."""
        script = Script()
        if self.config.directives:
            try:
                script = read_script([m["content"] for m in chat.messages])
            except DirectiveError as exc:
                raise invalid(str(exc)) from None
        if self.config.outages and self._in_outage():
            return script, 0, error_fault("ModelUnavailable")
        if not script.directives and not self._random_faults:
            return script, 0, None
        attempt = self._attempt(record.sha)
        fault = decide(script, self.config.faults, self.config.fault_seed, record.sha, attempt)
        return script, attempt, fault

    def _generate(self, chat: ChatRequest, script: Script) -> Generation:
        return generate(
            chat.model.name,
            chat.messages,
            chat.parameters,
            max_tokens=chat.max_tokens,
            median_tokens=self.config.reply_median_tokens,
            max_draft_tokens=self.config.reply_max_tokens,
            forced_tokens=script.length(),
        )

    def _latency(self, sha: str, attempt: int, script: Script) -> float:
        config = self.config
        delay = config.latency_s + script.latency(attempt)
        if config.latency_jitter_s:
            delay += config.latency_jitter_s * unit(config.fault_seed, sha, attempt, "latency")
        return delay

    def _retry_after(self, status: int) -> dict[str, str]:
        if status == 429 and self.config.retry_after is not None:
            return {"Retry-After": f"{self.config.retry_after:g}"}
        return {}

    # ----- native -------------------------------------------------------------------

    def _wants_sse(self, request: web.Request) -> bool:
        headers = request.headers
        if headers.get(SSE_HEADER, "").lower() == "enable":
            return True
        return self.config.sse_via_accept and "text/event-stream" in headers.get("Accept", "")

    def _native_error(self, error: ApiError, rid: str, *, stream: bool) -> web.Response:
        payload = _json_bytes({"code": error.code, "message": error.message, "request_id": rid})
        headers = {REQUEST_ID_HEADER: rid, **self._retry_after(error.status)}
        if stream:
            status = error.status if self.config.stream_error_mode == "status" else 200
            headers["Content-Type"] = SSE_CONTENT_TYPE
            return web.Response(body=_sse_error(1, error.status, payload), status=status, headers=headers)
        headers["Content-Type"] = JSON_CONTENT_TYPE
        return web.Response(body=payload, status=error.status, headers=headers)

    async def native(self, request: web.Request) -> web.StreamResponse:
        record = _Record()
        rid = str(uuid.uuid4())
        record.stream = self._wants_sse(request)
        self.ledger.started()
        try:
            return await self._native(request, record, rid)
        finally:
            self.ledger.finished()
            self._record("native", record, rid)

    def _admit(
        self, chat: ChatRequest, record: _Record, *, stream: bool
    ) -> tuple[Script, int, Fault | None, Generation]:
        """This attempt's plan: an injected error or a rate limit raises ApiError; else the reply."""
        script, attempt, fault = self._plan(chat, record)
        if fault is not None and fault.kind == "error" and not (fault.midstream and stream):
            record.fault = fault.name
            raise ApiError(fault.code or "InternalError", fault.message, fault.status)
        generation = self._generate(chat, script)
        if self.limiter.active:
            limited = self.limiter.admit(chat.model.name, chat.input_tokens + generation.output_tokens)
            if limited:
                raise ApiError(limited)
        return script, attempt, fault, generation

    async def _native(self, request: web.Request, record: _Record, rid: str) -> web.StreamResponse:
        try:
            raw = await self._read(request, record)
            if not self._authorized(request):
                raise ApiError("InvalidApiKey")
            body = parse_body(raw)
            self.received.append(body)
            record.model = body.get("model") if isinstance(body.get("model"), str) else None
            params = body.get("parameters")
            record.seed = params.get("seed") if isinstance(params, dict) else None
            chat = validate_native(body, self.catalog, rules=self.config.role_rules, usage_mode=self.config.usage_mode)
            record.input_tokens = chat.input_tokens
            script, attempt, fault, generation = self._admit(chat, record, stream=record.stream)
        except ApiError as error:
            # In "http200" stream mode the wire says 200, but the ledger keeps the error's status.
            record.status, record.code = error.status, error.code
            return self._native_error(error, rid, stream=record.stream)
        delay = self._latency(record.sha, attempt, script)
        if fault is not None:
            record.fault = fault.name
            if fault.kind in ("hang", "reset"):
                return await self._drop(request, fault, delay)
        if record.stream:
            return await self._native_stream(request, chat, generation, rid, record, fault, delay)
        if delay or self.config.latency_per_token_s:
            await asyncio.sleep(delay + self.config.latency_per_token_s * generation.output_tokens)
        payload = _json_bytes(_native_body(chat, generation, rid))
        record.output_tokens = generation.output_tokens
        return await self._deliver(request, payload, fault, record, rid)

    async def _native_stream(
        self,
        request: web.Request,
        chat: ChatRequest,
        generation: Generation,
        rid: str,
        record: _Record,
        fault: Fault | None,
        delay: float,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={"Content-Type": SSE_CONTENT_TYPE, REQUEST_ID_HEADER: rid, "x-dashscope-finished": "false"},
        )
        response.enable_chunked_encoding()
        if delay:
            await asyncio.sleep(delay)
        await response.prepare(request)
        record.status = 200
        pieces = _pieces(generation, self.config.stream_chunk_tokens, chat.model.name)
        # A mid-stream error or a cut-off comes after half of the content.
        stop_after = max(1, len(pieces) // 2) if fault is not None else None
        message = chat.result_format == "message"
        incremental = chat.incremental_output
        per_token = self.config.latency_per_token_s
        event_id = 0
        for index, (cumulative, delta, used) in enumerate(pieces):
            if stop_after is not None and index >= stop_after:
                break
            if per_token:
                await asyncio.sleep(per_token * self.config.stream_chunk_tokens)
            event_id += 1
            content = delta if incremental else cumulative
            data = _native_event_data(message, content, "null", chat.input_tokens, used, rid)
            await response.write(_sse_result(event_id, data))
        if fault is not None:
            if fault.kind == "error":
                record.status, record.code = fault.status or 500, fault.code
                payload = _json_bytes({"code": fault.code, "message": fault.message, "request_id": rid})
                await response.write(_sse_error(event_id + 1, fault.status or 500, payload))
            elif fault.kind == "malformed":
                record.status = 0
                await response.write(b"id:%d\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{\"choi\n\n" % (event_id + 1))
            elif fault.kind == "truncated":
                record.status = 0
                _abort(request)
                return response
            await response.write_eof()
            return response
        final = "" if incremental else generation.text
        data = _native_event_data(message, final, generation.finish_reason, chat.input_tokens, generation.output_tokens, rid)
        await response.write(_sse_result(event_id + 1, data))
        await response.write_eof()
        record.output_tokens = generation.output_tokens
        return response

    # ----- compatible ---------------------------------------------------------------

    def _compatible_error(self, error: ApiError, rid: str) -> web.Response:
        payload = _json_bytes(_compatible_error_body(error, rid))
        headers = {REQUEST_ID_HEADER: rid, "Content-Type": JSON_CONTENT_TYPE, **self._retry_after(error.status)}
        return web.Response(body=payload, status=error.status, headers=headers)

    async def compatible(self, request: web.Request) -> web.StreamResponse:
        record = _Record()
        rid = str(uuid.uuid4())
        self.ledger.started()
        try:
            return await self._compatible(request, record, rid)
        finally:
            self.ledger.finished()
            self._record("compatible", record, rid)

    async def _compatible(self, request: web.Request, record: _Record, rid: str) -> web.StreamResponse:
        try:
            raw = await self._read(request, record)
            if not self._authorized(request):
                raise ApiError("InvalidApiKey", COMPAT_AUTH_MESSAGE)
            body = parse_body(raw)
            self.received.append(body)
            record.model = body.get("model") if isinstance(body.get("model"), str) else None
            record.seed = body.get("seed")
            record.stream = body.get("stream") is True
            chat = validate_compatible(body, self.catalog, rules=self.config.role_rules, usage_mode=self.config.usage_mode)
            record.input_tokens = chat.input_tokens
            script, attempt, fault, generation = self._admit(chat, record, stream=chat.stream)
        except ApiError as error:
            record.status, record.code = error.status, error.code
            return self._compatible_error(error, rid)
        delay = self._latency(record.sha, attempt, script)
        if fault is not None:
            record.fault = fault.name
            if fault.kind in ("hang", "reset"):
                return await self._drop(request, fault, delay)
        created = int(time.time())
        if chat.stream:
            return await self._compatible_stream(request, chat, generation, rid, record, fault, delay, created)
        if delay or self.config.latency_per_token_s:
            await asyncio.sleep(delay + self.config.latency_per_token_s * generation.output_tokens)
        payload = _json_bytes(_compatible_body(chat, generation, rid, created))
        record.output_tokens = generation.output_tokens
        return await self._deliver(request, payload, fault, record, rid)

    async def _compatible_stream(
        self,
        request: web.Request,
        chat: ChatRequest,
        generation: Generation,
        rid: str,
        record: _Record,
        fault: Fault | None,
        delay: float,
        created: int,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200, headers={"Content-Type": "text/event-stream;charset=UTF-8", REQUEST_ID_HEADER: rid}
        )
        response.enable_chunked_encoding()
        if delay:
            await asyncio.sleep(delay)
        await response.prepare(request)
        record.status = 200
        common = {"object": "chat.completion.chunk", "usage": None, "created": created,
                  "system_fingerprint": None, "model": chat.model.name, "id": f"chatcmpl-{rid}"}

        def chunk(choice: dict[str, Any]) -> bytes:
            return b"data: " + _json_bytes({"choices": [choice], **common}) + b"\n\n"

        await response.write(chunk({"delta": {"content": "", "role": "assistant"}, "index": 0, "logprobs": None, "finish_reason": None}))
        pieces = _pieces(generation, self.config.stream_chunk_tokens, chat.model.name)
        stop_after = max(1, len(pieces) // 2) if fault is not None else None
        per_token = self.config.latency_per_token_s
        for index, (_, delta, _) in enumerate(pieces):
            if stop_after is not None and index >= stop_after:
                break
            if per_token:
                await asyncio.sleep(per_token * self.config.stream_chunk_tokens)
            await response.write(chunk({"finish_reason": None, "delta": {"content": delta}, "index": 0, "logprobs": None}))
        if fault is not None:
            if fault.kind == "error":
                error = ApiError(fault.code or "InternalError", fault.message, fault.status)
                record.status, record.code = error.status, error.code
                await response.write(b"data: " + _json_bytes(_compatible_error_body(error, rid)) + b"\n\n")
            elif fault.kind == "malformed":
                record.status = 0
                await response.write(b'data: {"choices":[{"delta":\n\n')
            elif fault.kind == "truncated":
                record.status = 0
                _abort(request)
                return response
            await response.write_eof()
            return response
        await response.write(chunk({"finish_reason": generation.finish_reason, "delta": {"content": ""}, "index": 0, "logprobs": None}))
        if chat.include_usage:
            usage = {"prompt_tokens": chat.input_tokens, "completion_tokens": generation.output_tokens,
                     "total_tokens": chat.input_tokens + generation.output_tokens}
            await response.write(b"data: " + _json_bytes({**common, "choices": [], "usage": usage}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        record.output_tokens = generation.output_tokens
        return response

    # ----- tokenizer ----------------------------------------------------------------

    async def tokenizer(self, request: web.Request) -> web.Response:
        record = _Record()
        rid = str(uuid.uuid4())
        self.ledger.started()
        try:
            try:
                raw = await self._read(request, record)
                if not self._authorized(request):
                    raise ApiError("InvalidApiKey")
                body = parse_body(raw)
                name = body.get("model")
                if not name:
                    raise ApiError("BadRequest.EmptyModel")
                if not isinstance(name, str) or self.catalog.get(name) is None:
                    raise invalid("Model not exist.")
                record.model = name
                inp = body.get("input")
                if not isinstance(inp, dict):
                    raise ApiError("BadRequest.EmptyInput")
                texts = [m.get("content") for m in inp.get("messages") or [] if isinstance(m, dict)]
                if isinstance(inp.get("prompt"), str):
                    texts.append(inp["prompt"])
                if not texts or not all(isinstance(t, str) for t in texts):
                    raise invalid('Either "prompt" or "messages" must exist and cannot both be none')
            except ApiError as error:
                record.status, record.code = error.status, error.code
                return self._native_error(error, rid, stream=False)
            # The Feb 2024 capture counts content only, no template (UNCONFIRMED for today).
            ids = tokens.encode("".join(texts), name)
            pieces = [tokens.decode([i], name) for i in ids]
            record.status, record.input_tokens = 200, len(ids)
            payload = {"output": {"token_ids": ids, "tokens": pieces}, "usage": {"input_tokens": len(ids)}, "request_id": rid}
            return web.Response(body=_json_bytes(payload), headers={"Content-Type": JSON_CONTENT_TYPE, REQUEST_ID_HEADER: rid})
        finally:
            self.ledger.finished()
            self._record("tokenizer", record, rid)

    # ----- delivery and faults -------------------------------------------------------

    async def _deliver(self, request: web.Request, payload: bytes, fault: Fault | None, record: _Record, rid: str) -> web.StreamResponse:
        """A 200 JSON answer, or its malformed or truncated version."""
        headers = {"Content-Type": JSON_CONTENT_TYPE, REQUEST_ID_HEADER: rid}
        if fault is None or fault.kind == "error":
            record.status = 200
            return web.Response(body=payload, headers=headers)
        # The ledger's status is that of a usable answer: 0 for a spoiled one (see ledger).
        record.output_tokens = 0
        if fault.kind == "malformed":
            return web.Response(body=payload[: max(1, len(payload) // 2)] + b"<html>502 Bad Gateway</html>", headers=headers)
        # Truncated: promise the whole body, send half, then drop the connection.
        response = web.StreamResponse(status=200, headers=headers)
        response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload[: len(payload) // 2])
        _abort(request)
        return response

    async def _drop(self, request: web.Request, fault: Fault, delay: float) -> web.StreamResponse:
        """Never answer: hang until the client leaves or the server stops, or reset the connection."""
        if delay:
            await asyncio.sleep(delay)
        if fault.kind == "hang":
            await asyncio.get_running_loop().create_future()
        _abort(request)
        # The connection is gone; aiohttp will not manage to send this.
        return web.Response(status=500)

    def _record(self, endpoint: str, record: _Record, rid: str) -> None:
        billed = record.status == 200 and record.fault is None and endpoint != "tokenizer"
        self.ledger.record(
            endpoint=endpoint,
            body_sha256=record.sha,
            model=record.model,
            seed=record.seed,
            stream=record.stream,
            status=record.status,
            code=record.code,
            request_id=rid,
            input_tokens=record.input_tokens,
            output_tokens=record.output_tokens,
            fault=record.fault,
            billable=billed,
        )


# ----- bodies and framing --------------------------------------------------------------


def _usage(chat: ChatRequest, output_tokens: int) -> dict[str, int]:
    return {"total_tokens": chat.input_tokens + output_tokens, "output_tokens": output_tokens, "input_tokens": chat.input_tokens}


def _native_body(chat: ChatRequest, generation: Generation, rid: str) -> dict[str, Any]:
    if chat.result_format == "message":
        output: dict[str, Any] = {"choices": [{"finish_reason": generation.finish_reason,
                                               "message": {"role": "assistant", "content": generation.text}}]}
    else:
        output = {"finish_reason": generation.finish_reason, "text": generation.text}
    return {"output": output, "usage": _usage(chat, generation.output_tokens), "request_id": rid}


def _native_event_data(message: bool, content: str, finish_reason: str, input_tokens: int, output_tokens: int, rid: str) -> bytes:
    usage = {"total_tokens": input_tokens + output_tokens, "input_tokens": input_tokens, "output_tokens": output_tokens}
    if message:
        output: dict[str, Any] = {"choices": [{"message": {"content": content, "role": "assistant"}, "finish_reason": finish_reason}]}
    else:
        output = {"finish_reason": finish_reason, "text": content}
    return _json_bytes({"output": output, "usage": usage, "request_id": rid})


def _sse_result(event_id: int, data: bytes) -> bytes:
    return b"id:%d\nevent:result\n:HTTP_STATUS/200\ndata:%s\n\n" % (event_id, data)


def _sse_error(event_id: int, status: int, data: bytes) -> bytes:
    return b"id:%d\nevent:error\n:HTTP_STATUS/%d\ndata:%s\n\n" % (event_id, status, data)


def _compatible_body(chat: ChatRequest, generation: Generation, rid: str, created: int) -> dict[str, Any]:
    return {
        "choices": [{"message": {"role": "assistant", "content": generation.text},
                     "finish_reason": generation.finish_reason, "index": 0, "logprobs": None}],
        "object": "chat.completion",
        "usage": {"prompt_tokens": chat.input_tokens, "completion_tokens": generation.output_tokens,
                  "total_tokens": chat.input_tokens + generation.output_tokens},
        "created": created,
        "system_fingerprint": None,
        "model": chat.model.name,
        "id": f"chatcmpl-{rid}",
    }


def _compatible_error_body(error: ApiError, rid: str) -> dict[str, Any]:
    code = error.compatible_code
    if error.status in (400, 401, 404, 413) and code != "data_inspection_failed":
        error_type = "invalid_request_error"
    else:
        error_type = code
    return {"error": {"message": error.message, "type": error_type, "param": None, "code": code}, "request_id": rid}


def _pieces(generation: Generation, per_event: int, model: str) -> list[tuple[str, str, int]]:
    """(cumulative text, delta, output tokens so far) per stream event, cut on whole characters."""
    ids = generation.token_ids
    result: list[tuple[str, str, int]] = []
    previous = ""
    for end in range(per_event, len(ids) + per_event, per_event):
        end = min(end, len(ids))
        prefix = generation.text if end == len(ids) else tokens.decode(ids[:end], model)
        if prefix.endswith("\ufffd") or not generation.text.startswith(prefix):
            continue  # inside a multi-byte character: wait for the rest of it
        result.append((prefix, prefix[len(previous):], end))
        previous = prefix
    return result


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


# ----- running it ----------------------------------------------------------------------


@dataclass(frozen=True)
class RunningEmulator:
    """A live emulator: where it listens, which key it accepts, and its records."""

    root_url: str
    api_key: str
    emulator: Emulator

    @property
    def base_url(self) -> str:
        """The native base, e.g. ``http://127.0.0.1:PORT/api/v1`` (``dashscope.base_http_api_url``)."""
        return self.root_url + API_PREFIX

    @property
    def compatible_base_url(self) -> str:
        """The OpenAI-compatible base, e.g. ``http://127.0.0.1:PORT/compatible-mode/v1``."""
        return self.root_url + "/compatible-mode/v1"

    @property
    def config(self) -> EmulatorConfig:
        return self.emulator.config

    @property
    def ledger(self) -> list[dict[str, Any]]:
        """Every ledger line so far, as dicts, oldest first."""
        return self.emulator.ledger.entries()

    @property
    def received(self) -> list[dict[str, Any]]:
        """Every generation request body (native and compatible) that parsed as JSON, in order."""
        return list(self.emulator.received)

    def stats(self) -> dict[str, Any]:
        """The same snapshot as ``GET /emulator/stats``."""
        return self.emulator.ledger.statistics()

    def wait_for_request(self, timeout: float | None = None) -> bool:
        """Block until one more request is recorded in the ledger; False on timeout.

        For code on another thread than the emulator's loop (``EmulatorThread`` users):
        called on the loop's own thread it would block the server.
        """
        ledger = self.emulator.ledger
        return ledger.wait_for_entries(len(ledger) + 1, timeout)

    def wait_for_in_flight(self, count: int, timeout: float | None = None) -> bool:
        """Block until ``count`` requests are in flight at once; False on timeout (other threads only)."""
        return self.emulator.ledger.wait_for_in_flight(count, timeout)


@contextlib.asynccontextmanager
async def open_emulator(
    config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningEmulator]:
    """Serve the emulator on ``host:port`` (0 = any free port) until the block exits.

    Shutdown is bounded: handlers still running (a hang, a slow stream) are cancelled
    after ``SHUTDOWN_GRACE_S``.
    """
    emulator = Emulator(config)
    emulator.warm_up()
    emulator.ledger.open()
    runner = web.AppRunner(
        emulator.application(), access_log=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_S
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        key = emulator.config.api_key if emulator.config.api_key is not None else "sk-any"
        yield RunningEmulator(f"http://{url_host}:{bound_port}", key, emulator)
    finally:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(runner.cleanup()), SHUTDOWN_GRACE_S * 4 + 1)
        emulator.ledger.close()
