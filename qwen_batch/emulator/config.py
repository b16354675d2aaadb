"""Every option of the emulator, in one frozen value with documented defaults.

The defaults describe a well-behaved service (no faults, no limits, no latency) that
answers the way the real one did from late 2024 on: ChatML token counts, strict 2024
role rules, and streaming errors before generation sent with their own HTTP status.
Each default that follows an UNCONFIRMED point of the protocol reference says so.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from ..catalog import Catalog, ModelInfo, builtin
from .models import MODELS as EMULATED_MODELS
from .servers import SERVER_NAMES, ServerName

UsageMode = Literal["chatml", "raw-2024q1"]
RoleRules = Literal["strict", "lenient"]
StreamErrorMode = Literal["status", "http200"]
# How a failed batch line names its error (research-wave2 E.5: the docs give both, UNCONFIRMED).
BatchErrorShape = Literal["code", "error_code"]

DEFAULT_API_KEY = "sk-emulator"
# The gateway refuses bodies over 16 MiB (reference section 1.2).
MAX_BODY_BYTES = 16 * 1024 * 1024
# The documented rate-limit window is one minute (reference section 8.3).
DEFAULT_RATE_WINDOW_S = 60.0
# The Batch API's documented limits per input file (reference section 7.2).
BATCH_MAX_LINES = 50_000
BATCH_MAX_FILE_BYTES = 500_000_000
BATCH_MAX_LINE_BYTES = 6_000_000
# A third-party client's docs (research-wave2 E.8); UNCONFIRMED, but cheap to hold a client to.
BATCH_MAX_CUSTOM_ID_CHARS = 256
# The docs' error file naming; the 2026-04 capture of a cancelled batch used "file-batch_output-" (E.1).
BATCH_ERROR_FILE_PREFIX = "file-batch_error-"


@dataclass(frozen=True)
class FaultRates:
    """Probability per attempt of each injected fault; they are exclusive and must sum to <= 1."""

    rate_quota: float = 0.0
    allocation_quota: float = 0.0
    burst_rate: float = 0.0
    internal_error: float = 0.0
    unavailable: float = 0.0
    reset: float = 0.0
    hang: float = 0.0
    malformed: float = 0.0
    truncated: float = 0.0

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fault probability {item.name}={value} is outside [0, 1]")
        if self.total() > 1.0 + 1e-9:
            raise ValueError(f"fault probabilities sum to {self.total():.3f}, more than 1")

    def total(self) -> float:
        return float(sum(getattr(self, item.name) for item in fields(self)))

    def __repr__(self) -> str:
        set_ = [f"{item.name}={getattr(self, item.name)}" for item in fields(self) if getattr(self, item.name)]
        return f"FaultRates({', '.join(set_)})"


@dataclass(frozen=True)
class EmulatorConfig:
    """How the emulator behaves. All fields have defaults; ``EmulatorConfig()`` is a clean service.

    Authentication
      api_key: the one accepted bearer key; ``None`` accepts any non-empty key.
    Models
      models_path: a JSON file shaped like ``qwen_batch/data/models.json`` whose models are
        added to (or override) the built-in catalog.
      extra_models: the same, for Python callers.
    Protocol choices (see docs/emulator.md for why each default)
      usage_mode: "chatml" counts the chat template (since Nov 2024); "raw-2024q1" content only.
      role_rules: "strict" enforces the 2024 role order; "lenient" only checks roles and content.
      stream_error_mode: a streaming request refused before generation gets its error status
        ("status") or HTTP 200 ("http200"); the body is an SSE ``event:error`` either way.
      sse_via_accept: ``Accept: text/event-stream`` alone also turns on streaming.
    Compatible endpoint
      server: "dashscope" (compatible mode under ``/compatible-mode/v1``, with the native routes) or a
        local server ("vllm", "sglang", "ollama", "llamacpp") imitated under ``/v1`` alone: its
        dialect (servers.py), no key needed, and no 429 (it queues).
      send_usage: False for a server that sends no usage at all (no usage object, no usage chunk).
      max_running: requests served at once; the rest wait in a queue (None: no limit), as a local
        server's slots do (``max_num_seqs``).
    Replies
      reply_median_tokens, reply_max_tokens: the spread of natural reply lengths.
      thinking_median_tokens, thinking_max_tokens: the same for a thinking reply's reasoning
        (before ``thinking_budget`` cuts it), short enough that small budgets are often reached.
      stream_chunk_tokens: tokens per streamed event.
    Faults (all off by default; reproducible from ``fault_seed``)
      faults: probabilities per attempt; retry_after: seconds sent in ``Retry-After`` with
      injected or limit 429s (``None``: no header, as the real service).
      rpm_limit, tpm_limit, rate_window_s: sliding-window limits per model (per account: every
        key counts, reference section 8.3).
      other_load: (requests per second, start_s, end_s): other clients of the same account
        using the same model's limits between those times (seconds since the first
        generation request), admitted while the window has room; () for none.
      outages: (start_s, end_s) spans (seconds since the first generation request) in which
        every generation attempt is answered 503 ModelUnavailable.
      latency_s, latency_jitter_s, latency_per_token_s: added delay.
      directives: obey ``[[emu: ...]]`` directives in prompts.
    Batch API (``/files``, ``/batches``; docs/emulator.md "Batch API")
      batch_validating_s, batch_line_s, batch_finalizing_s: seconds a batch spends validating, per
        line in progress, and finalizing.
      batch_hour_s: seconds of emulator time per hour of ``completion_window`` (3600: real time;
        0.05 makes a 24h window expire after 1.2 s).
      batch_expire_after_lines: a batch expires once this many of its lines are processed (None: only
        its window expires it); finished lines stay in its output file.
      batch_error_file_prefix: the prefix of error file ids ("file-batch_output-" reproduces the capture).
      batch_error_shape: a failed line's ``error`` as ``{code, message}`` or ``{error_code, error_message}``.
      batch_max_lines, batch_max_file_bytes, batch_max_line_bytes, batch_max_custom_id_chars: the
        limits of one input file; a file over them fails its batch with line errors.
      batch_rate_limits: enforce the Batch API's own per-minute call limits (reference section 7.8)
        over ``rate_window_s``.
    Records
      ledger_path: also append every ledger line to this file.
    """

    api_key: str | None = DEFAULT_API_KEY
    models_path: Path | None = None
    extra_models: Mapping[str, ModelInfo] = field(default_factory=dict)
    usage_mode: UsageMode = "chatml"
    role_rules: RoleRules = "strict"
    stream_error_mode: StreamErrorMode = "status"
    sse_via_accept: bool = True
    reply_median_tokens: int = 80
    reply_max_tokens: int = 600
    thinking_median_tokens: int = 60
    thinking_max_tokens: int = 600
    stream_chunk_tokens: int = 4
    fault_seed: int = 0
    faults: FaultRates = field(default_factory=FaultRates)
    retry_after: float | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    rate_window_s: float = DEFAULT_RATE_WINDOW_S
    other_load: tuple[float, float, float] | tuple[()] = ()
    outages: tuple[tuple[float, float], ...] = ()
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    latency_per_token_s: float = 0.0
    directives: bool = True
    ledger_path: Path | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    server: ServerName = "dashscope"
    send_usage: bool = True
    max_running: int | None = None
    batch_validating_s: float = 0.2
    batch_line_s: float = 0.001
    batch_finalizing_s: float = 0.2
    batch_hour_s: float = 3600.0
    batch_expire_after_lines: int | None = None
    batch_error_file_prefix: str = BATCH_ERROR_FILE_PREFIX
    batch_error_shape: BatchErrorShape = "code"
    batch_max_lines: int = BATCH_MAX_LINES
    batch_max_file_bytes: int = BATCH_MAX_FILE_BYTES
    batch_max_line_bytes: int = BATCH_MAX_LINE_BYTES
    batch_max_custom_id_chars: int = BATCH_MAX_CUSTOM_ID_CHARS
    batch_rate_limits: bool = False

    def __post_init__(self) -> None:
        if self.usage_mode not in ("chatml", "raw-2024q1"):
            raise ValueError(f"usage_mode must be 'chatml' or 'raw-2024q1', not {self.usage_mode!r}")
        if self.role_rules not in ("strict", "lenient"):
            raise ValueError(f"role_rules must be 'strict' or 'lenient', not {self.role_rules!r}")
        if self.stream_error_mode not in ("status", "http200"):
            raise ValueError(f"stream_error_mode must be 'status' or 'http200', not {self.stream_error_mode!r}")
        if self.server not in SERVER_NAMES:
            raise ValueError(f"server must be one of {', '.join(SERVER_NAMES)}, not {self.server!r}")
        if self.server != "dashscope" and (self.rpm_limit is not None or self.tpm_limit is not None or _throttles(self.faults)):
            raise ValueError(f"a local server ({self.server}) never answers 429, it queues: drop the rate limits and "
                             "throttling faults, or bound it with max_running")
        if self.max_running is not None and self.max_running < 1:
            raise ValueError("max_running must be >= 1")
        if self.rate_window_s <= 0:
            raise ValueError("rate_window_s must be positive")
        if min(self.stream_chunk_tokens, self.reply_median_tokens, self.reply_max_tokens,
               self.thinking_median_tokens, self.thinking_max_tokens) < 1:
            raise ValueError("stream_chunk_tokens and the reply and thinking token spreads must be >= 1")
        if self.other_load and self.other_load[0] <= 0:
            raise ValueError("other_load must be (requests per second > 0, start_s, end_s)")
        if any(end <= start for start, end in self.outages):
            raise ValueError("every outage must end after it starts")
        for name in ("latency_s", "latency_jitter_s", "latency_per_token_s", "batch_validating_s", "batch_line_s",
                     "batch_finalizing_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        self._check_batch()

    def _check_batch(self) -> None:
        if self.batch_hour_s <= 0:
            raise ValueError("batch_hour_s must be positive")
        if self.batch_expire_after_lines is not None and self.batch_expire_after_lines < 0:
            raise ValueError("batch_expire_after_lines must be >= 0")
        if self.batch_error_shape not in ("code", "error_code"):
            raise ValueError(f"batch_error_shape must be 'code' or 'error_code', not {self.batch_error_shape!r}")
        if not self.batch_error_file_prefix.startswith("file-"):
            raise ValueError("batch_error_file_prefix must start with 'file-'")
        if min(self.batch_max_lines, self.batch_max_file_bytes, self.batch_max_line_bytes,
               self.batch_max_custom_id_chars) < 1:
            raise ValueError("the batch file limits must be >= 1")

    def catalog(self) -> Catalog:
        """The built-in models, the current families (``models.MODELS``), then ``models_path`` and
        ``extra_models``; reads the file."""
        catalog = builtin().with_models(EMULATED_MODELS)
        if self.models_path is not None:
            extra = Catalog.from_json(Path(self.models_path).read_text(encoding="utf-8"))
            catalog = catalog.with_models(extra.models)
        if self.extra_models:
            catalog = catalog.with_models(self.extra_models)
        return catalog

    def __repr__(self) -> str:
        # Only what differs from the defaults, so a test failure shows the interesting part.
        default = _default_config()
        changed = [
            f"{item.name}={getattr(self, item.name)!r}"
            for item in fields(self)
            if getattr(self, item.name) != getattr(default, item.name)
        ]
        return f"EmulatorConfig({', '.join(changed)})"


def _throttles(faults: FaultRates) -> bool:
    return bool(faults.rate_quota or faults.allocation_quota or faults.burst_rate)


@functools.cache
def _default_config() -> EmulatorConfig:
    return EmulatorConfig()
