"""Public test seams of qwen-batch.

``FakeBackend`` answers every request at once without sending it: give it to the online
executor (``qwen_batch.run(plan, executor=qwen_batch.OnlineExecutor(FakeBackend()))``) to
run a whole job -- preflight, checkpoint, output, summary -- with no service at all.

``EmulatorThread`` runs the offline DashScope emulator on its own event loop in a
background thread, for synchronous code: the official ``dashscope`` SDK, the ``openai``
package, or ``qwen-batch`` run as a subprocess. Async code should use
``qwen_batch.emulator.open_emulator`` directly.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from types import TracebackType

from .backends.base import Event, Finished, ReasoningDelta, TextDelta, Usage, WholeReply
from .emulator import EmulatorConfig, RunningEmulator, open_emulator
from .types import Reply, Request

# Starting loads the tokenizer vocabulary (about 0.3 s); give it ample room on a busy machine.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class FakeBackend:
    """Answers each request with ``text`` (``output_tokens`` long, finished by "stop"), sending nothing.

    The input tokens are the preflight's exact count of the request; ``sent`` counts the
    requests answered. ``reasoning`` (``reasoning_tokens`` of the output tokens) makes it a
    thinking model's reply; ``streamed`` sends it as a stream's events (the reasoning, then
    the answer, in two deltas each; the usage; the finish), as a streaming backend does.
    Replies are cached apart from every real service's.
    """

    def __init__(
        self,
        text: str = "A short reply.",
        *,
        output_tokens: int = 4,
        reasoning: str | None = None,
        reasoning_tokens: int = 0,
        streamed: bool = False,
    ) -> None:
        self.text = text
        self.output_tokens = output_tokens
        self.reasoning = reasoning
        self.reasoning_tokens = reasoning_tokens
        self.streamed = streamed
        self.sent = 0

    def __repr__(self) -> str:
        return f"FakeBackend({self.text!r}, output_tokens={self.output_tokens}, streamed={self.streamed})"

    def stream(self, request: Request) -> AsyncIterator[Event]:
        """The reply as a stream: of one event, as every whole-reply backend gives it, unless ``streamed``."""
        if self.streamed:
            return self._events(request)
        return WholeReply(self._answer, request)

    async def _answer(self, request: Request) -> Reply:
        self.sent += 1
        return Reply(
            self.text,
            "stop",
            request.input_tokens,
            self.output_tokens,
            f"fake-{request.index}",
            reasoning=self.reasoning,
            reasoning_tokens=self.reasoning_tokens if self.reasoning is not None else None,
        )

    async def _events(self, request: Request) -> AsyncIterator[Event]:
        self.sent += 1
        for text, event in ((self.reasoning, ReasoningDelta), (self.text, TextDelta)):
            if text:
                half = len(text) // 2
                yield event(text[:half])
                yield event(text[half:])
        reasoning_tokens = self.reasoning_tokens if self.reasoning is not None else None
        yield Usage(request.input_tokens, self.output_tokens, reasoning_tokens)
        yield Finished("stop", f"fake-{request.index}")


class EmulatorThread:
    """``with EmulatorThread(config) as emu:`` — a running emulator for synchronous code.

    ``emu`` is the same ``RunningEmulator`` that ``open_emulator`` yields (``base_url``,
    ``compatible_base_url``, ``api_key``, ``ledger``, ``stats()``).
    """

    def __init__(self, config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config
        self.host = host
        self.port = port
        self._ready = threading.Event()
        self._running: RunningEmulator | None = None
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunningEmulator:
        self._thread = threading.Thread(target=self._main, name="qwen-batch-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError("the emulator did not start in time")
        if self._error is not None:
            raise RuntimeError("the emulator failed to start") from self._error
        assert self._running is not None
        return self._running

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with open_emulator(self.config, host=self.host, port=self.port) as running:
            self._running = running
            self._ready.set()
            await self._stop.wait()
