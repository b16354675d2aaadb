"""The loops qwen-batch is compared with; each sends every row of an input once and nothing else.

    python bench/reference.py httpx  BASE_URL INPUT.parquet --concurrency 64
    python bench/reference.py sdk    BASE_URL INPUT.parquet --concurrency 64

``httpx``: the minimal asyncio loop -- N tasks pulling from one iterator, httpx on the
``httpx-aiohttp`` transport (the fastest Python client measured here), a JSON body built per
row, the reply's JSON decoded, its text kept. No rate limit, retry, checkpoint or output.

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
                body = {
                    "model": MODEL,
                    "input": {"messages": [{"role": "user", "content": text}]},
                    "parameters": {"seed": SEED, "max_tokens": MAX_TOKENS, "result_format": RESULT_FORMAT},
                }
                response = await client.post(url, content=json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode())
                if response.status_code == 200:
                    replies.append(json.loads(response.content)["output"]["text"])
                else:
                    failures += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("loop", choices=("httpx", "sdk"))
    parser.add_argument("base_url", help="native base URL, e.g. http://127.0.0.1:PORT/api/v1")
    parser.add_argument("input", help="Parquet input with a 'text' column")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    texts = _texts(args.input)
    loop = httpx_loop if args.loop == "httpx" else sdk_loop
    failures = asyncio.run(loop(args.base_url.rstrip("/"), texts, args.concurrency))
    if failures:
        print(f"{failures} requests failed", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
