"""The emulator's HTTP application: its routes, and ``open_emulator`` to serve it.

Routes (reference section 10):

- ``POST /api/v1/services/aigc/text-generation/generation``  native; SSE with ``X-DashScope-SSE: enable``
- ``POST /api/v1/services/aigc/multimodal-generation/generation``  native, for the models bound to it
  (Qwen3.5 and later, QVQ); each path answers the other's models 400 "url error"
- ``POST /api/v1/tokenizer``                                   token ids of the content
- ``POST /compatible-mode/v1/chat/completions``                OpenAI-compatible, stream or not
- ``GET  /compatible-mode/v1/models``                          the catalog's names (with the key)
- ``/compatible-mode/v1/files``, ``/compatible-mode/v1/batches``  the Batch API (``batch_api.py``)
- with a local ``server`` (vllm, sglang, ollama, llamacpp): only ``POST /v1/chat/completions`` and
  ``GET /v1/models`` in that server's dialect (plus the emulator's own stats and ledger)
- ``GET  /emulator/stats``, ``GET /emulator/ledger``            statistics and the billing ledger
- any other path or method: 404 ``404: Not Found`` (the service's body is not documented), recorded
  in the ledger as endpoint ``not-found``, so a wrong base URL shows in what was sent

Both generation endpoints run the one request pipeline (``pipeline.py``) with their
dialect (``native.py``, ``compatible.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..wire import API_PREFIX, NATIVE_PATH
from .batch_api import BatchApi
from .compatible import CompatibleDialect
from .config import EmulatorConfig
from .generate import generate
from .native import MultimodalDialect, NativeDialect, tokenize
from .pipeline import JSON_CONTENT_TYPE, Exchange, Pipeline, json_bytes

NATIVE_ROUTE = API_PREFIX + NATIVE_PATH
MULTIMODAL_ROUTE = API_PREFIX + "/services/aigc/multimodal-generation/generation"
TOKENIZER_ROUTE = API_PREFIX + "/tokenizer"
STATS_ROUTE = "/emulator/stats"
LEDGER_ROUTE = "/emulator/ledger"
# Hung handlers get this long to finish at shutdown before they are cancelled.
SHUTDOWN_GRACE_S = 0.5


class Emulator:
    """One emulator: its request pipeline (state and steps), its two dialects, and their routes."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self.pipeline = Pipeline(self.config)
        self.catalog = self.pipeline.catalog
        self.ledger = self.pipeline.ledger
        # Every generation body that parsed as JSON, in arrival order (for tests).
        self.received = self.pipeline.received
        self.native = NativeDialect(self.config, self.catalog)
        self.multimodal = MultimodalDialect(self.config, self.catalog)
        self.compatible = CompatibleDialect(self.config, self.catalog)
        self.batch_api = BatchApi(self.config, self.pipeline, self.compatible)

    def warm_up(self) -> None:
        """Load the vocabulary and word pools now, so the first request is not the slow one."""
        generate("qwen-turbo", [{"role": "user", "content": "warm up"}], {}, max_tokens=16)
        generate("qwen-turbo", [{"role": "user", "content": "预热一下"}], {}, max_tokens=16)
        generate("qwen-turbo", [{"role": "user", "content": "ウォームアップ"}], {}, max_tokens=16)

    def application(self) -> web.Application:
        # Above the service's own limit, so that the service's 413 comes from our check.
        app = web.Application(client_max_size=self.config.max_body_bytes * 4)
        base = self.compatible.server.base_path
        if not self.compatible.server.local:
            app.router.add_post(NATIVE_ROUTE, self.pipeline.handler(self.native))
            app.router.add_get(NATIVE_ROUTE, self.native.wrong_method)
            app.router.add_post(MULTIMODAL_ROUTE, self.pipeline.handler(self.multimodal))
            app.router.add_get(MULTIMODAL_ROUTE, self.multimodal.wrong_method)
            app.router.add_post(TOKENIZER_ROUTE, self.tokenizer)
            self.batch_api.add_routes(app, base)
        app.router.add_post(base + "/chat/completions", self.pipeline.handler(self.compatible))
        app.router.add_get(base + "/models", self.models)
        app.router.add_get(STATS_ROUTE, self.stats)
        app.router.add_get(LEDGER_ROUTE, self.ledger_lines)
        # Last: routes are matched in order, so this takes only the requests no route above takes.
        app.router.add_route("*", "/{path:.*}", self.not_found)
        return app

    async def tokenizer(self, request: web.Request) -> web.Response:
        return await tokenize(self.pipeline, self.native, request)

    async def models(self, request: web.Request) -> web.Response:
        """The model listing; DashScope asks for the key (UNCONFIRMED: every other route does), a local server does not."""
        with Exchange(self.ledger, "models", bills=False) as exchange:
            exchange.sha = hashlib.sha256(await request.read()).hexdigest()
            if not self.pipeline.authorized(request):
                exchange.status, exchange.code = 401, "InvalidApiKey"
                return self.compatible.unauthorized(exchange.request_id)
            exchange.status = 200
            return self.compatible.models(int(time.time()))

    async def stats(self, request: web.Request) -> web.Response:
        return web.Response(body=json_bytes(self.ledger.statistics()), content_type=JSON_CONTENT_TYPE)

    async def ledger_lines(self, request: web.Request) -> web.Response:
        return web.Response(text=self.ledger.jsonl(), content_type="application/x-ndjson")

    async def not_found(self, request: web.Request) -> web.Response:
        """A path (or method) the service does not have: aiohttp's plain 404, with a ledger line."""
        with Exchange(self.ledger, "not-found") as exchange:
            exchange.sha = hashlib.sha256(await request.read()).hexdigest()
            exchange.status = 404
            return web.Response(status=404, text="404: Not Found")


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
        """The OpenAI-compatible base: ``http://127.0.0.1:PORT/compatible-mode/v1``, or ``.../v1`` for a local server."""
        return self.root_url + self.emulator.compatible.server.base_path

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
        await emulator.batch_api.close()
        emulator.ledger.close()
