"""What an earlier run of the same job left behind, and whether it may be trusted.

The checkpoint's manifest records what decides the requests (model, prompt, parameters);
``input.json`` records the input's bytes and the qwen-batch version the finished rows were
rendered with. A resume skips the rows already finished.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from .checkpoint import Checkpoint, write_file_atomically
from .errors import InputError, StorageError

if TYPE_CHECKING:
    from .render import Renderer
    from .spec import JobSpec
    from .types import Request
    from .variants import Variant


@dataclass(frozen=True, slots=True)
class DoneRow:
    """A row an earlier run finished, with a known token count: checked by fingerprint only.

    Rendering it in full (and counting its tokens) would only confirm what its record says;
    on a resume of a million rows that is most of the preflight's time.
    """

    index: int
    row_id: str
    fingerprint: str
    input_tokens: int
    max_tokens: int


class ResumeIndex:
    """Which rows an earlier run finished, the fingerprint each was sent with, and known token counts.

    A bytearray, an array of 64-bit fingerprint prefixes and an array of 32-bit input token
    counts (0: not known): about 13 MB for a million rows. The counts let a row be rendered
    again without counting its tokens again: the preflight fills them in for every request,
    so the run's own rendering pass skips the tokenizer; a finished row's count is the one
    its record holds (the request is the same as long as the fingerprint matches).
    """

    def __init__(self, rows: int) -> None:
        self.finished = bytearray(rows)
        self.fingerprints = array("Q", bytes(8 * rows))
        self.input_tokens = array("I", bytes(4 * rows))
        # True when the input file and qwen-batch are the same as when the finished rows were
        # sent (the spec is checked by the manifest): their requests cannot differ, so they
        # need not be rebuilt to be checked. Most of a million-row resume's start-up otherwise.
        self.verified = False
        self.finished_input_tokens = 0

    def is_finished(self, index: int) -> bool:
        return bool(self.finished[index])

    def matches(self, request: Request | DoneRow) -> bool:
        return self.verified or self.fingerprints[request.index] == fingerprint_prefix(request.fingerprint)

    def count(self) -> int:
        return self.finished.count(1)


def fingerprint_prefix(fingerprint: str) -> int:
    """The first 64 bits of a fingerprint; 0 for rows that never rendered to a request."""
    return int(fingerprint[:16], 16) if fingerprint else 0


def checkpoint_dir_for(output_path: Path) -> Path:
    return output_path.with_name(output_path.name + ".checkpoint")


def request_manifest(spec: JobSpec, renderer: Renderer, variants: Sequence[Variant] = ()) -> dict[str, Any]:
    """The parts of a job that decide its requests; a resume refuses when they change.

    A job of one variant and one sample keeps the form earlier releases wrote, so their
    checkpoints still resume; a sweep or samples add each variant's model and parameters.
    """
    manifest = {
        "format": 1,
        "model": spec.model,
        "prompt": spec.prompt.model_dump(mode="json"),
        "parameters": renderer.parameters,
        "id_column": spec.input.id_column,
    }
    if len(variants) > 1 or spec.samples > 1 or spec.sweep is not None:
        manifest["samples"] = spec.samples
        manifest["variants"] = [
            {"id": variant.id, "model": variant.model, "parameters": variant.parameters} for variant in variants
        ]
    return manifest


INPUT_IDENTITY_FILE = "input.json"


def input_identity(input_path: Path) -> dict[str, Any]:
    """What the finished rows of a checkpoint were rendered from: the input's bytes and qwen-batch."""
    from .version import __version__

    try:
        with input_path.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        raise InputError(f"{input_path}: cannot read the input ({exc.strerror})") from None
    return {"input_sha256": digest, "qwen_batch": __version__}


def record_input_identity(checkpoint_dir: Path, identity: dict[str, Any]) -> None:
    """Remember what this run's rows are rendered from, so a resume can trust them unchecked."""
    try:
        write_file_atomically(checkpoint_dir / INPUT_IDENTITY_FILE, json.dumps(identity).encode())
    except OSError as exc:
        raise StorageError(f"{checkpoint_dir / INPUT_IDENTITY_FILE}: cannot write ({exc.strerror})") from None


def same_input_as_before(checkpoint_dir: Path, identity: dict[str, Any]) -> bool:
    try:
        recorded: object = json.loads((checkpoint_dir / INPUT_IDENTITY_FILE).read_text(encoding="utf-8"))
        return recorded == identity
    except (OSError, ValueError):
        return False


def resume_state(
    checkpoint_dir: Path,
    manifest: dict[str, Any],
    rows: int,
    identity: dict[str, Any],
    *,
    fresh: bool,
    retry_errors: bool,
) -> tuple[ResumeIndex, float]:
    """Rows an earlier run finished (and will not be sent again), and what they cost.

    Finished means ok, or failed for good unless ``retry_errors``; ``fresh`` ignores them all.
    """
    resume = ResumeIndex(rows)
    if fresh or not checkpoint_dir.exists():
        return resume, 0.0
    resume.verified = same_input_as_before(checkpoint_dir, identity)
    checkpoint = Checkpoint.open(checkpoint_dir, manifest)
    try:
        done = checkpoint.done_frame(extra_columns=("input_tokens", "preflight_input_tokens"))
    finally:
        checkpoint.close()
    keep = pl.col("status") == "ok"
    if not retry_errors:
        keep = keep | ~pl.col("retryable")
    finished = done.filter(keep & pl.col("index").is_between(0, rows - 1))
    previous_cost = float(done["cost"].fill_null(0.0).sum())
    if finished.height == 0:
        return resume, previous_cost
    # Vectorised: a Python call per finished row took seconds on a million-row resume.
    positions = finished["index"]
    prefixes = finished["fingerprint"].str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64, strict=False)
    # The preflight count; a log from before that field was kept has the usage instead.
    counts = (
        finished["preflight_input_tokens"].fill_null(finished["input_tokens"]).fill_null(0)
        .clip(0, (1 << 32) - 1).cast(pl.UInt32)
    )

    def spread(values: pl.Series, dtype: pl.DataType) -> list[int]:
        return pl.zeros(rows, dtype=dtype, eager=True).scatter(positions, values.fill_null(0).cast(dtype)).to_list()

    resume.finished[:] = bytes(spread(pl.repeat(1, finished.height, dtype=pl.UInt8, eager=True), pl.UInt8()))
    resume.fingerprints[:] = array("Q", spread(prefixes, pl.UInt64()))
    resume.input_tokens[:] = array("I", spread(counts, pl.UInt32()))
    resume.finished_input_tokens = int(counts.sum())
    return resume, previous_cost
