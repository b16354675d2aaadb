"""The benchmark cases. Each takes its options and returns one result dict (see ``Result``).

Every case starts its own emulator process and runs ``qwen-batch run`` as a real subprocess
on a generated job in a temporary folder. Rates come from the emulator's ledger (first to
last 200 answer of one run), start-up times from the ledger's first line against the wall
clock at the child's start, peak RSS from ``bench/rss.py``. Contenders are interleaved and
each figure is the median of several runs in the same session.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from . import harness as h

Result = dict[str, Any]


def _reference_command(loop: str, emu: h.Emulator, input_path: Path, concurrency: int) -> list[str]:
    base_url = _compatible_base(emu) if loop == "openai" else emu.base_url
    return [h.PYTHON, str(h.ROOT / "bench" / "reference.py"), loop, base_url, str(input_path),
            "--concurrency", str(concurrency)]


def _compatible_base(emu: h.Emulator) -> str:
    return emu.root + "/compatible-mode/v1"


def _measure(emu: h.Emulator, argv: list[str], env: dict[str, str], expected: int,
             latency_s: float = 0.0) -> dict[str, Any]:
    """Run one contender; its rate is answers over the time from first to last answer.

    The ledger stamps a request when it is answered. With a latency L, the first answers
    come L after the first sends, so the span gets L added back: a perfect pool of C
    workers then measures exactly C / L.
    """
    since = emu.ledger_length()
    child = h.run_child(argv, env)
    entries = emu.ledger(since)
    times = h.served(entries)
    if len(times) != expected:
        raise RuntimeError(f"{argv[1:4]}: {len(times)} requests answered 200, expected {expected}")
    return {
        "rate": h.rate(times) if not latency_s else len(times) / (times[-1] - times[0] + latency_s),
        "wall_s": child.wall_s,
        "cpu_s": child.cpu_s,
        "throttled": sum(1 for e in entries if e["status"] == 429),
        "first_request_s": times[0] - child.started_at,
    }


# -- 1. overhead ---------------------------------------------------------------------------


# The minimal loops of bench/reference.py: contender name -> the loop it runs.
MINIMAL_LOOPS = {"httpx-minimal": "httpx", "httpx-transport": "transport", "aiohttp-minimal": "aiohttp"}


def overhead(rows: int = 20_000, concurrency: int = 64, runs: int = 3, sdk: bool = True) -> Result:
    """Rows per second against a zero-latency emulator, next to the minimal loops and the SDK.

    The goal is judged against the fastest minimal loop of the session, whichever it is.
    """
    contenders = ["qwen-batch", *MINIMAL_LOOPS] + (["dashscope-sdk"] if sdk else [])
    figures: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    with h.workdir() as folder, h.emulator() as emu:
        input_path = h.make_input(folder, rows)
        env = h.run_env(emu, folder)
        # Warm-up: the emulator's first requests and the page cache of every import.
        h.run_child(_reference_command("httpx", emu, h.make_input(folder, 2000), concurrency), env)
        for run in range(runs):
            for name in contenders:
                if name == "qwen-batch":
                    job = h.write_job(folder, input_path, name=f"overhead-{run}", concurrency=concurrency)
                    argv = h.run_command(job)
                else:
                    argv = _reference_command(MINIMAL_LOOPS.get(name, "sdk"), emu, input_path, concurrency)
                figure = _measure(emu, argv, env, rows)
                figures[name].append(figure)
                print(f"  overhead run {run + 1}: {name:15} {figure['rate']:8,.0f} rows/s "
                      f"(process {figure['wall_s']:.1f} s, CPU {figure['cpu_s']:.1f} s)", flush=True)
    medians = {name: h.median([f["rate"] for f in figs]) for name, figs in figures.items()}
    walls = {name: h.median([f["wall_s"] for f in figs]) for name, figs in figures.items()}
    # The client process's whole CPU time (start-up and output included) per row.
    cpu_us = {name: h.median([f["cpu_s"] for f in figs]) / rows * 1e6 for name, figs in figures.items()}
    fastest = max(MINIMAL_LOOPS, key=lambda name: medians[name])
    ratio = medians["qwen-batch"] / medians[fastest]
    # Each run's contenders ran back to back, so its ratio is less exposed to the machine's drift.
    pair_ratios = [q["rate"] / m["rate"] for q, m in zip(figures["qwen-batch"], figures[fastest])]
    result: Result = {
        "case": "overhead",
        "rows": rows,
        "concurrency": concurrency,
        "runs": runs,
        "rows_per_second": medians,
        "process_wall_s": walls,
        "process_cpu_us_per_row": cpu_us,
        "all_runs": {name: [round(f["rate"], 1) for f in figs] for name, figs in figures.items()},
        "fastest_minimal_loop": fastest,
        "ratio_to_fastest_loop": ratio,
        "ratio_to_minimal_loop": medians["qwen-batch"] / medians["httpx-minimal"],
        "ratio_per_run": [round(r, 3) for r in pair_ratios],
        "ratio_median_of_runs": h.median(pair_ratios),
        "goal": "qwen-batch >= 85% of the fastest minimal loop, well above the SDK by hand",
        "met": ratio >= 0.85 and (not sdk or medians["qwen-batch"] > 1.5 * medians["dashscope-sdk"]),
        "headline": f"{medians['qwen-batch']:,.0f} rows/s vs {medians[fastest]:,.0f} "
        f"(fastest minimal loop, {fastest}) = {ratio:.0%} (per-run median {h.median(pair_ratios):.0%})",
    }
    if sdk:
        result["ratio_to_sdk"] = medians["qwen-batch"] / medians["dashscope-sdk"]
        result["headline"] += f"; SDK {medians['dashscope-sdk']:,.0f} ({result['ratio_to_sdk']:.1f}x)"
    return result


# -- 2. latency-bound ----------------------------------------------------------------------


def latency(
    rows: int = 5_120, concurrency: int = 256, latency_s: float = 0.9, jitter_s: float = 0.2,
    runs: int = 3, sdk: bool = True,
) -> Result:
    """Rows per second over concurrency / mean latency, with ~1 s latency and jitter."""
    mean_latency = latency_s + jitter_s / 2
    ideal = concurrency / mean_latency
    contenders = ["qwen-batch"] + (["dashscope-sdk"] if sdk else [])
    figures: dict[str, list[float]] = {name: [] for name in contenders}
    with h.workdir() as folder, h.emulator("--latency", str(latency_s), "--latency-jitter", str(jitter_s)) as emu:
        input_path = h.make_input(folder, rows)
        env = h.run_env(emu, folder)
        for run in range(runs):
            for name in contenders:
                if name == "qwen-batch":
                    job = h.write_job(folder, input_path, name=f"latency-{run}", concurrency=concurrency)
                    argv = h.run_command(job)
                else:
                    argv = _reference_command("sdk", emu, input_path, concurrency)
                figure = _measure(emu, argv, env, rows, latency_s=mean_latency)
                figures[name].append(figure["rate"])
                print(f"  latency run {run + 1}: {name:14} {figure['rate']:8,.1f} rows/s "
                      f"= {figure['rate'] / ideal:.1%} of {ideal:.0f}", flush=True)
    medians = {name: h.median(values) for name, values in figures.items()}
    ratio = medians["qwen-batch"] / ideal
    result: Result = {
        "case": "latency",
        "rows": rows,
        "concurrency": concurrency,
        "latency_s": f"{latency_s} + uniform[0, {jitter_s}] (mean {mean_latency})",
        "ideal_rows_per_second": ideal,
        "rows_per_second": medians,
        "all_runs": {name: [round(v, 1) for v in values] for name, values in figures.items()},
        "ratio_to_ideal": ratio,
        "goal": ">= 95% of concurrency / latency",
        "met": ratio >= 0.95,
        "headline": f"{medians['qwen-batch']:,.1f} rows/s of {ideal:,.1f} = {ratio:.1%}",
    }
    if sdk:
        result["sdk_ratio_to_ideal"] = medians["dashscope-sdk"] / ideal
        result["headline"] += f"; SDK {result['sdk_ratio_to_ideal']:.1%}"
    return result


# -- 2b. streaming: the same two questions, every reply streamed ---------------------------


def _streaming_pair(case: str, emulator_args: tuple[str, ...], rows: int, concurrency: int, runs: int,
                    latency_s: float) -> tuple[dict[str, float], list[float], dict[str, list[float]]]:
    """Median rows/s of a streamed qwen-batch job and of the bare streaming loop, run in turns."""
    figures: dict[str, list[float]] = {"qwen-batch": [], "stream-loop": []}
    with h.workdir() as folder, h.emulator(*emulator_args) as emu:
        input_path = h.make_input(folder, rows)
        env = h.run_env(emu, folder)
        h.run_child(_reference_command("stream", emu, h.make_input(folder, 500), concurrency), env)  # warm-up
        for run in range(runs):
            for name in figures:
                if name == "qwen-batch":
                    job = h.write_job(folder, input_path, name=f"{case}-{run}", concurrency=concurrency, stream=True)
                    argv = h.run_command(job)
                else:
                    argv = _reference_command("stream", emu, input_path, concurrency)
                figure = _measure(emu, argv, env, rows, latency_s=latency_s)
                figures[name].append(figure["rate"])
                print(f"  {case} run {run + 1}: {name:11} {figure['rate']:8,.1f} rows/s "
                      f"(process {figure['wall_s']:.1f} s, CPU {figure['cpu_s']:.1f} s)", flush=True)
    medians = {name: h.median(values) for name, values in figures.items()}
    pair_ratios = [q / s for q, s in zip(figures["qwen-batch"], figures["stream-loop"])]
    return medians, pair_ratios, figures


def _streaming_result(case: str, rows: int, concurrency: int, medians: dict[str, float], pair_ratios: list[float],
                      figures: dict[str, list[float]], goal: str, floor: float, **extra: Any) -> Result:
    ratio = medians["qwen-batch"] / medians["stream-loop"]
    return {
        "case": case,
        "rows": rows,
        "concurrency": concurrency,
        **extra,
        "rows_per_second": medians,
        "all_runs": {name: [round(v, 1) for v in values] for name, values in figures.items()},
        "ratio_to_stream_loop": ratio,
        "ratio_per_run": [round(r, 3) for r in pair_ratios],
        "goal": goal,
        "met": ratio >= floor,
        "headline": f"{medians['qwen-batch']:,.1f} rows/s vs {medians['stream-loop']:,.1f} (bare streaming loop) "
        f"= {ratio:.1%} (per-run median {h.median(pair_ratios):.1%})",
    }


def stream_overhead(rows: int = 10_000, concurrency: int = 64, runs: int = 3) -> Result:
    """Streamed rows per second against a zero-latency emulator, next to the bare streaming loop."""
    medians, pair_ratios, figures = _streaming_pair("stream_overhead", (), rows, concurrency, runs, 0.0)
    return _streaming_result("stream_overhead", rows, concurrency, medians, pair_ratios, figures,
                             "a streamed qwen-batch job >= 85% of the bare streaming loop", 0.85, runs=runs)


def openai_overhead(rows: int = 10_000, concurrency: int = 64, runs: int = 3) -> Result:
    """Rows per second of a job on the openai protocol against the emulator's compatible endpoint
    (zero latency), next to the bare loop on the same endpoint, run in turns."""
    figures: dict[str, list[float]] = {"qwen-batch": [], "openai-loop": []}
    with h.workdir() as folder, h.emulator() as emu:
        input_path = h.make_input(folder, rows)
        env = {**h.run_env(emu, folder), "DASHSCOPE_HTTP_BASE_URL": _compatible_base(emu)}
        h.run_child(_reference_command("openai", emu, h.make_input(folder, 500), concurrency), env)  # warm-up
        for run in range(runs):
            for name in figures:
                if name == "qwen-batch":
                    job = h.write_job(folder, input_path, name=f"openai-{run}", concurrency=concurrency, stream=False)
                    # The server named, so the run asks no GET /models: both contenders send only rows.
                    job.write_text(job.read_text() + "api:\n  protocol: openai\n  server: dashscope\n")
                    argv = h.run_command(job)
                else:
                    argv = _reference_command("openai", emu, input_path, concurrency)
                figure = _measure(emu, argv, env, rows)
                figures[name].append(figure["rate"])
                print(f"  openai_overhead run {run + 1}: {name:11} {figure['rate']:8,.1f} rows/s "
                      f"(process {figure['wall_s']:.1f} s, CPU {figure['cpu_s']:.1f} s)", flush=True)
    medians = {name: h.median(values) for name, values in figures.items()}
    pair_ratios = [q / s for q, s in zip(figures["qwen-batch"], figures["openai-loop"])]
    ratio = medians["qwen-batch"] / medians["openai-loop"]
    return {
        "case": "openai_overhead",
        "rows": rows,
        "concurrency": concurrency,
        "runs": runs,
        "rows_per_second": medians,
        "all_runs": {name: [round(v, 1) for v in values] for name, values in figures.items()},
        "ratio_to_openai_loop": ratio,
        "ratio_per_run": [round(r, 3) for r in pair_ratios],
        "goal": "a qwen-batch job on the openai protocol >= 85% of the bare loop on the same compatible endpoint",
        "met": ratio >= 0.85,
        "headline": f"{medians['qwen-batch']:,.1f} rows/s vs {medians['openai-loop']:,.1f} (bare openai loop) "
        f"= {ratio:.1%} (per-run median {h.median(pair_ratios):.1%})",
    }


def stream_latency(rows: int = 5_120, concurrency: int = 256, latency_s: float = 0.9, jitter_s: float = 0.2,
                   runs: int = 3) -> Result:
    """Streamed rows per second with ~1 s latency before each stream, against the bare streaming loop."""
    mean_latency = latency_s + jitter_s / 2
    emulator_args = ("--latency", str(latency_s), "--latency-jitter", str(jitter_s))
    medians, pair_ratios, figures = _streaming_pair("stream_latency", emulator_args, rows, concurrency, runs, mean_latency)
    return _streaming_result(
        "stream_latency", rows, concurrency, medians, pair_ratios, figures,
        "a streamed qwen-batch job within 3% of the bare streaming loop at concurrency 256", 0.97,
        runs=runs, latency_s=f"{latency_s} + uniform[0, {jitter_s}] (mean {mean_latency})",
        ideal_rows_per_second=concurrency / mean_latency,
    )


# -- 3. rate-limit accuracy ----------------------------------------------------------------


def rate_limit(limit: int = 600, window_s: float = 10.0, seconds: float = 30.0, concurrency: int = 64,
               runs: int = 3) -> Result:
    """A configured RPM against an emulator enforcing the same limit over a scaled window.

    The emulator admits ``limit`` requests per ``window_s``; the job's ``requests_per_minute``
    is the same rate per minute (``limit * 60 / window_s``). The client's limiter is built for a
    60 s window; with its 50 ms bucket it stays under any window of 10 s or more.
    """
    per_second = limit / window_s
    rpm = per_second * 60
    rows = int(per_second * seconds)
    rates: list[float] = []
    throttled: list[int] = []
    with h.workdir() as folder, h.emulator("--rpm", str(limit), "--rate-window", str(window_s)) as emu:
        input_path = h.make_input(folder, rows)
        env = h.run_env(emu, folder)
        for run in range(runs):
            # A fresh window for each run: the previous run's requests must have left it.
            time.sleep(window_s + 0.5)
            job = h.write_job(folder, input_path, name=f"rate-{run}", concurrency=concurrency,
                              requests_per_minute=rpm, max_retries=8)
            figure = _measure(emu, h.run_command(job), env, rows)
            rates.append(figure["rate"])
            throttled.append(figure["throttled"])
            print(f"  rate-limit run {run + 1}: {figure['rate']:.2f} req/s of {per_second:.2f} "
                  f"= {figure['rate'] / per_second:.1%}, {figure['throttled']} x 429", flush=True)
    achieved = h.median(rates)
    ratio = achieved / per_second
    return {
        "case": "rate_limit",
        "limit": f"{limit} requests per {window_s:g} s window (= {rpm:g} requests_per_minute)",
        "rows": rows,
        "concurrency": concurrency,
        "limit_per_second": per_second,
        "achieved_per_second": achieved,
        "all_runs": [round(r, 2) for r in rates],
        "throttled_429": throttled,
        "ratio_to_limit": ratio,
        "goal": ">= 95% of the limit, no 429",
        "met": ratio >= 0.95 and sum(throttled) == 0,
        "headline": f"{achieved:.2f} req/s of {per_second:.2f} = {ratio:.1%}, {sum(throttled)} x 429",
    }


# -- 4. memory -----------------------------------------------------------------------------


def memory(rows: tuple[int, ...] = (100_000, 1_000_000), concurrency: int = 64) -> Result:
    """Peak RSS of ``qwen-batch run`` (a fresh helper process per measurement)."""
    peaks: dict[int, float] = {}
    walls: dict[int, float] = {}
    with h.workdir() as folder, h.emulator() as emu:
        env = h.run_env(emu, folder)
        for n in rows:
            input_path = h.make_input(folder, n)
            job = h.write_job(folder, input_path, name=f"memory-{n}", concurrency=concurrency)
            child = h.run_child(h.with_peak_rss(h.run_command(job)), env)
            assert child.max_rss_mb is not None
            peaks[n], walls[n] = child.max_rss_mb, child.wall_s
            print(f"  memory {n:>9,} rows: peak RSS {child.max_rss_mb:,.0f} MB ({child.wall_s:.0f} s)", flush=True)
    small, large = min(rows), max(rows)
    growth = peaks[large] / peaks[small]
    return {
        "case": "memory",
        "concurrency": concurrency,
        "reply": "emulator default replies (median 80 tokens, max_tokens 64)",
        "peak_rss_mb": {str(n): round(v, 1) for n, v in peaks.items()},
        "process_wall_s": {str(n): round(v, 1) for n, v in walls.items()},
        "ratio_large_to_small": growth,
        "goal": f"under 500 MB at {large:,} rows, not much larger than at {small:,}",
        "met": peaks[large] < 500,
        "headline": f"{peaks[small]:,.0f} MB at {small:,} rows, {peaks[large]:,.0f} MB at {large:,} "
        f"({growth:.2f}x)",
    }


def batch_memory(rows: int = 500_000, per_file: int = 50_000) -> Result:
    """Peak RSS of the same job run online and in batch mode (several files), a fresh emulator each."""
    peaks: dict[str, float] = {}
    walls: dict[str, float] = {}
    with h.workdir() as folder:
        input_path = h.make_input(folder, rows)
        for mode in ("online", "batch"):
            # Lines cost no emulator time: the figure is the client's memory, not the service's speed.
            with h.emulator("--batch-per-line", "0", "--batch-validating", "0.05", "--batch-finalizing", "0.05") as emu:
                job = h.write_job(folder, input_path, name=f"batch-memory-{mode}")
                with job.open("a", encoding="utf-8") as spec:
                    spec.write(f"batch:\n  max_requests_per_file: {per_file}\n  poll_interval_s: 0.5\n")
                child = h.run_child(h.with_peak_rss(h.run_command(job, "--mode", mode)), h.run_env(emu, folder))
            assert child.max_rss_mb is not None
            peaks[mode], walls[mode] = child.max_rss_mb, child.wall_s
            print(f"  {mode:>6} {rows:,} rows: peak RSS {child.max_rss_mb:,.0f} MB ({child.wall_s:.0f} s)", flush=True)
    return {
        "case": "batch_memory",
        "rows": rows,
        "files": -(-rows // per_file),
        "peak_rss_mb": {mode: round(value, 1) for mode, value in peaks.items()},
        "process_wall_s": {mode: round(value, 1) for mode, value in walls.items()},
        "goal": "batch mode's peak RSS under the online runner's at the same size",
        "met": peaks["batch"] < peaks["online"],
        "headline": f"batch {peaks['batch']:,.0f} MB, online {peaks['online']:,.0f} MB at {rows:,} rows",
    }


# -- 5. start-up and 6. resume -------------------------------------------------------------


def _time_to_first_request(emu: h.Emulator, argv: list[str], env: dict[str, str]) -> float:
    since = emu.ledger_length()
    started_at = time.time()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        return h.first_request_after(emu, since, started_at, child)
    finally:
        h.stop(child)


def startup(rows: int = 1_000_000, runs: int = 3, concurrency: int = 64) -> Result:
    """Seconds from the command's start to the first request the emulator sees."""
    times: list[float] = []
    with h.workdir() as folder, h.emulator() as emu:
        input_path = h.make_input(folder, rows)
        env = h.run_env(emu, folder)
        for run in range(runs):
            job = h.write_job(folder, input_path, name=f"startup-{run}", concurrency=concurrency)
            times.append(_time_to_first_request(emu, h.run_command(job), env))
            print(f"  start-up run {run + 1}: {times[-1]:.2f} s to the first request", flush=True)
    seconds = h.median(times)
    return {
        "case": "startup",
        "rows": rows,
        "seconds_to_first_request": seconds,
        "all_runs": [round(t, 2) for t in times],
        "goal": "measured (no fixed goal); preflight of every row happens before the first send",
        "met": None,
        "headline": f"{seconds:.2f} s to the first request on {rows:,} rows",
    }


def _build_checkpoint(job: Path, rows_done: int) -> Path:
    """A checkpoint for ``job`` with rows ``0 .. rows_done-1`` done (ok), as a killed run leaves it.

    A real run of the first rows through the public API, with a backend that answers at once.
    """
    import qwen_batch
    from qwen_batch.testing import FakeBackend

    plan = qwen_batch.prepare(job, limit=rows_done, no_cache=True)
    qwen_batch.run(plan, executor=qwen_batch.OnlineExecutor(FakeBackend("A short reply.", output_tokens=4)))
    # A killed run leaves no output or summary behind, only the checkpoint.
    plan.output_path.unlink()
    plan.summary_path.unlink()
    return plan.checkpoint_dir


def resume(rows: int = 1_000_000, done: int = 999_000, runs: int = 3, concurrency: int = 64) -> Result:
    """Seconds from the command's start to the first request when ``done`` rows are already done."""
    times: list[float] = []
    with h.workdir() as folder, h.emulator() as emu:
        input_path = h.make_input(folder, rows)
        env = h.run_env(emu, folder)
        job = h.write_job(folder, input_path, name="resume", concurrency=concurrency)
        began = time.perf_counter()
        saved = _build_checkpoint(job, done)
        pristine = saved.with_name(saved.name + ".pristine")
        shutil.copytree(saved, pristine)
        print(f"  resume: checkpoint of {done:,} rows built in {time.perf_counter() - began:.0f} s", flush=True)
        for run in range(runs):
            shutil.rmtree(saved)
            shutil.copytree(pristine, saved)
            times.append(_time_to_first_request(emu, h.run_command(job), env))
            print(f"  resume run {run + 1}: {times[-1]:.2f} s to the first request", flush=True)
    seconds = h.median(times)
    return {
        "case": "resume",
        "rows": rows,
        "rows_done": done,
        "seconds_to_first_request": seconds,
        "all_runs": [round(t, 2) for t in times],
        "goal": "sending again within a few seconds",
        "met": seconds <= 5.0,
        "headline": f"{seconds:.2f} s to the first request, {done:,} of {rows:,} rows done",
    }


# -- 7. token counting and preflight -------------------------------------------------------

_PREFLIGHT_SCRIPT = """
import json, sys, time
from pathlib import Path
began = time.perf_counter()
import qwen_batch
import qwen_batch.job  # what prepare() loads on first use, timed as import, not as preflight
imported = time.perf_counter()
plan = qwen_batch.prepare(Path(sys.argv[1]))
done = time.perf_counter()
print(json.dumps({"import_s": imported - began, "prepare_s": done - imported, "rows": plan.preflight.rows,
                  "input_tokens": plan.preflight.input_tokens}))
"""


def preflight(rows: int = 1_000_000, runs: int = 3, send_rate: float | None = None) -> Result:
    """Rows per second of ``qwen_batch.prepare`` (read, render, count tokens, check) on short prompts.

    ``send_rate`` (rows/s, from the overhead case of the same session) gives the preflight's
    share of a whole run: preflight / (preflight + rows / send_rate).
    """
    import json

    rates: list[float] = []
    seconds: list[float] = []
    with h.workdir() as folder:
        input_path = h.make_input(folder, rows)
        job = h.write_job(folder, input_path, name="preflight")
        for run in range(runs):
            done = subprocess.run([h.PYTHON, "-c", _PREFLIGHT_SCRIPT, str(job)], env=h._env(),
                                  capture_output=True, text=True, check=True)
            figure = json.loads(done.stdout)
            seconds.append(figure["prepare_s"])
            rates.append(rows / figure["prepare_s"])
            print(f"  preflight run {run + 1}: {figure['prepare_s']:.2f} s = {rates[-1]:,.0f} rows/s", flush=True)
    rate = h.median(rates)
    result: Result = {
        "case": "preflight",
        "rows": rows,
        "prepare_s": h.median(seconds),
        "rows_per_second": rate,
        "all_runs": [round(r) for r in rates],
        "goal": "not what limits a run: many times the sending rate",
        "met": None,
        "headline": f"{rate:,.0f} rows/s ({h.median(seconds):.2f} s for {rows:,} rows)",
    }
    if send_rate:
        send_s = rows / send_rate
        share = result["prepare_s"] / (result["prepare_s"] + send_s)
        result.update(send_rows_per_second=send_rate, share_of_run=share,
                      ratio_to_send_rate=rate / send_rate, met=rate >= 10 * send_rate)
        result["headline"] += f"; {rate / send_rate:.0f}x the sending rate, {share:.1%} of a run"
    return result


# -- 8. adaptive throttling (issue 12) -------------------------------------------------------


def _ledger_rate(entries: list[dict[str, Any]], start: float, end: float, statuses: tuple[int, ...] | None = None) -> float:
    """Generation requests per second in [start, end) seconds after the first one."""
    t0 = entries[0]["time"]
    count = sum(1 for e in entries if start <= e["time"] - t0 < end and (statuses is None or e["status"] in statuses))
    return count / (end - start)


def _throttle_run(folder: Path, name: str, emulator_args: list[str], rows: int, window_s: float,
                  **job: Any) -> list[dict[str, Any]]:
    """One ``qwen-batch run`` of ``rows`` rows against a fresh emulator; its ledger."""
    with h.emulator(*emulator_args) as emu:
        input_path = h.make_input(folder, rows)
        env = h.run_env(emu, folder) | {"QWEN_BATCH_RATE_WINDOW_S": str(window_s)}
        settings = {"concurrency": 8, "max_retries": 30, "request_timeout_s": 5.0} | job
        spec = h.write_job(folder, input_path, name=name, **settings)
        h.run_child(h.run_command(spec), env)
        entries = [e for e in emu.ledger() if e["endpoint"] != "tokenizer"]
    if not entries:
        raise RuntimeError(f"throttle case {name}: nothing was sent")
    return entries


def _throttle_simulated(seed: int = 0) -> dict[str, Any]:
    """The six cases on a fake clock at DashScope's real 60 s window (tests/test_throttle_sim.py's
    set-ups), for one seed of the modelled server and the retries (``python -m bench.throttle_sweep``
    runs it over many)."""
    import sys

    sys.path.insert(0, str(h.ROOT))
    from tests.throttle_sim import Server, Simulation

    rate, w = 20.0, 60.0

    def sim(server: dict[str, Any], **options: Any) -> Simulation:
        return Simulation(Server(**server, seed=seed), configured_rate=rate, window_s=w, seed=seed, **options).run()

    figures: dict[str, Any] = {}
    for p in (0.15, 0.30):
        s = sim(dict(p_random_429=p), duration_s=600.0)
        figures[f"1_random_{p:.0%}_attempts_of_configured"] = s.attempt_rate(0, 600) / rate
    s = sim(dict(limit=int(rate / 2 * w), window_s=w), duration_s=1200.0)
    figures["2_admitted_of_limit"] = s.admitted_rate(2 * w, 1200) / (rate / 2)
    figures["2_429_share"] = s.refused_share(2 * w, 1200)
    figures["2_restores"] = s.throttle.statistics().restores
    s = sim(dict(limit=int(rate / 2 * w), window_s=w, p_random_429=0.1), duration_s=1200.0)
    figures["3_admitted_of_limit"] = s.admitted_rate(2 * w, 1200) / (rate / 2)
    s = sim(dict(outage=(120.0, 150.0)), duration_s=300.0)
    back = s.first_time_at(0.9 * rate, after=150.0)
    figures["4_seconds_back_to_90pct"] = back - 150.0 if back is not None else None
    s = sim(dict(limit=int(rate * w), window_s=w, other_rate=rate / 2, other_during=(120.0, 480.0)), duration_s=720.0)
    figures["5_429_share_while_other_runs"] = s.refused_share(120, 480)
    figures["5_settled_of_what_is_left"] = s.admitted_rate(240, 480) / (rate / 2)
    back5 = next((t for t in range(480, 700) if s.admitted_rate(t, t + 5) >= 0.9 * rate), None)
    figures["5_seconds_back_to_90pct_of_limit"] = back5 - 480 if back5 is not None else None
    s = sim(dict(p_random_429=0.15, p_other_fault=0.35), duration_s=float("inf"), rows=3000)
    need = len(s.attempts) / rate
    done = sorted(s.rows_done)
    figures["6_rows_99pct_of_need"] = done[int(0.99 * len(done)) - 1] / need
    figures["6_all_rows_of_need"] = done[-1] / need
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in figures.items()}


def _throttle_simulated_e2e_seed(window_s: float, configured: float, seed: int, windows: int) -> dict[str, Any]:
    """Cases 2, 3 and 5 in the end-to-end set-up (its window, rate, 16 workers, latency and retry
    backoff scaled with the window; cases 2 and 3 ``windows`` windows of rows, case 5 eleven) on a
    fake clock, for one seed."""
    import sys

    sys.path.insert(0, str(h.ROOT))
    from tests.throttle_sim import Server, Simulation, scaled_to

    w, half = window_s, configured / 2

    def sim(server: Server, rows: int) -> Simulation:
        return Simulation(server, configured_rate=configured, window_s=w, concurrency=16, duration_s=float("inf"),
                          rows=rows, max_retries=30, seed=seed, **scaled_to(w)).run()

    figures: dict[str, Any] = {}
    s = sim(Server(limit=int(half * w), window_s=w, seed=seed), int(windows * w * half))
    figures["2_admitted_of_limit"] = s.admitted_rate(2 * w, s.attempts[-1].time) / half
    figures["2_429_share"] = s.refused_share(2 * w, s.attempts[-1].time)
    s = sim(Server(limit=int(half * w), window_s=w, p_random_429=0.1, seed=seed), int(windows * w * half))
    figures["3_admitted_of_limit"] = s.admitted_rate(2 * w, s.attempts[-1].time) / half
    s = sim(Server(limit=int(configured * w), window_s=w, other_rate=half, other_during=(2 * w, 8 * w), seed=seed),
            int(11 * w * configured))
    figures["5_429_share_while_other_runs"] = s.refused_share(2 * w, 8 * w)
    step = w / 20  # as tests/test_throttle_sim.py: the admitted rate over a quarter window, every 1/20
    back = next((i * step for i in range(80)
                 if s.admitted_rate(8 * w + i * step, 8 * w + i * step + w / 4) >= 0.9 * configured), None)
    figures["5_windows_back_to_90pct_of_limit"] = back / w if back is not None else None
    return figures


def _throttle_simulated_e2e_window(window_s: float, configured: float, seeds: range = range(8)) -> dict[str, Any]:
    """Cases 2, 3 and 5's 429 share in the end-to-end set-up on a fake clock, over ``seeds``: [worst, best]."""
    keys = ("2_admitted_of_limit", "2_429_share", "3_admitted_of_limit", "5_429_share_while_other_runs")
    figures: dict[str, list[float]] = {key: [] for key in keys}
    for seed in seeds:
        one = _throttle_simulated_e2e_seed(window_s, configured, seed, THROTTLE_WINDOWS)
        for key in keys:
            figures[key].append(one[key])
    return {"window_s": window_s, "configured_per_s": configured, "seeds": f"{seeds.start}-{seeds.stop - 1}",
            **{key: [round(min(v), 4), round(max(v), 4)] for key, v in figures.items()}}


# Runs of cases 2 and 3 last this many windows (a real 20-minute run at DashScope's minute).
THROTTLE_WINDOWS = 20


def _first_time_at(entries: list[dict[str, Any]], after: float, rate: float, window_s: float) -> float | None:
    """Seconds after ``after`` until the admitted rate over a quarter window first reaches ``rate``."""
    step, span = window_s / 20, window_s / 4
    return next((i * step for i in range(400) if _ledger_rate(entries, after + i * step, after + i * step + span, (200,))
                 >= rate), None)


def throttle(window_s: float = 4.0, configured: float = 300.0, scale: float = 1.0) -> Result:
    """Issue 12's six cases end to end, and on a fake clock.

    End to end, time is scaled and counts are not: the emulator's window is ``window_s`` and the
    CLI is told so (its throttle's constants and retry backoff scale with it), and ``configured``
    per second puts as many requests in a window as qwen-turbo's 1,200 RPM in a real minute
    (4 s x 300/s = 1,200). Cases 2 and 3 run twenty windows, case 5 eleven. Each figure is a ratio
    to the configured rate or to the emulator's limit, from the emulator's ledger of the same
    run; times are in windows after the event (one window = DashScope's minute).
    """
    rpm = configured * 60
    half = configured / 2
    limit = int(half * window_s)
    window = ["--rate-window", str(window_s)]
    job = {"requests_per_minute": rpm, "concurrency": 16}
    e2e: dict[str, Any] = {}
    with h.workdir() as folder:
        for p in (0.15, 0.30):
            rows = int(10 * window_s * configured * (1 - p) * scale)
            entries = _throttle_run(folder, f"t1-{int(p * 100)}", ["--p-rate-quota", str(p), "--fault-seed", "1"],
                                    rows, window_s, **job)
            span = entries[-1]["time"] - entries[0]["time"]
            e2e[f"1_random_{p:.0%}_attempts_of_configured"] = len(entries) / span / configured
        for case, extra in (("2", []), ("3", ["--p-rate-quota", "0.1", "--fault-seed", "2"])):
            entries = _throttle_run(folder, f"t{case}", ["--rpm", str(limit), *window, *extra],
                                    int(THROTTLE_WINDOWS * window_s * half * scale), window_s, **job)
            end = entries[-1]["time"] - entries[0]["time"]
            later = [e for e in entries if e["time"] - entries[0]["time"] >= 2 * window_s]
            e2e[f"{case}_admitted_of_limit"] = _ledger_rate(entries, 2 * window_s, end, (200,)) / half
            e2e[f"{case}_429_share"] = sum(e["status"] == 429 for e in later) / len(later)
        outage = (window_s, 1.5 * window_s)  # half a window, as 30 s of a minute
        entries = _throttle_run(folder, "t4", ["--outage", f"{outage[0]}:{outage[1]}"], int(5 * window_s * configured * scale),
                                window_s, **job)
        back = _first_time_at(entries, outage[1], 0.9 * configured, window_s)
        e2e["4_outage_windows"] = 0.5
        e2e["4_windows_back_to_90pct"] = back / window_s if back is not None else None
        start, stop = 2 * window_s, 8 * window_s
        entries = _throttle_run(folder, "t5", ["--rpm", str(int(configured * window_s)), *window,
                                               "--other-load", f"{half}:{start}:{stop}"],
                                int(11 * window_s * configured * scale), window_s, **job)
        during = [e for e in entries if start <= e["time"] - entries[0]["time"] < stop]
        e2e["5_429_share_while_other_runs"] = sum(e["status"] == 429 for e in during) / len(during)
        e2e["5_settled_of_what_is_left"] = _ledger_rate(entries, start + 2 * window_s, stop, (200,)) / half
        back5 = _first_time_at(entries, stop, 0.9 * configured, window_s)
        e2e["5_windows_back_to_90pct_of_limit"] = back5 / window_s if back5 is not None else None
        # Case 6 is the issue's own set-up: qwen-turbo's default limits, no scaling of time.
        kinds = ["rate-quota", "allocation-quota", "burst-rate", "500", "503", "reset", "hang", "malformed", "truncated"]
        mix = [arg for kind in kinds for arg in (f"--p-{kind}", str(0.5 / len(kinds)))]
        rows6 = int(200 * scale)
        entries = _throttle_run(folder, "t6", [*mix, "--fault-seed", "3"], rows6, 60.0,
                                requests_per_minute=None, tokens_per_minute=None, concurrency=16, request_timeout_s=1.0)
        last: dict[str, float] = {}
        for entry in entries:
            last[entry["body_sha256"]] = entry["time"] - entries[0]["time"]
        need = len(entries) / 20.0  # qwen-turbo's default 1,200 RPM
        finished = sorted(last.values())
        e2e["6_rows_accounted"] = len(last) == rows6
        e2e["6_failing_share"] = sum(e["status"] != 200 for e in entries) / len(entries)
        e2e["6_rows_99pct_of_need"] = finished[int(0.99 * len(finished)) - 1] / need
        e2e["6_all_rows_of_need"] = finished[-1] / need
    e2e = {key: round(value, 4) if isinstance(value, float) else value for key, value in e2e.items()}
    simulated = _throttle_simulated()
    simulated_e2e = _throttle_simulated_e2e_window(window_s, configured)
    return {
        "case": "throttle",
        "end_to_end": {"window_s": window_s, "configured_per_s": configured, **e2e},
        "end_to_end_goals_met": _throttle_goals(e2e, windows=True),
        "simulated_60s_window": simulated,
        "simulated_60s_goals_met": _throttle_goals(simulated, windows=False),
        "simulated_e2e_window": simulated_e2e,
        "goal": "issue 12's six thresholds, end to end and on a fake clock at the real 60 s window",
        "met": all(_throttle_goals(simulated, windows=False).values()) and all(_throttle_goals(e2e, windows=True).values()),
        "headline": (
            f"e2e ({window_s:g} s window, {configured:g}/s): random 429s {e2e['1_random_15%_attempts_of_configured']:.0%}/"
            f"{e2e['1_random_30%_attempts_of_configured']:.0%} of configured; limit {e2e['2_admitted_of_limit']:.0%} "
            f"({e2e['2_429_share']:.1%} 429); limit+random {e2e['3_admitted_of_limit']:.0%}; other client "
            f"{e2e['5_429_share_while_other_runs']:.1%} 429, back in {e2e['5_windows_back_to_90pct_of_limit']} windows"
        ),
    }


def _throttle_goals(f: dict[str, Any], *, windows: bool) -> dict[str, bool]:
    """Each of issue 12's thresholds, met or not, for figures from the end-to-end run
    (``windows``: times in windows) or the 60 s simulation (times in seconds)."""
    back4 = f["4_windows_back_to_90pct"] if windows else f["4_seconds_back_to_90pct"]
    back5 = f["5_windows_back_to_90pct_of_limit"] if windows else f["5_seconds_back_to_90pct_of_limit"]
    unit = 1.0 if windows else 60.0
    return {
        "1 attempts >= 80% of configured (15%, 30%)": f["1_random_15%_attempts_of_configured"] >= 0.8
        and f["1_random_30%_attempts_of_configured"] >= 0.8,
        "2 admitted >= 95% of limit, < 5% 429s": f["2_admitted_of_limit"] >= 0.95 and f["2_429_share"] < 0.05,
        "3 admitted >= 85% of limit": f["3_admitted_of_limit"] >= 0.85,
        "4 back at 90% within half a window": back4 is not None and back4 <= 0.5 * unit,
        "5 < 5% 429s while the other runs": f["5_429_share_while_other_runs"] < 0.05,
        "5 back at 90% of the limit within a window": back5 is not None and back5 <= 1.0 * unit,
        "6 99% of rows within 2x, all within 4x": f["6_rows_99pct_of_need"] <= 2 and f["6_all_rows_of_need"] <= 4,
    }

from .report import report  # noqa: E402  (the case lives in its own module)

CASES = {
    "overhead": overhead,
    "latency": latency,
    "stream_overhead": stream_overhead,
    "stream_latency": stream_latency,
    "openai_overhead": openai_overhead,
    "rate_limit": rate_limit,
    "memory": memory,
    "batch_memory": batch_memory,
    "startup": startup,
    "resume": resume,
    "preflight": preflight,
    "throttle": throttle,
    "report": report,
}
