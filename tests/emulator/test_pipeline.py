"""Both dialects run the one request pipeline: the same faults, limits and ledger lines on either endpoint.

Each case runs once per dialect; only the wire encoding (body shape, SSE framing, error
body) differs, so a case asserts the dialect's own error code through ``Dialect.code``
and everything else (status, Retry-After, ledger line, billing) the same way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from emu_helpers import compatible, native, prompt_body
from qwen_batch.emulator import FaultRates, RunningEmulator
from qwen_batch.wire import ERRORS


@dataclass(frozen=True)
class Dialect:
    """How a test speaks one dialect: send a prompt, read an error code, parse a stream."""

    name: str

    def send(self, emu: RunningEmulator, text: str, *, stream: bool = False, **parameters: Any) -> httpx.Response:
        """POST one prompt; returns once its ledger line is written too.

        A stream (or a dropped connection) ends on the wire before the handler returns and
        writes the line, so the test waits for the line, bounded, instead of racing it.
        """
        ledger = emu.emulator.ledger
        expected = len(ledger) + 1
        try:
            if self.name == "native":
                return native(emu, prompt_body(text, **parameters), stream=stream)
            body = {"model": "qwen-turbo", "messages": [{"role": "user", "content": text}], **parameters}
            if stream:
                body["stream"] = True
            return compatible(emu, body)
        finally:
            assert ledger.wait_for_entries(expected, timeout=5)

    def code(self, response: httpx.Response) -> str:
        """The error code as this dialect spells it on the wire."""
        body = response.json()
        return body["code"] if self.name == "native" else body["error"]["code"]

    def expected_code(self, code: str) -> str:
        return code if self.name == "native" else ERRORS[code].compatible_code

    def stream_datas(self, response: httpx.Response) -> list[str]:
        """The ``data`` payloads of a streamed answer, in order."""
        prefix = "data:" if self.name == "native" else "data: "
        return [line[len(prefix):] for line in response.text.split("\n") if line.startswith(prefix)]


@pytest.fixture(params=["native", "compatible"])
def dialect(request: pytest.FixtureRequest) -> Dialect:
    return Dialect(request.param)


def _line(emu: RunningEmulator) -> dict[str, Any]:
    return emu.ledger[-1]


def test_a_scripted_error_fails_the_listed_attempts_then_bills_the_retry(emu: RunningEmulator, dialect: Dialect) -> None:
    text = "row [[emu: fail=InternalError times=1]]"
    first = dialect.send(emu, text)
    assert (first.status_code, dialect.code(first)) == (500, dialect.expected_code("InternalError"))
    failed = _line(emu)
    assert (failed["endpoint"], failed["status"], failed["code"], failed["fault"]) == (dialect.name, 500, "InternalError", "InternalError")
    assert dialect.send(emu, text).status_code == 200
    retried = _line(emu)
    assert retried["body_sha256"] == failed["body_sha256"]  # the same body: attempt 2
    assert (retried["status"], retried["fault"], emu.stats()["billable"]) == (200, None, 1)


def test_a_random_fault_comes_from_the_seed_with_retry_after(start_emulator: Any, dialect: Dialect) -> None:
    emu = start_emulator(faults=FaultRates(rate_quota=1.0), retry_after=3)
    response = dialect.send(emu, "any row")
    assert (response.status_code, dialect.code(response)) == (429, dialect.expected_code("Throttling.RateQuota"))
    assert response.headers["Retry-After"] == "3"
    assert (_line(emu)["fault"], emu.stats()["billable"]) == ("Throttling.RateQuota", 0)


def test_the_rpm_limit_refuses_the_request_over_it(start_emulator: Any, dialect: Dialect) -> None:
    emu = start_emulator(rpm_limit=2, rate_window_s=600, retry_after=1.5)
    statuses = [dialect.send(emu, f"row {i}").status_code for i in range(2)]
    refused = dialect.send(emu, "row 2")
    assert statuses == [200, 200]
    assert (refused.status_code, dialect.code(refused)) == (429, dialect.expected_code("Throttling.RateQuota"))
    assert refused.headers["Retry-After"] == "1.5"
    line = _line(emu)
    assert (line["status"], line["code"], line["fault"]) == (429, "Throttling.RateQuota", None)
    assert emu.stats()["billable"] == 2


def test_the_tpm_limit_counts_input_and_output_tokens(start_emulator: Any, dialect: Dialect) -> None:
    emu = start_emulator(tpm_limit=150, rate_window_s=600)
    assert dialect.send(emu, "a [[emu: length=100]]").status_code == 200
    refused = dialect.send(emu, "b [[emu: length=100]]")
    assert (refused.status_code, dialect.code(refused)) == (429, dialect.expected_code("Throttling.AllocationQuota"))
    assert "Retry-After" not in refused.headers  # none unless configured, as the real service


def test_an_injected_fault_comes_before_the_limit_and_does_not_count(start_emulator: Any, dialect: Dialect) -> None:
    emu = start_emulator(rpm_limit=1, rate_window_s=600)
    assert dialect.send(emu, "x [[emu: fail=ModelUnavailable times=1]]").status_code == 503
    assert dialect.send(emu, "the one admitted").status_code == 200
    assert dialect.send(emu, "over the limit").status_code == 429


def test_a_midstream_error_cuts_the_stream_after_half_and_is_not_billed(emu: RunningEmulator, dialect: Dialect) -> None:
    response = dialect.send(emu, "story [[emu: length=60]] [[emu: fail=DataInspectionFailed midstream]]", stream=True)
    assert response.status_code == 200  # the error arrives inside the stream
    last = json.loads(dialect.stream_datas(response)[-1])
    error = last if dialect.name == "native" else last["error"]
    assert error["code"] == dialect.expected_code("DataInspectionFailed")
    assert error["message"] == "Output data may contain inappropriate content."
    line = _line(emu)
    assert (line["stream"], line["status"], line["code"], line["output_tokens"]) == (True, 400, "DataInspectionFailed", 0)
    assert emu.stats()["billable"] == 0


def test_a_whole_stream_bills_what_it_sent(emu: RunningEmulator, dialect: Dialect) -> None:
    response = dialect.send(emu, "story [[emu: length=30]]", stream=True)
    assert response.status_code == 200
    line = _line(emu)
    assert (line["stream"], line["status"], line["output_tokens"]) == (True, 200, 30)
    assert emu.stats()["billable"] == 1


def test_a_malformed_answer_is_a_200_recorded_as_unusable(emu: RunningEmulator, dialect: Dialect) -> None:
    response = dialect.send(emu, "[[emu: malformed]]")
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()
    line = _line(emu)
    assert (line["status"], line["fault"], line["output_tokens"], emu.stats()["billable"]) == (0, "malformed", 0, 0)


@pytest.mark.parametrize("fault", ["reset", "truncated"])
def test_a_dropped_connection_gives_no_answer_and_no_bill(emu: RunningEmulator, dialect: Dialect, fault: str) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        dialect.send(emu, f"[[emu: {fault} times=1]]")
    line = _line(emu)
    assert (line["status"], line["fault"], emu.stats()["billable"]) == (0, fault, 0)
    assert dialect.send(emu, f"[[emu: {fault} times=1]]").status_code == 200


@pytest.mark.serial  # a wall-clock window: run alone (pyproject's `serial` marker)
def test_directive_latency_delays_only_the_listed_attempt(emu: RunningEmulator, dialect: Dialect) -> None:
    started = time.monotonic()
    dialect.send(emu, "[[emu: latency=0.3 times=1]]")
    slow = time.monotonic() - started
    started = time.monotonic()
    dialect.send(emu, "[[emu: latency=0.3 times=1]]")
    assert slow >= 0.3 and time.monotonic() - started < 0.3


def test_an_unreadable_directive_is_a_400_naming_it(emu: RunningEmulator, dialect: Dialect) -> None:
    response = dialect.send(emu, "[[emu: explode]]")
    assert (response.status_code, dialect.code(response)) == (400, dialect.expected_code("InvalidParameter"))
    assert "explode" in json.dumps(response.json())
    assert _line(emu)["code"] == "InvalidParameter"


def test_a_wrong_key_is_a_401_recorded_before_the_body_is_read(emu: RunningEmulator, dialect: Dialect) -> None:
    body: dict[str, Any] = prompt_body() if dialect.name == "native" else {
        "model": "qwen-turbo", "messages": [{"role": "user", "content": "hi"}]}
    send = native if dialect.name == "native" else compatible
    response = send(emu, body, key="sk-wrong")
    assert (response.status_code, dialect.code(response)) == (401, dialect.expected_code("InvalidApiKey"))
    assert (_line(emu)["status"], _line(emu)["code"], _line(emu)["model"]) == (401, "InvalidApiKey", None)


def test_both_dialects_generate_the_same_reply_and_usage(emu: RunningEmulator) -> None:
    whole = Dialect("native").send(emu, "Hello there", seed=4, result_format="message").json()
    other = Dialect("compatible").send(emu, "Hello there", seed=4).json()
    assert whole["output"]["choices"][0]["message"]["content"] == other["choices"][0]["message"]["content"]
    assert whole["usage"]["output_tokens"] == other["usage"]["completion_tokens"]
    native_line, compatible_line = emu.ledger
    assert (native_line["input_tokens"], native_line["output_tokens"]) == (
        compatible_line["input_tokens"], compatible_line["output_tokens"])
