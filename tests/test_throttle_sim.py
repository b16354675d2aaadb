"""The six cases of issue 12 on a fake clock: the real AdaptiveThrottle against a modelled server.

DashScope's real window (60 s, also the throttle's reaction window), qwen-turbo's default
1,200 RPM (20/s) configured, 16 workers, 0.2 s latency. Each figure is a ratio to the
configured rate or to the server's limit, measured in the same simulated run; thresholds are
the issue's, exact (the simulation is deterministic for a seed). BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import pytest

from .throttle_sim import Server, Simulation, scaled_to

CONFIGURED = 20.0  # requests per second: 1,200 RPM
WINDOW_S = 60.0
SEEDS = (0, 1, 2)
# With them, the seeds (of 0-49) where an earlier controller missed a goal (BENCHMARKS.md, issue 12):
# case 1 at 30% (a chance-high sample cut and judged right before anything was learned) and
# case 5's climb back (a cut just before the other client stops).
CASE_1_SEEDS = (*SEEDS, 28, 42)
CASE_5_SEEDS = (*SEEDS, 7, 11, 38, 47)


def simulate(server: Server, seed: int, **options) -> Simulation:
    return Simulation(server, configured_rate=CONFIGURED, window_s=WINDOW_S, seed=seed, **options).run()


@pytest.mark.parametrize("seed", CASE_1_SEEDS)
@pytest.mark.parametrize("p", [0.15, 0.30])
def test_case_1_random_429s_keep_the_attempt_rate_at_80_percent_of_the_configured_rate(p: float, seed: int) -> None:
    sim = simulate(Server(p_random_429=p, seed=seed), seed, duration_s=600.0)
    assert sim.attempt_rate(0.0, 600.0) >= 0.80 * CONFIGURED
    # The share is learned as rate-independent: by a restore, or by a cut whose share fell but stayed
    # in excess a window later (a chance-high first sample; seeds 28 and 42).
    assert sim.throttle.statistics().baseline_share == pytest.approx(p, abs=0.1)


@pytest.mark.parametrize("seed", SEEDS)
def test_case_2_a_server_limit_at_half_the_configured_rate_is_used_at_95_percent_with_few_429s(seed: int) -> None:
    """From the third window on (the first two are the start: a burst into an empty window)."""
    limit = CONFIGURED / 2
    sim = simulate(Server(limit=int(limit * WINDOW_S), window_s=WINDOW_S, seed=seed), seed, duration_s=1200.0)
    start, end = 2 * WINDOW_S, 1200.0
    assert sim.admitted_rate(start, end) >= 0.95 * limit
    assert sim.refused_share(start, end) < 0.05
    assert sim.throttle.statistics().restores == 0  # every cut was ours, none undone


@pytest.mark.parametrize(("window_s", "configured"), [(10.0, 20.0), (4.0, 100.0)])
def test_case_2_holds_roughly_for_shorter_windows_when_the_throttle_is_told_them(window_s: float, configured: float) -> None:
    """The time constants scale with the window, but a sample's size does not: a window of
    a few hundred requests shows excess 429s later in its own terms, so looser bounds."""
    limit = configured / 2
    duration = 40 * window_s
    sim = Simulation(Server(limit=int(limit * window_s), window_s=window_s), configured_rate=configured,
                     window_s=window_s, duration_s=duration, latency_s=0.05).run()
    assert sim.admitted_rate(2 * window_s, duration) >= 0.90 * limit
    assert sim.refused_share(2 * window_s, duration) < 0.08


@pytest.mark.parametrize("seed", SEEDS)
def test_case_3_a_real_limit_plus_random_429s_is_used_at_85_percent(seed: int) -> None:
    limit = CONFIGURED / 2
    server = Server(limit=int(limit * WINDOW_S), window_s=WINDOW_S, p_random_429=0.10, seed=seed)
    sim = simulate(server, seed, duration_s=1200.0)
    assert sim.admitted_rate(2 * WINDOW_S, 1200.0) >= 0.85 * limit


@pytest.mark.parametrize("seed", SEEDS)
def test_case_4_after_a_30_s_outage_the_rate_is_back_at_90_percent_within_30_s(seed: int) -> None:
    sim = simulate(Server(outage=(120.0, 150.0), seed=seed), seed, duration_s=300.0)
    back = sim.first_time_at(0.9 * CONFIGURED, after=150.0)
    assert back is not None and back - 150.0 <= 30.0
    assert sim.throttle.statistics().decreases == 0  # 503s are no evidence against the rate


@pytest.mark.parametrize("seed", CASE_5_SEEDS)
def test_case_5_a_second_client_costs_few_429s_and_the_rate_climbs_back_when_it_stops(seed: int) -> None:
    """The server's limit is the configured rate; another client sends half of it from 120 s
    to 480 s."""
    limit = CONFIGURED
    server = Server(limit=int(limit * WINDOW_S), window_s=WINDOW_S, other_rate=limit / 2,
                    other_during=(120.0, 480.0), seed=seed)
    sim = simulate(server, seed, duration_s=720.0)
    assert sim.refused_share(120.0, 480.0) < 0.05
    # Settled under what is left (half the limit), not far below it.
    assert sim.admitted_rate(240.0, 480.0) >= 0.85 * limit / 2
    back = next((t for t in range(480, 700) if sim.admitted_rate(t, t + 5) >= 0.9 * limit), None)
    assert back is not None and back - 480 <= 60


@pytest.mark.parametrize("seed", SEEDS)
def test_case_6_a_heavy_fault_mix_finishes_within_twice_what_its_attempts_need(seed: int) -> None:
    """Half of all attempts fail: 15% 429s that do not depend on the rate, 35% other faults."""
    rows = 3000
    server = Server(p_random_429=0.15, p_other_fault=0.35, seed=seed)
    sim = simulate(server, seed, duration_s=float("inf"), rows=rows)
    need = len(sim.attempts) / CONFIGURED
    done = sorted(sim.rows_done)
    assert len(done) == rows
    assert done[int(0.99 * rows) - 1] <= 2 * need
    assert done[-1] <= 4 * need


# -- the end-to-end set-up (tests/test_throttle_e2e.py) on a fake clock ---------------------
# A 2 s window, 300/s configured (600 requests per window, half of a real minute's at 20/s), 16
# workers, latency and retry backoff scaled with the window, the same rows as there. Over seeds
# 0-7 every figure meets the issue's threshold, which is asserted, except case 5's climb back
# (bounded at the measured worst, rounded up; BENCHMARKS.md).
E2E_WINDOW_S, E2E_CONFIGURED = 2.0, 300.0
E2E_SEEDS = range(8)
E2E_CASE_3_WORST = 0.85  # the (88.0-95.0% measured)
E2E_CASE_5_BACK = 2.0  # windows; the is one (0.15-1.40 measured; seeds 0-49 in BENCHMARKS.md)


def simulate_e2e(server: Server, rows: int, seed: int) -> Simulation:
    return Simulation(server, configured_rate=E2E_CONFIGURED, window_s=E2E_WINDOW_S, concurrency=16,
                      duration_s=float("inf"), rows=rows, max_retries=30, seed=seed, **scaled_to(E2E_WINDOW_S)).run()


@pytest.mark.parametrize("seed", E2E_SEEDS)
def test_the_e2e_set_up_case_2_on_a_fake_clock(seed: int) -> None:
    limit, w = E2E_CONFIGURED / 2, E2E_WINDOW_S
    sim = simulate_e2e(Server(limit=int(limit * w), window_s=w, seed=seed), int(10 * w * limit), seed)
    end = sim.attempts[-1].time
    assert sim.admitted_rate(2 * w, end) >= 0.95 * limit
    assert sim.refused_share(2 * w, end) < 0.05


@pytest.mark.parametrize("seed", E2E_SEEDS)
def test_the_e2e_set_up_case_3_on_a_fake_clock(seed: int) -> None:
    limit, w = E2E_CONFIGURED / 2, E2E_WINDOW_S
    sim = simulate_e2e(Server(limit=int(limit * w), window_s=w, p_random_429=0.10, seed=seed), int(10 * w * limit), seed)
    assert sim.admitted_rate(2 * w, sim.attempts[-1].time) >= E2E_CASE_3_WORST * limit


@pytest.mark.parametrize("seed", E2E_SEEDS)
def test_the_e2e_set_up_case_5_on_a_fake_clock(seed: int) -> None:
    """The issue's 429 share (two windows to eight); back at 90% of the full limit within
    E2E_CASE_5_BACK windows after it stops (the issue: one)."""
    limit, w = E2E_CONFIGURED, E2E_WINDOW_S
    server = Server(limit=int(limit * w), window_s=w, other_rate=limit / 2, other_during=(2 * w, 8 * w), seed=seed)
    sim = simulate_e2e(server, int(11 * w * limit), seed)
    assert sim.refused_share(2 * w, 8 * w) < 0.05
    step = w / 20
    back = next((i * step for i in range(80) if sim.admitted_rate(8 * w + i * step, 8 * w + i * step + w / 4) >= 0.9 * limit), None)
    assert back is not None and back <= E2E_CASE_5_BACK * w


def test_the_seed_sweep_names_each_seed_that_misses_a_goal_and_the_spread_of_each_figure() -> None:
    """bench/throttle_sweep.py's summary (BENCHMARKS.md's seeds 0-49 table), on one real seed and
    two copies of it, one pushed over case 5's minute and one without a climb back at all."""
    from bench.throttle_sweep import GOALS, seed_figures, summarize

    real = seed_figures(0)
    assert set(real) == set(GOALS)
    late = real | {"5_seconds_back_to_90pct_of_limit": 61.0}
    never = real | {"5_seconds_back_to_90pct_of_limit": None}
    rows = {row["figure"]: row for row in summarize({0: real, 1: late, 2: never})}
    back = rows["5_seconds_back_to_90pct_of_limit"]
    assert back["missed_by_seeds"] == [1, 2] and back["none"] == 1 and back["max"] == 61.0
    assert back["min"] == real["5_seconds_back_to_90pct_of_limit"] <= 60
    share = rows["2_429_share"]
    assert share["min"] == share["median"] == share["max"] == real["2_429_share"]
    assert share["missed_by_seeds"] == []  # seed 0 meets the 5% (test_case_2_...)
