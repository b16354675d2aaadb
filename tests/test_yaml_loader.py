"""Job files are read with YAML 1.2 meaning, or refused where YAML 1.1 would read them differently.

A plain value either loads as the YAML 1.2 core schema reads it or is refused (exit 2, one
line naming the file and line); never silently another value. Duplicate keys are refused
with both lines; an alias bomb is refused quickly and in bounded memory.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qwen_batch.cli import main
from qwen_batch.errors import SpecError
from qwen_batch.spec import load_spec
from qwen_batch.yaml12 import MAX_DEPTH, MAX_NODES, YamlRefused, load_yaml

from .conftest import write_csv

JOB_HEAD = """\
name: yaml-job
model: qwen-turbo
input: {path: input.csv, id_column: id}
prompt: {template: "Say: {text}"}
output: {path: out/result.parquet}
"""


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def job_folder(folder: Path, body: str) -> Path:
    write_csv(folder / "input.csv", ["id", "text"], [["a", "one"], ["b", "two"]])
    job = folder / "job.yaml"
    job.write_text(JOB_HEAD + body, encoding="utf-8")
    return job


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --- what YAML 1.2 means, generated independently of the loader ------------------------------

# (text as written, its YAML 1.2 core-schema value)
_ints = st.integers(-(10**20), 10**20)
_core_numbers = st.one_of(
    _ints.map(lambda n: (str(n), n)),
    _ints.map(lambda n: (f"+{n}" if n >= 0 else str(n), n)),
    st.integers(0, 10**12).map(lambda n: (f"0o{n:o}", n)),
    st.integers(0, 10**12).map(lambda n: (f"0x{n:x}", n)),
    st.integers(0, 10**12).map(lambda n: (f"0x{n:X}", n)),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda x: (repr(x), x)),
    st.tuples(st.integers(0, 999), st.integers(-30, 30)).map(lambda p: (f"{p[0]}e{p[1]}", float(f"{p[0]}e{p[1]}"))),
    st.tuples(st.integers(0, 999), st.integers(0, 30)).map(lambda p: (f"{p[0]}.5E+{p[1]}", float(f"{p[0]}.5e{p[1]}"))),
    st.sampled_from([(".inf", math.inf), ("+.inf", math.inf), ("-.Inf", -math.inf), (".INF", math.inf),
                     (".5", 0.5), ("-.5", -0.5), ("1.", 1.0), ("0", 0), ("-0", 0)]),
)
_core_words = st.sampled_from([
    ("true", True), ("True", True), ("TRUE", True), ("false", False), ("False", False), ("FALSE", False),
    ("null", None), ("Null", None), ("NULL", None), ("~", None),
])
# Plain values YAML 1.1 reads as something else (the loader must refuse these, or give the 1.2 value).
_yaml11_forms = st.one_of(
    st.integers(0, 10**6).map(lambda n: (f"0{n:o}", int(f"0{n:o}"))),  # 1.1 octal; 1.2 decimal with a leading 0
    st.integers(0, 10**6).map(lambda n: (f"0{n}", int(f"0{n}"))),  # leading zeros with 8s and 9s
    st.tuples(st.integers(1, 99), st.integers(0, 59)).map(lambda p: (f"{p[0]}:{p[1]:02d}", f"{p[0]}:{p[1]:02d}")),
    st.tuples(st.integers(1, 99), st.integers(0, 59), st.integers(0, 59)).map(
        lambda p: (f"{p[0]}:{p[1]:02d}:{p[2]:02d}", f"{p[0]}:{p[1]:02d}:{p[2]:02d}")),
    st.tuples(st.integers(0, 9), st.integers(0, 59)).map(lambda p: (f"{p[0]}:{p[1]:02d}.5", f"{p[0]}:{p[1]:02d}.5")),
    st.integers(1000, 10**9).map(lambda n: (f"{n:_}", f"{n:_}")),  # 1_000: 1.1 int, 1.2 text
    st.integers(0, 10**6).map(lambda n: (f"0b{n:b}", f"0b{n:b}")),  # binary: 1.1 int, 1.2 text
    st.integers(0, 10**6).map(lambda n: (f"-0x{n:x}", f"-0x{n:x}")),  # signed hex: 1.1 int, 1.2 text
    st.sampled_from(["y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO",
                     "on", "On", "ON", "off", "Off", "OFF"]).map(lambda w: (w, w)),  # 1.1 booleans, 1.2 text
)


def double_quoted(text: str) -> str:
    """``text`` as a YAML double-quoted scalar: printable ASCII as is, everything else a \\U escape."""
    return '"' + "".join(c if " " <= c <= "~" and c not in '"\\' else f"\\U{ord(c):08x}" for c in text) + '"'


_quoted = st.text(max_size=20).map(lambda s: (double_quoted(s), s))
_single_quoted = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=20).map(
    lambda s: ("'" + s.replace("'", "''") + "'", s))


def same(a: Any, b: Any) -> bool:
    """The same value and type (1 is not 1.0 nor True), NaN equal to NaN."""
    return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


def same_number(a: Any, b: Any) -> bool:
    """As sent in JSON: an int and a float of equal value are one number; a bool or text is never a number."""
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return a == b if numbers else same(a, b)


@settings(max_examples=400, deadline=None)
@given(st.one_of(_core_numbers, _core_words, _quoted, _single_quoted))
def test_yaml_12_core_values_load_as_yaml_12_reads_them(written: tuple[str, Any]) -> None:
    text, value = written
    assert same(load_yaml(f"key: {text}\n")["key"], value), text


@settings(max_examples=300, deadline=None)
@given(st.one_of(_core_numbers, _core_words, _quoted, _yaml11_forms))
@example(("017", 17))
@example(("1:30", "1:30"))
@example(("yes", "yes"))
@example(("07", 7))
def test_any_scalar_loads_with_its_yaml_12_value_or_is_refused_with_its_line(written: tuple[str, Any]) -> None:
    text, value = written
    try:
        loaded = load_yaml(f"a: 1\nkey: {text}\n")["key"]
    except YamlRefused as refused:
        assert refused.line == 2
        assert text in refused.message and "YAML 1.1" in refused.message and "\n" not in refused.message
    else:
        assert same(loaded, value), (text, loaded, value)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("017", ["017", "octal 15", "17 in YAML 1.2", "write", "quote"]),
        ("1:30", ["1:30", "90", "base 60", "quote"]),
        ("1:30:00", ["5400"]),
        ("yes", ["yes", "true in YAML 1.1", "write true", 'quote it ("yes")']),
        ("No", ["false", "write false"]),
        ("on", ["true"]),
        ("OFF", ["false"]),
        ("y", ["true"]),
        ("n", ["false"]),
        ("1_000", ["1000", "write 1000"]),
        ("0b101", ["the number 5"]),
        ("-0x1F", ["-31"]),
        ("09", ["9 in YAML 1.2"]),
    ],
)
def test_each_yaml_11_only_value_is_refused_naming_the_key_and_the_fix(text: str, fragments: list[str]) -> None:
    with pytest.raises(YamlRefused) as caught:
        load_yaml(f"model: qwen-turbo\nparameters:\n  seed: {text}\n")
    assert caught.value.line == 3
    assert caught.value.message.startswith(f"seed: {text} ")
    for fragment in fragments:
        assert fragment in caught.value.message, (fragment, caught.value.message)


def test_quoted_or_explicitly_tagged_text_is_text_and_keys_are_names() -> None:
    data = load_yaml('a: "017"\nb: \'yes\'\nc: !!str 1:30\nn: 1\non: 2\nd: 2024-01-01\ne: 07\n')
    assert data == {"a": "017", "b": "yes", "c": "1:30", "n": 1, "on": 2, "d": "2024-01-01", "e": 7}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("seed: !!int 017", "octal 15"),
        ("seed: !!bool yes", "true in YAML 1.1"),
        ("seed: !!int abc", "!!int 'abc' is not an integer"),
        ("seed: !!float x", "is not a number"),
        ("seed: !!binary aGk=", "!!binary is not used"),
        ("seed: !!timestamp 2024-01-01", "!!timestamp is not used"),
        ("seed: !custom 1", "!custom is not used"),
        ("base: &b {x: 1}\nother:\n  <<: *b", "merge key"),
        ("other:\n  !!merge <<: {x: 1}", "merge key"),
        ("seed: " + "9" * 5000, "more than 1000 digits"),
        ("seed: 0x" + "f" * 5000, "more than 1000 digits"),
    ],
)
def test_explicit_tags_merge_keys_and_giant_numbers_are_refused(text: str, fragment: str) -> None:
    with pytest.raises(YamlRefused) as caught:
        load_yaml(text + "\n")
    assert fragment in caught.value.message
    assert len(caught.value.message) < 300


# --- duplicate keys ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "line", "fragment"),
    [
        ("parameters: {seed: 1}\nmodel: qwen-plus\n", 7, "key 'model' is given twice (lines 2 and 7); keep one"),
        ("parameters:\n  seed: 1\n  max_tokens: 9\n  seed: 2\n", 9, "key 'seed' is given twice (lines 7 and 9)"),
        ("parameters: {seed: 1, seed: 2}\n", 6, "key 'seed' is given twice (both on line 6)"),
        ("execution:\n  concurrency: 2\nexecution:\n  concurrency: 3\n", 8, "key 'execution' is given twice (lines 6 and 8)"),
    ],
)
def test_a_duplicated_key_is_exit_2_naming_both_lines_and_nothing_is_sent_or_changed(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str],
    body: str, line: int, fragment: str,
) -> None:
    job = job_folder(tmp_path, body)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "result.parquet").write_bytes(b"earlier output")
    before = snapshot(tmp_path)
    for command in (["run", str(job), "--quiet"], ["validate", str(job)]):
        assert main(command) == 2
        message = one_error_line(capsys.readouterr().err)
        assert message == f"error: {job}:{line}: {fragment}" or message.startswith(f"error: {job}:{line}: {fragment}")
    assert emulator.ledger == []
    assert snapshot(tmp_path) == before


# --- what is sent is what YAML 1.2 reads, end to end -------------------------------------------

_fields = st.sampled_from(["seed", "temperature", "enable_search"])
_any_scalar = st.one_of(_core_numbers, _core_words, _quoted, _yaml11_forms)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(field=_fields, written=_any_scalar)
@example(field="seed", written=("017", 17))
@example(field="seed", written=("1:30", "1:30"))
@example(field="enable_search", written=("yes", "yes"))
@example(field="seed", written=("0o17", 15))
def test_a_run_sends_the_yaml_12_value_or_refuses_with_exit_2_and_sends_nothing(
    tmp_path_factory: pytest.TempPathFactory, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str],
    field: str, written: tuple[str, Any],
) -> None:
    text, value = written
    folder = tmp_path_factory.mktemp("scalar")
    job = job_folder(folder, f"parameters:\n  max_tokens: 20\n  {field}: {text}\n")
    sent_before = len(emulator.received)
    code = main(["run", str(job), "--quiet", "--no-cache"])
    err = capsys.readouterr().err
    sent = emulator.received[sent_before:]
    if code == 2:
        assert one_error_line(err).startswith(f"error: {job}:")
        assert sent == []
        assert not (folder / "out").exists()
    else:
        assert code == 0, err
        assert len(sent) == 2
        # null means "not set": the parameter is not sent at all
        assert all(same_number(body["parameters"].get(field), value) for body in sent), (text, sent[0]["parameters"])


# --- anchors and aliases -------------------------------------------------------------------------


def laughs_in_model(levels: int = 9, width: int = 9) -> str:
    """The billion laughs inside ``model:`` itself, in an otherwise valid job: its value is a list."""
    items = [f"  - &l0 [{', '.join(['lol'] * width)}]"]
    items += [f"  - &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "model:\n" + "\n".join(items) + "\ninput: {path: input.csv}\nprompt: {template: 'Say: {text}'}\n"


def laughs(levels: int = 9, width: int = 9, under: str = "model") -> str:
    """The billion-laughs document: ``width ** levels`` strings from a few hundred bytes."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\n{under}: *l{levels}\n"


_MEASURE = textwrap.dedent("""
    import json, sys, time, tracemalloc
    from qwen_batch.cli import build_parser, main
    import qwen_batch.job, qwen_batch.catalog
    build_parser()  # every import done before measuring: what is measured is reading the job file
    tracemalloc.start()
    cpu = time.process_time()
    code = main(sys.argv[1:])
    cpu = time.process_time() - cpu
    peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"code": code, "cpu_s": cpu, "peak_bytes": peak}))
""")


@pytest.mark.parametrize(
    "document",
    [
        laughs_in_model(),
        laughs(),
        "l0: &l0 {a: lol, b: lol, c: lol}\n"
        + "".join(f"l{i}: &l{i} {{a: *l{i - 1}, b: *l{i - 1}, c: *l{i - 1}, d: *l{i - 1}}}\n" for i in range(1, 12))
        + "model: qwen-turbo\ninput: *l11\n",
        laughs(levels=30, width=2, under="parameters:\n  stop"),
    ],
    ids=["billion-laughs-in-model", "billion-laughs-under-model", "mapping-bomb-under-input", "deep-binary-bomb-under-stop"],
)
def test_an_alias_bomb_is_refused_quickly_in_bounded_memory(tmp_path: Path, document: str) -> None:
    write_csv(tmp_path / "input.csv", ["id", "text"], [["a", "one"]])
    job = tmp_path / "job.yaml"
    job.write_text(document, encoding="utf-8")
    before = snapshot(tmp_path)
    done = subprocess.run([sys.executable, "-c", _MEASURE, "validate", str(job)],
                          capture_output=True, text=True, timeout=60)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["code"] == 2
    message = one_error_line(done.stderr)
    assert message.startswith(f"error: {job}:") and f"more than {MAX_NODES:,} values" in message
    assert len(message) < 400
    assert measured["cpu_s"] < 0.5, measured
    assert measured["peak_bytes"] < 20 * 1024 * 1024, measured
    assert snapshot(tmp_path) == before


def test_an_alias_that_contains_itself_and_deep_nesting_are_refused(tmp_path: Path) -> None:
    cases = {
        "self.yaml": ("model: &m [a, *m]\n", "used inside its own anchor"),
        "deep.yaml": ("model: " + "[" * 5000 + "]" * 5000 + "\n", f"more than {MAX_DEPTH} levels deep"),
        "deep-block.yaml": ("".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "v: 1\n", "levels deep"),
    }
    for name, (text, fragment) in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(SpecError) as caught:
            load_spec(tmp_path / name)
        assert str(caught.value).startswith(f"{tmp_path / name}:")
        assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_a_document_with_too_many_values_is_refused_without_aliases() -> None:
    with pytest.raises(YamlRefused, match="more than 100,000 values"):
        load_yaml("stop: [" + ", ".join(["1"] * (MAX_NODES + 10)) + "]\n")


def test_error_messages_never_quote_a_huge_value_whole(tmp_path: Path) -> None:
    """A value in an error is cut short, whatever its size (a 1 MB string, a list of aliases)."""
    huge = "x" * 1_000_000
    base = JOB_HEAD.replace("name: yaml-job\n", "")
    for body in (f'execution: {{concurrency: "{huge}"}}\n', f'name: "a/{huge}"\n', f'"{huge}": 1\n',
                 f'parameters: {{result_format: "{huge}"}}\n', f"api: {{base_url: 'https://{huge}@x/'}}\n",
                 f"parameters: {{seed: {'9' * 900}}}\n"):
        job = tmp_path / "job.yaml"
        job.write_text(base + body, encoding="utf-8")
        with pytest.raises(SpecError) as caught:
            load_spec(job)
        assert len(str(caught.value)) < 400, str(caught.value)[:400]
