"""The retry policy: which failures are tried again, how often, and how long to wait.

tenacity lives here and nowhere else. The decision to retry is the error's class
(``RetryableError``), never its text. Waits are exponential with full jitter, capped,
and never shorter than a ``Retry-After`` the service sent.

When a call finally fails, the *last* error is raised unchanged, with one attribute
added: ``attempts`` (how many times the call was made, >= 1). Callers read it with
``error.attempts``; nothing is wrapped, so ``except AuthError`` keeps working.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base, wait_random_exponential

from .errors import BackendError, RateLimited, RetryableError
from .limits import DEFAULT_WINDOW_S, rate_window_s

T = TypeVar("T")

DEFAULT_BASE_DELAY_S = 0.5
DEFAULT_MAX_DELAY_S = 30.0


def _window_scaled(seconds: float) -> float:
    """``seconds`` for DashScope's one-minute rate window, scaled to the window in use
    (``QWEN_BATCH_RATE_WINDOW_S``): a scaled-down emulator run keeps its backoff in proportion."""
    return seconds * rate_window_s() / DEFAULT_WINDOW_S


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many times a retryable failure is tried again, and the backoff between tries.

    ``max_retries`` counts the extra attempts (0: send once). The n-th wait is drawn
    uniformly from ``[0, min(max_delay_s, base_delay_s * 2**(n-1))]`` ("full jitter"),
    then raised to the error's ``retry_after`` when it has one. The default delays (0.5 s and
    30 s) scale with ``QWEN_BATCH_RATE_WINDOW_S`` when it is set. ``sleep`` is the seam
    tests replace to run instantly.
    """

    max_retries: int
    base_delay_s: float = field(default_factory=lambda: _window_scaled(DEFAULT_BASE_DELAY_S))
    max_delay_s: float = field(default_factory=lambda: _window_scaled(DEFAULT_MAX_DELAY_S))
    sleep: Callable[[float], Awaitable[None]] = field(default=anyio.sleep, compare=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, not {self.max_retries}")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("base_delay_s and max_delay_s must not be negative")

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(max_retries={self.max_retries}, base_delay_s={self.base_delay_s}, "
            f"max_delay_s={self.max_delay_s})"
        )

    def delay(self, attempt: int, error: BaseException | None = None) -> float:
        """One draw of the wait after failed attempt ``attempt`` (1-based) that raised ``error``."""
        return _BackoffWait(self).delay(attempt, error)


class _BackoffWait(wait_base):
    """Full-jitter exponential backoff with ``RateLimited.retry_after`` as a floor.

    ``offset`` is added to tenacity's attempt number, for when attempts were made
    before tenacity took over (see ``call_with_retries``).
    """

    def __init__(self, policy: RetryPolicy, offset: int = 0) -> None:
        self._base = policy.base_delay_s
        self._cap = policy.max_delay_s
        self._offset = offset
        self._jitter = wait_random_exponential(multiplier=policy.base_delay_s, max=policy.max_delay_s)

    def delay(self, attempt: int, error: BaseException | None) -> float:
        """The wait after failed attempt ``attempt`` (1-based) that raised ``error``."""
        # A bare state: the jitter reads only its attempt number, so no Retrying object is needed.
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = attempt
        delay = self._jitter(state)
        if isinstance(error, RateLimited) and error.retry_after is not None:
            delay = max(delay, error.retry_after)
        return delay

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None and outcome.failed else None
        return self.delay(retry_state.attempt_number + self._offset, error)


_RETRY_ON = retry_if_exception_type(RetryableError)


async def call_with_retries(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    before_attempt: Callable[[], Awaitable[None]] | None = None,
    on_error: Callable[[BackendError, int], None] | None = None,
) -> tuple[T, int]:
    """Call ``fn`` until it succeeds or fails for good; return ``(result, attempts)``.

    ``before_attempt`` is awaited before *every* attempt, retries included (the runner
    waits for its rate limits there). ``on_error(error, attempt)`` is called once for each
    failed attempt, before the retry decision. Only ``RetryableError`` is retried, at most
    ``policy.max_retries`` times; on final failure the last ``BackendError`` is raised
    with ``error.attempts`` set. Any other exception propagates untouched.
    """
    attempt = 0

    async def attempt_once() -> T:
        nonlocal attempt
        attempt += 1
        if before_attempt is not None:
            await before_attempt()
        try:
            return await fn()
        except BackendError as error:
            error.attempts = attempt
            if on_error is not None:
                on_error(error, attempt)
            raise

    # The first attempt runs outside tenacity: nearly every call succeeds at once, and a
    # tenacity state machine per request would be the largest cost on the hot path.
    try:
        return await attempt_once(), 1
    except RetryableError as error:
        if policy.max_retries == 0:
            raise
        first_error = error
    wait = _BackoffWait(policy, offset=1)
    await policy.sleep(wait.delay(1, first_error))
    del first_error
    retrying = AsyncRetrying(
        sleep=policy.sleep,
        stop=stop_after_attempt(policy.max_retries),
        wait=wait,
        retry=_RETRY_ON,
        reraise=True,
    )
    result: T = await retrying(attempt_once)  # tenacity does not tie its result type to fn's
    return result, attempt
