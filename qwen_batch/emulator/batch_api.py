"""The HTTP routes of the Batch API under the compatible base (reference section 7).

- ``POST {base}/files`` (multipart ``file``, ``purpose=batch``), ``GET {base}/files/{id}``,
  ``GET {base}/files/{id}/content``, ``DELETE {base}/files/{id}``: ledger endpoint ``files``
- ``POST {base}/batches``, ``GET {base}/batches/{id}``, ``GET {base}/batches``,
  ``POST {base}/batches/{id}/cancel``: ledger endpoint ``batches``

Every call needs the same bearer key as online, is one ledger line (never billed) with its
``action`` and ids, and, with ``batch_rate_limits``, counts against the Batch API's own
per-minute limits (section 7.8), answered 429 past them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..wire import REQUEST_ID_HEADER
from .batches import BatchService
from .compatible import CompatibleDialect
from .config import EmulatorConfig
from .files import FileApiError, FileStore, read_upload
from .limits import WindowLimiter
from .pipeline import JSON_CONTENT_TYPE, Exchange, Pipeline, json_bytes
from .validate import ApiError

# Calls per minute the Batch API takes (section 7.8); upload shares the create limit (UNCONFIRMED).
BATCH_CALL_LIMITS = {"create": 1000, "retrieve": 1000, "list": 100, "cancel": 1000}
_LIMIT_OF = {"upload": "create", "create": "create", "retrieve": "retrieve", "file": "retrieve",
             "content": "retrieve", "delete": "retrieve", "list": "list", "cancel": "cancel"}

Action = Callable[[web.Request, Exchange], Awaitable[web.Response]]


class BatchApi:
    """The files and batches routes, over one file store and one batch service."""

    def __init__(self, config: EmulatorConfig, pipeline: Pipeline, compatible: CompatibleDialect) -> None:
        self.config = config
        self.pipeline = pipeline
        self.compatible = compatible
        self.files = FileStore()
        self.batches = BatchService(config, pipeline, compatible, self.files)
        window = config.rate_window_s
        self._limiters = {name: WindowLimiter(calls, None, window) for name, calls in BATCH_CALL_LIMITS.items()}

    def add_routes(self, app: web.Application, base: str) -> None:
        router = app.router
        router.add_post(base + "/files", self._route("files", "upload", self.upload))
        router.add_get(base + "/files/{file_id}", self._route("files", "file", self.file))
        router.add_get(base + "/files/{file_id}/content", self._route("files", "content", self.content))
        router.add_delete(base + "/files/{file_id}", self._route("files", "delete", self.delete))
        router.add_post(base + "/batches", self._route("batches", "create", self.create))
        router.add_get(base + "/batches", self._route("batches", "list", self.list))
        router.add_get(base + "/batches/{batch_id}", self._route("batches", "retrieve", self.retrieve))
        router.add_post(base + "/batches/{batch_id}/cancel", self._route("batches", "cancel", self.cancel))

    async def close(self) -> None:
        await self.batches.close()

    def _route(self, endpoint: str, action: str, answer: Action) -> Callable[[web.Request], Awaitable[web.Response]]:
        """A handler: key, rate limit, the action, and one ledger line whatever happens."""

        async def handle(request: web.Request) -> web.Response:
            with Exchange(self.pipeline.ledger, endpoint, bills=False) as exchange:
                exchange.extra = {"action": action, **request.match_info}
                if not self.pipeline.authorized(request):
                    exchange.status, exchange.code = 401, "InvalidApiKey"
                    return self.compatible.unauthorized(exchange.request_id)
                group = _LIMIT_OF[action]
                if self.config.batch_rate_limits and self._limiters[group].admit(group, 0):
                    return self._refusal(ApiError("Throttling.RateQuota"), exchange)
                try:
                    response = await answer(request, exchange)
                except FileApiError as error:
                    return self._api_error(error, exchange)
                exchange.status = response.status
                response.headers[REQUEST_ID_HEADER] = exchange.request_id
                return response

        return handle

    # ----- files -------------------------------------------------------------------------

    async def upload(self, request: web.Request, exchange: Exchange) -> web.Response:
        content, filename, purpose = await read_upload(request)
        exchange.sha = hashlib.sha256(content).hexdigest()
        stored = self.files.add(content, filename, purpose)
        exchange.extra = {**(exchange.extra or {}), "file_id": stored.id}
        return _json(stored.object())

    async def file(self, request: web.Request, exchange: Exchange) -> web.Response:
        return _json(self.files.get(request.match_info["file_id"]).object())

    async def content(self, request: web.Request, exchange: Exchange) -> web.Response:
        return web.Response(body=self.files.content(request.match_info["file_id"]),
                            content_type="application/octet-stream")

    async def delete(self, request: web.Request, exchange: Exchange) -> web.Response:
        return _json(self.files.delete(request.match_info["file_id"]))

    # ----- batches -----------------------------------------------------------------------

    async def create(self, request: web.Request, exchange: Exchange) -> web.Response:
        raw = await request.read()
        exchange.sha = hashlib.sha256(raw).hexdigest()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise FileApiError(400, "The request body is not valid JSON.") from None
        created = self.batches.create(body)
        exchange.extra = {**(exchange.extra or {}), "batch_id": created["id"]}
        return _json(created)

    async def retrieve(self, request: web.Request, exchange: Exchange) -> web.Response:
        return _json(self.batches.retrieve(request.match_info["batch_id"]))

    async def list(self, request: web.Request, exchange: Exchange) -> web.Response:
        return _json(self.batches.list(dict(request.query)))

    async def cancel(self, request: web.Request, exchange: Exchange) -> web.Response:
        return _json(self.batches.cancel(request.match_info["batch_id"]))

    # ----- refusals ----------------------------------------------------------------------

    def _api_error(self, error: FileApiError, exchange: Exchange) -> web.Response:
        exchange.status, exchange.code = error.status, error.code or "invalid_request_error"
        body = {"error": {"message": error.message, "type": "invalid_request_error", "param": error.param,
                          "code": error.code or "invalid_request_error"}, "request_id": exchange.request_id}
        return web.Response(body=json_bytes(body), status=error.status, content_type=JSON_CONTENT_TYPE,
                            headers={REQUEST_ID_HEADER: exchange.request_id})

    def _refusal(self, error: ApiError, exchange: Exchange) -> web.Response:
        exchange.status, exchange.code = error.status, error.code
        return self.compatible.error_response(error, exchange, self.pipeline.retry_after(error.status))


def _json(payload: Any) -> web.Response:
    return web.Response(body=json_bytes(payload), content_type=JSON_CONTENT_TYPE)
