"""Which OpenAI-compatible server the compatible endpoint imitates, and where they differ.

DashScope's compatible mode is the default; ``--server vllm|sglang|ollama|llamacpp`` imitates a
local server instead. Every difference here comes from shared/research-wave2.md D.1
("WAVE2 D.1", a reading of the vLLM 0.33.0 and SGLang 0.5.23 wheels and the Ollama and
llama.cpp docs) or shared/NOTES.md ("Local servers"); what those leave open is marked
UNCONFIRMED here and in docs/emulator.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

ServerName = Literal["dashscope", "vllm", "sglang", "ollama", "llamacpp"]
SERVER_NAMES: tuple[ServerName, ...] = ("dashscope", "vllm", "sglang", "ollama", "llamacpp")
ErrorShape = Literal["dashscope", "nested-int", "flat-int", "ollama", "llamacpp"]

# The OpenAI sampling fields every server reads (they change what the model says).
_OPENAI_SAMPLING = ("seed", "temperature", "top_p", "presence_penalty", "frequency_penalty", "n", "stop",
                    "max_tokens", "response_format")
# vLLM and SGLang also read these as extra sampling parameters (UNCONFIRMED: not in WAVE2 D.1).
_EXTRA_SAMPLING = ("top_k", "repetition_penalty")


def _template_switch(body: Mapping[str, Any]) -> bool | None:
    """``chat_template_kwargs.enable_thinking``, then ``reasoning_effort: "none"`` (vLLM
    ``chat_completion/protocol.py`` ~l.660: the kwargs win)."""
    switch = _kwargs_switch(body)
    if switch is not None:
        return switch
    return False if body.get("reasoning_effort") == "none" else None


def _effort_switch(body: Mapping[str, Any]) -> bool | None:
    """Ollama: ``reasoning_effort`` or ``reasoning.effort`` "none" turns thinking off; kwargs are ignored."""
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else body.get("reasoning_effort")
    return False if effort == "none" else None


def _kwargs_switch(body: Mapping[str, Any]) -> bool | None:
    """llama.cpp with ``--jinja``: ``chat_template_kwargs.enable_thinking`` only (WAVE2 D.1, 3P)."""
    kwargs = body.get("chat_template_kwargs")
    enable = kwargs.get("enable_thinking") if isinstance(kwargs, dict) else None
    return enable if isinstance(enable, bool) else None


@dataclass(frozen=True)
class Server:
    """One server's dialect of the compatible protocol.

    base_path: where its routes live (``{base_path}/chat/completions``, ``{base_path}/models``).
    owned_by: the ``owned_by`` of its ``GET /models`` entries (NOTES.md).
    reasoning_field: the message/delta key of the thought.
    thinking_switch: reads the thinking switch from a body (None: DashScope's top-level key).
    budget_key: the request field of the thinking budget (None: the server has none).
    sampling_keys: the body fields that change the reply (the others are ignored, as vLLM does).
    finish_reasons: what ``[[emu: finish=...]]`` may ask for.
    error_shape: how its error bodies look.
    keyless: no ``Authorization`` needed (a local server started without ``--api-key``).
    """

    name: ServerName
    base_path: str
    owned_by: str
    reasoning_field: str
    thinking_switch: Callable[[Mapping[str, Any]], bool | None] | None
    budget_key: str | None
    sampling_keys: tuple[str, ...]
    finish_reasons: frozenset[str]
    error_shape: ErrorShape
    keyless: bool
    stop_reason: bool = False

    @property
    def local(self) -> bool:
        return self.name != "dashscope"


_DASHSCOPE_SAMPLING = _OPENAI_SAMPLING + _EXTRA_SAMPLING + ("enable_search", "enable_thinking", "thinking_budget")

SERVERS: dict[ServerName, Server] = {
    # PROTO §6; owned_by is UNCONFIRMED (no capture of the listing).
    "dashscope": Server("dashscope", "/compatible-mode/v1", "system", "reasoning_content", None, "thinking_budget",
                        _DASHSCOPE_SAMPLING, frozenset({"stop", "length", "tool_calls", "content_filter"}),
                        "dashscope", keyless=False),
    "vllm": Server("vllm", "/v1", "vllm", "reasoning", _template_switch, "thinking_token_budget",
                   _OPENAI_SAMPLING + _EXTRA_SAMPLING,
                   frozenset({"stop", "length", "tool_calls", "abort", "error", "repetition"}),
                   "nested-int", keyless=True, stop_reason=True),
    "sglang": Server("sglang", "/v1", "sglang", "reasoning_content", _template_switch, None,
                     _OPENAI_SAMPLING + _EXTRA_SAMPLING, frozenset({"stop", "length", "tool_calls", "abort"}),
                     "flat-int", keyless=True),
    "ollama": Server("ollama", "/v1", "library", "reasoning", _effort_switch, None, _OPENAI_SAMPLING,
                     frozenset({"stop", "length"}), "ollama", keyless=True),
    "llamacpp": Server("llamacpp", "/v1", "llamacpp", "reasoning_content", _kwargs_switch, None, _OPENAI_SAMPLING,
                       frozenset({"stop", "length"}), "llamacpp", keyless=True),
}

# HTTP status → the error ``type`` vLLM and SGLang send (UNCONFIRMED: WAVE2 D.1 gives the shape only).
_PYTHON_TYPES = {400: "BadRequestError", 401: "UnauthorizedError", 404: "NotFoundError", 413: "BadRequestError"}


def error_body(server: Server, status: int, message: str, *, in_stream: bool = False) -> dict[str, Any]:
    """A local server's error body for ``status`` (WAVE2 D.1 "Error body": code an int, or none)."""
    shape = server.error_shape
    if shape == "ollama":
        return {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
    if shape == "llamacpp":
        kind = "server_error" if status >= 500 else ("not_found_error" if status == 404 else "invalid_request_error")
        return {"error": {"code": status, "message": message, "type": kind}}
    kind = _PYTHON_TYPES.get(status, "InternalServerError")
    if shape == "flat-int" and not in_stream:
        return {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}
