"""A job checked and opened but not sent: the command line's options and the ``JobPlan``.

The plan is what every later step reads (the executor, the summary, the estimate, the
report), so it sits below all of them and imports none of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import default_cache_path
from .modes import Mode
from .paths import JobPaths, job_paths

if TYPE_CHECKING:
    from .catalog import ModelInfo, Price
    from .preflight import PreflightReport
    from .render import Renderer
    from .resume import ResumeIndex
    from .spec import JobSpec
    from .table import Table
    from .types import Request
    from .redo import Redo
    from .sharding import Shard
    from .variants import Variant


@dataclass(frozen=True)
class JobOptions:
    """Command-line choices that override or extend the spec."""

    emulate: bool = False
    limit: int | None = None
    concurrency: int | None = None
    output: str | Path | None = None  # as typed: a trailing "/" means a folder
    fresh: bool = False
    retry_errors: bool = False
    no_cache: bool = False
    max_cost: float | None = None
    redo: str | None = None  # ``run --redo "WHERE"``: a SQL filter over the previous output (redo.py)
    shard: Shard | None = None  # ``run --shard I/N``: only this shard's units (sharding.py)


def checked_paths(spec: JobSpec, options: JobOptions) -> JobPaths:
    """The job's paths with the command line's choices (``--output``, the cache), checked as a set."""
    cache = None
    label = "cache.path"
    if spec.cache.enabled and not options.no_cache:
        cache = spec.cache.path
        if cache is None:
            cache, label = default_cache_path(), "the response cache"
    paths = job_paths(spec, options.output, cache=cache, cache_label=label)
    if options.shard is None:
        return paths
    # A shard writes its part, with the part's own checkpoint, summary and manifest beside it.
    return job_paths(spec, options.shard.part_path(paths.output), cache=cache, cache_label=label)



@dataclass
class JobPlan:
    """Everything checked and opened, nothing sent yet: what an executor executes."""

    spec: JobSpec
    options: JobOptions
    model_info: ModelInfo | None
    price: Price | None
    table: Table
    renderer: Renderer
    rows: int
    output_path: Path
    checkpoint_dir: Path
    manifest: dict[str, Any]
    preflight: PreflightReport
    resume: ResumeIndex
    previous_cost: float
    input_identity: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    cache_path: Path | None = None  # the response cache this run reads and writes, None when off
    # How requests are sent (stream, thinking, native path); the default is today's plain text call.
    mode: Mode = field(default_factory=lambda: Mode(False, False, "text", True, 0))
    # Issue 17: the sweep's variants in sweep order (one, id "", without a sweep) and samples per row.
    variants: tuple[Variant, ...] = ()
    samples: int = 1
    redo: Redo | None = None  # ``run --redo``: the units sent again (redo.py)
    # ``run --shard I/N``: 1 for each unit (dense order) of this shard, 0 for the others (sharding.py).
    held: bytearray | None = None

    @property
    def renderers(self) -> tuple[Renderer, ...]:
        """The renderer of each unit of a row, in output order (variant, then sample)."""
        if not self.variants:
            return (self.renderer,)
        return tuple(renderer for variant in self.variants for renderer in variant.renderers)

    @property
    def units_per_row(self) -> int:
        return max(1, len(self.variants)) * self.samples

    @property
    def units(self) -> int:
        """Units of work: rows x variants x samples (types.UnitKey numbers them densely)."""
        return self.rows * self.units_per_row

    @property
    def own_units(self) -> int:
        """The units this run is for: the shard's under ``--shard``, else all of them."""
        return self.units if self.held is None else self.held.count(1)

    @property
    def rate_share(self) -> float:
        """The part of the job's RPM and TPM this run may use: 1/N for ``--shard I/N``, unless
        the spec's ``shards:`` gives each shard limits (and an account) of its own."""
        shard = self.options.shard
        return 1.0 if shard is None or self.spec.shards else 1.0 / shard.count

    def shared(self, limits: tuple[float | None, float | None]) -> tuple[float | None, float | None]:
        """``limits`` (RPM, TPM) scaled to this run's ``rate_share``."""
        share = self.rate_share
        if share == 1.0:
            return limits
        rpm, tpm = limits
        return (rpm * share if rpm is not None else None, tpm * share if tpm is not None else None)

    @property
    def summary_path(self) -> Path:
        return self.output_path.with_name(self.output_path.name + ".summary.json")

    @property
    def max_cost(self) -> float | None:
        return self.options.max_cost if self.options.max_cost is not None else self.spec.budget.max_cost

    @property
    def uses_cache(self) -> bool:
        """Whether this run reads and writes the response cache (the spec allows it, no ``--no-cache``)."""
        return self.spec.cache.enabled and not self.options.no_cache

    @property
    def workers(self) -> int:
        """The concurrency asked for, but never more workers (and connections) than rows to send."""
        asked = self.options.concurrency or self.spec.execution.concurrency
        return min(asked, max(1, self.preflight.to_send))

    @property
    def rate_limits(self) -> tuple[float | None, float | None]:
        """The spec's RPM and TPM, else the catalog's documented defaults for the (first) model,
        this run's share of them (``rate_share``)."""
        from .variants import rate_limits_for

        return self.shared(rate_limits_for(self.spec, self.model_info))

    def requests(self) -> Iterator[Request]:
        """The request of every row that renders to one, in input order: rendered again, sent nowhere."""
        from .preflight import rendered
        from .types import Request

        for batch in rendered(self.renderers, self.table.iter_batches(limit=self.rows)):
            yield from (item for item in batch if isinstance(item, Request))
