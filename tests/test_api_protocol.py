"""The ``api`` section's protocol, server and key_env settings, and where the key comes from."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen_batch.apikey import keys_to_scrub, read_api_key
from qwen_batch.endpoint import resolve_api
from qwen_batch.errors import ConfigError
from qwen_batch.spec import load_spec
from qwen_batch.wire import COMPATIBLE_BASE_URL, DEFAULT_BASE_URL

from .test_spec import spec_error, with_changes, write_job


def test_the_defaults_are_the_native_protocol_with_the_dashscope_key(tmp_path: Path) -> None:
    api = load_spec(write_job(tmp_path, with_changes({}))).api
    assert (api.protocol, api.server, api.key_env, api.base_url) == ("dashscope", "auto", "DASHSCOPE_API_KEY", DEFAULT_BASE_URL)


def test_the_openai_protocol_defaults_to_the_compatible_mode_base(tmp_path: Path) -> None:
    api = load_spec(write_job(tmp_path, with_changes({"api.protocol": "openai"}))).api
    assert api.base_url == COMPATIBLE_BASE_URL
    explicit = with_changes({"api": {"protocol": "openai", "base_url": "http://127.0.0.1:8000/v1"}})
    assert load_spec(write_job(tmp_path, explicit)).api.base_url == "http://127.0.0.1:8000/v1"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"api.protocol": "grpc"}, ["api.protocol", "'dashscope'", "'openai'"]),
        ({"api.server": "tgi"}, ["api.server", "'vllm'", "'llamacpp'"]),
        ({"api.server": "vllm"}, ["api.server", "api.protocol: openai"]),
        ({"api.key_env": "MY KEY"}, ["api.key_env"]),
        ({"api.key_env": ""}, ["api.key_env"]),
    ],
)
def test_bad_api_settings_name_the_key(tmp_path: Path, changes: dict[str, object], expected: list[str]) -> None:
    message = spec_error(tmp_path, with_changes(changes))
    for part in expected:
        assert part in message


def test_a_null_key_env_reads_no_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    monkeypatch.delenv("DASHSCOPE_HTTP_BASE_URL", raising=False)
    spec = load_spec(
        write_job(tmp_path, with_changes({"api": {"protocol": "openai", "base_url": "http://127.0.0.1:8000/v1", "key_env": None}}))
    )
    assert resolve_api(spec) == ("http://127.0.0.1:8000/v1", None)


def test_key_env_names_the_variable_and_its_key_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-the-dashscope-one")
    monkeypatch.setenv("VLLM_KEY", "token-local-server-123")
    key = read_api_key("VLLM_KEY")
    assert key.value == "token-local-server-123" and key.source == "VLLM_KEY"
    assert "token-local-server-123" in keys_to_scrub() and "sk-the-dashscope-one" in keys_to_scrub()
    assert "token-local-server-123" not in repr(key)


def test_a_missing_custom_key_says_which_variable_and_the_null_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_KEY", raising=False)
    monkeypatch.setenv("DASHSCOPE_API_KEY_FILE_PATH", "/nonexistent/key")  # only the default reads the file
    with pytest.raises(ConfigError) as caught:
        read_api_key("VLLM_KEY")
    assert "VLLM_KEY" in str(caught.value) and "api.key_env: null" in str(caught.value)


def test_the_key_file_still_works_for_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-the-file\n")
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    monkeypatch.setenv("DASHSCOPE_API_KEY_FILE_PATH", str(key_file))
    assert read_api_key().value == "sk-from-the-file"


def test_plain_http_to_a_remote_server_is_refused_on_the_openai_protocol_too(tmp_path: Path) -> None:
    message = spec_error(tmp_path, with_changes({"api": {"protocol": "openai", "base_url": "http://10.0.0.5:8000/v1"}}))
    assert "api.base_url" in message and "allow_insecure_http" in message
