"""HTTP helpers for the emulator tests (raw httpx, so bytes and headers can be checked)."""

from __future__ import annotations

from typing import Any

import httpx

from qwen_batch.emulator import RunningEmulator
from qwen_batch.wire import NATIVE_PATH


def native(
    emu: RunningEmulator,
    body: Any,
    *,
    stream: bool = False,
    key: str | None = None,
    timeout: float = 5.0,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST a native generation request with raw httpx."""
    all_headers = {"Authorization": f"Bearer {key or emu.api_key}", **(headers or {})}
    if stream:
        all_headers["X-DashScope-SSE"] = "enable"
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, (bytes, str)) else {"json": body}
    return httpx.post(emu.base_url + NATIVE_PATH, headers=all_headers, timeout=timeout, **kwargs)


def compatible(emu: RunningEmulator, body: Any, *, key: str | None = None, timeout: float = 5.0) -> httpx.Response:
    """POST an OpenAI-compatible chat completion with raw httpx."""
    return httpx.post(
        emu.compatible_base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key or emu.api_key}"},
        timeout=timeout,
    )


def prompt_body(text: str = "Hello there", **parameters: Any) -> dict[str, Any]:
    return {"model": "qwen-turbo", "input": {"messages": [{"role": "user", "content": text}]}, "parameters": parameters}


def sse_events(raw: str) -> list[dict[str, str]]:
    """Split a native SSE body into events of {"id", "event", "status", "data"} (strict framing)."""
    assert raw.endswith("\n\n"), "every event ends with a blank line"
    events = []
    for block in raw[:-2].split("\n\n"):
        lines = block.split("\n")
        assert len(lines) == 4, block
        assert lines[0].startswith("id:") and lines[1].startswith("event:")
        assert lines[2].startswith(":HTTP_STATUS/") and lines[3].startswith("data:")
        events.append({"id": lines[0][3:], "event": lines[1][6:], "status": lines[2][13:], "data": lines[3][5:]})
    return events
