"""``python -m qwen_batch.emulator [options]``: the same as ``qwen-batch emulate``."""

from __future__ import annotations

import sys

from ..argtypes import ArgumentParser
from .cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m qwen_batch.emulator", description=run.__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
