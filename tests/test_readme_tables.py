"""The README documents every output column and every key of ``<output>.summary.json``.

The tables are parsed from README.md and compared with what a real run writes, both ways,
so a key added without docs, or docs left behind by a removed key, fail here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import polars as pl

from qwen_batch.cli import main
from qwen_batch.output import RESULT_COLUMNS

from .conftest import REPO, read_summary, sentences_job

# Maps whose keys are data (an error code, a model name), documented as one placeholder.
DATA_KEYED = {"errors_by_code": "<code>", "cost.by_model": "<model>", "by_variant": "<variant>"}


def _table_names(heading: str) -> set[str]:
    """The backticked names in the first column of the table under ``heading``."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index(heading)
    section = re.split(r"\n#{2,3} ", readme[start + len(heading):], maxsplit=1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return names


def _keys(value: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every leaf of the summary."""
    if not isinstance(value, dict):
        return {prefix}
    if prefix in DATA_KEYED:
        return {f"{prefix}.{DATA_KEYED[prefix]}"} if value else set()
    keys: set[str] = set()
    for name, item in value.items():
        keys |= _keys(item, f"{prefix}.{name}" if prefix else name)
    return keys


def test_every_summary_key_is_in_the_readme_and_every_documented_key_exists(
    tmp_path: Path, job_env: dict, emulator: Any
) -> None:
    job = sentences_job(tmp_path, ["fine", ""])  # "" is a row problem: errors_by_code gets a key
    assert main(["run", str(job), "--quiet"]) == 1
    written = _keys(read_summary(tmp_path / "out" / "result.parquet"))
    assert "errors_by_code.<code>" in written and "cost.by_model.<model>" in written
    # A JSON-mode job's summary has its parse counts besides.
    (tmp_path / "json").mkdir()
    json_job = sentences_job(
        tmp_path / "json", ["fine"], parameters={"seed": 7, "max_tokens": 200, "response_format": {"type": "json_object"}},
        prompt={"system": "Answer in JSON.", "template": "{text}"},
    )
    assert main(["run", str(json_job), "--quiet"]) == 0
    json_keys = _keys(read_summary(tmp_path / "json" / "out" / "result.parquet"))
    assert {"rows.parse_status.ok", "rows.reasks"} <= json_keys
    written |= json_keys
    documented = _table_names("### Summary (`<output>.summary.json`)")
    assert written - documented == set(), "summary keys missing from README"
    assert documented - written == set(), "README documents summary keys that do not exist"


def test_every_output_column_is_in_the_readme(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    job = sentences_job(tmp_path, ["fine"])
    assert main(["run", str(job), "--quiet"]) == 0
    written = set(pl.read_parquet(tmp_path / "out" / "result.parquet").columns) - {"id", "text"}
    assert written == set(RESULT_COLUMNS)
    assert _table_names("## Output") == written
