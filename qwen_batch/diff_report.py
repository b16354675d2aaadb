"""How ``diff``'s report reads: text for a terminal, one HTML page; both from the dict ``diff.py`` builds.

The text uses the same words as ``--json``'s keys, so what a script reads is what a person sees.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, TextIO

from .diff import COMPARABLE, NOT_COMPARABLE

COUNTS = ("same_request", "identical_output", "changed_output", "only_in_a", "only_in_b")


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report as plain lines (the terminal's and the HTML page's headline)."""
    lines = [f"A: {report['a']}", f"B: {report['b']}", f"verdict: {report['verdict']}"]
    if report["verdict"] == NOT_COMPARABLE:
        lines += [f"  {reason}" for reason in report["not_comparable_because"]]
        return lines
    if report["verdict"] == COMPARABLE:
        lines.append("differing settings:")
        lines += [f"  {key}" for key in report["differing_settings"]]
    counts = report["counts"]
    lines.append(f"rows: {counts['rows_a']} in A, {counts['rows_b']} in B, aligned by id, variant and sample")
    lines += [f"{name}: {counts[name]}" for name in COUNTS]
    if report["status_transitions"]:
        lines.append("status transitions (A -> B):")
        lines += [f"  {row['a']} -> {row['b']}: {row['rows']}" for row in report["status_transitions"]]
    lines.append("finish_reason transitions (A -> B):")
    lines += [f"  {row['a']} -> {row['b']}: {row['rows']}" for row in report["finish_reason_transitions"]]
    lines.append("deltas (B - A per aligned row; sums over each output):")
    for metric, sides in report["deltas"].items():
        figures = "  ".join(
            f"{side} sum {_figure(values['sum'])} p50 {_figure(values['p50'])} p95 {_figure(values['p95'])}"
            for side, values in sides.items()
        )
        lines.append(f"  {metric}: {figures}")
    if report["most_changed"]:
        lines.append("most changed rows (by output tokens):")
        for row in report["most_changed"]:
            lines.append(
                f"  id {row['id']} variant {row['variant'] or '-'} sample {row['sample']}: "
                f"{row['status_a']} -> {row['status_b']}, finish_reason {row['finish_a']} -> {row['finish_b']}, "
                f"output_tokens {_figure(row['output_tokens_a'])} -> {_figure(row['output_tokens_b'])}"
            )
    if "score" in report:
        lines += _score_lines(report["score"])
    return lines


def _score_lines(score: dict[str, Any]) -> list[str]:
    if score.get("test") is None:
        return [f"score {score['column']}: {score['warning']}"]
    low, high = score["ci"]
    lines = [
        f"score {score['column']} ({score['test']}, n {score['n']}): mean A {score['mean_a']:.4g}, "
        f"mean B {score['mean_b']:.4g}, difference {score['difference']:+.4g} "
        f"({score['confidence']:.0%} CI {low:+.4g} to {high:+.4g}), p = {score['p_value']:.4g}"
    ]
    if "warning" in score:
        lines.append(f"warning: {score['warning']}")
    return lines


def _figure(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def render_diff(report: dict[str, Any], out: TextIO) -> None:
    for line in report_lines(report):
        print(line, file=out)


def write_html(report: dict[str, Any], path: Path) -> None:
    """The same report as a self-contained page, written atomically."""
    from .checkpoint import write_file_atomically
    from .errors import StorageError

    body = "\n".join(f"<div>{html.escape(line)}</div>" for line in report_lines(report))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>qwen-batch diff</title>"
        "<style>body{font-family:monospace;white-space:pre}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )
    try:
        write_file_atomically(path, page.encode())
    except OSError as exc:
        raise StorageError(f"{path}: cannot write the HTML report ({exc.strerror})") from None
