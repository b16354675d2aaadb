"""``qwen-batch report`` and ``run --report``: aggregate, write report.json and the page, print tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from ..errors import StorageError
from .aggregate import build_report, default_html_path, report_json_path


def write_report(
    output: Path, *, html: Path | None = None, as_json: bool = False, out: TextIO | None = None, quiet: bool = False
) -> int:
    """Write ``<output>.report.json`` and the HTML page (``html``, default ``<output>.report.html``).

    Prints the tables (or, ``as_json``, the JSON) on ``out`` and where the files went on
    stderr, unless ``quiet``. Without plotly, says in one note how to get the page. Returns 0.
    """
    from ..checkpoint import write_file_atomically
    from .page import INSTALL_HINT, plotly_available, write_page
    from .tables import render_tables

    output = Path(output)
    report = build_report(output)
    json_path = report_json_path(output)
    data = (json.dumps(report, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    try:
        write_file_atomically(json_path, data, mode=0o644)
    except OSError as exc:
        raise StorageError(f"{json_path}: cannot write the report ({exc.strerror or exc})") from None
    notes: list[str] = [f"report: {json_path}"]
    if plotly_available():
        page_path = Path(html) if html is not None else default_html_path(output)
        try:
            size = write_page(report, page_path)
        except OSError as exc:
            raise StorageError(f"{page_path}: cannot write the report page ({exc.strerror or exc})") from None
        notes.append(f"report page: {page_path} ({size / 1e6:.1f} MB, opens offline)")
    else:
        notes.append(f"note: no HTML page: the plots need plotly ({INSTALL_HINT})")
    if quiet:
        return 0
    out = out if out is not None else sys.stdout
    if as_json:
        out.write(data.decode("utf-8"))
    else:
        render_tables(report, out)
    for line in notes:
        print(line, file=sys.stderr)
    return 0
