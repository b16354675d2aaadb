"""The progress line as a person sees it: a real terminal (tmux), a run that slows down midway.

The job's rows carry emulator latency directives: the first rows answer in 0.05 s, the next
in 1 s, so the run slows from tens of rows per second to 4, then the last rows are fast again
(so the test ends soon). The pane is captured in the fast part, late in the slow part (where
the done count stays in range for over a second at 4 rows/s) and at the end; each wait polls
the pane's content up to a deadline.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import sentences_job

WIDTH, HEIGHT = 80, 60
FAST_ROWS, SLOW_ROWS, TAIL_ROWS, CONCURRENCY = 240, 48, 100, 4
FAST_LATENCY_S, SLOW_LATENCY_S = 0.05, 1.0
SLOW_END = FAST_ROWS + SLOW_ROWS
TOTAL = SLOW_END + TAIL_ROWS
LINE = re.compile(
    r"(?P<done>\d+)/(?P<total>\d+) rows (?P<percent>\d+)% \| (?P<rate>[\d.]+|--) rows/s \| "
    r"(?:ETA (?P<eta>\S+)|(?P<final>done|stopped))"
)


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    percent: int
    rate: float
    eta_s: float | None
    final: str | None
    row: int
    text: str


def _seconds(eta: str) -> float | None:
    if eta == "--":
        return None
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", eta)
    assert match, eta
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def progress_in(screen: list[str]) -> Progress | None:
    for row, text in enumerate(screen):
        match = LINE.search(text)
        if match and match["rate"] != "--":
            eta = match["eta"]
            return Progress(
                int(match["done"]), int(match["total"]), int(match["percent"]), float(match["rate"]),
                _seconds(eta) if eta else None, match["final"], row, text,
            )
    return None


class Terminal:
    """A private tmux server (its own socket) with one fixed-size window running a shell."""

    def __init__(self, socket: str) -> None:
        self.socket = socket

    def tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            check=True, capture_output=True, text=True, timeout=10,
        ).stdout

    def screen(self) -> list[str]:
        return self.tmux("capture-pane", "-p", "-t", "job").splitlines()

    def wait_for(self, what: str, found: Callable[[list[str]], bool], deadline_s: float) -> list[str]:
        deadline = time.monotonic() + deadline_s
        while True:
            screen = self.screen()
            if found(screen):
                return screen
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {deadline_s} s; the pane shows:\n" + "\n".join(screen))
            time.sleep(0.05)  # polling the pane's content; nothing is ordered by this sleep


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    assert shutil.which("tmux"), "tmux is needed for this test (.ci/run installs it)"
    term = Terminal(f"qwen-batch-test-{tmp_path.name}")
    term.tmux("new-session", "-d", "-s", "job", "-x", str(WIDTH), "-y", str(HEIGHT), "sh")
    try:
        yield term
    finally:
        term.tmux("kill-server")


def _slowing_job(folder: Path) -> Path:
    texts = [f"row {i} [[emu: latency={FAST_LATENCY_S}]]" for i in range(FAST_ROWS)]
    texts += [f"row {i} [[emu: latency={SLOW_LATENCY_S}]]" for i in range(FAST_ROWS, SLOW_END)]
    texts += [f"row {i} [[emu: latency={FAST_LATENCY_S}]]" for i in range(SLOW_END, TOTAL)]
    return sentences_job(
        folder,
        texts,
        parameters={"seed": 7, "max_tokens": 20},
        execution={"concurrency": CONCURRENCY, "requests_per_minute": 600000, "request_timeout_s": 30},
    )


def test_the_live_line_shows_the_slowdown_and_ends_at_total_before_the_summary(
    tmp_path: Path, terminal: Terminal
) -> None:
    job = _slowing_job(tmp_path)
    command = (
        f"cd {shlex.quote(str(tmp_path))} && QWEN_BATCH_CACHE_DIR={shlex.quote(str(tmp_path / 'cache'))} "
        f"{shlex.quote(sys.executable)} -m qwen_batch run {shlex.quote(str(job))} --emulate; echo EXIT=$?"
    )
    sent = time.monotonic()
    terminal.tmux("send-keys", "-t", "job", command, "Enter")

    def at(low: int, high: int) -> Callable[[list[str]], bool]:
        def found(screen: list[str]) -> bool:
            progress = progress_in(screen)
            return progress is not None and low <= progress.done <= high

        return found

    start = progress_in(terminal.wait_for("progress in the fast part", at(100, FAST_ROWS - 40), 60))
    # Over 10 s into the slow part (4 rows/s), before its end: the rate's window holds only slow rows.
    middle_screen = terminal.wait_for("progress late in the slow part", at(FAST_ROWS + 42, SLOW_END - 1), 60)
    middle = progress_in(middle_screen)
    whole_run_average = middle.done / (time.monotonic() - sent)  # an underestimate: the run began later
    end_screen = terminal.wait_for("the end of the run", lambda s: any(r.startswith("EXIT=") for r in s), 60)
    end = progress_in(end_screen)

    assert start.total == middle.total == TOTAL
    assert middle.rate < start.rate / 2, (start.text, middle.text)
    assert middle.rate < whole_run_average, (middle.text, whole_run_average)  # recent, not the average
    assert start.eta_s is not None and middle.eta_s is not None and middle.eta_s > start.eta_s
    # The final figures are drawn before the summary, not a stale refresh.
    assert (end.done, end.percent, end.final) == (TOTAL, 100, "done"), end.text
    summary_row = next(i for i, row in enumerate(end_screen) if "qwen-batch summary" in row)
    assert end.row < summary_row
    assert "EXIT=0" in end_screen
    # The line fits the terminal: it is never wrapped onto a second row.
    for progress in (start, middle, end):
        assert len(progress.text) < WIDTH and progress.text.rstrip().endswith("CNY"), progress.text
