"""``qwen-batch diff`` on two large outputs: ``python bench/diff_outputs.py [ROWS] [FOLDER]``.

Writes two synthetic outputs of ROWS rows (default 1,000,000) with their manifests, B
differing from A in 5% of its texts, 1% of its statuses and with the temperature changed,
then times ``qwen-batch diff A B --json`` in a fresh process under ``bench/rss.py`` (peak RSS).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

ROWS = 1_000_000


def _output(rows: int, *, changed: bool) -> pl.DataFrame:
    index = pl.int_range(rows, eager=True)
    text = pl.concat_str([pl.lit("a deterministic answer of some sixty characters, row "), index.cast(pl.String)])
    frame = pl.DataFrame({"index": index}).with_columns(
        id=pl.format("q{}", pl.col("index")),
        text=pl.format("question {}", pl.col("index")),
        request_id=pl.format("req-{}", pl.col("index")),
        output_text=text,
        finish_reason=pl.lit("stop"),
        input_tokens=(pl.col("index") % 50 + 20),
        output_tokens=(pl.col("index") % 64 + 1),
        cost=(pl.col("index") % 64 + 1) * 1e-6,
        status=pl.lit("ok"),
        latency_s=(pl.col("index") % 100) / 100.0,
        variant=pl.lit(""),
        sample=pl.lit(0, dtype=pl.Int64),
        request_sha256=pl.format("{}", pl.col("index").hash(seed=1)),
    )
    if changed:
        frame = frame.with_columns(
            output_text=pl.when(pl.col("index") % 20 == 0).then(pl.lit("another answer")).otherwise(pl.col("output_text")),
            status=pl.when(pl.col("index") % 100 == 1).then(pl.lit("error")).otherwise(pl.col("status")),
            request_sha256=pl.format("{}", pl.col("index").hash(seed=2)),
        )
    return frame.drop("index")


def _manifest(rows: int, temperature: float) -> dict[str, object]:
    return {
        "format": 1, "run_id": f"bench-{temperature}",
        "input": {"sha256": "0" * 64, "id_column": "id", "rows": rows},
        "spec": {"model": "qwen-plus", "parameters": {"seed": 1, "temperature": temperature}},
        "samples": 1, "units_per_row": 1,
        "variants": [{"id": "", "model": "qwen-plus", "parameters": {"seed": 1, "temperature": temperature}, "mode": {}}],
        "service": {"protocol": "dashscope", "emulated": True, "base_url": None}, "catalog": {},
    }


def write_pair(folder: Path, rows: int) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, changed, temperature in (("a", False, 0.0), ("b", True, 0.7)):
        path = folder / f"{name}.parquet"
        _output(rows, changed=changed).write_parquet(path, row_group_size=10_000)
        path.with_name(path.name + ".manifest.json").write_text(json.dumps(_manifest(rows, temperature)))
        paths.append(path)
    return paths[0], paths[1]


def main() -> int:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else ROWS
    folder = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/tmp/qwen-batch-bench-diff")
    a, b = write_pair(folder, rows)
    command = [sys.executable, str(Path(__file__).with_name("rss.py")), sys.executable, "-m", "qwen_batch",
               "diff", str(a), str(b), "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    counts = json.loads(done.stdout)["counts"]
    peak = next(line for line in done.stderr.splitlines() if line.startswith("bench-max-rss-kb"))
    print(f"rows {rows}: exit {done.returncode}, {seconds:.2f} s, peak RSS {int(peak.split()[1]) // 1024} MB, counts {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
