"""The names the Batch API sees: each line's ``custom_id`` and each batch's ``metadata.ds_name``."""

from __future__ import annotations

from ..types import UnitKey

DS_NAME_MAX = 100  # metadata.ds_name, dashscope-protocol.md section 7.3


def custom_id(unit: UnitKey) -> str:
    """The line's id: the unit's key, stable across runs of the same input.

    The row's position, not the user's id column: it is short (the service's 256-character
    limit, research-wave2.md E.8), unique by construction, and maps back without a lookup.
    A unit of a later variant or sample adds them: ``row.variant.sample``.
    """
    if unit.variant == 0 and unit.sample == 0:
        return str(unit.row)
    return f"{unit.row}.{unit.variant}.{unit.sample}"


def unit_of(custom: str) -> UnitKey | None:
    """The unit a ``custom_id`` names, or None when it is none of ours."""
    parts = custom.split(".")
    if len(parts) not in (1, 3) or not all(part.isdigit() and part.isascii() for part in parts):
        return None
    numbers = [int(part) for part in parts]
    return UnitKey(*numbers)


def dense_index_of(custom: str, units_per_row: tuple[int, int]) -> int | None:
    """The dense unit index a ``custom_id`` names in a job of ``(variants, samples)`` per row;
    None when it is none of ours or names a variant or sample the job does not have."""
    unit = unit_of(custom)
    variants, samples = units_per_row
    if unit is None or unit.variant >= variants or unit.sample >= samples:
        return None
    return unit.dense_index(variants, samples)


def ds_name(job_id: str, shard: str) -> str:
    """``metadata.ds_name`` of a shard's batch: the job's id and the shard, what crash recovery lists by."""
    name = f"qwen-batch/{job_id}/{shard}"
    assert len(name) <= DS_NAME_MAX, name
    return name
