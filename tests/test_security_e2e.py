"""The API key never leaves the process except in the Authorization header to a safe URL,
and the files a run creates for checkpoints and the cache are private to the user."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from qwen_batch.cli import main
from qwen_batch.emulator import EmulatorConfig, FaultRates
from qwen_batch.testing import EmulatorThread

from .conftest import run_subprocess, sentences_job

KEY = "sk-CANARY-7f3a9c1e5b2d4680-do-not-leak"
# Fragments of the key a partial leak (a cut-off message, a hex dump) would still show.
KEY_PARTS = (KEY, KEY[3:20], KEY[-16:])


def assert_no_key(text: str, where: str) -> None:
    for part in KEY_PARTS:
        assert part not in text, f"the API key leaked into {where}"


def scan_files(root: Path) -> list[Path]:
    files = [path for path in root.rglob("*") if path.is_file()]
    for path in files:
        data = path.read_bytes()
        for part in KEY_PARTS:
            assert part.encode() not in data, f"the API key leaked into {path}"
            assert part.encode("utf-16-le") not in data, f"the API key leaked into {path} (UTF-16)"
    return files


@pytest.fixture
def canary(tmp_path: Path) -> Any:
    config = EmulatorConfig(
        api_key=KEY, ledger_path=tmp_path / "emulator-ledger.jsonl",
        faults=FaultRates(internal_error=0.2, reset=0.1, malformed=0.1, rate_quota=0.1), fault_seed=3, retry_after=0.05,
    )
    with EmulatorThread(config) as emu:
        yield emu


def _env(emu: Any, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "DASHSCOPE_API_KEY": KEY, "DASHSCOPE_HTTP_BASE_URL": emu.base_url,
        "QWEN_BATCH_CACHE_DIR": str(tmp_path / "cache"), "QWEN_BATCH_DEBUG": "1", **extra,
    }


TEXTS = [
    "fine row", "another fine row", "moderated [[emu: always=DataInspectionFailed]]",
    "busy for good [[emu: always=ModelUnavailable]]", f"a row that quotes a key-like text sk-{'x' * 20}",
]


def test_no_file_or_console_output_of_ok_failing_and_crashing_runs_holds_the_key(tmp_path: Path, canary: Any) -> None:
    env = _env(canary, tmp_path)
    console = []
    # 1. A run with ok rows and failed rows, progress on, in a real process.
    job = sentences_job(tmp_path, TEXTS, execution={"concurrency": 2, "max_retries": 2, "request_timeout_s": 5})
    done = run_subprocess(["run", str(job)], env)
    assert done.returncode == 1, done.stderr
    console += [done.stdout, done.stderr]
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert set(frame["status"]) == {"ok", "error"}
    # 2. status and estimate read the checkpoint and the cache.
    for command in (["status", str(job)], ["estimate", str(job)], ["validate", str(job)]):
        done = run_subprocess(command, env)
        assert done.returncode == 0, done.stderr
        console += [done.stdout, done.stderr]
    # 3. A wrong key is refused (exit 3); the refused key must not leak either.
    done = run_subprocess(["run", str(job), "--fresh"], {**env, "DASHSCOPE_API_KEY": KEY + "-wrong"})
    assert done.returncode == 3
    console += [done.stdout, done.stderr]
    # 4. A crash (a bug) with QWEN_BATCH_DEBUG=1: the traceback is printed, the key is not,
    #    even though the exception's own text quotes it.
    crash = (
        "import os, sys\n"
        "import qwen_batch.output as output\n"
        "def broken(*args, **kwargs):\n"
        "    key = os.environ['DASHSCOPE_API_KEY']\n"
        "    raise RuntimeError('write failed for request with Authorization: Bearer ' + key)\n"
        "output.write_results = broken\n"
        "from qwen_batch.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    crash_job = sentences_job(crash_dir, TEXTS[:2])
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", crash, "run", str(crash_job)], env={**os.environ, **env},
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 70, done.stderr
    assert "Traceback" in done.stderr and "RuntimeError" in done.stderr and "sk-***" in done.stderr
    console += [done.stdout, done.stderr]
    # 5. The same crash without QWEN_BATCH_DEBUG is one line, still without the key.
    env_quiet = {k: v for k, v in env.items() if k != "QWEN_BATCH_DEBUG"}
    done = subprocess.run(
        [sys.executable, "-c", crash, "run", str(crash_job)], env={**os.environ, **env_quiet, "QWEN_BATCH_DEBUG": "0"},
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 70 and "Traceback" not in done.stderr
    assert "internal error" in done.stderr and "QWEN_BATCH_DEBUG=1" in done.stderr
    console += [done.stdout, done.stderr]

    for index, text in enumerate(console):
        assert_no_key(text, f"console output #{index}")
    files = scan_files(tmp_path)
    names = {path.name for path in files}
    # The scan covered what a run leaves behind.
    assert {"result.parquet", "result.parquet.summary.json", "rows.jsonl", "manifest.json",
            "responses.sqlite3", "emulator-ledger.jsonl"} <= names
    assert (tmp_path / "emulator-ledger.jsonl").stat().st_size > 0


def test_checkpoint_and_cache_files_are_private_to_the_user(tmp_path: Path, canary: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _env(canary, tmp_path).items():
        monkeypatch.setenv(name, value)
    job = sentences_job(tmp_path, TEXTS[:2], execution={"max_retries": 5})
    assert main(["run", str(job), "--quiet"]) == 0
    checkpoint = tmp_path / "out" / "result.parquet.checkpoint"
    cache = tmp_path / "cache"
    for folder in (checkpoint, cache):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        files = [path for path in folder.iterdir() if path.is_file()]
        assert files
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.parametrize(
    ("base_url", "allowed"),
    [
        ("http://example.com/api/v1", False),
        ("http://10.1.2.3:8080/api/v1", False),
        ("http://[::ffff:8.8.8.8]/api/v1", False),
        ("http://127.0.0.1.nip.io/api/v1", False),
    ],
)
def test_the_key_is_not_sent_over_plain_http_to_a_remote_host(
    tmp_path: Path, canary: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    base_url: str, allowed: bool,
) -> None:
    """From the environment or the spec, a plain-http remote URL is exit 2 with the fix; nothing is sent."""
    for name, value in _env(canary, tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", base_url)
    job = sentences_job(tmp_path, TEXTS[:1])
    assert main(["run", str(job), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "allow_insecure_http" in err and "https" in err
    assert canary.ledger == []
    assert not (tmp_path / "out").exists()


def test_plain_http_to_loopback_names_is_allowed(tmp_path: Path, canary: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _env(canary, tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", canary.base_url.replace("127.0.0.1", "localhost"))
    job = sentences_job(tmp_path, TEXTS[:1], execution={"max_retries": 5})
    assert main(["run", str(job), "--quiet"]) == 0
    assert canary.ledger
