"""The Ray engine's fixed cost, and its throughput against one process at the same global limit.

    python bench/ray_engine.py [--rows 4000] [--per-second 200] [--workers 4] [--concurrency 8]

Fixed cost, in this process: a local Ray started the way ``run --engine ray`` starts it (loopback,
logical CPUs, no dashboard), a limiter actor's first grant, a worker-like actor's first call, the
limiter's grants per second with 16 requests waiting, and the shutdown. Throughput: the same job
(rows, global limit, concurrency per worker) through ``qwen-batch run`` in one process and through
``--engine ray --ray-workers K``, each against its own loopback emulator; wall time from the
command's start to its exit, and the rate the emulator saw (its ledger). Writes bench/results/ray.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness as h  # noqa: E402
from qwen_batch.emulator import EmulatorConfig  # noqa: E402
from qwen_batch.testing import EmulatorThread  # noqa: E402

RESULT_PATH = ROOT / "bench" / "results" / "ray.json"


class Probe:
    """A worker-like async actor: its first call is the fixed cost of a worker; ``grants`` drives a limiter."""

    async def ping(self) -> int:
        return os.getpid()

    async def grants(self, handle: Any, snapshot: Any, count: int, waiting: int) -> float:
        from qwen_batch.engines.ray_limiter import RayEndpoint, RemoteGate

        gate = RemoteGate(RayEndpoint(handle), snapshot)

        async def send(times: int) -> None:
            for _ in range(times):
                await gate.wait_to_send(100)
                gate.settle(100, 50)
                gate.on_success()

        started = time.perf_counter()
        await asyncio.gather(*(send(count // waiting) for _ in range(waiting)))
        return (count // waiting * waiting) / (time.perf_counter() - started)


def fixed_cost(workers: int) -> dict[str, float]:
    from qwen_batch.engines.ray_engine import WORKER_CPUS, start_ray
    from qwen_batch.engines.ray_limiter import SharedLimits

    started = time.perf_counter()
    ray = start_ray(None, workers)
    up = time.perf_counter()
    limiter = ray.remote(SharedLimits).options(num_cpus=0, max_concurrency=1000).remote(None, None, None)
    snapshot = ray.get(limiter.statistics.remote())
    ray.get(limiter.wait_to_send.remote(100))
    granted = time.perf_counter()
    probe = ray.remote(Probe).options(num_cpus=WORKER_CPUS).remote()
    ray.get(probe.ping.remote())
    answered = time.perf_counter()
    rate = ray.get(probe.grants.remote(limiter, snapshot, 4000, 16))
    stopping = time.perf_counter()
    ray.shutdown()
    stopped = time.perf_counter()
    return {
        "ray_start_s": round(up - started, 2),
        "limiter_first_grant_s": round(granted - up, 3),
        "worker_first_call_s": round(answered - granted, 3),
        "limiter_grants_per_s_16_waiting": round(rate, 1),
        "ray_shutdown_s": round(stopped - stopping, 2),
    }


def _job(folder: Path, rows: int, per_second: float, concurrency: int) -> Path:
    from tests.conftest import sentences_job

    folder.mkdir(parents=True)
    texts = [f"row number {i}: 请把这句话翻译成英文" for i in range(rows)]
    execution = {"concurrency": concurrency, "requests_per_minute": per_second * 60}
    return sentences_job(folder, texts, execution=execution)


def timed_run(folder: Path, args: list[str], rows: int, per_second: float, concurrency: int) -> dict[str, float]:
    job = _job(folder, rows, per_second, concurrency)
    with EmulatorThread(EmulatorConfig()) as emu:
        env = {**os.environ, "DASHSCOPE_API_KEY": emu.api_key, "DASHSCOPE_HTTP_BASE_URL": emu.base_url,
               "QWEN_BATCH_CACHE_DIR": str(folder / "cache")}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "qwen_batch", "run", str(job), "--quiet", *args],
                              env=env, capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - started
        times = sorted(entry["time"] for entry in emu.ledger)
    if done.returncode != 0:
        raise SystemExit(f"run {' '.join(args) or '(one process)'} exited {done.returncode}: {done.stderr[-2000:]}")
    span = times[-1] - times[0]
    return {"wall_s": round(wall, 2), "requests": len(times), "sending_s": round(span, 2),
            "sent_per_s": round(len(times) / span, 1), "rows_per_s_wall": round(rows / wall, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--per-second", type=float, default=200.0, help="the job's global limit")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight per process or worker")
    args = parser.parse_args()
    cost = fixed_cost(args.workers)
    print(f"fixed cost: {cost}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        single = timed_run(Path(folder) / "single", [], args.rows, args.per_second, args.concurrency)
        print(f"one process: {single}", flush=True)
        ray = timed_run(Path(folder) / "ray", ["--engine", "ray", "--ray-workers", str(args.workers)],
                        args.rows, args.per_second, args.concurrency)
        print(f"ray, {args.workers} workers: {ray}", flush=True)
    result = {
        "benchmark": "ray_engine",
        "fixed_cost": cost,
        "one_process": single,
        "ray": ray,
        "ray_to_one_process_wall": round(ray["wall_s"] / single["wall_s"], 2),
        "ray_to_one_process_sent_per_s": round(ray["sent_per_s"] / single["sent_per_s"], 2),
        "rows": args.rows, "per_second": args.per_second, "workers": args.workers, "concurrency": args.concurrency,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": h.machine() | {"load_average_at_end": os.getloadavg()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    RESULT_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULT_PATH.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
