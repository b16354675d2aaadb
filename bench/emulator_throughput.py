"""How many small non-streamed requests per second one emulator process serves.

Starts ``python -m qwen_batch.emulator --port 0`` as a separate process, drives it with
httpx on the aiohttp transport at a fixed concurrency, and reports the median of several
runs. Writes bench/results/emulator.json.

    python bench/emulator_throughput.py [--requests 20000] [--concurrency 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from httpx_aiohttp import AiohttpTransport

ROOT = Path(__file__).resolve().parent.parent
RESULT_PATH = ROOT / "bench" / "results" / "emulator.json"
PATH = "/api/v1/services/aigc/text-generation/generation"
KEY = "sk-emulator"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _start_emulator() -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(
        [sys.executable, "-m", "qwen_batch.emulator", "--port", "0"],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"(http://\S+)", line)
    if not match:
        process.kill()
        raise SystemExit(f"emulator did not report its URL: {line!r}")
    return process, match.group(1)


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux), to tell server cost from client cost."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _run_once(url: str, total: int, concurrency: int, offset: int, pid: int) -> tuple[float, float | None]:
    """(requests per second, server CPU seconds per request) of one run."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    # Bodies are built before the clock starts: the client's own work is not what is measured.
    bodies = [
        json.dumps({"model": "qwen-turbo",
                    "input": {"messages": [{"role": "user", "content": f"Say something short about row {offset + i}."}]},
                    "parameters": {"max_tokens": 64}}).encode()
        for i in range(total)
    ]
    async with httpx.AsyncClient(transport=AiohttpTransport(), base_url=url, headers=headers, timeout=30) as client:
        pending = iter(bodies)
        failures = 0

        async def worker() -> None:
            nonlocal failures
            for body in pending:
                response = await client.post(PATH, content=body)
                if response.status_code != 200:
                    failures += 1

        cpu_before = _cpu_seconds(pid)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu_after = _cpu_seconds(pid)
    if failures:
        raise SystemExit(f"{failures} requests failed")
    cpu = None if cpu_before is None or cpu_after is None else (cpu_after - cpu_before) / total
    return total / elapsed, cpu


async def _main(args: argparse.Namespace) -> dict[str, object]:
    process, url = _start_emulator()
    try:
        await _run_once(url, min(2000, args.requests), args.concurrency, 10**9, process.pid)  # warm-up
        rates: list[float] = []
        capacities: list[float] = []
        for run in range(args.runs):
            rate, cpu = await _run_once(url, args.requests, args.concurrency, run * args.requests, process.pid)
            note = f"; server CPU {cpu * 1e6:,.0f} us/request = {1 / cpu:,.0f} req/s per core" if cpu else ""
            print(f"run {run + 1}: {rate:,.0f} req/s{note}", flush=True)
            rates.append(rate)
            if cpu:
                capacities.append(1 / cpu)
    finally:
        process.terminate()
        process.wait(10)
    return {
        "benchmark": "emulator_throughput",
        "requests_per_second_median": round(statistics.median(rates), 1),
        "runs": [round(r, 1) for r in rates],
        # Requests per second of server CPU: what one emulator core sustains when the
        # client is not the bottleneck (on 2 cores the httpx client usually is).
        "server_capacity_per_core_median": round(statistics.median(capacities), 1) if capacities else None,
        "requests_per_run": args.requests,
        "concurrency": args.concurrency,
        "request": "native, non-streamed, one short user message, max_tokens 64",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"nproc": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000, help="requests per run (default 20000)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    parser.add_argument("--runs", type=int, default=3, help="runs; the median is reported (default 3)")
    args = parser.parse_args()
    result = asyncio.run(_main(args))
    RESULT_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULT_PATH.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    capacity = result["server_capacity_per_core_median"]
    print(f"median: {result['requests_per_second_median']:,.0f} req/s"
          + (f"; server capacity {capacity:,.0f} req/s per core" if capacity else "")
          + f"  ({RESULT_PATH.relative_to(ROOT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
