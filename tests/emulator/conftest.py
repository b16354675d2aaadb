"""Fixtures for the emulator's own tests: running emulators and small HTTP helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import dashscope
import pytest

from qwen_batch.emulator import EmulatorConfig, RunningEmulator
from qwen_batch.testing import EmulatorThread

StartEmulator = Callable[..., RunningEmulator]


@pytest.fixture
def emu() -> Iterator[RunningEmulator]:
    """A default emulator (no faults, no limits) on loopback."""
    with EmulatorThread(EmulatorConfig()) as running:
        yield running


@pytest.fixture
def start_emulator() -> Iterator[StartEmulator]:
    """``start_emulator(**config_fields)``: an emulator with that config, stopped after the test."""
    with contextlib.ExitStack() as stack:
        def start(**fields: Any) -> RunningEmulator:
            return stack.enter_context(EmulatorThread(EmulatorConfig(**fields)))

        yield start


@pytest.fixture
def sdk(emu: RunningEmulator, monkeypatch: pytest.MonkeyPatch) -> RunningEmulator:
    """The dashscope SDK pointed at a default emulator."""
    monkeypatch.setattr(dashscope, "base_http_api_url", emu.base_url)
    return emu


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
