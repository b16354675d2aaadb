"""``python -m bench.streamed JOB.yaml``: run a job as ``qwen-batch run --quiet --no-cache`` would, streamed.

Until the spec's ``parameters.stream`` key is merged (another branch of issue 14), this is
how the bench makes a job stream: the public API, ``qwen_batch.prepare`` then a plan whose
``mode`` streams. Once the key exists, the streaming cases can run ``qwen-batch run`` on a job
with ``parameters.stream: true`` instead (same code path from the executor on).
"""

from __future__ import annotations

import dataclasses
import sys

import qwen_batch
from qwen_batch.modes import Mode


def main(argv: list[str]) -> int:
    (job,) = argv
    plan = qwen_batch.prepare(job, no_cache=True)
    mode = Mode(stream=True, thinking=False, path="text", path_known=True, reasoning_cap=0)
    return qwen_batch.run(dataclasses.replace(plan, mode=mode)).exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
