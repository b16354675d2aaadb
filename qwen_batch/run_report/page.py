"""The run report as one self-contained HTML page: plotly.js inlined, every chart from bins.

Needs the ``qwen-batch[report]`` extra (plotly). Each chart is a ``<div id="chart-NAME">``
drawn by ``Plotly.newPlot`` from a figure built of plain lists (never arrays, which plotly
would write as base64), and the whole ``report.json`` is embedded as
``<script id="report-data" type="application/json">`` so the page and a test read the same
figures. Nothing is fetched: the page opens offline.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'qwen-batch[report]'"
CHARTS = (
    "latency", "throughput", "in_flight", "finish_reason",
    "tokens_input", "tokens_output", "tokens_reasoning", "cost", "retries", "errors",
)
_QUESTIONS = {
    "latency": "How long did a row take? (log scale; lines at p50, p95, p99; first-token time where streamed)",
    "throughput": "How fast did it go, against the configured limits? Was the API limiting us (429s by kind)?",
    "in_flight": "How many requests were on the wire at once?",
    "finish_reason": "Why did answers stop? A large share of `length` means max_tokens cut them off.",
    "tokens_input": "How long were the prompts?",
    "tokens_output": "How long were the answers, against max_tokens?",
    "tokens_reasoning": "How much did the model think?",
    "cost": "Where did the money go (input, output, thinking)?",
    "retries": "How many attempts did rows need?",
    "errors": "Which errors, and when? (every failed attempt, retried or not)",
}


def plotly_available() -> bool:
    try:
        import plotly.offline  # type: ignore[import-untyped]  # noqa: F401  (plotly ships no py.typed)
    except ImportError:
        return False
    return True


def _centers(edges: list[float], log: bool) -> list[float]:
    if log:
        return [(a * b) ** 0.5 for a, b in zip(edges, edges[1:])]
    return [(a + b) / 2 for a, b in zip(edges, edges[1:])]


def _vline(x: float, label: str) -> tuple[dict[str, Any], dict[str, Any]]:
    shape = {"type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1,
             "line": {"dash": "dot", "width": 1}}
    note = {"x": x, "y": 1, "xref": "x", "yref": "paper", "text": label, "showarrow": False, "yanchor": "bottom"}
    return shape, note


def _latency(report: dict[str, Any]) -> dict[str, Any]:
    data, shapes, notes = [], [], []
    for key, name in (("latency_s", "latency"), ("first_token_s", "first token")):
        stats = report["latency"][key]
        if not stats:
            continue
        data.append({"type": "bar", "name": name, "x": _centers(stats["edges"], True), "y": stats["counts"], "opacity": 0.7})
        if key == "latency_s":
            for q in ("p50", "p95", "p99"):
                shape, note = _vline(stats[q], f"{q} {stats[q]:.3g}s")
                shapes.append(shape)
                notes.append(note)
    layout = {"xaxis": {"type": "log", "title": {"text": "seconds"}}, "yaxis": {"title": {"text": "rows"}},
              "barmode": "overlay", "shapes": shapes, "annotations": notes}
    return {"data": data, "layout": layout}


def _throughput(report: dict[str, Any]) -> dict[str, Any]:
    line = report["timeline"]
    if not line["available"]:
        return _empty("no event log for this output (written by runs since the run report existed)")
    t = line["t"]
    per_min = [r * 60 for r in line["rows_per_s"]]
    tokens_per_min = [r * 60 for r in line["tokens_per_s"]]
    data: list[dict[str, Any]] = [
        {"type": "scatter", "mode": "lines", "name": "answers / min", "x": t, "y": per_min},
        {"type": "scatter", "mode": "lines", "name": "configured RPM", "x": t, "y": line["rpm_limit"], "line": {"dash": "dash"}},
        {"type": "scatter", "mode": "lines", "name": "throttle rate (req/min)", "x": t, "y": line["request_rate_per_min"], "line": {"dash": "dot"}},
        {"type": "scatter", "mode": "lines", "name": "tokens / min", "x": t, "y": tokens_per_min, "yaxis": "y2"},
        {"type": "scatter", "mode": "lines", "name": "configured TPM", "x": t, "y": line["tpm_limit"], "yaxis": "y2", "line": {"dash": "dash"}},
    ]
    for kind, counts in line["throttled_by_kind"].items():
        points = [(x, n) for x, n in zip(t, counts) if n]
        data.append({"type": "scatter", "mode": "markers", "name": f"429 {kind}", "x": [p[0] for p in points],
                     "y": [p[1] for p in points], "yaxis": "y3", "marker": {"symbol": "x", "size": 9}})
    layout = {
        "xaxis": {"title": {"text": "seconds since the run started"}},
        "yaxis": {"title": {"text": "per minute"}, "domain": [0.32, 1]},
        "yaxis2": {"title": {"text": "tokens / min"}, "overlaying": "y", "side": "right"},
        "yaxis3": {"title": {"text": "429s"}, "domain": [0, 0.24]},
    }
    return {"data": data, "layout": layout}


def _in_flight(report: dict[str, Any]) -> dict[str, Any]:
    line = report["timeline"]
    if not line["available"]:
        return _empty("no event log for this output")
    return {"data": [{"type": "scatter", "mode": "lines", "line": {"shape": "hv"}, "name": "in flight (most)",
                      "x": line["t"], "y": line["in_flight_max"]}],
            "layout": {"xaxis": {"title": {"text": "seconds since the run started"}}, "yaxis": {"title": {"text": "requests"}}}}


def _label(record: dict[str, Any]) -> str:
    parts = [str(record[k]) for k in ("model", "variant") if record.get(k)]
    return " / ".join(parts) or "all"


def _finish_reason(report: dict[str, Any]) -> dict[str, Any]:
    by_reason: dict[str, dict[str, Any]] = {}
    for record in report["finish_reason"]:
        trace = by_reason.setdefault(record["finish_reason"], {"type": "bar", "name": record["finish_reason"], "x": [], "y": [], "text": []})
        trace["x"].append(_label(record))
        trace["y"].append(record["count"])
        trace["text"].append(f"{record['share']:.1%}")
    return {"data": list(by_reason.values()), "layout": {"barmode": "group", "yaxis": {"title": {"text": "rows"}}}}


def _tokens(report: dict[str, Any], which: str) -> dict[str, Any]:
    stats = report["tokens"][which]
    if not stats:
        return _empty(f"no {which} token counts in this output")
    layout: dict[str, Any] = {"xaxis": {"title": {"text": f"{which} tokens"}}, "yaxis": {"title": {"text": "rows"}}}
    max_tokens = report["tokens"]["max_tokens"]
    if max_tokens:
        shape, note = _vline(max_tokens, f"max_tokens {max_tokens}")
        layout["shapes"], layout["annotations"] = [shape], [note]
    return {"data": [{"type": "bar", "name": which, "x": _centers(stats["edges"], False), "y": stats["counts"]}], "layout": layout}


def _cost(report: dict[str, Any]) -> dict[str, Any]:
    labels = [_label(record) for record in report["cost"]]
    data = [
        {"type": "bar", "name": part, "x": labels, "y": [record[part] for record in report["cost"]]}
        for part in ("input", "output", "thinking", "unsplit")
        if any(record[part] for record in report["cost"])
    ]
    currency = report["header"]["cost"]["currency"] or ""
    return {"data": data, "layout": {"barmode": "stack", "yaxis": {"title": {"text": f"cost {currency}".strip()}}}}


def _retries(report: dict[str, Any]) -> dict[str, Any]:
    retries = report["retries"]
    return {"data": [{"type": "bar", "name": "rows", "x": retries["attempts"], "y": retries["rows"]}],
            "layout": {"xaxis": {"title": {"text": "attempts"}, "dtick": 1}, "yaxis": {"title": {"text": "rows"}}}}


def _errors(report: dict[str, Any]) -> dict[str, Any]:
    line = report["timeline"]
    if not line["available"]:
        return _empty("no event log for this output")
    data = [{"type": "bar", "name": code, "x": line["t"], "y": counts, "width": line["width_s"]}
            for code, counts in line["attempt_errors_by_code"].items()]
    return {"data": data, "layout": {"barmode": "stack", "xaxis": {"title": {"text": "seconds since the run started"}},
                                     "yaxis": {"title": {"text": "failed attempts"}}}}


def _empty(message: str) -> dict[str, Any]:
    return {"data": [], "layout": {"annotations": [{"text": message, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}],
                                   "xaxis": {"visible": False}, "yaxis": {"visible": False}}}


def figures(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each chart's plotly figure (data and layout, plain JSON), by chart name."""
    return {
        "latency": _latency(report),
        "throughput": _throughput(report),
        "in_flight": _in_flight(report),
        "finish_reason": _finish_reason(report),
        "tokens_input": _tokens(report, "input"),
        "tokens_output": _tokens(report, "output"),
        "tokens_reasoning": _tokens(report, "reasoning"),
        "cost": _cost(report),
        "retries": _retries(report),
        "errors": _errors(report),
    }


def _script_json(value: Any) -> str:
    """JSON safe inside a <script> element (no ``</`` can close it early)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def _header_html(report: dict[str, Any]) -> str:
    header = report["header"]
    rows, cost = header["rows"], header["cost"]
    currency = cost["currency"] or ""
    items = [
        ("job", header["job"] or "-"),
        ("models", ", ".join(header["models"]) or "-"),
        ("variants", ", ".join(header["variants"]) or "-"),
        ("rows", f"{rows['total']}: {rows['ok']} ok, {rows['error']} error, {rows['not_done']} not done"),
        ("wall time", "-" if header["wall_time_s"] is None else f"{header['wall_time_s']:.1f} s"),
        ("cost", f"{cost['total']:.4f} {currency}"),
        ("estimate (at most)", "-" if cost["estimate_max"] is None else f"{cost['estimate_max']:.4f} {currency}"),
        ("budget", "none" if cost["budget"] is None else f"{cost['budget']} {currency}"),
        ("mode", f"{header['mode']} ({header['segments']} run segment(s))"),
    ]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items)
    return f'<table id="header">{cells}</table>'


def _rows_html(table_id: str, records: list[dict[str, Any]]) -> str:
    if not records:
        return f'<table id="{table_id}"><tr><td>no rows</td></tr></table>'
    columns = list(records[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(record[c]))}</td>" for c in columns) + "</tr>" for record in records
    )
    return f'<table id="{table_id}"><tr>{head}</tr>{body}</table>'


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0}th,td{padding:.15em .6em;text-align:left;border-bottom:1px solid #ddd}
section{margin:1.5em 0}.chart{height:380px}p.q{color:#555;margin:.2em 0}
"""


def render_page(report: dict[str, Any]) -> str:
    """The whole HTML page: header, every chart, the top rows, plotly.js and report.json inlined."""
    from plotly.offline import get_plotlyjs

    title = f"qwen-batch report: {report['header']['job'] or report['output']}"
    charts = figures(report)
    sections = "".join(
        f'<section><h2>{html.escape(name.replace("_", " "))}</h2><p class="q">{html.escape(_QUESTIONS[name])}</p>'
        f'<div class="chart" id="chart-{name}"></div></section>'
        for name in CHARTS
    )
    tables = (
        "<section><h2>slowest rows</h2>" + _rows_html("slowest", report["slowest"]) + "</section>"
        "<section><h2>most expensive rows</h2>" + _rows_html("most_expensive", report["most_expensive"]) + "</section>"
    )
    draw = (
        "const figures = JSON.parse(document.getElementById('figures').textContent);"
        "const config = {displaylogo: false, responsive: true};"
        "Promise.all(Object.entries(figures).map(([name, f]) => Plotly.newPlot('chart-' + name, f.data, f.layout, config)))"
        ".then(() => { document.body.dataset.rendered = String(Object.keys(figures).length); });"
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"<script>{get_plotlyjs()}</script></head><body>"
        f"<h1>{html.escape(title)}</h1>{_header_html(report)}{sections}{tables}"
        f'<script id="report-data" type="application/json">{_script_json(report)}</script>'
        f'<script id="figures" type="application/json">{_script_json(charts)}</script>'
        f"<script>{draw}</script></body></html>\n"
    )


def write_page(report: dict[str, Any], path: Path) -> int:
    """Write the page atomically; its size in bytes."""
    from ..checkpoint import write_file_atomically

    data = render_page(report).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, data, mode=0o644)
    return len(data)
