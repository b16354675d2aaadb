"""The run report in the terminal: the header and the tables, from ``report.json``'s dict."""

from __future__ import annotations

from typing import Any, TextIO


def _money(value: float | None, currency: str | None) -> str:
    if value is None:
        return "unknown"
    return f"{value:.4f} {currency or ''}".strip()


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def render_tables(report: dict[str, Any], out: TextIO) -> None:
    """Print the header, latency, finish reasons, cost, retries, errors and the top rows."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=120, soft_wrap=True)
    header = report["header"]
    rows = header["rows"]
    cost = header["cost"]
    top = Table(title=f"qwen-batch report: {header['job'] or report['output']}", show_header=False)
    top.add_row("output", report["output"])
    top.add_row("models", ", ".join(header["models"]) or "-")
    if header["variants"]:
        top.add_row("variants", ", ".join(header["variants"]))
    top.add_row("rows", f"{rows['total']} ({rows['ok']} ok, {rows['error']} error, {rows['not_done']} not done)")
    top.add_row("mode", f"{header['mode']} ({header['segments']} run segment(s))")
    top.add_row("wall time", _seconds(header["wall_time_s"]))
    spent = _money(cost["total"], cost["currency"])
    estimate = _money(cost["estimate_max"], cost["currency"]) if cost["estimate_max"] is not None else "-"
    budget = _money(cost["budget"], cost["currency"]) if cost["budget"] is not None else "none"
    top.add_row("cost", f"{spent} (estimate at most {estimate}, budget {budget})")
    console.print(top)

    latency = Table(title="latency of answered rows")
    for column in ("", "rows", "p50", "p95", "p99"):
        latency.add_column(column)
    for label, key in (("latency", "latency_s"), ("first token", "first_token_s")):
        stats = report["latency"][key]
        if stats:
            latency.add_row(label, str(stats["count"]), _seconds(stats["p50"]), _seconds(stats["p95"]), _seconds(stats["p99"]))
    console.print(latency)

    _records_table(console, "finish_reason", report["finish_reason"], ("count", "share"))
    _records_table(console, "cost", report["cost"], ("rows", "input", "output", "thinking", "unsplit", "total"))

    retries = Table(title=f"attempts per row ({report['retries']['share_retried']:.1%} of sent rows retried)")
    retries.add_column("attempts")
    retries.add_column("rows")
    for attempts, n in zip(report["retries"]["attempts"], report["retries"]["rows"]):
        retries.add_row(str(attempts), str(n))
    console.print(retries)

    if report["errors_by_code"]:
        errors = Table(title="failed rows by error code")
        errors.add_column("code")
        errors.add_column("rows")
        for code, n in report["errors_by_code"].items():
            errors.add_row(code, str(n))
        console.print(errors)
    _records_table(console, "slowest rows", report["slowest"], ())
    _records_table(console, "most expensive rows", report["most_expensive"], ())


def _records_table(console: Any, title: str, records: list[dict[str, Any]], value_columns: tuple[str, ...]) -> None:
    if not records:
        return
    from rich.table import Table

    table = Table(title=title)
    columns = list(records[0])
    for column in columns:
        table.add_column(column, justify="right" if column in value_columns else "left")
    for record in records:
        table.add_row(*(_cell(record[c]) for c in columns))
    console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
