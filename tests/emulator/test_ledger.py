"""The billing ledger and the stats endpoints."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import httpx

from emu_helpers import native, prompt_body
from qwen_batch.emulator.ledger import LEDGER_KEYS


def test_every_request_is_one_ledger_line_with_all_keys(emu: Any) -> None:
    body = json.dumps(prompt_body(seed=11)).encode()
    ok = native(emu, body)
    native(emu, prompt_body(), key="sk-wrong")
    first, second = emu.ledger
    assert tuple(first) == LEDGER_KEYS
    assert first["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert (first["endpoint"], first["model"], first["seed"], first["stream"], first["status"], first["code"]) == (
        "native", "qwen-turbo", 11, False, 200, None)
    assert first["request_id"] == ok.json()["request_id"]
    assert first["output_tokens"] == ok.json()["usage"]["output_tokens"]
    assert (second["status"], second["code"]) == (401, "InvalidApiKey")


def test_stats_count_statuses_billable_requests_and_tokens(emu: Any) -> None:
    a = native(emu, prompt_body("one")).json()
    b = native(emu, prompt_body("two"), stream=True)
    native(emu, prompt_body(top_p=5))
    stats = httpx.get(emu.root_url + "/emulator/stats").json()
    assert stats == emu.stats()
    assert stats["requests"] == 3 and stats["by_status"] == {"200": 2, "400": 1}
    assert stats["billable"] == 2
    streamed = json.loads(b.text.strip().split("\n")[-1][5:])
    assert stats["output_tokens"] == a["usage"]["output_tokens"] + streamed["usage"]["output_tokens"]
    assert stats["in_flight"] == 0 and stats["peak_in_flight"] >= 1


def test_the_ledger_endpoint_returns_json_lines(emu: Any) -> None:
    native(emu, prompt_body())
    lines = httpx.get(emu.root_url + "/emulator/ledger").text.splitlines()
    assert [json.loads(line) for line in lines] == emu.ledger


def test_the_ledger_file_gets_the_same_lines(start_emulator: Any, tmp_path: Any) -> None:
    path = tmp_path / "sub" / "ledger.jsonl"
    emu = start_emulator(ledger_path=path)
    native(emu, prompt_body())
    native(emu, prompt_body("[[emu: malformed]]"))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == emu.ledger
    assert lines[1]["status"] == 0 and lines[1]["fault"] == "malformed"


def test_peak_in_flight_sees_concurrent_requests(start_emulator: Any) -> None:
    import concurrent.futures

    emu = start_emulator(latency_s=0.3)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: native(emu, prompt_body(f"c{i}")), range(4)))
    assert emu.stats()["peak_in_flight"] == 4


def test_received_keeps_every_generation_body_in_order(emu: Any) -> None:
    native(emu, prompt_body("first"))
    native(emu, prompt_body("second"), key="sk-wrong")
    assert [b["input"]["messages"][0]["content"] for b in emu.received] == ["first"]


def test_wait_for_request_returns_when_the_next_line_is_recorded(emu: Any) -> None:
    import threading

    sender = threading.Thread(target=lambda: native(emu, prompt_body()))
    waiting_from = len(emu.ledger)
    sender.start()
    emu.emulator.ledger.wait_for_entries(waiting_from + 1, timeout=5)
    sender.join(5)
    assert len(emu.ledger) == waiting_from + 1
    assert emu.wait_for_request(timeout=0.05) is False


def test_a_path_the_service_lacks_is_a_404_with_a_ledger_line(emu: Any) -> None:
    """A wrong base URL must show in what was sent; the real routes are untouched."""
    body = json.dumps(prompt_body()).encode()
    response = httpx.post(emu.root_url + "/wrong/api/v1/services/aigc/text-generation/generation", content=body)
    assert (response.status_code, response.text) == (404, "404: Not Found")
    assert httpx.get(emu.root_url + "/nowhere").status_code == 404
    assert native(emu, prompt_body()).status_code == 200
    assert httpx.get(emu.root_url + "/emulator/stats").status_code == 200
    (line, elsewhere, ok) = emu.ledger
    assert (line["endpoint"], line["status"], line["body_sha256"]) == ("not-found", 404, hashlib.sha256(body).hexdigest())
    assert (elsewhere["endpoint"], elsewhere["status"]) == ("not-found", 404)
    assert ok["endpoint"] == "native"
    assert emu.stats()["billable"] == 1
