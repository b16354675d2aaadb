"""The ``emulate`` command: flags → EmulatorConfig → serve until Ctrl-C.

``add_arguments(parser)`` declares the flags on any argparse parser (the ``qwen-batch
emulate`` subcommand and ``python -m qwen_batch.emulator`` share them); ``run(args)``
serves and returns the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import math
import signal
import socket
import sys
from pathlib import Path

from ..argtypes import number, whole_number
from .config import (
    BATCH_ERROR_FILE_PREFIX,
    BATCH_MAX_CUSTOM_ID_CHARS,
    BATCH_MAX_FILE_BYTES,
    BATCH_MAX_LINE_BYTES,
    BATCH_MAX_LINES,
    DEFAULT_API_KEY,
    DEFAULT_RATE_WINDOW_S,
    EmulatorConfig,
    FaultRates,
)
from .servers import SERVER_NAMES
from .server import open_emulator

# flag suffix → FaultRates field; each takes a probability per attempt.
FAULT_FLAGS = {
    "rate-quota": ("rate_quota", "429 Throttling.RateQuota"),
    "allocation-quota": ("allocation_quota", "429 Throttling.AllocationQuota"),
    "burst-rate": ("burst_rate", "429 Throttling.BurstRate"),
    "500": ("internal_error", "500 InternalError"),
    "503": ("unavailable", "503 ModelUnavailable"),
    "reset": ("reset", "connection reset without an answer"),
    "hang": ("hang", "never answer"),
    "malformed": ("malformed", "200 with a body that is not JSON"),
    "truncated": ("truncated", "200 cut short of its Content-Length"),
}


def _numbers(text: str, count: int) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(":"))
    except ValueError:
        values = ()
    if len(values) != count or not all(math.isfinite(value) for value in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not {count} numbers separated by ':'")
    return values


def _span(text: str) -> tuple[float, float]:
    start, end = _numbers(text, 2)
    if end <= start:
        raise argparse.ArgumentTypeError(f"{text!r}: the end must come after the start")
    return start, end


def _other_load(text: str) -> tuple[float, float, float]:
    rate, start, end = _numbers(text, 3)
    if rate <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the rate must be positive")
    return rate, start, end


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every emulator option (see docs/emulator.md); numbers are checked as EmulatorConfig checks them."""
    positive, seconds = whole_number(1), number(0)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    server.add_argument("--port", type=whole_number(0, 65535), default=0, help="port (default 0: any free port)")
    server.add_argument("--api-key", default=DEFAULT_API_KEY,
                        help=f"the accepted bearer key (default {DEFAULT_API_KEY})")
    server.add_argument("--any-key", action="store_true", help="accept any non-empty bearer key")
    server.add_argument("--models", type=Path, metavar="PATH",
                        help="JSON file shaped like qwen_batch/data/models.json; its models are added")
    server.add_argument("--ledger", type=Path, metavar="PATH", help="append the billing ledger (JSON lines) here")

    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--usage-mode", choices=("chatml", "raw-2024q1"), default="chatml",
                          help="input token counting (default chatml: with the chat template)")
    protocol.add_argument("--roles", choices=("strict", "lenient"), default="strict",
                          help="message role rules (default strict: the 2024 rules)")
    protocol.add_argument("--stream-errors", choices=("status", "http200"), default="status",
                          help="status of a streaming request refused before generation (default status)")
    protocol.add_argument("--no-sse-via-accept", action="store_true",
                          help="stream only on X-DashScope-SSE: enable, not on Accept: text/event-stream")
    protocol.add_argument("--reply-median-tokens", type=positive, default=80, help="median natural reply length (default 80)")
    protocol.add_argument("--reply-max-tokens", type=positive, default=600, help="longest natural reply (default 600)")
    protocol.add_argument("--thinking-median-tokens", type=positive, default=60,
                          help="median natural reasoning length of a thinking reply (default 60)")
    protocol.add_argument("--thinking-max-tokens", type=positive, default=600,
                          help="longest natural reasoning (default 600)")
    protocol.add_argument("--server", choices=SERVER_NAMES, default="dashscope",
                          help="compatible endpoint's dialect: dashscope (default) or a local server imitated under /v1 "
                               "(no key, no 429)")
    protocol.add_argument("--no-usage", action="store_true",
                          help="compatible endpoint: send no usage at all (a server that sends none)")
    protocol.add_argument("--max-running", type=positive, metavar="N",
                          help="requests served at once; the rest queue (default: no limit)")
    protocol.add_argument("--stream-chunk-tokens", type=positive, default=4, help="tokens per stream event (default 4)")

    faults = parser.add_argument_group("faults (probabilities per attempt, reproducible from --fault-seed)")
    faults.add_argument("--fault-seed", type=whole_number(), default=0, help="seed of every random fault decision (default 0)")
    for suffix, (_, meaning) in FAULT_FLAGS.items():
        faults.add_argument(f"--p-{suffix}", type=number(0, 1), default=0.0, metavar="P", help=f"{meaning} (default 0)")
    faults.add_argument("--retry-after", type=seconds, metavar="SECONDS",
                        help="send Retry-After with 429s (default: none, as the real service)")
    faults.add_argument("--rpm", type=whole_number(0), help="requests per window per model (default: unlimited)")
    faults.add_argument("--tpm", type=whole_number(0), help="input+output tokens per window per model (default: unlimited)")
    faults.add_argument("--rate-window", type=number(0, low_open=True), default=DEFAULT_RATE_WINDOW_S, metavar="SECONDS",
                        help=f"length of the sliding RPM/TPM window (default {DEFAULT_RATE_WINDOW_S:g})")
    faults.add_argument("--other-load", type=_other_load, metavar="RATE:START:END",
                        help="other clients of the account: RATE requests/s counted in the same windows "
                        "from START to END seconds after the first request")
    faults.add_argument("--outage", type=_span, action="append", default=[], metavar="START:END",
                        help="answer every generation request 503 from START to END seconds after the "
                        "first request (repeatable)")
    faults.add_argument("--latency", type=seconds, default=0.0, metavar="SECONDS", help="fixed delay per request (default 0)")
    faults.add_argument("--latency-jitter", type=seconds, default=0.0, metavar="SECONDS",
                        help="extra seeded delay, uniform in [0, SECONDS] (default 0)")
    faults.add_argument("--latency-per-token", type=seconds, default=0.0, metavar="SECONDS",
                        help="delay per output token (default 0)")
    faults.add_argument("--no-directives", action="store_true", help="ignore [[emu: ...]] directives in prompts")
    _add_batch_arguments(parser)


def _add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    positive, seconds = whole_number(1), number(0)
    batch = parser.add_argument_group("Batch API (/files, /batches)")
    batch.add_argument("--batch-validating", type=seconds, default=0.2, metavar="SECONDS",
                       help="time a batch spends validating (default 0.2)")
    batch.add_argument("--batch-per-line", type=seconds, default=0.001, metavar="SECONDS",
                       help="processing time per line (default 0.001)")
    batch.add_argument("--batch-finalizing", type=seconds, default=0.2, metavar="SECONDS",
                       help="time a batch spends finalizing (default 0.2)")
    batch.add_argument("--batch-hour", type=number(0, low_open=True), default=3600.0, metavar="SECONDS",
                       help="emulator seconds per hour of completion_window (default 3600: real time)")
    batch.add_argument("--batch-expire-after-lines", type=whole_number(0), metavar="N",
                       help="a batch expires after N lines are processed (default: only at its window's end)")
    batch.add_argument("--batch-error-file-prefix", default=BATCH_ERROR_FILE_PREFIX, metavar="PREFIX",
                       help=f"prefix of error file ids (default {BATCH_ERROR_FILE_PREFIX}; "
                            "file-batch_output- reproduces the captured naming)")
    batch.add_argument("--batch-error-shape", choices=("code", "error_code"), default="code",
                       help="a failed line's error as {code, message} (default) or {error_code, error_message}")
    batch.add_argument("--batch-max-lines", type=positive, default=BATCH_MAX_LINES, metavar="N",
                       help=f"lines per input file (default {BATCH_MAX_LINES})")
    batch.add_argument("--batch-max-file-bytes", type=positive, default=BATCH_MAX_FILE_BYTES, metavar="BYTES",
                       help=f"bytes per input file (default {BATCH_MAX_FILE_BYTES})")
    batch.add_argument("--batch-max-line-bytes", type=positive, default=BATCH_MAX_LINE_BYTES, metavar="BYTES",
                       help=f"bytes per input line (default {BATCH_MAX_LINE_BYTES})")
    batch.add_argument("--batch-max-custom-id-chars", type=positive, default=BATCH_MAX_CUSTOM_ID_CHARS, metavar="N",
                       help=f"characters per custom_id (default {BATCH_MAX_CUSTOM_ID_CHARS})")
    batch.add_argument("--batch-rate-limits", action="store_true",
                       help="enforce the Batch API's own call limits per --rate-window (create, query, cancel "
                            "1000, list 100)")


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """The EmulatorConfig the flags describe."""
    rates = FaultRates(**{field: getattr(args, "p_" + suffix.replace("-", "_")) for suffix, (field, _) in FAULT_FLAGS.items()})
    return EmulatorConfig(
        api_key=None if args.any_key else args.api_key,
        models_path=args.models,
        usage_mode=args.usage_mode,
        role_rules=args.roles,
        stream_error_mode=args.stream_errors,
        sse_via_accept=not args.no_sse_via_accept,
        reply_median_tokens=args.reply_median_tokens,
        reply_max_tokens=args.reply_max_tokens,
        thinking_median_tokens=args.thinking_median_tokens,
        thinking_max_tokens=args.thinking_max_tokens,
        stream_chunk_tokens=args.stream_chunk_tokens,
        fault_seed=args.fault_seed,
        faults=rates,
        retry_after=args.retry_after,
        rpm_limit=args.rpm,
        tpm_limit=args.tpm,
        rate_window_s=args.rate_window,
        other_load=args.other_load or (),
        outages=tuple(args.outage),
        latency_s=args.latency,
        latency_jitter_s=args.latency_jitter,
        latency_per_token_s=args.latency_per_token,
        directives=not args.no_directives,
        ledger_path=args.ledger,
        server=args.server,
        send_usage=not args.no_usage,
        max_running=args.max_running,
        batch_validating_s=args.batch_validating,
        batch_line_s=args.batch_per_line,
        batch_finalizing_s=args.batch_finalizing,
        batch_hour_s=args.batch_hour,
        batch_expire_after_lines=args.batch_expire_after_lines,
        batch_error_file_prefix=args.batch_error_file_prefix,
        batch_error_shape=args.batch_error_shape,
        batch_max_lines=args.batch_max_lines,
        batch_max_file_bytes=args.batch_max_file_bytes,
        batch_max_line_bytes=args.batch_max_line_bytes,
        batch_max_custom_id_chars=args.batch_max_custom_id_chars,
        batch_rate_limits=args.batch_rate_limits,
    )


async def _serve(config: EmulatorConfig, host: str, port: int) -> None:
    async with open_emulator(config, host=host, port=port) as emu:
        print(f"qwen-batch emulator listening on {emu.root_url}", flush=True)
        if config.server == "dashscope":
            print(f"  native base URL:     {emu.base_url}", flush=True)
            print(f"  compatible base URL: {emu.compatible_base_url}", flush=True)
            print(f"  API key:             {config.api_key if config.api_key is not None else '(any)'}", flush=True)
        else:
            print(f"  {config.server} base URL: {emu.compatible_base_url}", flush=True)
            print("  API key:             (none needed)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
        await stop.wait()


def run(args: argparse.Namespace) -> int:
    """Serve the offline DashScope emulator until Ctrl-C.

    Example: qwen-batch emulate --port 8000 --p-rate-quota 0.1 --rpm 600 --ledger ledger.jsonl
    """
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problem = _models_file_problem(config)
    if problem is not None:
        print(f"error: --models {config.models_path}: {problem}", file=sys.stderr)
        return 2
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(config, args.host, args.port))
    except OSError as exc:
        if exc.errno not in _BIND_ERRNOS and not isinstance(exc, socket.gaierror):
            raise
        print(f"error: cannot listen on {args.host}:{args.port} ({exc.strerror}); choose another --host or --port",
              file=sys.stderr)
        return 2
    return 0


_BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES, errno.EAFNOSUPPORT})


def _models_file_problem(config: EmulatorConfig) -> str | None:
    """Why the --models file cannot be used (read now, so it is one line and not a crash at start)."""
    if config.models_path is None:
        return None
    try:
        config.catalog()
    except OSError as exc:
        return f"cannot read it ({exc.strerror}); check the path"
    except UnicodeDecodeError:
        return "not UTF-8 text; give a JSON file shaped like qwen_batch/data/models.json"
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"not a models file ({type(exc).__name__}: {str(exc)[:100]}); give JSON shaped like qwen_batch/data/models.json"
    return None
