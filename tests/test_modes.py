"""The mode decision: streamed or not, thinking or not, which path, and the reasoning worst case."""

from __future__ import annotations

import dataclasses

import pytest

from qwen_batch.catalog import ModelInfo
from qwen_batch.errors import SpecError
from qwen_batch.modes import Mode, resolve_mode

BASE = ModelInfo("m", context_tokens=None, max_input_tokens=None, max_output_tokens=None, default_max_tokens=None)
QWQ = dataclasses.replace(BASE, thinking="only", stream_only=True, thinking_needs_stream=True, max_thinking_tokens=32768)
QWEN3_OPEN = dataclasses.replace(
    BASE, thinking="hybrid", thinking_default=True, thinking_needs_stream=True, max_thinking_tokens=38912
)
QWEN35 = dataclasses.replace(
    BASE, thinking="hybrid", thinking_default=True, native_path="multimodal", max_thinking_tokens=81920
)


def test_a_model_without_thinking_is_sent_whole_on_its_path() -> None:
    assert resolve_mode("job.yaml", "m", BASE) == Mode(False, False, "text", True, 0)


def test_a_stream_only_model_streams_and_reserves_its_longest_thought() -> None:
    assert resolve_mode("job.yaml", "qwq-plus", QWQ) == Mode(True, True, "text", True, 32768)


def test_a_hybrid_model_thinks_by_default_and_streams_because_it_must() -> None:
    assert resolve_mode("job.yaml", "qwen3-32b", QWEN3_OPEN, thinking_budget=100) == Mode(True, True, "text", True, 100)


def test_thinking_off_on_a_hybrid_model_needs_no_stream() -> None:
    assert resolve_mode("job.yaml", "qwen3-32b", QWEN3_OPEN, enable_thinking=False) == Mode(False, False, "text", True, 0)


def test_auto_streams_every_thinking_request_even_where_the_service_would_answer_whole() -> None:
    assert resolve_mode("job.yaml", "qwen3.5-plus", QWEN35) == Mode(True, True, "multimodal", True, 81920)


def test_a_thinking_model_may_still_be_asked_whole_where_the_service_allows_it() -> None:
    assert resolve_mode("job.yaml", "qwen3.5-plus", QWEN35, stream=False) == Mode(False, True, "multimodal", True, 81920)


def test_a_local_server_may_be_asked_whole_for_what_dashscope_only_streams() -> None:
    """vLLM serves Qwen3's thought in a whole reply; DashScope's stream-only rule is the service's own."""
    with pytest.raises(SpecError, match="thinks only when streamed"):
        resolve_mode("job.yaml", "qwen3-32b", QWEN3_OPEN, stream=False)
    assert resolve_mode("job.yaml", "qwen3-32b", QWEN3_OPEN, stream=False, service_rules=False) == Mode(
        False, True, "text", True, 38912
    )
    assert resolve_mode("job.yaml", "qwq-plus", QWQ, stream=False, service_rules=False).stream is False


def test_an_unknown_model_goes_on_the_text_path_unless_told_and_may_switch() -> None:
    assert resolve_mode("job.yaml", "x", None) == Mode(False, False, "text", False, 0)
    assert resolve_mode("job.yaml", "x", None, endpoint="multimodal").path_known


@pytest.mark.parametrize(
    ("info", "settings", "key"),
    [
        (QWQ, {"stream": False}, "parameters.stream"),
        (QWEN3_OPEN, {"stream": False}, "parameters.stream"),
        (BASE, {"enable_thinking": True}, "parameters.enable_thinking"),
        (QWQ, {"enable_thinking": False}, "parameters.enable_thinking"),
        (QWEN3_OPEN, {"enable_thinking": False, "thinking_budget": 10}, "parameters.thinking_budget"),
        (QWEN3_OPEN, {"thinking_budget": 40000}, "parameters.thinking_budget"),
        (None, {"enable_thinking": True}, "parameters.thinking_budget"),
    ],
)
def test_a_combination_every_request_would_fail_is_refused_naming_its_key(
    info: ModelInfo | None, settings: dict[str, object], key: str
) -> None:
    with pytest.raises(SpecError) as refused:
        resolve_mode("job.yaml", "m", info, **settings)  # type: ignore[arg-type]
    assert str(refused.value).startswith(f"job.yaml: {key}: ")
