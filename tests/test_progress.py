"""The recent rate, the ETA and the progress line, driven by explicit times (a fake clock)."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen_batch.progress import RecentRate
from qwen_batch.report import Reporter, duration, progress_line
from qwen_batch.runner import RunStatistics

STATS = RunStatistics(
    rows_total=3000,
    rows_done=0,
    ok=0,
    errors=0,
    errors_by_code={},
    cached=0,
    cache_saved_cost=0.0,
    input_tokens=0,
    output_tokens=0,
    cost=0.0,
    retries=0,
    throttled=0,
    in_flight=0,
    elapsed_s=0.0,
)


def test_the_rate_is_over_the_trailing_window_not_the_whole_run() -> None:
    """The issue's case: a collapse to 1.8 rows/s must not hide behind the whole-run average."""
    rate = RecentRate(window_s=10.0)
    for second in range(1, 61):  # a minute at 5 rows/s
        rate.observe(float(second), 5 * second)
    assert rate.rate() == pytest.approx(5.0)
    for second in range(1, 21):  # then 20 s at 1.8 rows/s
        rate.observe(60.0 + second, 300 + round(1.8 * second))
    assert rate.rate() == pytest.approx(1.8)  # exactly the last 10 s: 18 rows
    whole_run = (300 + 36) / 80.0
    assert whole_run > 2 * rate.rate()


def test_before_the_window_is_full_the_rate_is_since_the_start() -> None:
    rate = RecentRate(window_s=10.0)
    assert rate.rate() is None and rate.eta_s(10) is None
    rate.observe(0.5, 4)
    assert rate.rate() == pytest.approx(8.0)
    rate.observe(2.0, 10)
    assert rate.rate() == pytest.approx(5.0)


def test_the_window_keeps_a_sample_at_its_start_so_it_is_never_shorter() -> None:
    """Samples every 3 s: the rate spans the newest sample at or before now - window."""
    rate = RecentRate(window_s=10.0)
    for t, done in [(3, 30), (6, 60), (9, 90), (12, 100), (15, 110)]:
        rate.observe(float(t), done)
    # now 15: the window reaches back to 5, the newest sample at or before it is t=3.
    assert rate.rate() == pytest.approx((110 - 30) / 12)


def test_eta_follows_the_recent_rate() -> None:
    rate = RecentRate(window_s=10.0)
    rate.observe(10.0, 100)  # 10 rows/s
    assert rate.eta_s(50) == pytest.approx(5.0)
    rate.observe(20.0, 110)  # 1 row/s over the last 10 s
    assert rate.eta_s(50) == pytest.approx(50.0)
    assert rate.eta_s(0) == 0.0


def test_a_stalled_run_has_no_eta_rather_than_an_infinite_one() -> None:
    rate = RecentRate(window_s=10.0)
    rate.observe(5.0, 50)
    rate.observe(16.0, 50)
    rate.observe(17.0, 50)
    assert rate.rate() == 0.0 and rate.eta_s(10) is None


def test_an_observation_from_the_past_is_ignored() -> None:
    rate = RecentRate(window_s=10.0)
    rate.observe(4.0, 40)
    rate.observe(3.0, 0)
    assert rate.rate() == pytest.approx(10.0)


@given(st.lists(st.tuples(st.floats(0.01, 5.0), st.integers(0, 50)), min_size=1, max_size=60))
def test_the_rate_equals_rows_over_the_time_it_spans(steps: list[tuple[float, int]]) -> None:
    """For any sampling, the rate is (done now - done then) / (now - then) for the kept start."""
    rate = RecentRate(window_s=10.0)
    samples = [(0.0, 0)]
    now, done = 0.0, 0
    for dt, rows in steps:
        now, done = now + dt, done + rows
        rate.observe(now, done)
        samples.append((now, done))
    start = max((s for s in samples[:-1] if s[0] <= now - 10.0), default=samples[0], key=lambda s: s[0])
    assert rate.rate() == pytest.approx((done - start[1]) / (now - start[0]))


def test_durations_read_well() -> None:
    assert [duration(s) for s in (None, 0, 42.4, 185, 7440, 400_000)] == ["--", "0s", "42s", "3m05s", "2h04m", ">99h"]


def _line(**changes: object) -> str:
    rate = RecentRate(window_s=10.0)
    rate.observe(10.0, 100)
    stats = replace(STATS, **{"rows_done": 100, "elapsed_s": 10.0, **changes})
    return progress_line(stats, "CNY", rate=rate)


def test_the_line_shows_percentage_rate_eta_in_flight_retries_throttling_and_spend() -> None:
    line = _line(in_flight=16, retries=3, throttled=7, cooling_down_s=1.25, cost=0.0123, errors=2)
    assert line.startswith("100/3000 rows 3% | 10.0 rows/s | ETA 4m50s | 16 in flight | 3 retries")
    assert "7 throttled (cooling 1.2s)" in line and "2 errors" in line and line.endswith("0.0123 CNY")


def test_a_resume_counts_the_rows_and_spend_of_earlier_runs() -> None:
    rate = RecentRate(window_s=10.0)
    rate.observe(10.0, 100)
    stats = replace(STATS, rows_done=100, elapsed_s=10.0, cost=0.5)
    line = progress_line(stats, "CNY", rate=rate, done_before=2900, spent_before=1.0, final=True)
    assert line.startswith("3000/3000 rows 100% | 10.0 rows/s | done") and line.endswith("1.5000 CNY")
    stopped = progress_line(stats, "CNY", rate=rate, done_before=10, final=True)
    assert "110/3000 rows 3%" in stopped and "stopped" in stopped and "ETA" not in stopped


@pytest.mark.parametrize("width", [40, 60, 80, 100])
def test_a_narrow_terminal_drops_the_least_important_parts_first(width: int) -> None:
    full = _line(in_flight=16, retries=3, throttled=7, cooling_down_s=1.0, cost=0.0123, errors=2, cached=5)
    rate = RecentRate(window_s=10.0)
    rate.observe(10.0, 100)
    stats = replace(STATS, rows_done=100, elapsed_s=10.0, in_flight=16, retries=3, throttled=7,
                    cooling_down_s=1.0, cost=0.0123, errors=2, cached=5)
    line = progress_line(stats, "CNY", rate=rate, width=width)
    assert len(full) > 100 and len(line) <= width
    if width >= 60:  # what matters most survives: done, rate, ETA, spend
        assert line.startswith("100/3000 rows 3% | 10.0 rows/s | ETA 4m50s") and line.endswith("0.0123 CNY")
    assert "tokens" not in line


class _Stream(io.StringIO):
    """A log (``tty=False``) or a terminal without a file descriptor (its width falls back to 80)."""

    def __init__(self, *, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_in_a_log_the_final_line_is_plain_and_comes_before_the_summary() -> None:
    """No carriage returns or escapes in a cron log; the last figures are the final ones."""
    log = _Stream(tty=False)
    reporter = Reporter(stream=log, out=log)
    reporter.draw(replace(STATS, rows_done=1000, elapsed_s=10.0))
    reporter.draw(replace(STATS, rows_done=3000, elapsed_s=20.0), final=True)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    assert lines[0].startswith("1000/3000 rows 33% | 100.0 rows/s | ETA 20s")
    assert lines[1].startswith("3000/3000 rows 100% | 200.0 rows/s | done")


def test_on_a_terminal_the_line_is_redrawn_in_place_and_fits_the_width() -> None:
    screen = _Stream(tty=True)
    reporter = Reporter(stream=screen, out=screen)
    busy = replace(STATS, in_flight=16, retries=3, throttled=7, cooling_down_s=1.0, errors=2, cached=5,
                   input_tokens=123456, output_tokens=654321, cost=12.3456)
    reporter.draw(replace(busy, rows_done=1000, elapsed_s=10.0))
    reporter.draw(replace(busy, rows_done=1500, elapsed_s=15.0))
    frames = screen.getvalue().split("\r\x1b[2K")
    assert frames[0] == "" and len(frames) == 3 and "\n" not in screen.getvalue()
    assert all(len(frame) <= 79 for frame in frames[1:])
    assert frames[2].startswith("1500/3000 rows 50% | 100.0 rows/s | ETA 15s")
