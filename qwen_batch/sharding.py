"""Which shard of a job a unit belongs to, and where a shard writes its part.

``run --shard I/N`` sends only the units whose stable hash falls in shard I of N (numbered
from 0, as Kubernetes indexed jobs, Slurm arrays and Ray number their workers), so any
scheduler can start N copies of the same command and each pays for its own units only. The
hash is of the row's id, the variant's id and the sample, never of a position or a process:
the same unit lands in the same shard on every machine, in every run, whatever the order of
the input file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

_SHARD = re.compile(r"([0-9]+)/([0-9]+)")
MAX_SHARDS = 65_536


class ShardError(ValueError):
    """A ``--shard`` value that is not ``I/N`` with 0 <= I < N."""


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count`` (0 <= index < count)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS or not 0 <= self.index < self.count:
            raise ShardError(
                f"--shard {self.index}/{self.count}: shards are numbered 0 to N-1 with 1 <= N <= {MAX_SHARDS}"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` as typed on the command line (plain ASCII digits)."""
        match = _SHARD.fullmatch(text.strip())
        if match is None or not text.strip().isascii():
            raise ShardError(f"--shard {text!r}: expected I/N, e.g. 0/4 (shards are numbered 0 to N-1)")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, row_id: str, variant_id: str = "", sample: int = 0) -> bool:
        """Whether the unit (row id, variant id, sample) is this shard's."""
        return unit_shard(row_id, variant_id, sample, self.count) == self.index

    def part_path(self, output: Path) -> Path:
        """This shard's part of the job's output: ``<output>.parts/part-I-of-N.parquet``."""
        return parts_dir(output) / f"part-{self.index}-of-{self.count}.parquet"


def unit_shard(row_id: str, variant_id: str, sample: int, count: int) -> int:
    """The shard (0 to count-1) of a unit, from a hash of its identity that never changes."""
    if count == 1:
        return 0
    key = f"{row_id}\x1f{variant_id}\x1f{sample}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % count


def parts_dir(output: Path) -> Path:
    """The folder of a sharded job's parts, next to the output they merge into."""
    return output.with_name(output.name + ".parts")
