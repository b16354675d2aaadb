"""What a person sees: start lines, progress, the closing summary table. Display only.

Progress is rendered from ``statistics()`` snapshots of the running execution: a live line on a terminal
(redrawn in place, cut to its width), a plain line every 10 seconds otherwise (cron logs),
nothing with ``--quiet``; either way the final figures are drawn before the summary.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

import anyio

from .progress import RecentRate

if TYPE_CHECKING:
    from .executors import Execution
    from .plan import JobPlan
    from .result import JobResult
    from .runner import RunStatistics

TTY_REFRESH_S = 0.5
PLAIN_REFRESH_S = 10.0


def _money(value: float | None, currency: str) -> str:
    return "unknown" if value is None else f"{value:.4f} {currency}"


def duration(seconds: float | None) -> str:
    """A short human duration: 42s, 3m05s, 2h04m; "--" when unknown."""
    if seconds is None:
        return "--"
    whole = int(seconds + 0.5)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 100 * 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return ">99h"


def _rate(rate: float | None) -> str:
    if rate is None:
        return "-- rows/s"
    return f"{rate:.1f} rows/s" if rate >= 0.1 or rate == 0 else f"{rate:.2g} rows/s"


def progress_line(
    stats: RunStatistics,
    currency: str,
    *,
    rate: RecentRate,
    done_before: int = 0,
    spent_before: float = 0.0,
    width: int | None = None,
    final: bool = False,
) -> str:
    """One line of progress, the same for the terminal and for logs.

    Rows done and the spend count what an earlier run finished (``done_before``,
    ``spent_before``), so a resume ends at total/total. ``rate`` gives the recent rate and the ETA. With ``width``, the parts that
    matter least are left out until the line fits. ``final``: the run is over, so the ETA
    reads "done", or "stopped" when rows remain.
    """
    done = done_before + stats.rows_done
    total = max(stats.rows_total, done)
    remaining = total - done
    percent = 100 * done // total if total else 100
    eta = ("done" if remaining == 0 else "stopped") if final else f"ETA {duration(rate.eta_s(remaining))}"
    throttled = ""
    if stats.throttled:
        throttled = f"{stats.throttled} throttled" + (
            f" (cooling {stats.cooling_down_s:.1f}s)" if stats.cooling_down_s > 0 else ""
        )
    # (text, importance): the least important parts go first when the terminal is narrow.
    parts = [
        (f"{done}/{total} rows {percent}%", 9),
        (_rate(rate.rate()), 8),
        (eta, 8),
        (f"{stats.in_flight} in flight", 5),
        (f"{stats.retries} retries" if stats.retries else "", 4),
        (throttled, 6),
        (f"{stats.errors} errors" if stats.errors else "", 7),
        (f"{stats.cached} cached" if stats.cached else "", 2),
        (f"{stats.input_tokens + stats.output_tokens} tokens", 1),
        (f"{spent_before + stats.cost:.4f} {currency}", 9),
    ]
    parts = [part for part in parts if part[0]]
    line = " | ".join(text for text, _ in parts)
    while width is not None and len(line) > width and len(parts) > 1:
        parts.remove(min(parts, key=lambda part: part[1]))
        line = " | ".join(text for text, _ in parts)
    return line if width is None else line[:width]


class Reporter:
    """Writes to stderr; ``quiet`` silences progress and notes, not errors or the summary."""

    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None, out: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.out = out or sys.stdout
        self.interactive = self.stream.isatty()
        self.currency = "CNY"
        self._done_before = 0
        self._spent_before = 0.0
        self._rate = RecentRate()

    def note(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=self.stream, flush=True)

    def start(self, plan: JobPlan, rpm: float | None, tpm: float | None) -> None:
        for warning in plan.warnings:
            self.warn(warning)
        if plan.price is not None:
            self.currency = plan.price.currency
        execution = plan.spec.execution
        info = plan.model_info
        if info is not None and info.rate_limits is not None:
            of = "" if plan.rate_share == 1.0 else f"this shard's {plan.rate_share:.4g} of "
            if execution.requests_per_minute is None and rpm is not None:
                self.note(f"requests_per_minute not set: using {rpm:g}, {of}{info.name}'s documented default ({info.rate_limits.source})")
            if execution.tokens_per_minute is None and tpm is not None:
                self.note(f"tokens_per_minute not set: using {tpm:g}, {of}{info.name}'s documented default ({info.rate_limits.source})")
        elif rpm is None and tpm is None:
            self.note("no rate limits known for this model: running with the concurrency limit alone")
        shard = plan.options.shard
        if shard is not None:
            share = "its own rate limits (shards:)" if plan.spec.shards else f"1/{shard.count} of the job's rate limits"
            self.note(f"shard {shard}: {plan.own_units} of the job's {plan.units} units, at {share}")
        report = plan.preflight
        done = plan.resume.count()
        self._done_before = done
        self._spent_before = plan.previous_cost
        resumed = f", {done} already done (resuming)" if done else ""
        self.note(
            f"{plan.spec.name}: {plan.rows} rows{resumed}, {report.to_send} to send, "
            f"{report.to_send_input_tokens} input tokens -> {plan.output_path}"
        )

    async def follow(self, execution: Execution) -> None:
        """Show progress until cancelled."""
        if self.quiet:
            return
        interval = TTY_REFRESH_S if self.interactive else PLAIN_REFRESH_S
        while True:
            await anyio.sleep(interval)
            self.draw(execution.statistics())

    def draw(self, stats: RunStatistics, *, final: bool = False) -> None:
        """Show ``stats``: redrawn in place on a terminal, a plain line in a log.

        The snapshot's ``elapsed_s`` (the runner's clock) timestamps it for the recent rate.
        """
        self._rate.observe(stats.elapsed_s, stats.rows_done)
        width = self._width() if self.interactive else None
        line = progress_line(
            stats,
            self.currency,
            rate=self._rate,
            done_before=self._done_before,
            spent_before=self._spent_before,
            width=width,
            final=final,
        )
        if self.interactive:
            print(f"\r\x1b[2K{line}", end="", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    def _width(self) -> int:
        """The terminal's width less one column, so the line never wraps."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = 80
        return max(columns - 1, 20)

    def stopping(self, message: str) -> None:
        print(f"\n{message}", file=self.stream, flush=True)

    def finish(self, result: JobResult, plan: JobPlan, command: str) -> None:
        if not self.quiet:
            # The final figures, before the summary: the last refresh may be a second old.
            self.draw(result.statistics, final=True)
            if self.interactive:
                print(file=self.stream)
        if result.stop_reason == "interrupted":
            print(f"interrupted: finished rows are saved; resume with: {command}", file=self.stream, flush=True)
        elif result.stop_reason == "auth":
            print(f"aborted: the API key was refused ({result.stop_detail}); nothing more was sent", file=self.stream)
        elif result.stop_reason == "configuration":
            print(
                f"error: {result.stop_detail}; nothing more was sent, and after the fix the same command "
                f"sends the rest: {command}",
                file=self.stream,
            )
        elif result.stop_reason == "error_rate":
            print(
                f"stopped: {result.stop_detail}; rows not sent stay not done, re-run to continue: {command}",
                file=self.stream,
            )
        elif result.stop_reason == "submitted":
            print(f"submitted, not finished: run the same command again to collect: {command}", file=self.stream)
        elif result.stop_reason == "budget":
            print(
                f"stopped: the budget of {plan.max_cost} would be exceeded; "
                f"raise budget.max_cost or --max-cost and re-run to continue: {command}",
                file=self.stream,
            )
        if not self.quiet or result.stop_reason:
            render_summary(result.summary, self.out)


def render_summary(summary: dict[str, Any], out: TextIO) -> None:
    """The closing summary as a table (rich), the same figures as summary.json."""
    from rich.console import Console
    from rich.table import Table

    cost = summary["cost"]
    currency = cost["currency"]
    table = Table(title=f"qwen-batch summary: {summary['job']}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    rows = summary["rows"]
    models = list(summary["cost"].get("by_model") or [summary["model"]])
    table.add_row("models" if len(models) > 1 else "model", ", ".join(models))
    table.add_row("rows", f"{rows['total']} total, {rows['ok']} ok, {rows['error']} error, {rows['not_done']} not done")
    for code, count in summary["errors_by_code"].items():
        table.add_row(f"  error {code}", str(count))
    if "parse_status" in rows:
        parsed = ", ".join(f"{count} {status}" for status, count in rows["parse_status"].items())
        table.add_row("parse status", f"{parsed}; {rows['reasks']} re-asks")
    tokens = summary["tokens"]
    table.add_row("tokens", f"{tokens['input']} in, {tokens['output']} out, {tokens['total']} total")
    if tokens.get("estimate"):
        table.add_row("tokens counted here", f"{tokens['estimated_rows']} rows: {tokens['estimate']}")
    if tokens["reasoning"]:
        reasoning_cost = _money(cost["reasoning"], currency)
        table.add_row("  reasoning", f"{tokens['reasoning']} of the output tokens, costing {reasoning_cost}")
    table.add_row("cost", _money(cost["total"], currency))
    by_variant = summary.get("by_variant") or {}
    if len(by_variant) > 1:
        for name, entry in by_variant.items():
            table.add_row(f"  {name}", _variant_line(entry, currency))
    table.add_row("price source", cost["price_source"])
    cache = summary["cache"]
    if cache["hits"]:
        table.add_row("cache hits", f"{cache['hits']} (saved {_money(cache['saved_cost'], currency)})")
    table.add_row("retries", str(summary["retries"]))
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s ({summary['rows_per_second']:.1f} rows/s)")
    table.add_row("output", summary["output"])
    # A terminal gets a table of its own width; a file or pipe one wide enough for the path.
    width = None if out.isatty() else max(100, len(summary["output"]) + 20)
    Console(file=out, width=width).print(table)
    truncated = rows["truncated_in_thinking"]
    if truncated:
        print(
            f"warning: {truncated} row(s) ran out of tokens inside their thinking and have no answer "
            "(finish_reason length, empty output_text); raise parameters.max_tokens or lower "
            "parameters.thinking_budget, then re-run them with --fresh",
            file=out,
        )


def _variant_line(entry: dict[str, Any], currency: str) -> str:
    """One variant of a sweep in the summary: its units, tokens and cost."""
    rows, tokens = entry["rows"], entry["tokens"]
    return (
        f"{rows['ok']} ok, {rows['error']} error of {rows['total']}; "
        f"{tokens['input']} in, {tokens['output']} out; {_money(entry['cost'], currency)}"
    )


def render_status(status: Any, out: TextIO) -> None:
    """``qwen-batch status``: how far the job got."""
    done = status.done
    print(f"{status.name}: {status.rows} rows in the input", file=out)
    _render_parts(status.parts, status.currency, out)
    if done is None:
        if not status.parts:
            print("  not started: no checkpoint yet", file=out)
        return
    print(f"  done:      {done.rows_done} ({done.ok} ok, {done.errors} error, {done.cached} from cache)", file=out)
    for code, count in done.errors_by_code.items():
        print(f"    error {code}: {count}", file=out)
    if done.retryable_errors:
        print(f"    {done.retryable_errors} of the errors are retried on resume", file=out)
    print(f"  remaining: {status.remaining}", file=out)
    print(f"  tokens:    {done.input_tokens} in, {done.output_tokens} out (billed)", file=out)
    print(f"  cost:      {done.cost:.4f} {status.currency} so far", file=out)
    print(f"  output:    {status.output_path} ({'written' if status.output_written else 'not written yet'})", file=out)
    if status.spec_changed:
        print("  the spec changed since this checkpoint (a run will refuse; --fresh starts over):", file=out)
        for change in status.spec_changed:
            print(f"    {change}", file=out)


def _render_parts(parts: Sequence[Any], currency: str, out: TextIO) -> None:
    """One line per shard of a sharded job: done, errors and remaining, or that it is missing."""
    for part in parts:
        shard = part.shard
        name = f"part-{shard.index}-of-{shard.count}"
        if not part.started:
            print(f"  {name}: missing (not started; run with --shard {shard}): {part.units} units", file=out)
            continue
        done = part.done
        line = (
            f"{done.rows_done} done ({done.ok} ok, {done.errors} error), {part.remaining} remaining, "
            f"{done.cost:.4f} {currency}"
            if done is not None
            else f"0 done, {part.remaining} remaining"
        )
        print(f"  {name}: {line}; part {'written' if part.written else 'not written yet'}", file=out)


def render_estimate(estimate: dict[str, Any], out: TextIO) -> None:
    """``qwen-batch estimate`` as a table; ``--json`` prints the same dict."""
    from rich.console import Console
    from rich.table import Table

    cost, tokens, time = estimate["cost"], estimate["output_tokens"], estimate["time"]
    currency = cost["currency"] or ""
    table = Table(title=f"qwen-batch estimate: {estimate['job']} ({estimate['model']})", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("rows", f"{estimate['rows']} ({estimate['rows_done']} done, {estimate['rows_cached']} cached)")
    table.add_row("requests to send", str(estimate["requests_to_send"]))
    if estimate["rows_over_long"] or estimate["rows_with_problems"]:
        table.add_row("rows not sent", f"{estimate['rows_over_long']} over-long, {estimate['rows_with_problems']} with problems")
    table.add_row("input tokens (exact)", str(estimate["input_tokens"]["to_send"]))
    table.add_row("output tokens", f"0 .. {tokens['max']} (expected {tokens['expected']})")
    table.add_row("  expected from", tokens["expected_basis"])
    reasoning = estimate["reasoning_tokens"]
    if reasoning["per_row_cap"]:
        table.add_row(
            "reasoning tokens",
            f"0 .. {reasoning['max']} (expected {reasoning['expected']}, at most {reasoning['per_row_cap']} a row)",
        )
        table.add_row("  expected from", reasoning["expected_basis"])
    reasks = estimate["json_reasks"]
    if reasks is not None:
        table.add_row(
            "JSON re-asks",
            f"0 .. {reasks['requests_max']} requests ({reasks['per_row_max']} a row at most), "
            f"0 .. {reasks['input_tokens_max']} input and 0 .. {reasks['output_tokens_max']} output tokens",
        )
        table.add_row("  at most", reasks["basis"])
    if cost["min"] is None:
        table.add_row("cost", "unknown (no price for this model)")
    else:
        table.add_row("cost", f"{cost['min']:.4f} .. {cost['max']:.4f} {currency} (expected {cost['expected']:.4f})")
        batch = cost["batch"]
        table.add_row(
            "cost in batch mode", f"{batch['min']:.4f} .. {batch['max']:.4f} {currency} (expected {batch['expected']:.4f})"
        )
    minutes = time["minutes_at_limits"]
    table.add_row("time at the limits", f"{minutes:.1f} min" if minutes is not None else time["note"])
    console = Console(file=out, width=100)
    console.print(table)
    if "by_variant" in estimate:
        console.print(_variant_estimate_table(estimate["by_variant"], currency))


def _variant_estimate_table(by_variant: dict[str, dict[str, Any]], currency: str) -> Any:
    """A sweep's estimate per variant: requests, exact input tokens, cost bounds at its model's price."""
    from rich.table import Table

    table = Table(title="per variant")
    for column in ("variant", "model", "requests", "input tokens", f"cost {currency}".strip()):
        table.add_column(column)
    for name, entry in by_variant.items():
        cost = entry["cost"]
        shown = "unknown" if cost["min"] is None else f"{cost['min']:.4f} .. {cost['max']:.4f} (expected {cost['expected']:.4f})"
        table.add_row(name, entry["model"], str(entry["requests_to_send"]), str(entry["input_tokens"]), shown)
    return table
