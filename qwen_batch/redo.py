"""``run --redo "WHERE"``: which units a run sent again, and under which spec.

Each redo appends one JSON line to ``<checkpoint>/redo.jsonl`` (``REDO_FILE``)::

    {"at": "2026-12-01T16:30:00Z", "where": "finish_reason = 'length'",
     "spec_sha256": "<sha256 of the job file's bytes>", "request_manifest": {...},
     "units": [{"row_id": "q1", "variant": "model=qwen-plus", "sample": 0}, ...]}

``request_manifest`` is the checkpoint's manifest the units were redone under (resume.py's
``request_manifest``); ``units`` name each unit as ``variants.unit_key`` does. The run
manifest (manifest.py) lists these records as the redone units.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REDO_FILE = "redo.jsonl"


def read_redo_log(checkpoint_dir: Path) -> list[dict[str, Any]]:
    """Every redo record of a checkpoint, oldest first; ``[]`` when none was made."""
    try:
        text = (checkpoint_dir / REDO_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
