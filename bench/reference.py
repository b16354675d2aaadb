"""The loops qwen-batch is compared with; each sends every row of an input once and nothing else.

    python bench/reference.py httpx     BASE_URL INPUT.parquet --concurrency 64
    python bench/reference.py transport BASE_URL INPUT.parquet --concurrency 64
    python bench/reference.py stream    BASE_URL INPUT.parquet --concurrency 64
    python bench/reference.py aiohttp   BASE_URL INPUT.parquet --concurrency 64
    python bench/reference.py sdk       BASE_URL INPUT.parquet --concurrency 64
    python bench/reference.py openai    COMPATIBLE_BASE_URL INPUT.parquet --concurrency 64

``httpx``: the minimal asyncio loop -- N tasks pulling from one iterator, an
``httpx.AsyncClient`` on the ``httpx-aiohttp`` transport, a JSON body built per row, the
reply's JSON decoded, its text kept. No rate limit, retry, checkpoint or output.

``transport``: the same loop handing each ``httpx.Request`` straight to the transport, with
no ``AsyncClient`` (no cookie jar, auth or redirect steps) -- how qwen-batch sends.

``aiohttp``: the same loop on a bare ``aiohttp.ClientSession``, with no httpx at all.

``stream``: the ``transport`` loop streamed, as a careful hand-written client would: the SSE
headers and ``incremental_output: true``, the body read line by line as it arrives
(``aiter_lines``), each ``data:`` line's JSON decoded and its text delta kept, the reply done
at the event whose ``finish_reason`` is not ``"null"``.

``openai``: the ``transport`` loop on chat completions (``{base}/chat/completions``, the
compatible-mode body), its reply's ``choices[0].message.content`` kept.

``sdk``: the official ``dashscope`` SDK driven the usual way: ``AioGeneration.call`` per row
under an ``asyncio.Semaphore``, all rows gathered at once.

Both send the same bodies as ``qwen-batch run`` on a bench job (model, one user message,
``max_tokens``, ``seed``, ``result_format``); the harness times them from the emulator's ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

MODEL = "qwen-turbo"
MAX_TOKENS = 64
SEED = 1
RESULT_FORMAT = "text"
NATIVE_PATH = "/services/aigc/text-generation/generation"
KEY = "sk-emulator"


def _texts(path: str) -> list[str]:
    import polars as pl

    return pl.read_parquet(path, columns=["text"])["text"].to_list()


async def httpx_loop(base_url: str, texts: list[str], concurrency: int) -> int:
    import httpx
    from httpx_aiohttp import AiohttpTransport

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = base_url + NATIVE_PATH
    replies: list[str] = []
    failures = 0
    pending = iter(texts)
    async with httpx.AsyncClient(
        transport=AiohttpTransport(limits=limits), headers=headers, timeout=httpx.Timeout(60, pool=None), limits=limits
    ) as client:

        async def worker() -> None:
            nonlocal failures
            for text in pending:
                response = await client.post(url, content=_body(text))
                if response.status_code == 200:
                    replies.append(json.loads(response.content)["output"]["text"])
                else:
                    failures += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


async def transport_loop(base_url: str, texts: list[str], concurrency: int) -> int:
    return await _bare_transport_loop(base_url + NATIVE_PATH, _body, lambda reply: reply["output"]["text"], texts, concurrency)


async def openai_loop(base_url: str, texts: list[str], concurrency: int) -> int:
    return await _bare_transport_loop(
        base_url + "/chat/completions", _chat_body, lambda reply: reply["choices"][0]["message"]["content"], texts, concurrency
    )


async def _bare_transport_loop(
    url_text: str, body_of: Callable[[str], bytes], text_of: Callable[[Any], str], texts: list[str], concurrency: int
) -> int:
    """N tasks handing each ``httpx.Request`` straight to the httpx-aiohttp transport."""
    import httpx
    from httpx_aiohttp import AiohttpTransport

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = [("Authorization", f"Bearer {KEY}"), ("Content-Type", "application/json")]
    timeout = {"connect": 60, "read": 60, "write": 60, "pool": None}
    url = httpx.URL(url_text)
    replies: list[str] = []
    failures = 0
    pending = iter(texts)
    transport = AiohttpTransport(limits=limits)

    async def worker() -> None:
        nonlocal failures
        for text in pending:
            request = httpx.Request("POST", url, headers=headers, content=body_of(text), extensions={"timeout": timeout})
            response = await transport.handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
            if response.status_code == 200:
                replies.append(text_of(json.loads(response.content)))
            else:
                failures += 1

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await transport.aclose()
    return failures


async def stream_loop(base_url: str, texts: list[str], concurrency: int) -> int:
    import httpx
    from httpx_aiohttp import AiohttpTransport

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = [
        ("Authorization", f"Bearer {KEY}"),
        ("Content-Type", "application/json"),
        ("Accept", "text/event-stream"),
        ("X-DashScope-SSE", "enable"),
    ]
    timeout = {"connect": 60, "read": 60, "write": 60, "pool": None}
    url = httpx.URL(base_url + NATIVE_PATH)
    replies: list[str] = []
    failures = 0
    pending = iter(texts)
    transport = AiohttpTransport(limits=limits)

    async def one(text: str) -> str | None:
        body = _body(text, incremental_output=True)
        request = httpx.Request("POST", url, headers=headers, content=body, extensions={"timeout": timeout})
        response = await transport.handle_async_request(request)
        pieces: list[str] = []
        try:
            if response.status_code != 200:
                return None
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                output = json.loads(line[5:])["output"]
                pieces.append(output["text"])
                if output["finish_reason"] != "null":
                    return "".join(pieces)
        finally:
            await response.aclose()
        return None

    async def worker() -> None:
        nonlocal failures
        for text in pending:
            reply = await one(text)
            if reply is None:
                failures += 1
            else:
                replies.append(reply)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await transport.aclose()
    return failures


async def aiohttp_loop(base_url: str, texts: list[str], concurrency: int) -> int:
    import aiohttp

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = base_url + NATIVE_PATH
    replies: list[str] = []
    failures = 0
    pending = iter(texts)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            nonlocal failures
            for text in pending:
                async with session.post(url, data=_body(text)) as response:
                    content = await response.read()
                if response.status == 200:
                    replies.append(json.loads(content)["output"]["text"])
                else:
                    failures += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


def _body(text: str, *, incremental_output: bool = False) -> bytes:
    parameters: dict[str, object] = {"seed": SEED, "max_tokens": MAX_TOKENS, "result_format": RESULT_FORMAT}
    if incremental_output:
        parameters["incremental_output"] = True
    body = {"model": MODEL, "input": {"messages": [{"role": "user", "content": text}]}, "parameters": parameters}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _chat_body(text: str) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS, "seed": SEED}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


async def sdk_loop(base_url: str, texts: list[str], concurrency: int) -> int:
    import dashscope
    from dashscope import AioGeneration

    dashscope.base_http_api_url = base_url
    dashscope.api_key = KEY
    semaphore = asyncio.Semaphore(concurrency)

    async def one(text: str) -> str | None:
        async with semaphore:
            response = await AioGeneration.call(
                model=MODEL,
                messages=[{"role": "user", "content": text}],
                max_tokens=MAX_TOKENS,
                seed=SEED,
                result_format=RESULT_FORMAT,
            )
        return response.output.text if response.status_code == 200 else None

    results = await asyncio.gather(*(one(text) for text in texts))
    return sum(1 for r in results if r is None)


LOOPS = {
    "httpx": httpx_loop,
    "transport": transport_loop,
    "stream": stream_loop,
    "aiohttp": aiohttp_loop,
    "openai": openai_loop,
    "sdk": sdk_loop,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("loop", choices=tuple(LOOPS))
    parser.add_argument("base_url", help="native base URL, e.g. http://127.0.0.1:PORT/api/v1")
    parser.add_argument("input", help="Parquet input with a 'text' column")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    texts = _texts(args.input)
    failures = asyncio.run(LOOPS[args.loop](args.base_url.rstrip("/"), texts, args.concurrency))
    if failures:
        print(f"{failures} requests failed", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
