"""Checks shared by the end-to-end tests of refused input: exit 2, one error line, nothing sent,
nothing changed on disk."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from qwen_batch.cli import main

SPEC: dict[str, Any] = {
    "model": "qwen-turbo",
    "input": {"path": "in.csv", "id_column": "id"},
    "prompt": {"template": "Say: {text}"},
    "parameters": {"seed": 7, "max_tokens": 50},
    "execution": {"concurrency": 2, "max_retries": 0, "request_timeout_s": 5},
    "output": {"path": "out/result.parquet"},
}


def spec(name: str, **sections: Any) -> dict[str, Any]:
    """A small valid job spec named ``name``, with whole sections replaced."""
    return {"name": name, **json.loads(json.dumps(SPEC)), **sections}


def snapshot(folder: Path) -> dict[str, str]:
    """Regular files by content hash, links by target, anything else by kind (never opened: it may be a FIFO)."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            found[name] = "-> " + os.readlink(path)
        elif path.is_file():
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[name] = f"mode {os.lstat(path).st_mode:o}"
    return found


def refused(argv: list[str], folder: Path, emulator: Any, capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI; assert exit 2, one error line, nothing sent, nothing under ``folder`` changed; return the line."""
    before = snapshot(folder)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err
    assert emulator.ledger == []
    assert snapshot(folder) == before
    return lines[0]
