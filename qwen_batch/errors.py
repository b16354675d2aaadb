"""The one exception tree of qwen-batch.

    QwenBatchError
    ├── UsageError             the user's to fix; exit 2, nothing sent, nothing overwritten
    │   ├── SpecError          the job spec (YAML, keys, types, ranges)
    │   ├── InputError         the input table (file, columns, ids)
    │   └── ConfigError        the environment (API key, paths, flags)
    ├── StorageError           the disk refused a write (unwritable folder, disk full)
    ├── RunAborted             the run stopped on purpose; exit 3
    │   └── BudgetExceeded
    └── BackendError           one request failed; the class carries the retry decision
        ├── RetryableError
        │   ├── RateLimited    429 Throttling*; carries retry_after and the limit kind
        │   ├── ServerError    5xx
        │   └── TransportError timeouts, resets, malformed or truncated replies
        └── PermanentError
            ├── BadRequest     400/413 and non-transient 429s: the row's error
            ├── AuthError      401/403: aborts the whole run
            └── ConfigurationRefused   the job's configuration is wrong, not the row: aborts the run
                ├── EndpointNotFound       404/405 from the generation URL: the base URL is wrong
                ├── UnknownModel           the service does not know the model
                ├── ModelNotOnEndpoint     400 InvalidURL: the model is served on another path
                └── ParameterRefused       a 400 naming a parameter every request carries

Nobody compares error strings to decide what to do: ``isinstance`` does.
"""

from __future__ import annotations

from typing import Any


class QwenBatchError(Exception):
    """Base of every error qwen-batch raises on purpose."""


class UsageError(QwenBatchError):
    """Something the user must fix; the CLI exits 2 and sends nothing."""

    exit_code = 2


class SpecError(UsageError):
    """The job spec is malformed or out of range."""


class InputError(UsageError):
    """The input table cannot be used as it is."""


class ConfigError(UsageError):
    """The environment or the command line is wrong (key, flags, paths)."""


class StorageError(QwenBatchError):
    """Writing results failed; what was already durable is kept."""

    exit_code = 2


class RunAborted(QwenBatchError):
    """The run stopped before finishing, on purpose (auth refused, budget reached)."""

    exit_code = 3


class BudgetExceeded(RunAborted):
    """Sending more would let the cost exceed the budget."""


class BackendError(QwenBatchError):
    """One request failed. ``code`` and ``message`` are the service's own when it sent them."""

    retryable = False
    attempts = 1  # set by the retry policy to how many times the request was sent

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.request_id = request_id


class RetryableError(BackendError):
    """Worth trying again after a pause."""

    retryable = True


class RateLimited(RetryableError):
    """HTTP 429 that will pass: ``kind`` is "requests", "tokens" or "burst"."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = 429,
        request_id: str | None = None,
        retry_after: float | None = None,
        kind: str = "requests",
    ) -> None:
        super().__init__(code, message, status=status, request_id=request_id)
        self.retry_after = retry_after
        self.kind = kind


class ServerError(RetryableError):
    """The service failed (5xx)."""


class TransportError(RetryableError):
    """No usable answer: timeout, reset connection, malformed or truncated body."""


class PermanentError(BackendError):
    """Sending the same request again would fail the same way."""


class BadRequest(PermanentError):
    """The service refused this request (400, 413, exhausted quota)."""


class AuthError(PermanentError):
    """The key was refused (401/403): every other row would fail too."""


class ConfigurationRefused(PermanentError):
    """The answer says the job's configuration is wrong, so every other request would fail too.

    The run stops as for a refused key; the row is not recorded, so a resume after the fix
    sends it. ``url`` is where the request went.
    """

    def __init__(self, code: str, message: str, *, url: str = "", **fields: Any) -> None:
        super().__init__(code, message, **fields)
        self.url = url


class EndpointNotFound(ConfigurationRefused):
    """HTTP 404 (or 405) from the generation URL: the base URL, not the row, is wrong."""


class UnknownModel(ConfigurationRefused):
    """The service does not know the model (400 ``Model not exist.``, 404 ``ModelNotFound``)."""


class ModelNotOnEndpoint(ConfigurationRefused):
    """400 ``InvalidURL`` (``url error``): the model is served on another path (multimodal)."""


class ParameterRefused(ConfigurationRefused):
    """A 400 whose message names ``parameter``, which every request of the job carries."""

    def __init__(self, code: str, message: str, *, parameter: str, **fields: Any) -> None:
        super().__init__(code, message, **fields)
        self.parameter = parameter
