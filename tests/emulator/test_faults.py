"""Faults: prompt directives, seeded random faults, RPM/TPM limits, latency, and shutdown."""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx
import pytest

from emu_helpers import compatible, native, prompt_body, sse_events
from qwen_batch.emulator import EmulatorConfig, FaultRates, open_emulator
from qwen_batch.emulator.faults import DirectiveError, decide, parse_directive, read_script
from qwen_batch.emulator.limits import WindowLimiter
from qwen_batch.wire import NATIVE_PATH


def test_times_counts_attempts_of_that_exact_body(emu: Any) -> None:
    flaky = prompt_body("row A [[emu: fail=InternalError times=1]]")
    other = prompt_body("row B [[emu: fail=InternalError times=1]]")
    assert native(emu, flaky).status_code == 500
    assert native(emu, other).status_code == 500  # a different body has its own count
    assert native(emu, flaky).status_code == 200
    assert native(emu, other).status_code == 200


def test_always_fails_every_attempt_with_the_documented_text(emu: Any) -> None:
    body = prompt_body("[[emu: always=DataInspectionFailed]]")
    for _ in range(3):
        response = native(emu, body)
        assert (response.status_code, response.json()["code"]) == (400, "DataInspectionFailed")
    assert emu.ledger[-1]["fault"] == "DataInspectionFailed"


def test_status_option_overrides_the_error_status(emu: Any) -> None:
    response = native(emu, prompt_body("[[emu: fail=RequestTimeOut status=408]]"))
    assert (response.status_code, response.json()["code"]) == (408, "RequestTimeOut")


def test_reset_drops_the_connection_without_an_answer(emu: Any) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        native(emu, prompt_body("[[emu: reset times=1]]"))
    assert emu.ledger[-1]["status"] == 0 and emu.ledger[-1]["fault"] == "reset"
    assert native(emu, prompt_body("[[emu: reset times=1]]")).status_code == 200


def test_malformed_is_a_200_whose_body_is_not_json(emu: Any) -> None:
    response = native(emu, prompt_body("[[emu: malformed]]"))
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()
    assert emu.stats()["billable"] == 0


def test_truncated_promises_more_bytes_than_it_sends(emu: Any) -> None:
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete|complete message body"):
        native(emu, prompt_body("[[emu: truncated]]"))


def test_hang_never_answers_and_is_recorded_when_abandoned() -> None:
    from qwen_batch.testing import EmulatorThread

    with EmulatorThread() as emu:
        with pytest.raises(httpx.ReadTimeout):
            native(emu, prompt_body("[[emu: hang times=1]]"), timeout=0.3)
        assert native(emu, prompt_body("[[emu: hang times=1]]")).status_code == 200
    hung = [entry for entry in emu.ledger if entry["fault"] == "hang"]
    assert len(hung) == 1 and hung[0]["status"] == 0


def test_stream_faults_cut_the_stream_midway(emu: Any) -> None:
    response = native(emu, prompt_body("[[emu: fail=DataInspectionFailed midstream]]"), stream=True)
    events = sse_events(response.text)
    assert [e["event"] for e in events[:-1]] == ["result"] * (len(events) - 1)
    assert events[-1]["event"] == "error" and events[-1]["status"] == "400"
    assert events[-1]["id"] == str(len(events))
    with pytest.raises(httpx.RemoteProtocolError):
        native(emu, prompt_body("[[emu: truncated]]"), stream=True)


def test_compatible_endpoint_obeys_directives(emu: Any) -> None:
    body = {"model": "qwen-turbo", "messages": [{"role": "user", "content": "x [[emu: fail=Throttling.AllocationQuota times=1]]"}]}
    first = compatible(emu, body)
    assert first.status_code == 429 and first.json()["error"]["code"] == "insufficient_quota"
    assert compatible(emu, body).status_code == 200


def test_length_forces_the_reply_length_and_max_tokens_still_cuts(emu: Any) -> None:
    body = native(emu, prompt_body("story [[emu: length=300]]")).json()
    assert body["usage"]["output_tokens"] == 300 and body["output"]["finish_reason"] == "stop"
    cut = native(emu, prompt_body("story [[emu: length=300]]", max_tokens=5)).json()
    assert cut["usage"]["output_tokens"] == 5 and cut["output"]["finish_reason"] == "length"


def test_a_directive_that_cannot_be_read_is_a_400(emu: Any) -> None:
    response = native(emu, prompt_body("[[emu: explode]]"))
    assert response.status_code == 400 and "explode" in response.json()["message"]


def test_directives_can_be_turned_off(start_emulator: Any) -> None:
    emu = start_emulator(directives=False)
    assert native(emu, prompt_body("[[emu: always=InternalError]]")).status_code == 200


def test_directive_parsing() -> None:
    assert parse_directive(" fail=Throttling.RateQuota times=2").times == 2
    assert parse_directive("always=X").times is None
    script = read_script(["a [[emu: latency=0.5 times=1]] b [[emu: hang times=1]] [[emu: reset]]"])
    assert script.latency(1) == 0.5 and script.latency(2) == 0
    assert script.fault(1).kind == "hang" and script.fault(2).kind == "reset"
    with pytest.raises(DirectiveError):
        parse_directive("length=many")


def test_random_faults_are_a_pure_function_of_seed_body_and_attempt() -> None:
    rates = FaultRates(rate_quota=0.2, internal_error=0.2, reset=0.2)
    script = read_script([])
    draws = [decide(script, rates, 7, f"{i:064x}", attempt) for i in range(200) for attempt in (1, 2)]
    again = [decide(script, rates, 7, f"{i:064x}", attempt) for i in range(200) for attempt in (1, 2)]
    other_seed = [decide(script, rates, 8, f"{i:064x}", attempt) for i in range(200) for attempt in (1, 2)]
    assert draws == again and draws != other_seed
    share = sum(d is not None for d in draws) / len(draws)
    assert 0.45 < share < 0.75


def test_random_faults_reach_the_wire_reproducibly(start_emulator: Any) -> None:
    config = dict(fault_seed=3, faults=FaultRates(rate_quota=0.3, unavailable=0.3))
    first, second = start_emulator(**config), start_emulator(**config)
    bodies = [prompt_body(f"row {i}") for i in range(20)]
    statuses = [[native(emu, b).status_code for b in bodies] for emu in (first, second)]
    assert statuses[0] == statuses[1]
    assert {429, 503, 200} <= set(statuses[0])
    assert first.ledger[0]["fault"] in (None, "Throttling.RateQuota", "ModelUnavailable")


def test_fault_probabilities_must_be_valid() -> None:
    with pytest.raises(ValueError):
        FaultRates(reset=0.7, hang=0.7)
    with pytest.raises(ValueError):
        FaultRates(reset=-0.1)


def test_retry_after_is_sent_only_when_configured(start_emulator: Any, emu: Any) -> None:
    body = prompt_body("[[emu: always=Throttling.BurstRate]]")
    assert "Retry-After" not in native(emu, body).headers
    assert native(start_emulator(retry_after=2), body).headers["Retry-After"] == "2"


def test_window_limiter_counts_requests_and_tokens_over_a_sliding_window() -> None:
    now = [0.0]
    limiter = WindowLimiter(rpm=2, tpm=100, window_s=10, clock=lambda: now[0])
    assert limiter.admit("m", 10) is None and limiter.admit("m", 10) is None
    assert limiter.admit("m", 10) == "Throttling.RateQuota"
    assert limiter.admit("other", 10) is None  # limits are per model
    now[0] = 10.0
    assert limiter.admit("m", 90) is None
    assert limiter.admit("m", 20) == "Throttling.AllocationQuota"
    now[0] = 20.0
    assert limiter.admit("m", 100) is None


@pytest.mark.serial  # a wall-clock window: run alone (pyproject's `serial` marker)
def test_rpm_limit_answers_429_rate_quota_until_the_window_passes(start_emulator: Any) -> None:
    emu = start_emulator(rpm_limit=2, rate_window_s=0.2)
    statuses = [native(emu, prompt_body(f"r{i}")).status_code for i in range(3)]
    assert statuses == [200, 200, 429]
    assert emu.ledger[-1]["code"] == "Throttling.RateQuota"
    deadline = time.monotonic() + 3
    while native(emu, prompt_body("later")).status_code == 429:
        assert time.monotonic() < deadline


def test_tpm_limit_answers_429_allocation_quota(start_emulator: Any) -> None:
    emu = start_emulator(tpm_limit=150)
    first = native(emu, prompt_body("a [[emu: length=100]]"))
    second = native(emu, prompt_body("b [[emu: length=100]]"))
    assert first.status_code == 200
    assert (second.status_code, second.json()["code"]) == (429, "Throttling.AllocationQuota")


def test_latency_delays_the_answer(start_emulator: Any) -> None:
    emu = start_emulator(latency_s=0.2)
    started = time.monotonic()
    native(emu, prompt_body())
    assert time.monotonic() - started >= 0.2


@pytest.mark.serial  # a wall-clock bound: run alone (pyproject's `serial` marker)
def test_directive_latency_applies_to_the_listed_attempts(emu: Any) -> None:
    body = prompt_body("[[emu: latency=0.3 times=1]]")
    started = time.monotonic()
    native(emu, body)
    slow = time.monotonic() - started
    started = time.monotonic()
    native(emu, body)
    assert slow >= 0.3 and time.monotonic() - started < 0.3


@pytest.mark.anyio
async def test_open_emulator_shuts_down_promptly_with_a_hung_request() -> None:
    started = time.monotonic()
    async with open_emulator(EmulatorConfig()) as emu:
        async with httpx.AsyncClient() as client:
            async with anyio.create_task_group() as group:
                async def hang() -> None:
                    await client.post(emu.base_url + NATIVE_PATH, json=prompt_body("[[emu: hang]]"),
                                      headers={"Authorization": f"Bearer {emu.api_key}"}, timeout=30)

                group.start_soon(hang)
                with anyio.fail_after(5):  # bounded wait for the server to hold the request
                    while emu.stats()["in_flight"] == 0:
                        await anyio.sleep(0.01)
                group.cancel_scope.cancel()
    assert time.monotonic() - started < 5
    assert emu.ledger[-1]["fault"] == "hang"


def test_other_clients_of_the_account_use_the_same_window() -> None:
    """Another client at 1 request/s from 0 to 5 s fills 5 of 6 slots of a 10 s window."""
    now = [0.0]
    limiter = WindowLimiter(rpm=6, tpm=None, window_s=10, clock=lambda: now[0], other_load=(1.0, 0.0, 5.0))
    assert limiter.admit("m", 1) is None  # t=0: the other client's first request, then ours
    now[0] = 5.0
    assert limiter.admit("m", 1) == "Throttling.RateQuota"  # 6 others + ours = full
    assert limiter.other_admitted == 5
    now[0] = 10.5  # the other client stopped at 5 s; its first requests left the window
    assert limiter.admit("m", 1) is None
    assert limiter.other_admitted == 5


def test_an_outage_answers_every_request_503_for_its_span(start_emulator: Any) -> None:
    emu = start_emulator(outages=((0.3, 0.8),))
    started = time.monotonic()
    assert native(emu, prompt_body("first")).status_code == 200  # starts the outage clock
    first_done = time.monotonic() - started  # the clock started between 0 and this
    statuses: list[tuple[float, int]] = []
    while time.monotonic() < started + 3 and not (statuses and statuses[-1][1] == 200 and 503 in dict(statuses).values()):
        response = native(emu, prompt_body(f"poll {len(statuses)}"))
        statuses.append((time.monotonic() - started, response.status_code))
    failed = [t for t, status in statuses if status == 503]
    assert failed and statuses[-1][1] == 200
    assert min(failed) >= 0.3 and max(failed) <= first_done + 0.8 + 0.2  # the span, plus one request's time
    codes = [status for _, status in statuses]
    first, last = codes.index(503), len(codes) - 1 - codes[::-1].index(503)
    assert set(codes[first:last + 1]) == {503}  # one unbroken span
    assert "ModelUnavailable" in {entry["fault"] for entry in emu.ledger}


def test_outage_and_other_load_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        EmulatorConfig(outages=((2.0, 1.0),))
    with pytest.raises(ValueError):
        EmulatorConfig(other_load=(0.0, 1.0, 2.0))
