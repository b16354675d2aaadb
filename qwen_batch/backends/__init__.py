"""Clients for the service, one per protocol, behind one streaming ``Backend`` protocol.

``base`` defines the protocol, its events, and the collector; ``registry`` maps a protocol name to its backend;
``errors`` is the one translation of HTTP statuses and transport exceptions into the error
tree that every backend uses; ``dashscope`` is the native DashScope client. httpx and aiohttp
live in this package and nowhere else, and are imported only when a backend is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Backend, OpenBackend, collect
from .registry import backend_factory, protocols, register_backend

if TYPE_CHECKING:
    from .dashscope import DashScopeBackend

__all__ = ["Backend", "DashScopeBackend", "OpenBackend", "backend_factory", "collect", "protocols", "register_backend"]


def __getattr__(name: str) -> Any:
    # The client imports httpx and aiohttp (~0.1 s): only code that sends pays for it.
    if name == "DashScopeBackend":
        from .dashscope import DashScopeBackend

        return DashScopeBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
