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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .table import Table

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


def unit_shards(row_ids: Iterable[str], slots: Sequence[tuple[str, int]], count: int) -> Iterator[int]:
    """The shard of every unit, in dense unit order: each row's ``slots`` (variant id, sample) in turn."""
    for row_id in row_ids:
        for variant_id, sample in slots:
            yield unit_shard(row_id, variant_id, sample, count)


def shard_mask(row_ids: Iterable[str], slots: Sequence[tuple[str, int]], shard: Shard) -> bytearray:
    """1 for each unit (dense order) that ``shard`` holds, 0 for the others: what a part sends and writes.

    One byte a unit, computed once per run, so the hot path only indexes it.
    """
    index = shard.index
    return bytearray(held == index for held in unit_shards(row_ids, slots, shard.count))


def shard_sizes(row_ids: Iterable[str], slots: Sequence[tuple[str, int]], count: int) -> list[int]:
    """How many units each of ``count`` shards holds."""
    sizes = [0] * count
    for held in unit_shards(row_ids, slots, count):
        sizes[held] += 1
    return sizes


def table_row_ids(table: Table, id_column: str | None, rows: int) -> Iterator[str]:
    """The first ``rows`` row ids of ``table`` as units are named by them (``Renderer.row_id``)."""
    if id_column is None:
        yield from map(str, range(rows))
        return
    for batch in table.iter_batches(columns=[id_column], batch_size=50_000, limit=rows):
        yield from (str(row.get(id_column)) for row in batch)


PART_NAME = re.compile(r"part-([0-9]+)-of-([0-9]+)\.parquet")


def found_parts(output: Path) -> dict[Shard, Path]:
    """The parts written so far next to ``output`` (any N), by shard."""
    folder = parts_dir(output)
    if not folder.is_dir():
        return {}
    found: dict[Shard, Path] = {}
    for path in sorted(folder.iterdir()):
        match = PART_NAME.fullmatch(path.name)
        if match is not None and path.is_file():
            try:
                found[Shard(int(match.group(1)), int(match.group(2)))] = path
            except ShardError:
                continue
    return found


_PART_OR_CHECKPOINT = re.compile(r"part-[0-9]+-of-([0-9]+)\.parquet(?:\.checkpoint)?")


def shard_counts(output: Path) -> list[int]:
    """Every N that a part or a part's checkpoint beside ``output`` is of (a shard started)."""
    folder = parts_dir(output)
    if not folder.is_dir():
        return []
    found = {int(m.group(1)) for m in map(_PART_OR_CHECKPOINT.fullmatch, (p.name for p in folder.iterdir())) if m}
    return sorted(count for count in found if 1 <= count <= MAX_SHARDS)
