"""Before/after pair: the overhead case's qwen-batch run, from this tree and from another revision.

    python -m bench.pair REV [--runs 5] [--rows 20000]

Both trees run the same job against one zero-latency emulator (this tree's), alternating run
by run so the machine's drift hits both alike; the figure is the ratio of the median rates.
A structural change should keep it within a few percent (issue 13 asks for 3%).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from . import harness as h
from .cases import _measure


def _export(revision: str, folder: Path) -> Path:
    """The package of ``revision`` as plain files (git archive), importable through PYTHONPATH."""
    archive = subprocess.run(
        ["git", "-C", str(h.ROOT), "archive", revision, "qwen_batch"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def _check_imports_from(tree: Path, env: dict[str, str]) -> None:
    """Refuse to measure unless a child with ``env`` imports qwen_batch from ``tree``."""
    found = subprocess.run(
        [h.PYTHON, "-c", "import qwen_batch; print(qwen_batch.__file__)"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"a child imports qwen_batch from {found}, not from {tree}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pair", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", help="the 'before' revision (any git revision of this repository)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    rates: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="qwen-batch-pair-") as tmp, h.workdir() as folder, h.emulator() as emu:
        before_tree = _export(args.revision, Path(tmp))
        input_path = h.make_input(folder, args.rows)
        os.chdir(folder)  # a child's sys.path[0] is its working folder: neither tree may be there
        envs = {"after": h.run_env(emu, folder), "before": {**h.run_env(emu, folder), "PYTHONPATH": str(before_tree)}}
        for side, tree in (("before", before_tree), ("after", h.ROOT)):
            _check_imports_from(tree, envs[side])
        for run in range(args.runs):
            for side in ("before", "after") if run % 2 == 0 else ("after", "before"):
                job = h.write_job(folder, input_path, name=f"pair-{side}-{run}", concurrency=args.concurrency)
                figure = _measure(emu, h.run_command(job), envs[side], args.rows)
                rates[side].append(figure["rate"])
                print(f"  run {run + 1}: {side:6} {figure['rate']:8,.0f} rows/s", flush=True)
    before, after = h.median(rates["before"]), h.median(rates["after"])
    print(f"before ({args.revision}): median {before:,.0f} rows/s; after (this tree): median {after:,.0f} rows/s; "
          f"after/before {after / before:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
