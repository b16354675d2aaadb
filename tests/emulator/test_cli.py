"""The emulate command: flags map onto EmulatorConfig, and the process serves and stops."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from qwen_batch.emulator import EmulatorConfig, FaultRates
from qwen_batch.emulator.cli import add_arguments, config_from_args

REPO = Path(__file__).resolve().parents[2]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_no_flags_give_the_default_config() -> None:
    assert config_from_args(_parse()) == EmulatorConfig()


def test_every_fault_flag_reaches_the_config() -> None:
    config = config_from_args(_parse(
        "--any-key", "--p-rate-quota", "0.1", "--p-500", "0.05", "--p-hang", "0.01", "--rpm", "60", "--tpm", "1000",
        "--rate-window", "2", "--latency", "0.1", "--latency-jitter", "0.2", "--latency-per-token", "0.001",
        "--usage-mode", "raw-2024q1", "--roles", "lenient", "--stream-errors", "http200", "--retry-after", "1",
        "--fault-seed", "9", "--no-directives",
    ))
    assert config.api_key is None
    assert config.faults == FaultRates(rate_quota=0.1, internal_error=0.05, hang=0.01)
    assert (config.rpm_limit, config.tpm_limit, config.rate_window_s) == (60, 1000, 2.0)
    assert (config.latency_s, config.latency_jitter_s, config.latency_per_token_s) == (0.1, 0.2, 0.001)
    assert (config.usage_mode, config.role_rules, config.stream_error_mode) == ("raw-2024q1", "lenient", "http200")
    assert (config.retry_after, config.fault_seed, config.directives) == (1.0, 9, False)
    assert "rpm_limit=60" in repr(config) and "usage_mode" in repr(config) and "max_body_bytes" not in repr(config)


def test_python_m_emulator_prints_its_url_serves_and_stops_on_sigint() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(
        [sys.executable, "-m", "qwen_batch.emulator", "--port", "0", "--api-key", "sk-test"],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert process.stdout is not None
        url = re.search(r"http://127\.0\.0\.1:\d+", process.stdout.readline()).group(0)
        response = httpx.post(url + "/api/v1/services/aigc/text-generation/generation",
                              json={"model": "qwen-turbo", "input": {"prompt": "hi"}, "parameters": {}},
                              headers={"Authorization": "Bearer sk-test"}, timeout=5)
        assert response.status_code == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_the_thinking_length_flags_reach_the_config() -> None:
    config = config_from_args(_parse("--thinking-median-tokens", "30", "--thinking-max-tokens", "90"))
    assert (config.thinking_median_tokens, config.thinking_max_tokens) == (30, 90)


def test_the_server_flags_reach_the_config() -> None:
    config = config_from_args(_parse("--server", "vllm", "--no-usage", "--max-running", "8"))
    assert (config.server, config.send_usage, config.max_running) == ("vllm", False, 8)


def test_a_local_server_with_a_rate_limit_is_a_one_line_error_exit_2() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "qwen_batch.emulator", "--server", "vllm", "--rpm", "10"],
                            capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("error: a local server (vllm) never answers 429")
    assert result.stderr.count("\n") == 1


def test_python_m_emulator_as_vllm_prints_its_v1_base_and_needs_no_key() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "qwen_batch.emulator", "--port", "0", "--server", "vllm"],
                               stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        process.stdout.readline()
        base = re.search(r"vllm base URL: (http://127\.0\.0\.1:\d+/v1)", process.stdout.readline()).group(1)
        response = httpx.get(base + "/models", timeout=5)
        assert response.status_code == 200 and response.json()["data"][0]["owned_by"] == "vllm"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
