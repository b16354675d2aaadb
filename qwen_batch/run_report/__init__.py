"""``qwen-batch report``: a run's aggregates (report.json), terminal tables and an HTML page.

``aggregate`` reads the output Parquet (lazily, by column name; columns added by later
features are optional), the summary and the event log next to it, and returns every figure
the tables and the page show. ``tables`` prints them with rich; ``page`` draws them with
plotly (the optional ``qwen-batch[report]`` extra). Charts receive bins, never raw rows.
"""

from __future__ import annotations

from .aggregate import REPORT_FORMAT, build_report, report_json_path

__all__ = ["REPORT_FORMAT", "build_report", "report_json_path"]
