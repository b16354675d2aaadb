"""What every benchmark case shares: the emulator process, generated jobs, child runs, ledgers.

Nothing here measures by itself; the cases in ``bench/cases.py`` combine these pieces. Every
contender (``qwen-batch run`` and the reference loops in ``bench/reference.py``) runs as its own
process against one emulator process, so each has its own CPU and the emulator's is separate.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
API_KEY = "sk-emulator"
MODEL = "qwen-turbo"
MAX_TOKENS = 64
SEED = 1
# High RPM and TPM, so the catalog's default limits for the model (1,200 RPM, 5M TPM for
# qwen-turbo) do not pace a case that does not test them.
UNLIMITED_RPM = 100_000_000
UNLIMITED_TPM = 100_000_000_000
PYTHON = sys.executable


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "system": platform.platform()}


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(extra)
    return env


# -- the emulator ---------------------------------------------------------------------------


@dataclass
class Emulator:
    process: subprocess.Popen[str]
    root: str

    @property
    def base_url(self) -> str:
        """The native base URL (what ``DASHSCOPE_HTTP_BASE_URL`` and the SDK take)."""
        return self.root + "/api/v1"

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.root + path, timeout=120) as response:
            return response.read()

    def stats(self) -> dict[str, Any]:
        return json.loads(self._get("/emulator/stats"))

    def ledger(self, since: int = 0) -> list[dict[str, Any]]:
        """Ledger lines from the ``since``-th on (the endpoint has no offset: sliced here)."""
        lines = self._get("/emulator/ledger").splitlines()
        return [json.loads(line) for line in lines[since:]]

    def ledger_length(self) -> int:
        return int(self.stats()["requests"])


@contextmanager
def emulator(*args: str) -> Iterator[Emulator]:
    """``python -m qwen_batch.emulator --port 0 ARGS`` as a separate process, stopped on exit."""
    process = subprocess.Popen(
        [PYTHON, "-m", "qwen_batch.emulator", "--port", "0", *args],
        stdout=subprocess.PIPE, text=True, env=_env(),
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"(http://\S+)", line)
    if not match:
        process.kill()
        raise SystemExit(f"emulator did not report its URL: {line!r}")
    try:
        yield Emulator(process, match.group(1).rstrip("/"))
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def served(entries: Sequence[dict[str, Any]]) -> list[float]:
    """Ledger times of the generation requests answered 200, in order."""
    return sorted(e["time"] for e in entries if e["status"] == 200 and e["endpoint"] != "tokenizer")


def rate(times: Sequence[float]) -> float:
    """Requests per second between the first and the last 200 (the run's steady part)."""
    if len(times) < 2 or times[-1] <= times[0]:
        return 0.0
    return (len(times) - 1) / (times[-1] - times[0])


# -- jobs ----------------------------------------------------------------------------------


def prompt_text(i: int) -> str:
    return f"Say something short about row {i}."


@contextmanager
def workdir(prefix: str = "qwen-batch-bench-") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_input(folder: Path, rows: int, name: str | None = None) -> Path:
    """A Parquet input of ``rows`` short prompts with ids ``r0, r1, ...``."""
    import polars as pl

    path = folder / (name or f"input-{rows}.parquet")
    if not path.exists():
        frame = pl.select(pl.int_range(0, rows, dtype=pl.Int64).alias("i")).select(
            pl.format("r{}", pl.col("i")).alias("id"),
            pl.format("Say something short about row {}.", pl.col("i")).alias("text"),
        )
        frame.write_parquet(path)
    return path


def write_job(
    folder: Path,
    input_path: Path,
    *,
    name: str = "bench",
    concurrency: int = 64,
    requests_per_minute: float | None = UNLIMITED_RPM,
    tokens_per_minute: float | None = UNLIMITED_TPM,
    max_retries: int = 0,
    request_timeout_s: float | None = None,
    stream: bool | None = None,
) -> Path:
    """A job spec: template ``{text}``, seed and max_tokens fixed, the cache off; ``stream`` sets
    ``parameters.stream`` (unset: the default, ``auto``)."""
    rpm = f"  requests_per_minute: {requests_per_minute}\n" if requests_per_minute else ""
    rpm += f"  tokens_per_minute: {tokens_per_minute}\n" if tokens_per_minute else ""
    rpm += f"  request_timeout_s: {request_timeout_s}\n" if request_timeout_s else ""
    streamed = f"  stream: {str(stream).lower()}\n" if stream is not None else ""
    spec = (
        f"name: {name}\n"
        f"model: {MODEL}\n"
        f"input:\n  path: {input_path}\n  id_column: id\n"
        'prompt:\n  template: "{text}"\n'
        f"parameters:\n  seed: {SEED}\n  max_tokens: {MAX_TOKENS}\n{streamed}"
        f"execution:\n  concurrency: {concurrency}\n{rpm}  max_retries: {max_retries}\n"
        f"output:\n  path: {folder / 'out' / (name + '.parquet')}\n"
        "cache:\n  enabled: false\n"
    )
    path = folder / f"{name}.yaml"
    path.write_text(spec, encoding="utf-8")
    return path


def run_command(job: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "qwen_batch", "run", str(job), "--quiet", "--no-cache", *extra]


def run_env(emu: Emulator, folder: Path) -> dict[str, str]:
    return _env(
        DASHSCOPE_HTTP_BASE_URL=emu.base_url,
        DASHSCOPE_API_KEY=API_KEY,
        QWEN_BATCH_CACHE_DIR=str(folder / "cache"),
    )


@dataclass(frozen=True)
class ChildRun:
    returncode: int
    wall_s: float
    started_at: float  # time.time() just before the child was started
    max_rss_mb: float | None
    cpu_s: float  # user + system CPU of the child (and of its waited-for children)


def run_child(argv: Sequence[str], env: dict[str, str], *, timeout: float = 3600) -> ChildRun:
    """Run a process to its end; wall time, and peak RSS when measured through ``rss_helper``."""
    started_at = time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    begin = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - begin
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    rss = None
    match = re.search(r"^bench-max-rss-kb (\d+)$", done.stderr, re.MULTILINE)
    if match:
        rss = int(match.group(1)) / 1024
    return ChildRun(done.returncode, wall, started_at, rss, cpu)


def with_peak_rss(argv: Sequence[str]) -> list[str]:
    """``argv`` run under a fresh helper process that reports the child's peak RSS on stderr."""
    return [PYTHON, str(ROOT / "bench" / "rss.py"), *argv]


def first_request_after(emu: Emulator, since: int, started_at: float, child: subprocess.Popen[str],
                        *, timeout: float = 300) -> float:
    """Seconds from ``started_at`` to the first ledger line after ``since`` (polled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if emu.stats()["requests"] > since:
            entries = emu.ledger(since)
            if entries:
                return min(e["time"] for e in entries) - started_at
        if child.poll() is not None:
            raise RuntimeError(f"qwen-batch exited {child.returncode} before sending anything")
        time.sleep(0.02)
    raise RuntimeError("no request within the timeout")


def stop(child: subprocess.Popen[str]) -> None:
    """Interrupt a run twice (finish nothing), then make sure it is gone."""
    if child.poll() is None:
        child.send_signal(signal.SIGINT)
        time.sleep(0.2)
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
