"""Command-line values follow the spec's bounds; a bad one is one ``error:`` line and exit 2.

Every numeric flag of every command is covered, the message names the flag and its bounds
(never an internal function name), workers never outnumber the rows to send, and
``--version`` prints the installed version.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import qwen_batch
from qwen_batch.cli import build_parser, main
from qwen_batch.spec import MAX_CONCURRENCY

from .conftest import REPO, sentences_job

INTERNAL_NAMES = ("_positive", "whole_number value", "number value", "_probability", "invalid int", "invalid float")

# (argv, fragments the one error line must hold)
BAD_FLAGS: list[tuple[list[str], list[str]]] = [
    (["run", "j.yaml", "--concurrency", "abc"], ["--concurrency", "whole number from 1 to 4096", "'abc'"]),
    (["run", "j.yaml", "--concurrency", "0"], ["--concurrency", "from 1 to 4096", "got 0"]),
    (["run", "j.yaml", "--concurrency", "4097"], ["--concurrency", "from 1 to 4096", "got 4097"]),
    (["run", "j.yaml", "--concurrency", "99999"], ["--concurrency", "from 1 to 4096", "got 99999"]),
    (["run", "j.yaml", "--concurrency", "2.5"], ["--concurrency", "whole number"]),
    (["run", "j.yaml", "--concurrency", "1_0"], ["--concurrency", "whole number"]),
    (["run", "j.yaml", "--concurrency", "\u0663"], ["--concurrency", "whole number"]),  # an Arabic-Indic 3
    (["run", "j.yaml", "--concurrency="], ["--concurrency", "whole number"]),
    (["run", "j.yaml", "--limit", "0"], ["--limit", "whole number >= 1", "got 0"]),
    (["run", "j.yaml", "--limit=-3"], ["--limit", ">= 1"]),
    (["run", "j.yaml", "--limit", "1e3"], ["--limit", "whole number"]),
    (["run", "j.yaml", "--limit", "9" * 40], ["--limit", "whole number"]),
    (["run", "j.yaml", "--max-cost", "0"], ["--max-cost", "number > 0", "got 0"]),
    (["run", "j.yaml", "--max-cost=-1"], ["--max-cost", "> 0"]),
    (["run", "j.yaml", "--max-cost", "nan"], ["--max-cost", "'nan'"]),
    (["run", "j.yaml", "--max-cost", "inf"], ["--max-cost", "'inf'"]),
    (["run", "j.yaml", "--max-cost", "1e999"], ["--max-cost", "'1e999'"]),
    (["run", "j.yaml", "--max-cost", "ten"], ["--max-cost", "'ten'"]),
    (["validate", "j.yaml", "--limit", "x"], ["--limit", "whole number >= 1"]),
    (["estimate", "j.yaml", "--limit", "0"], ["--limit", ">= 1"]),
    (["emulate", "--port", "70000"], ["--port", "from 0 to 65535"]),
    (["emulate", "--port", "http"], ["--port", "whole number"]),
    (["emulate", "--reply-median-tokens", "0"], ["--reply-median-tokens", ">= 1"]),
    (["emulate", "--reply-max-tokens", "many"], ["--reply-max-tokens", "whole number"]),
    (["emulate", "--stream-chunk-tokens", "0"], ["--stream-chunk-tokens", ">= 1"]),
    (["emulate", "--fault-seed", "x"], ["--fault-seed", "whole number"]),
    (["emulate", "--p-500", "2"], ["--p-500", "from 0 to 1", "got 2"]),
    (["emulate", "--p-rate-quota", "nan"], ["--p-rate-quota", "from 0 to 1"]),
    (["emulate", "--p-hang=-0.1"], ["--p-hang", "from 0 to 1"]),
    (["emulate", "--retry-after=-1"], ["--retry-after", ">= 0"]),
    (["emulate", "--retry-after", "inf"], ["--retry-after", ">= 0"]),
    (["emulate", "--rpm", "1.5"], ["--rpm", "whole number >= 0"]),
    (["emulate", "--tpm=-5"], ["--tpm", ">= 0"]),
    (["emulate", "--rate-window", "0"], ["--rate-window", "number > 0"]),
    (["emulate", "--latency=-1"], ["--latency", ">= 0"]),
    (["emulate", "--latency-jitter", "nan"], ["--latency-jitter", ">= 0"]),
    (["emulate", "--latency-per-token", "inf"], ["--latency-per-token", ">= 0"]),
]


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert not any(name in lines[0] for name in INTERNAL_NAMES), lines[0]
    return lines[0]


@pytest.mark.parametrize(("argv", "fragments"), BAD_FLAGS, ids=[" ".join(a[:1] + a[2:]) for a, _ in BAD_FLAGS])
def test_a_bad_flag_value_is_one_error_line_naming_the_flag_and_its_bounds(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragments: list[str],
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    line = error_line(capsys)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert f"see qwen-batch {argv[0]} --help" in line


def test_a_missing_argument_or_unknown_command_is_one_error_line_too(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, fragment in ((["run"], "required: job"), (["frobnicate"], "invalid choice: 'frobnicate'"), ([], "required")):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2
        assert fragment in error_line(capsys)


def test_the_emulator_module_s_own_command_line_gives_the_same_one_line_errors() -> None:
    done = subprocess.run([sys.executable, "-m", "qwen_batch.emulator", "--port", "-1"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: python -m qwen_batch.emulator: --port: expected a whole number")


def parse_run_flag(flag: str, text: str) -> Any:
    """The parsed value of ``run --flag=text``, or None after checking the refusal is one error line."""
    capture = _Capture()
    with capture:
        try:
            args = build_parser().parse_args(["run", "job.yaml", f"--{flag}={text}"])
        except SystemExit as exit_:
            assert exit_.code == 2
            args = None
    if args is None:
        assert capture.err.count("\n") == 1 and capture.err.startswith(f"error: qwen-batch run: --{flag}: ")
        return None
    return getattr(args, flag.replace("-", "_"))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=12), st.integers(-10, 10_000).map(str)))
@example("--")  # Python 3.11's argparse once turned "--flag=--" into the value []
def test_concurrency_is_accepted_exactly_when_it_is_a_whole_number_within_the_spec_bounds(text: str) -> None:
    # str.strip and int() disagree on some whitespace ("\x1f"): the number is the stripped text's.
    valid = re.fullmatch(r"[-+]?[0-9]+", text.strip()) is not None and 1 <= int(text.strip()) <= MAX_CONCURRENCY
    assert parse_run_flag("concurrency", text) == (int(text.strip()) if valid else None)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=12), st.floats().map(repr), st.integers(-5, 5).map(str)))
@example("--")
def test_max_cost_is_accepted_exactly_when_it_is_a_finite_positive_decimal(text: str) -> None:
    decimal = re.fullmatch(r"[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?", text.strip()) is not None
    # str.strip and float() disagree on some whitespace ("0\x1f"): such text is no number.
    value = _float_or_none(text) if decimal else None
    valid = value is not None and math.isfinite(value) and value > 0
    assert parse_run_flag("max-cost", text) == (value if valid else None)


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


class _Capture:
    """Collects stderr for one parse (capsys cannot be reset between hypothesis examples)."""

    def __enter__(self) -> _Capture:
        import contextlib
        import io

        self._buffer = io.StringIO()
        self._redirect = contextlib.redirect_stderr(self._buffer)
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._redirect.__exit__(*exc)
        self.err = self._buffer.getvalue()


# --- workers never outnumber the rows to send -----------------------------------------------


def test_workers_are_never_more_than_the_rows_to_send(tmp_path: Path) -> None:
    job = sentences_job(tmp_path, ["one", "two"], execution={"concurrency": 16})
    assert qwen_batch.prepare(job, concurrency=MAX_CONCURRENCY).workers == 2
    assert qwen_batch.prepare(job).workers == 2
    assert qwen_batch.prepare(job, concurrency=1).workers == 1
    assert qwen_batch.prepare(job, limit=1, concurrency=8).workers == 1
    (tmp_path / "many").mkdir()
    many = sentences_job(tmp_path / "many", [f"row {i}" for i in range(40)])
    assert qwen_batch.prepare(many, concurrency=8).workers == 8


def test_a_two_row_job_at_the_largest_concurrency_runs_and_one_past_it_sends_nothing(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    job = sentences_job(tmp_path, ["one", "two"])
    with pytest.raises(SystemExit) as caught:
        main(["run", str(job), "--quiet", "--concurrency", str(MAX_CONCURRENCY + 1)])
    assert caught.value.code == 2
    assert f"from 1 to {MAX_CONCURRENCY}" in error_line(capsys)
    assert emulator.ledger == [] and not (tmp_path / "out").exists()
    assert main(["run", str(job), "--quiet", "--concurrency", str(MAX_CONCURRENCY)]) == 0
    assert len(emulator.ledger) == 2


# --- --version ---------------------------------------------------------------------------------


def test_version_prints_the_installed_version_and_exits_0() -> None:
    done = subprocess.run([sys.executable, "-m", "qwen_batch", "--version"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"qwen-batch {metadata.version('qwen-batch')}\n"
    assert done.stderr == ""
