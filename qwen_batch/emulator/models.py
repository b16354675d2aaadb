"""How each model behaves on the emulated service: thinking, streaming rules and native path.

This is the emulator's own table, taken from the protocol references (never from the
client's catalog): shared/dashscope-protocol.md sections 1.1, 1.3, 8 ("PROTO §n") and
shared/research-wave2.md section A ("WAVE2 A.n"). Each entry names its source; a figure the
references do not give is marked UNCONFIRMED and is the emulator's choice.

``MODELS`` also gives the limits of the models the built-in catalog does not know (the
current families), so a job naming them is served; they override the catalog's entries of
the same name, so the emulator behaves the same whatever the client's catalog says.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ..catalog import ModelInfo

ThinkingMode = Literal["none", "hybrid", "only"]
NativePath = Literal["text", "multimodal"]

QWQ_STREAM_ONLY = "This model only support stream mode, please enable the stream parameter to access the model. "
THINKING_NEEDS_STREAM = "parameter.enable_thinking must be set to false for non-streaming calls"


@dataclass(frozen=True, slots=True)
class Behaviour:
    """One model's behaviour.

    thinking: "none" (no thinking; ``enable_thinking: true`` is refused), "hybrid" (a switch)
      or "only" (always thinks).
    thinking_default: whether it thinks when ``enable_thinking`` is not sent.
    thinking_stream_only: a non-streaming call that thinks is refused with ``stream_only_message``.
    stream_only_message: the refusal's text (None: the model answers without a stream).
    incremental_default: ``incremental_output`` when not sent; ``incremental_locked``: false is refused.
    max_thinking_tokens: the largest ``thinking_budget`` (and the default budget).
    """

    thinking: ThinkingMode
    thinking_default: bool
    path: NativePath
    source: str
    thinking_stream_only: bool = False
    stream_only_message: str | None = None
    incremental_default: bool = False
    incremental_locked: bool = False
    max_thinking_tokens: int | None = None

    def thinks(self, enable_thinking: bool | None) -> bool:
        """Whether a request with this ``enable_thinking`` (None: not sent) thinks."""
        if self.thinking == "only":
            return True  # a thinking-only model ignores false (UNCONFIRMED: no capture either way)
        if self.thinking == "none":
            return False
        return self.thinking_default if enable_thinking is None else enable_thinking


# Classic models with no thinking, on the text path: what every model not listed here does.
CLASSIC = Behaviour("none", False, "text", "PROTO §1.1, §1.3 (classic text models)")

_COMMERCIAL_HYBRID = Behaviour(
    "hybrid", False, "text",
    "WAVE2 A.1 (Qwen3 commercial hybrid: default false; 'Qwen3商业版（思考模式）…只支持流式输出' per the API ref, "
    "the FAQ says otherwise: UNCONFIRMED, the emulator follows the API ref); max thinking length UNCONFIRMED",
    thinking_stream_only=True, stream_only_message=THINKING_NEEDS_STREAM, max_thinking_tokens=38912,
)


def _streamed_thinker(thinking: ThinkingMode, path: NativePath, source: str, message: str, max_thinking: int) -> Behaviour:
    """A model that thinks by default and only streams while it does, with ``incremental_output`` locked on."""
    return Behaviour(thinking, True, path, source, thinking_stream_only=True, stream_only_message=message,
                     incremental_default=True, incremental_locked=True, max_thinking_tokens=max_thinking)


_QWEN3_OPEN = _streamed_thinker(
    "hybrid", "text",
    "WAVE2 A.1 (Qwen3 open: default true, stream only while thinking, the 400 text of langchain4j#3974); "
    "PROTO §1.3 (incremental_output default true, false refused); max thinking length UNCONFIRMED",
    THINKING_NEEDS_STREAM, 38912,
)
_QWEN3_THINKING_2507 = _streamed_thinker(
    "only", "text",
    "WAVE2 A.1 (Qwen3 -thinking-2507: thinking only; stream only UNCONFIRMED for DashScope, so the QwQ text "
    "is used, UNCONFIRMED); max thinking length UNCONFIRMED",
    QWQ_STREAM_ONLY, 81920,
)
_QWEN3_INSTRUCT_2507 = Behaviour(
    "none", False, "text", "WAVE2 A.1 (Qwen3 -instruct-2507: 'does not support enable_thinking')",
    incremental_default=True, incremental_locked=True,
)
_QWQ = _streamed_thinker(
    "only", "text",
    "WAVE2 A.1 (QwQ: thinking only, every non-streaming call refused, ragflow#5912 text with its trailing space; "
    "native shape UNCONFIRMED); PROTO §1.3 (incremental_output locked); max thinking length UNCONFIRMED",
    QWQ_STREAM_ONLY, 32768,
)
_QVQ = _streamed_thinker(
    "only", "multimodal",
    "WAVE2 A.1 (QVQ: thinking only, stream only, multimodal path; refusal text UNCONFIRMED, QwQ's used); "
    "PROTO §1.3 (incremental_output locked); max thinking length UNCONFIRMED",
    QWQ_STREAM_ONLY, 16384,
)
_QWEN35_PLUS = Behaviour(
    "hybrid", True, "multimodal",
    "WAVE2 §1 and A.1 (Qwen3.5-3.8: multimodal path only, thinking on by default, streaming and non-streaming "
    "both served); incremental_output default true like Qwen3-VL (PROTO §1.3), UNCONFIRMED for 3.5+; "
    "max thinking length UNCONFIRMED (qwen3-vl-plus 80K per WAVE2 A.4)",
    incremental_default=True, max_thinking_tokens=81920,
)
_QWEN3_MAX = Behaviour(
    "none", False, "text", "WAVE2 A.1 (qwen3-max, -2025-09-23: non-thinking only); PROTO §1.3 (incremental_output locked)",
    incremental_default=True, incremental_locked=True,
)
_QWEN3_MAX_2026 = Behaviour(
    "hybrid", False, "text",
    "WAVE2 A.1 (qwen3-max-2026-01-23 adds thinking via enable_thinking, commercial: default false, stream only "
    "while thinking per the API ref, UNCONFIRMED); max thinking length UNCONFIRMED",
    thinking_stream_only=True, stream_only_message=THINKING_NEEDS_STREAM,
    incremental_default=True, incremental_locked=True, max_thinking_tokens=81920,
)

_QWEN35_NAMES = (
    "qwen3.5-plus", "qwen3.5-plus-2026-02-15", "qwen3.5-flash", "qwen3.5-flash-2026-02-23",
    "qwen3.5-397b-a17b", "qwen3.5-122b-a10b", "qwen3.5-27b", "qwen3.5-35b-a3b",
    "qwen3.6-plus", "qwen3.6-plus-2026-04-02", "qwen3.6-flash", "qwen3.6-flash-2026-04-16", "qwen3.6-35b-a3b",
    "qwen3.7-plus", "qwen3.7-plus-2026-05-26", "qwen3.7-max", "qwen3.7-flash",
    "qwen3.8-max", "qwen3.8-flash",
)
_QWEN3_OPEN_NAMES = ("qwen3-235b-a22b", "qwen3-32b", "qwen3-30b-a3b", "qwen3-14b", "qwen3-8b")

BEHAVIOURS: Mapping[str, Behaviour] = {
    **{name: _COMMERCIAL_HYBRID for name in (
        "qwen-plus", "qwen-plus-latest", "qwen-turbo", "qwen-turbo-latest", "qwen-flash")},
    **{name: _QWEN3_OPEN for name in _QWEN3_OPEN_NAMES},
    "qwen3-235b-a22b-thinking-2507": _QWEN3_THINKING_2507,
    "qwen3-30b-a3b-thinking-2507": _QWEN3_THINKING_2507,
    "qwen3-235b-a22b-instruct-2507": _QWEN3_INSTRUCT_2507,
    "qwen3-30b-a3b-instruct-2507": _QWEN3_INSTRUCT_2507,
    "qwq-plus": _QWQ,
    "qwq-32b": _QWQ,
    "qvq-max": _QVQ,
    "qvq-plus": _QVQ,
    "qwen3-max": _QWEN3_MAX,
    "qwen3-max-2025-09-23": _QWEN3_MAX,
    "qwen3-max-2026-01-23": _QWEN3_MAX_2026,
    **{name: _QWEN35_PLUS for name in _QWEN35_NAMES},
}


# Whole families (WAVE2 A.1 names them as families), for snapshots and sizes the table does not list.
_FAMILIES: tuple[tuple[str, Behaviour], ...] = (
    ("qwen3.5", _QWEN35_PLUS), ("qwen3.6", _QWEN35_PLUS), ("qwen3.7", _QWEN35_PLUS), ("qwen3.8", _QWEN35_PLUS),
    ("qvq", _QVQ), ("qwq", _QWQ),
)


def behaviour(model: str) -> Behaviour:
    """The behaviour of ``model``: its entry, else its family's; any other model is a classic text model."""
    rules = BEHAVIOURS.get(model)
    if rules is not None:
        return rules
    return next((rules for prefix, rules in _FAMILIES if model.startswith(prefix)), CLASSIC)


_LIMITS_35 = ("262,144 context per the zh Batch page ('单次请求的上下文 Token 数最大支持 256K', WAVE2 E.1); "
              "max output 65,536 UNCONFIRMED (the emulator's choice, as qwen3-max)")
_LIMITS_QWEN3_OPEN = "as qwen3-32b in PROTO §8.2 (131,072 / 8,192); UNCONFIRMED for this variant"


def _model(name: str, context: int, max_output: int, source: str) -> ModelInfo:
    return ModelInfo(name=name, context_tokens=context, max_input_tokens=context - max_output,
                     max_output_tokens=max_output, default_max_tokens=max_output,
                     default_result_format="message", limits_source=source)


# Limits of the models the built-in catalog did not have (it is read for the others).
MODELS: Mapping[str, ModelInfo] = {
    **{name: _model(name, 262144, 65536, _LIMITS_35) for name in _QWEN35_NAMES},
    **{name: _model(name, 131072, 8192, _LIMITS_QWEN3_OPEN) for name in (
        "qwen3-30b-a3b", "qwen3-14b", "qwen3-8b",
        "qwen3-235b-a22b-thinking-2507", "qwen3-30b-a3b-thinking-2507",
        "qwen3-235b-a22b-instruct-2507", "qwen3-30b-a3b-instruct-2507")},
    "qwq-32b": _model("qwq-32b", 131072, 8192, "as qwq-plus in the built-in catalog; UNCONFIRMED for qwq-32b"),
    "qvq-max": _model("qvq-max", 131072, 8192, "UNCONFIRMED (the references give no QVQ limits)"),
    "qvq-plus": _model("qvq-plus", 131072, 8192, "UNCONFIRMED (the references give no QVQ limits)"),
    "qwen3-max-2025-09-23": _model("qwen3-max-2025-09-23", 262144, 65536, "as qwen3-max, PROTO §8.2"),
    "qwen3-max-2026-01-23": _model("qwen3-max-2026-01-23", 262144, 65536, "as qwen3-max, PROTO §8.2"),
}
