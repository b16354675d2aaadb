"""The offline DashScope emulator: a real loopback server speaking the text-generation protocol.

``open_emulator(config)`` serves it inside the current event loop (an async context
manager yielding a ``RunningEmulator``); ``qwen_batch.testing.EmulatorThread`` runs it on
a background thread for synchronous code; ``qwen-batch emulate`` runs it from the shell.
It imports only the shared ``wire``, ``types``, ``tokens``, ``catalog`` and ``argtypes``
modules, never the client it is used to test. Both generation endpoints run one request
pipeline (``pipeline.py``) with their dialect (``native.py``, ``compatible.py``); the app
and its routes are ``server.py``. See docs/emulator.md.
"""

from __future__ import annotations

from .config import EmulatorConfig, FaultRates
from .server import RunningEmulator, open_emulator

__all__ = ["EmulatorConfig", "FaultRates", "RunningEmulator", "open_emulator"]
