"""How a job's requests are sent: streamed or not, thinking or not, on which native path.

One pure decision, made once per job from the catalog's entry for the model and the spec's
``parameters.stream``, ``parameters.enable_thinking``, ``parameters.thinking_budget`` and
``api.endpoint``. Every combination the service is known to refuse for every row (a
stream-only model with ``stream: false``, a budget without thinking, thinking on a model
that has none) is refused here, before anything is sent, as a ``SpecError`` naming the key.

For a model outside the catalog nothing is known: it is asked as the spec says, on the text
path unless ``api.endpoint`` names one, and ``path_known`` is False so the run may switch to
the other path once when the service answers "url error".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .catalog import ModelInfo, NativePath
from .errors import SpecError

if TYPE_CHECKING:
    from .spec import JobSpec

StreamSetting = Literal["auto"] | bool
EndpointSetting = Literal["auto", "text", "multimodal"]


@dataclass(frozen=True, slots=True)
class Mode:
    """The resolved way of asking: ``reasoning_cap`` is the most reasoning tokens one request
    may bill on top of its answer (0 when it does not think), the worst case that preflight,
    ``estimate`` and the budget reserve."""

    stream: bool
    thinking: bool
    path: NativePath
    path_known: bool
    reasoning_cap: int


def mode_of(spec: JobSpec, model_info: ModelInfo | None, *, service_rules: bool = True) -> Mode:
    """How ``spec``'s requests are sent; a setting every request would be refused for is a SpecError.

    ``service_rules``: whether DashScope's stream rules bind (``servers.dashscope_rules_bind``)."""
    parameters = spec.parameters
    return resolve_mode(
        spec.where,
        spec.model,
        model_info,
        stream=parameters.stream,
        enable_thinking=parameters.enable_thinking,
        thinking_budget=parameters.thinking_budget,
        endpoint=spec.api.endpoint,
        result_format=parameters.result_format,
        service_rules=service_rules,
    )


def resolve_mode(
    where: str,
    model: str,
    info: ModelInfo | None,
    *,
    stream: StreamSetting = "auto",
    enable_thinking: bool | None = None,
    thinking_budget: int | None = None,
    endpoint: EndpointSetting = "auto",
    result_format: str | None = None,
    service_rules: bool = True,
) -> Mode:
    """The Mode of a job on ``model`` (``info`` its catalog entry, None if unknown).

    ``where`` names the job file in messages; ``result_format`` is the spec's (None when unset).
    ``service_rules`` false (a local server): DashScope's stream-only rules do not bind.
    Raises SpecError for a combination that every request would be refused for.
    """
    thinking = _thinks(where, model, info, enable_thinking)
    if thinking and result_format == "text":
        raise SpecError(
            f"{where}: parameters.result_format: {model} thinks with these parameters, and the service answers "
            'thinking only in the message format (The result_format parameter must be "message" when '
            "enable_thinking is true); remove `result_format: text` or set parameters.enable_thinking: false"
        )
    if thinking_budget is not None and not thinking:
        raise SpecError(
            f"{where}: parameters.thinking_budget: {model} does not think with these parameters, so a thinking "
            "budget has no effect; remove it or set parameters.enable_thinking: true"
        )
    needs_stream = service_rules and info is not None and (info.stream_only or (thinking and info.thinking_needs_stream))
    if stream is False and needs_stream:
        why = "answers only when streamed" if info is not None and info.stream_only else "thinks only when streamed"
        raise SpecError(
            f"{where}: parameters.stream: {model} {why}; remove `stream: false` (or set parameters.enable_thinking: "
            "false where the model allows it)"
        )
    # auto streams every thinking request, not only where the service insists: a whole reply
    # is one wait for data that a long thought can stretch past request_timeout_s, while a
    # stream's events keep arriving (and first_token_s is measured).
    streamed = (needs_stream or thinking) if stream == "auto" else bool(stream)
    if endpoint == "auto":
        path: NativePath = info.native_path if info is not None else "text"
        path_known = info is not None
    else:
        path, path_known = endpoint, True
    return Mode(streamed, thinking, path, path_known, _reasoning_cap(where, model, info, thinking, thinking_budget))


def _thinks(where: str, model: str, info: ModelInfo | None, enable_thinking: bool | None) -> bool:
    if info is None:
        return bool(enable_thinking)
    if info.thinking == "none":
        if enable_thinking:
            raise SpecError(
                f"{where}: parameters.enable_thinking: {model} has no thinking mode; remove the key or pick a "
                "thinking model (`qwen-batch models` lists them)"
            )
        return False
    if info.thinking == "only":
        if enable_thinking is False:
            raise SpecError(
                f"{where}: parameters.enable_thinking: {model} always thinks and cannot turn it off; remove the key "
                "or pick a hybrid model (`qwen-batch models` lists them)"
            )
        return True
    return info.thinking_default if enable_thinking is None else enable_thinking


def _reasoning_cap(where: str, model: str, info: ModelInfo | None, thinking: bool, budget: int | None) -> int:
    if not thinking:
        return 0
    limit = info.max_thinking_tokens if info is not None else None
    if budget is not None:
        if limit is not None and budget > limit:
            raise SpecError(
                f"{where}: parameters.thinking_budget: {model} thinks at most {limit} tokens, got {budget}; "
                f"lower it to at most {limit}"
            )
        return budget
    if limit is None:
        raise SpecError(
            f"{where}: parameters.thinking_budget: the most {model} may think is unknown, so a thinking row's "
            "worst-case cost is too; set parameters.thinking_budget"
        )
    return limit
