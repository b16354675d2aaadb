"""What the file holds is what is sent: a cell's text reaches the prompt exactly as written.

JSONL numbers keep their text (an integer 5 stays ``5`` next to a 6.5; ``1.50`` and ``1e3``
stay as they are), booleans are ``true``/``false``, CSV cells are their text verbatim (``007``
stays ``007``), Parquet integers are digits. A lone surrogate is that row's error, never a
changed character; a duplicated column name is refused.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_batch.cli import main
from qwen_batch.render import Renderer, RowProblem
from qwen_batch.spec import JobSpec
from qwen_batch.table import open_table

from .conftest import write_job
from .refusal import refused, spec

TEMPLATE_HEAD, TEMPLATE_TAIL = "<<", ">>"


def renderer_and_table(path: Path) -> tuple[Renderer, Any]:
    spec = JobSpec.model_validate(
        {
            "model": "qwen-turbo",
            "input": {"path": str(path), "id_column": "id"},
            "prompt": {"template": TEMPLATE_HEAD + "{v}" + TEMPLATE_TAIL},
            "parameters": {"max_tokens": 10},
        }
    )
    return Renderer(spec, None), open_table(spec)


def prompts(path: Path) -> list[str | RowProblem]:
    """Each row's user message, or its RowProblem, read and rendered as a run does."""
    renderer, table = renderer_and_table(path)
    found: list[str | RowProblem] = []
    index = 0
    for batch in table.iter_batches(batch_size=7):
        for row in batch:
            result = renderer.render(index, row)
            found.append(result if isinstance(result, RowProblem) else result.messages[-1]["content"])
            index += 1
    return found


# A JSON number's text as a person might write it: leading minus, fraction, exponent, any case
# (within a float's range: a larger one is refused, see the test below).
_number_texts = st.from_regex(r"\A-?(0|[1-9][0-9]{0,20})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?\Z").filter(
    lambda text: math.isfinite(float(text))
)
# (JSON text of the cell, the text a prompt must show; None for null)
_json_cells = st.one_of(
    st.integers().map(lambda v: (json.dumps(v), str(v))),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda v: (json.dumps(v), json.dumps(v))),
    _number_texts.map(lambda t: (t, t)),
    st.booleans().map(lambda v: (json.dumps(v), json.dumps(v))),
    st.text().filter(bool).flatmap(lambda v: st.sampled_from([True, False]).map(lambda ascii: (json.dumps(v, ensure_ascii=ascii), v))),
    st.none().map(lambda _: ("null", None)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cells=st.lists(_json_cells, min_size=1, max_size=12))
def test_a_jsonl_cell_reaches_the_prompt_as_the_file_writes_it(tmp_path_factory: pytest.TempPathFactory, cells: list[tuple[str, str | None]]) -> None:
    path = tmp_path_factory.mktemp("cells") / "in.jsonl"
    path.write_text("".join(f'{{"id": "r{i}", "v": {text}}}\n' for i, (text, _) in enumerate(cells)), encoding="utf-8")
    for (written, expected), got in zip(cells, prompts(path), strict=True):
        if expected is None:
            assert isinstance(got, RowProblem) and "null" in got.message, (written, got)
        else:
            assert got == TEMPLATE_HEAD + expected + TEMPLATE_TAIL, (written, got)


# CSV cells are text: whatever is written (numbers, booleans, spaces, quotes, line breaks) is sent.
_csv_texts = st.one_of(
    _number_texts, st.sampled_from(["007", "1e3", "true", "FALSE", " padded ", "1,000", 'say "hi"', "two\nlines", "null", "NaN"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_csv_texts, min_size=1, max_size=12))
def test_a_csv_cell_reaches_the_prompt_verbatim(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> None:
    path = tmp_path_factory.mktemp("cells") / "in.csv"
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n")  # RFC 4180: a field holding \r or \n is quoted
    writer.writerow(["id", "v"])
    writer.writerows([f"r{i}", text] for i, text in enumerate(texts))
    path.write_text(buffer.getvalue(), encoding="utf-8")
    assert prompts(path) == [TEMPLATE_HEAD + text + TEMPLATE_TAIL for text in texts]


def test_a_jsonl_number_beyond_a_floats_range_is_refused_naming_its_line(tmp_path: Path) -> None:
    from qwen_batch.errors import InputError

    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "v": 1}\n{"id": "b", "v": 1E400}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"in\.jsonl:2: the number 1E400 is beyond the range of a float"):
        renderer_and_table(path)


def test_parquet_integers_render_as_integers(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pl.DataFrame({"id": ["a", "b", "c"], "v": [5, None, -7]}, schema={"id": pl.String, "v": pl.Int64}).write_parquet(path)
    got = prompts(path)
    assert got[0] == "<<5>>" and got[2] == "<<-7>>"
    assert isinstance(got[1], RowProblem)


# -- end to end: what the emulator received -----------------------------------------------

SPEC = spec("cells", input={"path": "in.jsonl", "id_column": "id"}, prompt={"template": "n={n} t={t}"})


def sent(emulator: Any) -> dict[str, str]:
    return {body["input"]["messages"][-1]["content"] for body in emulator.received}  # type: ignore[return-value]


def test_a_jsonl_integer_is_sent_as_an_integer_beside_a_float(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    lines = ['{"id": "a", "n": 5, "t": true}', '{"id": "b", "n": 6.5, "t": 7}', '{"id": "c", "n": 1.50, "t": "x"}', '{"id": "d", "n": 1e3, "t": false}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    job = write_job(tmp_path, SPEC)
    assert main(["run", str(job), "--quiet"]) == 0
    assert sent(emulator) == {"n=5 t=true", "n=6.5 t=7", "n=1.50 t=x", "n=1e3 t=false"}
    assert pl.read_parquet(tmp_path / "out" / "result.parquet")["status"].to_list() == ["ok"] * 4


def test_a_lone_surrogate_is_that_rows_error_and_the_other_rows_run(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = ['{"id": "a", "n": 1, "t": "fine"}', '{"id": "b", "n": 2, "t": "bad \\ud800 half"}', '{"id": "c", "n": 3, "t": "\\ud83d\\ude00"}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    job = write_job(tmp_path, SPEC)
    assert main(["run", str(job), "--quiet"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert sent(emulator) == {"n=1 t=fine", "n=3 t=😀"}  # a surrogate pair is one character; a lone half is not sent
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["status"].to_list() == ["ok", "error", "ok"]
    assert "surrogate" in frame["error_message"][1]


def test_a_csv_header_naming_a_column_twice_is_refused(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in.csv").write_bytes(b"id,text,text\na,x,y\n")
    job = write_job(tmp_path, {**SPEC, "input": {"path": "in.csv", "id_column": "id"}, "prompt": {"template": "{text}"}})
    line = refused(["validate", str(job)], tmp_path, emulator, capsys)
    assert "in.csv:1:" in line and "'text' appears twice" in line
