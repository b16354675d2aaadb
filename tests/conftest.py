"""Shared fixtures: a real emulator on loopback and a small job written into a temp folder."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from qwen_batch.emulator import EmulatorConfig
from qwen_batch.testing import EmulatorThread

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def emulator() -> Iterator[Any]:
    """A fresh emulator (zero latency, no faults) on 127.0.0.1, in a background thread."""
    with EmulatorThread(EmulatorConfig()) as emu:
        yield emu


@pytest.fixture
def job_env(emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment pointing a real run at the emulator, with a private cache folder."""
    env = {
        "DASHSCOPE_API_KEY": emulator.api_key,
        "DASHSCOPE_HTTP_BASE_URL": emulator.base_url,
        "QWEN_BATCH_CACHE_DIR": str(tmp_path / "cache"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DASHSCOPE_API_KEY_FILE_PATH", raising=False)
    return env


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_job(folder: Path, spec: dict[str, Any], name: str = "job.yaml") -> Path:
    """Write a spec; ``input.path`` and ``output.path`` are relative to ``folder``."""
    path = folder / name
    path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def sentences_job(folder: Path, texts: Sequence[str], **overrides: Any) -> Path:
    """A template job over a CSV of (id, text) rows."""
    write_csv(folder / "input.csv", ["id", "text"], [[f"r{i:03d}", text] for i, text in enumerate(texts)])
    spec: dict[str, Any] = {
        "name": "test-job",
        "model": "qwen-turbo",
        "input": {"path": "input.csv", "id_column": "id"},
        "prompt": {"system": "You are terse.", "template": "Say something about: {text}"},
        "parameters": {"seed": 7, "max_tokens": 200},
        "execution": {"concurrency": 4, "max_retries": 3, "request_timeout_s": 10, "requests_per_minute": 600000},
        "output": {"path": "out/result.parquet"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return write_job(folder, spec)


def read_summary(output: Path) -> dict[str, Any]:
    return json.loads(output.with_name(output.name + ".summary.json").read_text(encoding="utf-8"))


def run_subprocess(args: Sequence[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``qwen-batch`` as a real process (for signals and kills)."""
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-m", "qwen_batch", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
