"""``qwen-batch verify``: does a finished output still follow from the spec and input its manifest names?

Three checks, each listed when it fails: the spec's resolved sha256, the input's sha256, and
every unit's ``request_sha256`` against the request rendered again now. Sends nothing
(``--resend`` aside, which is ``resend.py``'s).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from .errors import InputError
from .manifest import canonical_sha256, changed_keys
from .plan import JobOptions

if TYPE_CHECKING:
    from .plan import JobPlan
    from .types import Request

LISTED = 10  # differing rows named in the report; the count is always whole


@dataclass
class Verification:
    """What ``verify`` found: an empty ``differences`` means everything matched."""

    output: Path
    units: int
    checked_units: int
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.differences else 0


def job_of(manifest: dict[str, Any], output: Path) -> Path:
    """The job file the manifest names; InputError when it is gone (nothing to re-render from)."""
    job = manifest.get("job", {}).get("path")
    if not job or not Path(job).is_file():
        raise InputError(f"{output}: the job file its manifest names ({job}) is gone; restore it to verify")
    return Path(job)


def rendering_options(manifest: dict[str, Any], output: Path, *, emulate: bool | None = None) -> JobOptions:
    """Options that render every unit of the recorded run again, trusting no checkpoint."""
    rows = int(manifest.get("input", {}).get("rows", 0))
    emulated = bool(manifest.get("service", {}).get("emulated")) if emulate is None else emulate
    return JobOptions(output=output, fresh=True, limit=max(rows, 1), emulate=emulated)


def verify_output(output: Path, manifest: dict[str, Any], plan: JobPlan) -> Verification:
    """Check ``output`` against its manifest and ``plan``, the job prepared again from the files it names."""
    from .resume import input_identity

    frame = _read_output(output)
    spec = plan.spec
    report = Verification(output=output, units=frame.height, checked_units=0)
    resolved = spec.model_dump(mode="json")
    if canonical_sha256(resolved) != manifest.get("spec_sha256"):
        keys = ", ".join(changed_keys(manifest.get("spec", {}), resolved)) or "(formatting only)"
        report.differences.append(f"spec: {spec.where} changed since the run: {keys}")
    input_path = Path(spec.input.path)
    recorded = manifest.get("input", {}).get("sha256")
    current = input_identity(input_path)["input_sha256"]
    if current != recorded:
        report.differences.append(
            f"input: {input_path} sha256 {current[:12]}... differs from the run's {str(recorded)[:12]}..."
        )
    _check_requests(report, frame, plan.requests(), _unit_namer(plan))
    return report


def _unit_namer(plan: JobPlan) -> Callable[[Request], str]:
    """How a message names a unit: its row id, with the variant and sample when the job has several."""
    if plan.units_per_row == 1:
        return lambda request: request.row_id
    ids = [variant.id for variant in plan.variants]

    def name(request: Request) -> str:
        variant = ids[request.unit.variant] if request.unit.variant < len(ids) else request.unit.variant
        return f"{request.row_id} ({variant or 'no sweep'}, sample {request.unit.sample})"

    return name


def _read_output(output: Path) -> pl.DataFrame:
    """The output's request fingerprints in unit order (null where a unit sent nothing or the column is absent)."""
    try:
        schema = pl.read_parquet_schema(output)
        columns = ["request_sha256"] if "request_sha256" in schema else []
        frame = pl.read_parquet(output, columns=columns or [next(iter(schema))])
    except (OSError, pl.exceptions.ComputeError) as exc:
        raise InputError(f"{output}: cannot read the output ({exc}); name a Parquet file that qwen-batch run wrote") from None
    if not columns:
        frame = pl.DataFrame({"request_sha256": pl.Series([None] * frame.height, dtype=pl.String)})
    return frame.select(pl.col("request_sha256").cast(pl.String)).with_row_index("index")


def _check_requests(
    report: Verification, frame: pl.DataFrame, requests: Iterable[Request], unit_name: Callable[[Request], str]
) -> None:
    """Each unit's recorded fingerprint against the one rendered now, by dense unit index."""
    indices: list[int] = []
    fingerprints: list[str] = []
    ids: list[str] = []
    for request in requests:
        indices.append(request.index)
        fingerprints.append(request.fingerprint)
        ids.append(unit_name(request))
    rendered = pl.DataFrame(
        {"index": pl.Series(indices, dtype=pl.UInt32), "rendered": fingerprints, "row_id": ids},
        schema={"index": pl.UInt32, "rendered": pl.String, "row_id": pl.String},
    )
    if frame["request_sha256"].null_count() == frame.height:
        report.notes.append("the output has no request_sha256 column (written before 0.1.0's run records): units not checked")
        return
    joined = frame.join(rendered, on="index", how="full", coalesce=True)
    differing = joined.filter(pl.col("request_sha256").ne_missing(pl.col("rendered")))
    report.checked_units = frame.height
    if differing.height:
        named = ", ".join(
            str(row_id if row_id is not None else f"#{index}")
            for index, row_id in differing.select("index", "row_id").head(LISTED).iter_rows()
        )
        more = f" and {differing.height - LISTED} more" if differing.height > LISTED else ""
        report.differences.append(
            f"requests: {differing.height} of {frame.height} units render to another request now: {named}{more}"
        )


def render_verification(report: Verification, out: Any) -> None:
    for note in report.notes:
        print(f"note: {note}", file=out)
    for difference in report.differences:
        print(f"differs: {difference}", file=out)
    if report.differences:
        print(f"{report.output}: {len(report.differences)} difference(s)", file=out)
    else:
        print(f"{report.output}: ok: spec, input and {report.checked_units} of {report.units} requests match the manifest", file=out)
