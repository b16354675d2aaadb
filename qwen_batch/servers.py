"""Which OpenAI-compatible server a run talks to, and where that server reads each parameter.

The servers agree on the OpenAI fields (``seed``, ``max_tokens``, ``temperature``, ``top_p``,
``presence_penalty``, ``stop``) and differ on DashScope's extensions (research-wave2 D.1):
DashScope's compatible mode reads them all at the top level; vLLM ignores a top-level
``enable_thinking`` (it only logs the extra field) and reads ``chat_template_kwargs``, and
calls the budget ``thinking_token_budget``; SGLang reads ``chat_template_kwargs``; Ollama's
``/v1`` turns thinking off only with ``reasoning_effort: "none"`` and has no ``top_k`` or
``repetition_penalty``; llama.cpp calls the penalty ``repeat_penalty``. A parameter a
server is not known to read is refused before sending, never dropped in silence.

``auto`` decides once at start: a DashScope host by its name, anything else by the
``owned_by`` of ``GET {base_url}/models`` (vLLM ``vllm``, SGLang ``sglang``, Ollama
``library``, llama.cpp ``llamacpp``; NOTES.md "Local servers").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .endpoint import configured_base_url
from .errors import ConfigError

if TYPE_CHECKING:
    from .spec import JobSpec

DASHSCOPE_DOMAIN = "aliyuncs.com"
_THINKING_SWITCH = "enable_thinking"


@dataclass(frozen=True, slots=True)
class Dialect:
    """Where one server reads each DashScope extension.

    ``renamed``: sent at the top level under the server's name; ``template_kwargs``: sent in
    ``chat_template_kwargs``; ``unsupported``: refused (the value says why); ``effort_switch``:
    thinking off is ``reasoning_effort: "none"`` (and on is the server's default). ``local``:
    a server the user runs, with no price.
    """

    server: str
    local: bool
    renamed: Mapping[str, str] = field(default_factory=dict)
    template_kwargs: frozenset[str] = frozenset()
    unsupported: Mapping[str, str] = field(default_factory=dict)
    effort_switch: bool = False

    def body_parameters(self, parameters: Mapping[str, Any], not_sent: frozenset[str]) -> dict[str, Any]:
        """The top-level body fields for ``parameters`` (DashScope's names), this server's way."""
        body: dict[str, Any] = {}
        kwargs: dict[str, Any] = {}
        for name, value in parameters.items():
            if name in not_sent:
                continue
            if name in self.template_kwargs:
                kwargs[name] = value
            elif self.effort_switch and name == _THINKING_SWITCH:
                if value is False:
                    body["reasoning_effort"] = "none"
            else:
                body[self.renamed.get(name, name)] = value
        if kwargs:
            body["chat_template_kwargs"] = kwargs
        return body

    def refused(self, parameters: Mapping[str, Any]) -> tuple[str, str] | None:
        """``(parameter, why)`` for the first set parameter this server does not read, else None."""
        for name in parameters:
            if name in self.unsupported and parameters[name] is not None:
                return name, self.unsupported[name]
        return None


_NO_SEARCH = "web search is DashScope's own"
DIALECTS: dict[str, Dialect] = {
    "dashscope": Dialect("dashscope", local=False),
    "vllm": Dialect(
        "vllm",
        local=True,
        renamed={"thinking_budget": "thinking_token_budget"},
        template_kwargs=frozenset({_THINKING_SWITCH}),
        unsupported={"enable_search": _NO_SEARCH},
    ),
    "sglang": Dialect(
        "sglang",
        local=True,
        template_kwargs=frozenset({_THINKING_SWITCH}),
        unsupported={"enable_search": _NO_SEARCH, "thinking_budget": "SGLang has no documented thinking budget"},
    ),
    "ollama": Dialect(
        "ollama",
        local=True,
        effort_switch=True,
        unsupported={
            "enable_search": _NO_SEARCH,
            "top_k": "Ollama's /v1 endpoint does not read top_k",
            "repetition_penalty": "Ollama's /v1 endpoint does not read repetition_penalty",
            "thinking_budget": "Ollama has effort levels, no thinking budget",
        },
    ),
    "llamacpp": Dialect(
        "llamacpp",
        local=True,
        renamed={"repetition_penalty": "repeat_penalty"},
        template_kwargs=frozenset({_THINKING_SWITCH}),
        unsupported={"enable_search": _NO_SEARCH, "thinking_budget": "llama-server's thinking budget is undocumented"},
    ),
}

OWNERS = {"vllm": "vllm", "sglang": "sglang", "library": "ollama", "llamacpp": "llamacpp"}
"""``owned_by`` in ``GET /models`` -> the server (NOTES.md, "Local servers")."""


def is_dashscope_host(base_url: str) -> bool:
    """Whether ``base_url`` is one of DashScope's gateways."""
    host = (urlsplit(base_url).hostname or "").rstrip(".").lower()
    return host == DASHSCOPE_DOMAIN or host.endswith("." + DASHSCOPE_DOMAIN)


def dashscope_rules_bind(spec: JobSpec, *, emulate: bool) -> bool:
    """Whether DashScope's own service rules (stream-only models, thinking only when streamed) may
    bind ``spec``'s requests: its native protocol, a server named dashscope, or ``auto`` against a
    DashScope host (``--emulate`` imitates the server the spec's own base URL names). ``auto``
    elsewhere is decided at start; a rule the server does hold then surfaces as its refusal."""
    api = spec.api
    if api.protocol != "openai" or api.server == "dashscope":
        return True
    base_url = api.base_url if emulate else configured_base_url(spec)
    return api.server == "auto" and is_dashscope_host(base_url)


def format_tokens(spec: JobSpec, *, emulate: bool) -> int:
    """Input tokens the service adds to each of ``spec``'s requests for its json mode: DashScope's
    for ``json_object`` (``tokens.JSON_OBJECT_INPUT_TOKENS``) where its rules bind, else 0."""
    from .tokens import response_format_tokens

    fmt = spec.parameters.response_format
    if fmt is None or not dashscope_rules_bind(spec, emulate=emulate):
        return 0
    return response_format_tokens(fmt.type)


def server_of_models(body: Any) -> str | None:
    """The server a ``GET /models`` body names by its first model's ``owned_by``, or None."""
    try:
        owner = body["data"][0]["owned_by"]
    except (KeyError, IndexError, TypeError):
        return None
    return OWNERS.get(owner) if isinstance(owner, str) else None


def check_dialect(where: str, server: str, parameters: Mapping[str, Any]) -> None:
    """Refuse (ConfigError, exit 2) a parameter that ``server`` is known not to read."""
    refusal = DIALECTS[server].refused(parameters)
    if refusal is not None:
        name, why = refusal
        raise ConfigError(
            f"{where}: parameters.{name}: the {server} server does not read it ({why}); "
            "remove it, or point api.base_url at a server that does"
        )


async def detect_server(base_url: str, api_key: str | None, *, timeout_s: float) -> tuple[str, str]:
    """``(server, how it was decided)``: from the host name, else from ``GET {base_url}/models``.

    A server that does not answer, or names no known owner, is spoken to in DashScope's
    dialect (the extensions at the top level), and the reason says so.
    """
    if is_dashscope_host(base_url):
        return "dashscope", f"{urlsplit(base_url).hostname} is a DashScope host"
    import httpx
    import orjson

    url = base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.get(url, headers=headers)
        body = orjson.loads(response.content) if response.status_code == 200 else None
    except (httpx.HTTPError, orjson.JSONDecodeError, OSError):
        body = None
    server = server_of_models(body)
    if server is not None:
        return server, f"GET {url} lists models owned_by {body['data'][0]['owned_by']!r}"  # type: ignore[index]
    return "dashscope", f"GET {url} names no known local server, so DashScope's dialect is spoken"
