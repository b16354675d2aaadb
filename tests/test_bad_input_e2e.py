"""Bad input through the real CLI: exit 2, one line naming the file/row/key and the fix,
nothing sent to the emulator, nothing overwritten. Row-level problems are row errors."""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_batch.cli import main

from .conftest import sentences_job, write_csv, write_job

BASE_SPEC: dict[str, Any] = {
    "name": "bad",
    "model": "qwen-turbo",
    "input": {"path": "input.csv", "id_column": "id"},
    "prompt": {"template": "Say: {text}"},
    "parameters": {"seed": 7, "max_tokens": 50},
    "execution": {"concurrency": 2, "max_retries": 0, "request_timeout_s": 5},
    "output": {"path": "out/result.parquet"},
}


def spec_with(**changes: Any) -> dict[str, Any]:
    spec = json.loads(json.dumps(BASE_SPEC))
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = spec
        for parent in parents:
            node = node[parent]
        node[key] = value
    return spec


def good_csv(folder: Path) -> None:
    write_csv(folder / "input.csv", ["id", "text"], [["a", "one"], ["b", "two"]])


# Each case prepares the folder and returns the job file; ``fragments`` must all be in the message.
Case = tuple[str, Callable[[Path], Path], list[str]]


def _yaml_text(text: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        good_csv(folder)
        path = folder / "job.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    return make


def _spec(spec: dict[str, Any], prepare: Callable[[Path], None] = good_csv) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        prepare(folder)
        return write_job(folder, spec)

    return make


def _input_bytes(name: str, data: bytes, **changes: Any) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return write_job(folder, spec_with(input__path=name, **changes))

    return make


def _input_folder(folder: Path) -> Path:
    (folder / "input.csv").mkdir()
    return write_job(folder, BASE_SPEC)


def _messages_rows(folder: Path) -> Path:
    rows = [
        {"id": "a", "messages": [{"role": "assistant", "content": "hi"}]},
        {"id": "b", "messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]},
    ]
    (folder / "conv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return write_job(folder, spec_with(input__path="conv.jsonl", prompt={"messages_column": "messages"}))


def _output_is_input(folder: Path) -> Path:
    good_csv(folder)
    return write_job(folder, spec_with(output__path="input.csv"))


def _unwritable_output(folder: Path) -> Path:
    good_csv(folder)
    (folder / "blocker").write_text("a file, not a folder", encoding="utf-8")
    return write_job(folder, spec_with(output__path="blocker/result.parquet"))


CASES: list[Case] = [
    ("malformed-yaml", _yaml_text("model: qwen-turbo\ninput: {path: input.csv\nprompt: [\n"), ["job.yaml", "not valid YAML", "line"]),
    ("misspelt-key", _spec(spec_with(execution__concurency=3)), ["job.yaml", "concurency", "did you mean 'concurrency'"]),
    ("unknown-top-key", _spec({**BASE_SPEC, "modle": "x"}), ["job.yaml", "unknown key 'modle'"]),
    ("wrong-type", _spec(spec_with(execution__concurrency="16")), ["job.yaml", "execution.concurrency", "must be an integer"]),
    ("out-of-range", _spec(spec_with(parameters__top_p=1.5)), ["job.yaml", "parameters.top_p", "must be in (0, 1]", "1.5"]),
    ("negative-retries", _spec(spec_with(execution__max_retries=-1)), ["execution.max_retries", "must be"]),
    ("missing-input", _spec(spec_with(input__path="nowhere.csv"), prepare=lambda f: None), ["nowhere.csv", "not found", "input.path"]),
    ("input-is-a-folder", _input_folder, ["input.csv", "folder", "input.path"]),
    ("unsupported-extension", _input_bytes("rows.xlsx", b"id,text\na,b\n"), ["rows.xlsx", "unsupported input format", ".csv"]),
    ("empty-file", _input_bytes("empty.csv", b""), ["empty.csv", "empty"]),
    ("header-only", _input_bytes("head.csv", b"id,text\n"), ["head.csv", "no rows"]),
    ("template-column-missing", _spec(spec_with(prompt__template="Say: {txt}")), ["input.csv", "'txt'", "did you mean 'text'"]),
    ("invalid-utf8", _input_bytes("latin.csv", b"id,text\na,caf\xe9\n"), ["latin.csv", "UTF-8", "line 2"]),
    ("messages-break-role-rules", _messages_rows, ["conv.jsonl", "messages"]),
    ("duplicate-ids", _input_bytes("dup.csv", b"id,text\na,x\nb,y\na,z\n"), ["dup.csv", "duplicate", "'a'", "rows 1 and 3"]),
    ("null-id", _input_bytes("nullid.csv", b"id,text\na,x\n,y\n"), ["nullid.csv", "empty at row 2", "id"]),
    ("output-is-input", _output_is_input, ["output.path", "input file", "choose another output path"]),
    ("output-in-unwritable-folder", _unwritable_output, ["blocker"]),
    ("insecure-http-base-url", _spec(spec_with(api={"base_url": "http://example.com/api/v1"})), ["api.base_url", "unencrypted", "allow_insecure_http"]),
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


_PARAMS = [
    pytest.param(command, *case, id=f"{command}-{case[0]}")
    for command in ("run", "validate")
    for case in CASES
]


@pytest.mark.parametrize(("command", "name", "make", "fragments"), _PARAMS)
def test_bad_input_is_exit_2_with_one_line_and_nothing_sent_or_overwritten(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str],
    command: str, name: str, make: Callable[[Path], Path], fragments: list[str],
) -> None:
    job = make(tmp_path)
    # Results of an earlier run that a bad run must leave alone.
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "result.parquet").write_bytes(b"earlier output")
    (out / "result.parquet.summary.json").write_text("{}", encoding="utf-8")
    before = _snapshot(tmp_path)
    assert main([command, str(job), "--quiet"] if command == "run" else [command, str(job)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert emulator.ledger == []
    assert _snapshot(tmp_path) == before


def test_a_null_or_empty_prompt_and_one_bad_messages_cell_are_row_errors(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    """Problems known only by reading a row become that row's error; the other rows run."""
    rows = [
        {"id": "a", "messages": [{"role": "user", "content": "fine"}]},
        {"id": "b", "messages": [{"role": "assistant", "content": "no user"}]},
        {"id": "c", "messages": "not json ["},
        {"id": "d", "messages": None},
        {"id": "e", "messages": [{"role": "user", "content": "also fine"}]},
    ]
    (tmp_path / "conv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    job = write_job(tmp_path, spec_with(input__path="conv.jsonl", prompt={"messages_column": "messages"}))
    assert main(["run", str(job), "--quiet"]) == 1
    frame = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert frame["status"].to_list() == ["ok", "error", "error", "error", "ok"]
    assert frame["error_code"].to_list()[1:4] == ["InvalidParameter"] * 3
    assert len([e for e in emulator.ledger if e["status"] == 200]) == 2
    assert len(emulator.ledger) == 2

    prompts = [{"id": "a", "text": "x"}, {"id": "b", "text": None}, {"id": "c", "text": ""}, {"id": "d", "text": "y"}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts), encoding="utf-8")
    spec = spec_with(input__path="prompts.jsonl", prompt={"prompt_column": "text"}, output__path="out/p.parquet")
    job = write_job(tmp_path, spec)
    assert main(["run", str(job), "--quiet"]) == 1
    frame = pl.read_parquet(tmp_path / "out" / "p.parquet")
    assert frame["status"].to_list() == ["ok", "error", "error", "ok"]
    assert len(emulator.ledger) == 4


def test_cell_text_is_never_a_template(tmp_path: Path, job_env: dict, emulator: Any) -> None:
    texts = ["{text}", "{0} {} {{x}}", "%s %d %(name)s", "{text!r:>10} ${HOME} {{{{"]
    job = sentences_job(tmp_path, texts)
    assert main(["run", str(job), "--quiet"]) == 0
    sent = [body["input"]["messages"][-1]["content"] for body in emulator.received]
    assert sorted(sent) == sorted(f"Say something about: {t}" for t in texts)


# -- property: random specs and tables never give a traceback ------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-2, 5), max_size=3),
)
_keys = st.sampled_from(
    ["model", "input", "prompt", "parameters", "execution", "output", "api", "pricing", "cache", "budget",
     "preflight", "model_limits", "name", "seed", "max_tokens", "top_p", "concurrency", "path", "template",
     "prompt_column", "messages_column", "id_column", "base_url", "requests_per_minute", "enabled", "bogus"]
)
_values = st.recursive(_scalars, lambda inner: st.dictionaries(_keys, inner, max_size=4), max_leaves=12)


@st.composite
def _specs(draw: st.DrawFn) -> Any:
    spec: dict[str, Any] = json.loads(json.dumps(BASE_SPEC))
    spec["execution"]["request_timeout_s"] = 2
    spec["input"]["path"] = draw(st.sampled_from(["input.csv", "input.jsonl", "missing.csv", "input.txt"]))
    for _ in range(draw(st.integers(0, 3))):
        section = draw(st.sampled_from(list(spec)))
        if isinstance(spec[section], dict) and draw(st.booleans()):
            spec[section][draw(_keys)] = draw(_values)
        else:
            spec[section] = draw(_values)
    if draw(st.booleans()):
        spec["prompt"] = draw(
            st.sampled_from([{"template": "T {text} {id}"}, {"prompt_column": "text"}, {"messages_column": "text"}])
        )
    return spec


_cells = st.one_of(st.none(), st.text(alphabet=string.printable + "{}%中文", max_size=20), st.integers(), st.floats())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    spec=_specs(),
    rows=st.lists(st.tuples(st.one_of(st.none(), st.text(max_size=4)), _cells), min_size=0, max_size=5),
    raw=st.binary(max_size=40),
    use_raw=st.booleans(),
)
def test_random_specs_and_tables_never_give_a_traceback(
    tmp_path_factory: pytest.TempPathFactory, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str],
    spec: Any, rows: list[tuple[Any, Any]], raw: bytes, use_raw: bool,
) -> None:
    folder = tmp_path_factory.mktemp("prop")
    if use_raw:
        (folder / "input.csv").write_bytes(raw)
        (folder / "input.jsonl").write_bytes(raw)
    else:
        write_csv(folder / "input.csv", ["id", "text"], [["" if i is None else i, "" if t is None else t] for i, t in rows])
        (folder / "input.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows), encoding="utf-8")
    job = folder / "job.yaml"
    job.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    for argv in (["validate", str(job)], ["run", str(job), "--quiet"]):
        code = main(argv)
        captured = capsys.readouterr()
        assert code in (0, 1, 2), (argv, code, captured.err)
        assert "Traceback" not in captured.err + captured.out
        if code == 2:
            assert [line for line in captured.err.splitlines() if line.startswith("error:")], captured.err
