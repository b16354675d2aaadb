"""Run the benchmark suite against the built-in emulator: ``python -m bench [case ...]``.

    python -m bench                      # every case, as in BENCHMARKS.md
    python -m bench overhead latency     # some cases
    python -m bench --quick              # smaller sizes, fewer runs (a smoke test, not figures)

Cases: overhead, latency, stream_overhead, stream_latency, rate_limit, memory, batch_memory, startup, resume, preflight, throttle, report. Prints a table and
writes bench/results/latest.json (every figure, the date, the machine and the command).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

from . import harness as h
from .cases import CASES

QUICK = {
    "overhead": {"rows": 5_000, "runs": 1},
    "latency": {"rows": 1_024, "runs": 1},
    "stream_overhead": {"rows": 2_000, "runs": 1},
    "stream_latency": {"rows": 1_024, "runs": 1},
    "openai_overhead": {"rows": 2_000, "runs": 1},
    "rate_limit": {"seconds": 12.0, "runs": 1},
    "memory": {"rows": (20_000, 100_000)},
    "batch_memory": {"rows": 20_000, "per_file": 5_000},
    "startup": {"rows": 100_000, "runs": 1},
    "resume": {"rows": 100_000, "done": 99_000, "runs": 1},
    "preflight": {"rows": 100_000, "runs": 1},
    "throttle": {"scale": 0.5},
    "report": {"rows": 100_000, "runs": 1},
}


def _table(results: list[dict]) -> str:
    lines = [f"{'case':<11} {'met':<5} figure", f"{'-' * 11} {'-' * 5} {'-' * 60}"]
    for result in results:
        met = {True: "yes", False: "NO", None: "-"}[result.get("met")]
        lines.append(f"{result['case']:<11} {met:<5} {result['headline']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", metavar="case", help=f"cases to run (default: all): {', '.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="small sizes and one run: checks the suite works")
    parser.add_argument("--output", type=Path, default=h.RESULTS / "latest.json", help="result file")
    args = parser.parse_args(argv)
    names = args.cases or list(CASES)
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    results: list[dict] = []
    started = time.perf_counter()
    for name in names:
        print(f"== {name}", flush=True)
        options = dict(QUICK.get(name, {})) if args.quick else {}
        if name == "preflight":
            overhead = next((r for r in results if r["case"] == "overhead"), None)
            if overhead is not None:
                options["send_rate"] = overhead["rows_per_second"]["qwen-batch"]
        began = time.perf_counter()
        result = CASES[name](**options)
        result["seconds"] = round(time.perf_counter() - began, 1)
        results.append(result)
    document = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": h.machine(),
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print()
    print(_table(results))
    print(f"\n{document['date']}, {document['machine']['nproc']} x {document['machine']['cpu']}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
