"""The Batch API: ``/batches`` create, retrieve, list and cancel, and the work each batch does.

A batch runs as one task on the emulator's loop (cancelled at shutdown), on the config's
time scale: ``validating`` for ``batch_validating_s``, then the whole input file is checked
against the documented limits (section 7.2; a broken file ends ``failed`` with line errors),
then ``in_progress`` one line per ``batch_line_s``, then ``finalizing`` for
``batch_finalizing_s``, then ``completed``. Its ``completion_window`` lasts
``batch_hour_s`` per hour: past it the batch is ``expired``. A cancel makes it
``cancelling`` at once; the line in flight finishes, then it is ``cancelled``.
``request_counts`` are true at every step. Lines that never ran (expired, cancelled) count as
failed and are listed in the error file (research-wave2 E.1), are not run and are not billed.

Each line goes through the compatible endpoint's own validation, scripted faults and
generation (``Pipeline.admit``), so its answer is the online answer for the same body and a
body the endpoint refuses gets that refusal as its error line. Every processed line is one
ledger line (endpoint ``batch``, with ``batch_id``, ``custom_id`` and ``billable``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .compatible import CompatibleDialect
from .config import EmulatorConfig
from .faults import DirectiveError, read_script
from .files import OUTPUT_PREFIX, RESULT_PURPOSE, FileApiError, FileStore
from .pipeline import Exchange, Pipeline, json_bytes, new_request_id
from .validate import ApiError, invalid

CHAT_URL = "/v1/chat/completions"
TEST_URL = "/v1/chat/ds-test"
EMBEDDINGS_URL = "/v1/embeddings"
TEST_MODEL = "batch-test-model"
# The test model's fixed answer and usage (reference section 7.2).
TEST_ANSWER = "This is a test result."
TEST_USAGE = {"prompt_tokens": 20, "completion_tokens": 6, "total_tokens": 26}
TEST_MAX_LINES = 100
TEST_MAX_FILE_BYTES = 1_000_000
MAX_DS_NAME = 100
MAX_DS_DESCRIPTION = 200
MAX_LISTED = 100
DEFAULT_LISTED = 20
# At most this many line errors are listed in a failed batch's ``errors``.
MAX_REPORTED_ERRORS = 1000
# A batch processes lines without sleeping while it is less than this far ahead of its schedule.
SCHEDULE_SLACK_S = 0.005
# Lines processed between two yields to the loop when the schedule is behind (line time 0).
LINES_PER_YIELD = 64
_WINDOW = re.compile(r"([1-9][0-9]{0,3})([hd])")
_LINE_ERROR = ApiError("InternalError")
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."


def window_hours(text: Any) -> int:
    """Hours of a ``completion_window`` ("24h".."336h", "1d".."14d"); FileApiError otherwise."""
    match = _WINDOW.fullmatch(text) if isinstance(text, str) else None
    hours = (int(match.group(1)) * (24 if match.group(2) == "d" else 1)) if match else 0
    if not 24 <= hours <= 336:
        raise FileApiError(400, f"completion_window {text!r} is not supported: give whole hours from 24h to 336h "
                           "or whole days from 1d to 14d.", param="completion_window")
    return hours


@dataclass(slots=True)
class Line:
    """One checked input line: its number (from 1), id, url and body."""

    number: int
    custom_id: str
    body: dict[str, Any]


@dataclass
class Batch:
    """One batch and everything its object shows."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None
    created_at: int
    deadline: float  # time.monotonic() at which its window ends
    status: str = "validating"
    stamps: dict[str, int | None] = field(default_factory=lambda: dict.fromkeys(_STAMPS))
    errors: dict[str, Any] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    cancel: asyncio.Event = field(default_factory=asyncio.Event)

    def enter(self, status: str) -> None:
        """Move to ``status`` and stamp its time (``cancelling_at`` for cancelling, ...)."""
        self.status = status
        stamp = _STAMP_OF.get(status)
        if stamp is not None:
            self.stamps[stamp] = int(time.time())

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "expired", "cancelled")

    def object(self) -> dict[str, Any]:
        """The batch object, in the create capture's key order; ``expires_at`` stays null as in every capture."""
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": self.errors,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, **self.stamps,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }


_STAMP_OF = {"in_progress": "in_progress_at", "finalizing": "finalizing_at", "completed": "completed_at",
             "failed": "failed_at", "expired": "expired_at", "cancelling": "cancelling_at", "cancelled": "cancelled_at"}
_STAMPS = ("in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
           "cancelling_at", "cancelled_at")


@dataclass
class Results:
    """The lines a batch has written so far: output lines, error lines (bytes, without newlines)."""

    output: list[bytes] = field(default_factory=list)
    errors: list[bytes] = field(default_factory=list)


class BatchService:
    """Every batch of the emulated account, and the tasks that run them."""

    def __init__(self, config: EmulatorConfig, pipeline: Pipeline, compatible: CompatibleDialect,
                 files: FileStore) -> None:
        self.config = config
        self.pipeline = pipeline
        self.compatible = compatible
        self.files = files
        self.batches: dict[str, Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # How many batches have carried each line body (``[[emu: batch_line_error]]`` counts them).
        self._batch_attempts: dict[str, int] = {}

    # ----- the API ---------------------------------------------------------------------

    def create(self, body: Any) -> dict[str, Any]:
        """``POST /batches``: check the request, start the batch, answer it ``validating``."""
        if not isinstance(body, dict):
            raise FileApiError(400, "The request body must be a JSON object.")
        input_file = self.files.get(_text(body, "input_file_id"))
        if input_file.purpose != "batch":
            raise FileApiError(400, f"File {input_file.id} was not uploaded with purpose 'batch'.",
                               param="input_file_id")
        endpoint = _text(body, "endpoint")
        if endpoint not in (CHAT_URL, TEST_URL):
            raise FileApiError(400, f"endpoint {endpoint!r} is not served here: use {CHAT_URL} or {TEST_URL}.",
                               param="endpoint")
        window = body.get("completion_window", "24h")
        hours = window_hours(window)
        metadata = _metadata(body.get("metadata"))
        batch = Batch("batch_" + str(uuid.uuid4()), input_file.id, endpoint, window, metadata, int(time.time()),
                      time.monotonic() + hours * self.config.batch_hour_s)
        self.batches[batch.id] = batch
        task = asyncio.get_running_loop().create_task(self._run(batch, input_file.content))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return batch.object()

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        return self._get(batch_id).object()

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """``POST /batches/{id}/cancel``: ``cancelling`` now; a finished batch cannot be cancelled (UNCONFIRMED: 400)."""
        batch = self._get(batch_id)
        if batch.finished:
            raise FileApiError(400, f"Cannot cancel a batch with status '{batch.status}'.", param="batch_id")
        if batch.status != "cancelling":
            batch.enter("cancelling")
            batch.cancel.set()
        return batch.object()

    def list(self, query: dict[str, str]) -> dict[str, Any]:
        """``GET /batches``: newest first, filtered, a page after ``after``."""
        limit = _limit(query.get("limit"))
        found = [batch for batch in reversed(self.batches.values()) if _matches(batch, query)]
        after = query.get("after")
        if after:
            ids = [batch.id for batch in found]
            found = found[ids.index(after) + 1:] if after in ids else []
        page = found[:limit]
        return {"object": "list", "data": [batch.object() for batch in page],
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
                "has_more": len(found) > limit}

    async def close(self) -> None:
        """Stop every running batch (emulator shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _get(self, batch_id: str) -> Batch:
        batch = self.batches.get(batch_id)
        if batch is None:
            raise FileApiError(404, f"No such batch: {batch_id}", code="not_found", param="batch_id")
        return batch

    # ----- the work ----------------------------------------------------------------------

    async def _run(self, batch: Batch, content: bytes) -> None:
        try:
            await self._work(batch, content)
        except Exception as exc:  # noqa: BLE001 - an emulator bug shows as a failed batch, not a stuck one
            batch.errors = {"object": "list", "data": [_problem("internal_error", f"emulator error: {exc!r}", None, None)]}
            batch.enter("failed")

    async def _work(self, batch: Batch, content: bytes) -> None:
        await self._pause(batch, self.config.batch_validating_s)
        lines, problems = check_file(content, batch.endpoint, self.config)
        if problems:
            if not batch.cancel.is_set():
                batch.errors = {"object": "list", "data": problems[:MAX_REPORTED_ERRORS]}
                batch.enter("failed")
                return
            lines = []
        batch.total = len(lines)
        if not batch.cancel.is_set() and not self._expired(batch):
            batch.enter("in_progress")
        results = Results()
        done = await self._process(batch, lines, results)
        await self._finish(batch, lines, done, results)

    async def _process(self, batch: Batch, lines: list[Line], results: Results) -> int:
        """Run lines in order on schedule until all are done, the batch is cancelled or it expires; how many ran."""
        if batch.status != "in_progress":
            return 0
        line_s = self.config.batch_line_s
        expire_after = self.config.batch_expire_after_lines
        start = time.monotonic()
        for index, line in enumerate(lines):
            if batch.cancel.is_set() or self._expired(batch) or (expire_after is not None and index >= expire_after):
                return index
            due = start + (index + 1) * line_s
            wait = min(due, batch.deadline) - time.monotonic()
            if wait > SCHEDULE_SLACK_S:
                await self._pause(batch, wait)
                if batch.cancel.is_set() or self._expired(batch):
                    return index
            elif index % LINES_PER_YIELD == LINES_PER_YIELD - 1:
                await asyncio.sleep(0)
            self._answer(batch, line, results)
        return len(lines)

    async def _finish(self, batch: Batch, lines: list[Line], done: int, results: Results) -> None:
        """Write what never ran into the error file, store the files, and end in the status that applies."""
        if batch.cancel.is_set():
            await asyncio.sleep(self.config.batch_finalizing_s)  # cancelling while lines in flight finish
            self._never_ran(batch, lines[done:], results, "batch_cancelled", CANCELLED_MESSAGE)
            final = "cancelled"
        elif done < len(lines):
            self._never_ran(batch, lines[done:], results, "batch_expired", EXPIRED_MESSAGE)
            final = "expired"
        else:
            batch.enter("finalizing")
            await asyncio.sleep(self.config.batch_finalizing_s)
            final = "completed"
        self._store(batch, results)
        batch.enter(final)

    def _never_ran(self, batch: Batch, lines: list[Line], results: Results, code: str, message: str) -> None:
        for line in lines:
            results.errors.append(json_bytes({"id": new_request_id(), "custom_id": line.custom_id, "response": None,
                                              "error": self._error(code, message)}))
        batch.failed += len(lines)

    def _store(self, batch: Batch, results: Results) -> None:
        name = batch.id
        if results.output:
            batch.output_file_id = self.files.add(_jsonl(results.output), f"{name}_output.jsonl", RESULT_PURPOSE,
                                                  OUTPUT_PREFIX).id
        if results.errors:
            batch.error_file_id = self.files.add(_jsonl(results.errors), f"{name}_error.jsonl", RESULT_PURPOSE,
                                                 self.config.batch_error_file_prefix).id

    async def _pause(self, batch: Batch, seconds: float) -> None:
        """Sleep ``seconds``, or less: a cancel wakes it, and so does the end of the window."""
        seconds = min(seconds, max(0.0, batch.deadline - time.monotonic()))
        try:
            await asyncio.wait_for(batch.cancel.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def _expired(self, batch: Batch) -> bool:
        return time.monotonic() >= batch.deadline

    # ----- one line ----------------------------------------------------------------------

    def _answer(self, batch: Batch, line: Line, results: Results) -> None:
        """Run one line as the compatible endpoint would, write its output or error line, count it."""
        test = batch.endpoint == TEST_URL
        with Exchange(self.pipeline.ledger, "batch", bills=not test) as exchange:
            exchange.sha = hashlib.sha256(json_bytes(line.body)).hexdigest()
            self.compatible.note(line.body, exchange)
            exchange.stream = False
            try:
                payload = self._test_reply(line.body, exchange) if test else self._reply(line.body, exchange)
            except ApiError as error:
                exchange.status, exchange.code = error.status, error.code
                payload = None
                results.errors.append(self._error_line(line, error, exchange))
                batch.failed += 1
            else:
                exchange.status = 200
                results.output.append(_output_line(line.custom_id, exchange.request_id, payload))
                batch.completed += 1
            exchange.extra = {"batch_id": batch.id, "custom_id": line.custom_id,
                              "billable": exchange.bills and payload is not None}

    def _reply(self, body: dict[str, Any], exchange: Exchange) -> bytes:
        """The body of the online answer to ``body``; ApiError when the endpoint refuses it.

        A batch answer is whole, and the Batch API takes thinking requests (section 7.2), so the
        body is checked as a stream (the stream-only rules do not refuse it) and answered whole.
        """
        chat = self.compatible.validate({**body, "stream": True}, True)
        chat.stream = chat.include_usage = False
        exchange.input_tokens = chat.input_tokens
        self._check_line_error(chat.messages, exchange.sha)
        _, _, _, generation = self.pipeline.admit(chat, exchange, self.compatible.finish_reasons, online=False)
        exchange.output_tokens = generation.output_tokens
        return self.compatible.reply(chat, generation, exchange.request_id, int(time.time()))

    def _check_line_error(self, messages: list[dict[str, Any]], sha: str) -> None:
        if not self.config.directives:
            return
        try:
            script = read_script([m["content"] for m in messages if isinstance(m.get("content"), str)])
        except DirectiveError as exc:
            raise invalid(str(exc)) from None
        if not any(d.action == "batch_line_error" for d in script.directives):
            return
        attempt = self._batch_attempts.get(sha, 0) + 1
        self._batch_attempts[sha] = attempt
        if script.batch_line_error(attempt):
            raise _LINE_ERROR

    def _test_reply(self, body: dict[str, Any], exchange: Exchange) -> bytes:
        """The test model's fixed answer (section 7.2); another model on its url is unknown there."""
        if body.get("model") != TEST_MODEL:
            raise ApiError("ModelNotFound", f"The model '{body.get('model')}' is not served at {TEST_URL}: "
                           f"use {TEST_MODEL}.", 404, compatible_code="model_not_found")
        exchange.model = TEST_MODEL
        exchange.input_tokens = TEST_USAGE["prompt_tokens"]
        exchange.output_tokens = TEST_USAGE["completion_tokens"]
        reply = {"choices": [{"message": {"role": "assistant", "content": TEST_ANSWER}, "finish_reason": "stop",
                              "index": 0, "logprobs": None}],
                 "object": "chat.completion", "usage": dict(TEST_USAGE), "created": int(time.time()),
                 "system_fingerprint": None, "model": TEST_MODEL, "id": f"chatcmpl-{exchange.request_id}"}
        return json_bytes(reply)

    def _error_line(self, line: Line, error: ApiError, exchange: Exchange) -> bytes:
        """A refused line: the online error body as its response, and its ``error`` object."""
        body = self.compatible.error_body(error, exchange.request_id)
        return json_bytes({"id": exchange.request_id, "custom_id": line.custom_id,
                           "response": {"status_code": error.status, "request_id": exchange.request_id, "body": body},
                           "error": self._error(error.compatible_code, error.message)})

    def _error(self, code: str, message: str) -> dict[str, str]:
        if self.config.batch_error_shape == "error_code":
            return {"error_code": code, "error_message": message}
        return {"code": code, "message": message}


# ----- checking an input file ---------------------------------------------------------------


def check_file(content: bytes, endpoint: str, config: EmulatorConfig) -> tuple[list[Line], list[dict[str, Any]]]:
    """The lines of an input file, and every way it breaks the documented limits (section 7.2)."""
    test = endpoint == TEST_URL
    max_lines = TEST_MAX_LINES if test else config.batch_max_lines
    max_bytes = TEST_MAX_FILE_BYTES if test else config.batch_max_file_bytes
    problems: list[dict[str, Any]] = []
    if len(content) > max_bytes:
        problems.append(_problem("file_too_large", f"The input file is {len(content)} bytes; "
                                 f"at most {max_bytes} are accepted.", None, None))
    raw_lines = [(number, raw) for number, raw in enumerate(content.split(b"\n"), 1) if raw.strip()]
    if len(raw_lines) > max_lines:
        problems.append(_problem("too_many_requests", f"The input file has {len(raw_lines)} requests; "
                                 f"at most {max_lines} are accepted.", None, None))
    if not raw_lines:
        problems.append(_problem("empty_file", "The input file has no requests.", None, None))
    checker = _LineChecker(endpoint, config)
    lines = [line for number, raw in raw_lines if (line := checker.check(number, raw)) is not None]
    return lines, problems + checker.problems


class _LineChecker:
    """Checks lines one by one, remembering the file's model, thinking mode and ids."""

    def __init__(self, endpoint: str, config: EmulatorConfig) -> None:
        self.endpoint = endpoint
        self.config = config
        self.problems: list[dict[str, Any]] = []
        self.ids: set[str] = set()
        self.model: str | None = None
        self.thinking: Any = None

    def check(self, number: int, raw: bytes) -> Line | None:
        problem = self._problem(number, raw)
        if isinstance(problem, Line):
            return problem
        self.problems.append(problem)
        return None

    def _problem(self, number: int, raw: bytes) -> Line | dict[str, Any]:
        if len(raw) > self.config.batch_max_line_bytes:
            return _problem("line_too_large", f"The request is {len(raw)} bytes; at most "
                            f"{self.config.batch_max_line_bytes} are accepted per line.", None, number)
        try:
            item = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            item = None
        if not isinstance(item, dict):
            return _problem("invalid_json_line", "This line is not a JSON object.", None, number)
        custom_id, url, body = item.get("custom_id"), item.get("url"), item.get("body")
        if not isinstance(custom_id, str) or not custom_id:
            return _problem("missing_required_parameter", "Missing required parameter: 'custom_id'.", "custom_id", number)
        if len(custom_id) > self.config.batch_max_custom_id_chars:
            return _problem("invalid_custom_id", f"The custom_id is longer than "
                            f"{self.config.batch_max_custom_id_chars} characters.", "custom_id", number)
        if item.get("method") != "POST":
            return _problem("invalid_method", "The method must be 'POST'.", "method", number)
        if url != self.endpoint:
            return _problem("url_not_found", f"The provided url '{url}' is not supported by the Batch API.",
                            "url", number)
        if not isinstance(body, dict):
            return _problem("missing_required_parameter", "Missing required parameter: 'body'.", "body", number)
        return self._consistent(number, custom_id, body)

    def _consistent(self, number: int, custom_id: str, body: dict[str, Any]) -> Line | dict[str, Any]:
        """The checks across lines: one model, one thinking mode, unique ids."""
        if custom_id in self.ids:
            return _problem("duplicate_custom_id", f"The custom_id '{custom_id}' for this request is a duplicate of "
                            "another request. The custom_id parameter must be unique for each request in a batch.",
                            "custom_id", number)
        self.ids.add(custom_id)
        model, thinking = body.get("model"), body.get("enable_thinking")
        if self.model is None:
            self.model, self.thinking = model, thinking
        elif model != self.model:
            return _problem("mismatched_model", f"The model '{model}' for this request does not match the rest of the "
                            "batch. Each batch must contain requests for a single model.", "body.model", number)
        elif thinking != self.thinking:
            return _problem("mismatched_enable_thinking", f"enable_thinking {json.dumps(thinking)} for this request "
                            "does not match the rest of the batch. Each batch must use a single thinking mode.",
                            "body.enable_thinking", number)
        return Line(number, custom_id, body)


def _problem(code: str, message: str, param: str | None, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


# ----- small helpers --------------------------------------------------------------------------


def _output_line(custom_id: str, request_id: str, payload: bytes) -> bytes:
    """An output line as captured (research-wave2 E.4), around the reply's own bytes."""
    head = json_bytes({"id": request_id, "custom_id": custom_id})[:-1]
    return (head + b',"response":{"status_code":200,"request_id":' + json_bytes(request_id) + b',"body":'
            + payload + b'},"error":null}')


def _jsonl(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise FileApiError(400, f"Missing required parameter: '{key}'.", param=key)
    return value


def _metadata(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise FileApiError(400, "metadata must be an object of strings.", param="metadata")
    for key, most in (("ds_name", MAX_DS_NAME), ("ds_description", MAX_DS_DESCRIPTION)):
        if len(value.get(key, "")) > most:
            raise FileApiError(400, f"metadata.{key} is longer than {most} characters.", param=f"metadata.{key}")
    return dict(value)


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LISTED
    if not text.isdigit() or not 1 <= int(text) <= MAX_LISTED:
        raise FileApiError(400, f"limit must be a whole number from 1 to {MAX_LISTED}.", param="limit")
    return int(text)


def _matches(batch: Batch, query: dict[str, str]) -> bool:
    """The list filters (section 7.5). ``ds_name`` matches a part of the name (UNCONFIRMED: exact
    or fuzzy), so a client must check the names it gets back."""
    name = query.get("ds_name")
    if name and name not in (batch.metadata or {}).get("ds_name", ""):
        return False
    statuses = query.get("status")
    if statuses and batch.status not in statuses.split(","):
        return False
    file_ids = query.get("input_file_ids")
    if file_ids and batch.input_file_id not in file_ids.split(","):
        return False
    created = time.strftime("%Y%m%d%H%M%S", time.localtime(batch.created_at))
    after, before = query.get("create_after"), query.get("create_before")
    return not ((after and created < after) or (before and created > before))
