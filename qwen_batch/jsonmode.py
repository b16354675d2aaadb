"""A job's JSON mode (``parameters.response_format``): whether it asks for JSON, and what
DashScope refuses before anything is sent (research-wave2 B.1).

Apart from ``structured.py`` (the answers' parsing, which the spec's check of a schema uses)
because these read the spec and the plan.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .structured import JSON_MODES, JSON_WORD_MISSING, JsonMode, has_json_word

if TYPE_CHECKING:
    from .plan import JobPlan
    from .spec import JobSpec


def asks_json(spec: JobSpec) -> bool:
    """Whether ``spec``'s requests ask for JSON (``json_object`` or ``json_schema``)."""
    fmt = spec.parameters.response_format
    return fmt is not None and fmt.type in JSON_MODES


def json_mode_of(spec: JobSpec, *, emulate: bool = False) -> JsonMode | None:
    """The JSON mode of ``spec``'s requests, or None when it asks for text (the usual case)."""
    from .servers import format_tokens

    fmt = spec.parameters.response_format
    if fmt is None or fmt.type not in JSON_MODES:
        return None
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
    return JsonMode(
        fmt.type, schema, retries=spec.output.json_retries, protocol=spec.api.protocol,
        format_tokens=format_tokens(spec, emulate=emulate),
    )


def refusal(plan: JobPlan, *, server: str | None = None) -> str | None:
    """Why DashScope would refuse every request of ``plan``'s JSON mode, or None.

    Only DashScope refuses (B.1), so only a job that speaks to it is checked: the native
    protocol, or ``openai`` with ``server`` (the decided one) or the spec's ``api.server``
    DashScope's. A json mode with thinking is refused whole; ``json_object`` is refused when
    no row's messages hold "json" (a row without it, in a job where others have it, is that
    row's error: ``work.py``).
    """
    spec = plan.spec
    fmt = spec.parameters.response_format
    if fmt is None or not asks_json(spec) or not speaks_dashscope(spec, server, emulate=plan.options.emulate):
        return None
    if plan.mode.thinking:
        return (
            f"{spec.where}: parameters.response_format: DashScope refuses a json mode with thinking "
            "(Json mode response is not supported when enable_thinking is true); set "
            "parameters.enable_thinking: false, or remove response_format"
        )
    if fmt.type == "json_object" and not any(has_json_word(r.messages) for r in plan.requests()):
        return (
            f"{spec.where}: parameters.response_format: json_object needs the word 'json' in the messages "
            f"and no row has it (DashScope: {JSON_WORD_MISSING}); say 'Answer in JSON' in prompt.system "
            "or the template"
        )
    return None


def speaks_dashscope(spec: JobSpec, server: str | None = None, *, emulate: bool = False) -> bool:
    """Whether the job talks to DashScope (native, or its compatible mode), as far as known now:
    the ``server`` decided at start, else what the spec and base URL say
    (``servers.dashscope_rules_bind``)."""
    if server is not None:
        return spec.api.protocol == "dashscope" or server == "dashscope"
    from .servers import dashscope_rules_bind

    return dashscope_rules_bind(spec, emulate=emulate)


def refuses_rows(spec: JobSpec, *, emulate: bool = False) -> bool:
    """Whether rows whose messages lack "json" are refused (``json_object`` on DashScope)."""
    fmt = spec.parameters.response_format
    return fmt is not None and fmt.type == "json_object" and speaks_dashscope(spec, emulate=emulate)
