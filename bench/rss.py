"""Run a command and report its peak RSS: ``python bench/rss.py CMD ...``.

A fresh helper process per measurement, so ``RUSAGE_CHILDREN`` holds exactly that one child
(the largest of its descendants' peaks; qwen-batch starts no processes of its own). Prints
``bench-max-rss-kb N`` on stderr after the child's own output and exits with its code.
"""

from __future__ import annotations

import resource
import subprocess
import sys


def main() -> int:
    code = subprocess.call(sys.argv[1:])
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
    print(f"bench-max-rss-kb {peak_kb}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
