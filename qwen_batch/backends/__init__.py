"""Clients for the service, one per protocol, each over one shared ``httpx.AsyncClient``.

httpx lives in this package and nowhere else. Each backend turns HTTP statuses, error
bodies and transport exceptions into the ``BackendError`` tree in one place.
"""

from __future__ import annotations

from .dashscope import DashScopeBackend

__all__ = ["DashScopeBackend"]
