"""The Batch API's files and batches calls (OpenAI-compatible, dashscope-protocol.md section 7).

Each kind of call keeps to the service's own rate limit (section 7.8: create, query and
cancel 1,000 a minute, list 100) by spacing calls of that kind; a 429, a 5xx or a dropped
connection is retried with backoff, everything else raises at once through the error tree
(the key scrubbed, as for generation). Downloads stream to a file, so a 500 MB output file
never sits in memory.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson

from ..apikey import key_problem
from ..backends.errors import TRANSPORT_EXCEPTIONS, ErrorTranslator
from ..errors import BackendError, ConfigError, RateLimited, RetryableError, TransportError
from ..version import __version__

SPACING_S = {"create": 60 / 1000, "query": 60 / 1000, "list": 60 / 100, "cancel": 60 / 1000, "files": 0.0}
"""Seconds between two calls of a kind: the Batch API's documented limits (section 7.8)."""
MAX_TRIES = 8
BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
_DOWNLOAD_CHUNK = 1 << 20


class BatchApi:
    """Calls ``{base_url}/files`` and ``{base_url}/batches`` with the job's key.

    ``transport``: an ``httpx`` transport to send through (a test's ``MockTransport``);
    ``sleep``: what waits between tries (a test's instant one).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (problem := key_problem(api_key)) is not None:
            raise ConfigError(f"the API key {problem}")
        self.base_url = base_url.rstrip("/")
        self._errors = ErrorTranslator(api_key, self.base_url)
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            transport=transport,
            timeout=httpx.Timeout(timeout_s),
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": f"qwen-batch/{__version__}"},
        )
        self._sleep = sleep
        self._clock = clock
        self._next_call: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"BatchApi(base_url={self.base_url!r})"

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- files -------------------------------------------------------------------------

    async def upload(self, path: Path) -> dict[str, Any]:
        """``POST /files`` (purpose batch): the file object."""

        async def send() -> httpx.Response:
            with path.open("rb") as handle:
                files = {"file": (path.name, handle, "application/jsonl")}
                return await self._client.post("/files", files=files, data={"purpose": "batch"})

        return await self._json("files", send)

    async def file(self, file_id: str) -> dict[str, Any] | None:
        """``GET /files/{id}``, or None when the service no longer has it."""
        found = await self._json("files", lambda: self._client.get(f"/files/{file_id}"), missing_ok=True)
        return found or None

    async def download(self, file_id: str, target: Path) -> None:
        """``GET /files/{id}/content`` into ``target`` (replaced whole: a kill leaves no half file there)."""
        partial = target.with_name(target.name + ".part")

        async def send() -> httpx.Response:
            async with self._client.stream("GET", f"/files/{file_id}/content") as response:
                if response.status_code == 200:
                    with partial.open("wb") as out:
                        async for chunk in response.aiter_bytes(_DOWNLOAD_CHUNK):
                            out.write(chunk)
                else:
                    await response.aread()
                return response

        await self._call("files", send)
        partial.replace(target)

    # -- batches -----------------------------------------------------------------------

    async def create(
        self, file_id: str, window: str, ds_name: str, description: str, endpoint: str = "/v1/chat/completions"
    ) -> dict[str, Any]:
        """``POST /batches``: the batch object (``endpoint``: the lines' url, the test model's for a dry run)."""
        body = {
            "input_file_id": file_id,
            "endpoint": endpoint,
            "completion_window": window,
            "metadata": {"ds_name": ds_name, "ds_description": description[:200]},
        }
        return await self._json("create", lambda: self._client.post("/batches", json=body))

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return await self._json("query", lambda: self._client.get(f"/batches/{batch_id}"))

    async def find(self, ds_name: str) -> dict[str, Any] | None:
        """The account's batch named ``ds_name`` (the newest, if several), or None; every page is read."""
        named: list[dict[str, Any]] = []
        params: dict[str, Any] = {"ds_name": ds_name, "limit": 100}
        while True:
            page = await self._json("list", lambda: self._client.get("/batches", params=params))
            batches = page.get("data") or []
            named += [batch for batch in batches if (batch.get("metadata") or {}).get("ds_name") == ds_name]
            if not page.get("has_more") or not batches:
                break
            params = {**params, "after": batches[-1]["id"]}
        return max(named, key=lambda batch: batch.get("created_at") or 0, default=None)

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._json("cancel", lambda: self._client.post(f"/batches/{batch_id}/cancel"))

    # -- sending -----------------------------------------------------------------------

    async def _json(
        self, kind: str, send: Callable[[], Awaitable[httpx.Response]], *, missing_ok: bool = False
    ) -> dict[str, Any]:
        """The JSON object of the answer; ``{}`` for a 404 when ``missing_ok``."""
        response = await self._call(kind, send, missing_ok=missing_ok)
        if response is None:
            return {}
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise self._errors.unreadable_body(response.content, response.headers) from None
        if not isinstance(data, dict):
            raise TransportError("MalformedReply", f"the Batch API answered {self._errors.quote(response.content)!r}, not an object")
        return data

    async def _call(
        self, kind: str, send: Callable[[], Awaitable[httpx.Response]], *, missing_ok: bool = False
    ) -> httpx.Response | None:
        """Send (paced), retrying what may pass; the 200 response, None for a 404 when ``missing_ok``."""
        for attempt in range(1, MAX_TRIES + 1):
            await self._pace(kind)
            try:
                response = await send()
            except TRANSPORT_EXCEPTIONS as exc:
                error: BackendError = self._errors.transport_error(exc)
            else:
                if response.status_code == 200:
                    return response
                if response.status_code == 404 and missing_ok:
                    return None
                error = self._errors.status_error(
                    response.status_code, response.content, response.headers, sent_parameters=()
                )
            if not isinstance(error, RetryableError) or attempt == MAX_TRIES:
                error.attempts = attempt
                raise error
            wait = min(BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S)
            if isinstance(error, RateLimited) and error.retry_after is not None:
                wait = max(wait, error.retry_after)
            await self._sleep(wait)
        raise AssertionError("unreachable")

    async def _pace(self, kind: str) -> None:
        now = self._clock()
        at = max(self._next_call.get(kind, now), now)
        self._next_call[kind] = at + SPACING_S[kind]
        if at > now:
            await self._sleep(at - now)
