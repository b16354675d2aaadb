"""Ways of executing a ``JobPlan``; each feeds its outcomes to the same durable sink.

``base`` holds the protocols every executor meets; ``online`` is the pool of workers that
sends one request per row (``OnlineExecutor``, the default). Another way of executing (a
file submitted to a batch service, say) is a new module here, with no edit to the others.
"""

from __future__ import annotations

from .base import Execution, Executor

__all__ = ["Execution", "Executor"]
