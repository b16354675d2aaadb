"""The registry: protocol name -> the factory of its backend.

Apart from ``base`` so that the protocol sits below every backend: a backend module imports
``base``, and only the registry knows the backends (each imported when first made).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..errors import ConfigError
from ..wire import DASHSCOPE, OPENAI
from .base import OpenBackend

if TYPE_CHECKING:
    from ..catalog import NativePath


class BackendFactory(Protocol):
    """Makes a backend that sends to ``base_url`` with ``api_key`` (raises ConfigError on bad settings).

    ``stream``, ``path`` and ``path_known`` are the job's ``modes.Mode``: stream the replies,
    on which native path, and whether that path is known (when not, a "url error" answer
    may move the run to the other one). ``server`` is the OpenAI-compatible server whose
    dialect to speak (``servers.DIALECTS``); ``api_key`` None is a server that needs none.
    """

    def __call__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout_s: float,
        max_connections: int,
        stream: bool = False,
        path: NativePath = "text",
        path_known: bool = True,
        server: str = DASHSCOPE,
    ) -> OpenBackend: ...


def _dashscope(
    base_url: str,
    api_key: str | None,
    *,
    timeout_s: float,
    max_connections: int,
    stream: bool = False,
    path: NativePath = "text",
    path_known: bool = True,
    server: str = DASHSCOPE,
) -> OpenBackend:
    from .dashscope import DashScopeBackend

    return DashScopeBackend(
        base_url,
        api_key or "",
        timeout_s=timeout_s,
        max_connections=max_connections,
        streamed=stream,
        path=path,
        path_known=path_known,
    )


def _openai(
    base_url: str,
    api_key: str | None,
    *,
    timeout_s: float,
    max_connections: int,
    stream: bool = False,
    path: NativePath = "text",
    path_known: bool = True,
    server: str = DASHSCOPE,
) -> OpenBackend:
    from ..servers import DIALECTS
    from .openai import OpenAIBackend

    return OpenAIBackend(
        base_url,
        api_key,
        timeout_s=timeout_s,
        max_connections=max_connections,
        streamed=stream,
        dialect=DIALECTS[server],
    )


_FACTORIES: dict[str, BackendFactory] = {DASHSCOPE: _dashscope, OPENAI: _openai}


def register_backend(protocol: str, factory: BackendFactory) -> None:
    """Make ``factory`` the backend of ``protocol`` (a name such as ``"dashscope"``)."""
    _FACTORIES[protocol] = factory


def backend_factory(protocol: str) -> BackendFactory:
    """The factory registered for ``protocol``; ConfigError naming the known ones if none is."""
    try:
        return _FACTORIES[protocol]
    except KeyError:
        known = ", ".join(sorted(_FACTORIES))
        raise ConfigError(f"unknown service protocol {protocol!r}; known: {known}") from None


def protocols() -> tuple[str, ...]:
    """The registered protocol names, sorted."""
    return tuple(sorted(_FACTORIES))
