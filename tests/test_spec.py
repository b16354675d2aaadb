"""Job spec loading: every bad spec is one SpecError line naming the file, the key and the fix."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_batch.catalog import builtin
from qwen_batch.errors import ConfigError, SpecError
from qwen_batch.paths import job_paths
from qwen_batch.spec import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_RETRIES,
    DEFAULT_REQUEST_TIMEOUT_S,
    DEFAULT_SEED,
    JobSpec,
    check_base_url,
    load_spec,
    parse_template,
    price_for,
    resolve_model,
)
from qwen_batch.wire import DEFAULT_BASE_URL

BASE: dict[str, Any] = {
    "model": "qwen-turbo",
    "input": {"path": "data/in.csv", "id_column": "id"},
    "prompt": {"system": "Be brief.", "template": "Translate:\n{text}"},
}
DELETE = object()


def with_changes(changes: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return data


def write_job(folder: Path, data: Any, name: str = "job.yaml") -> Path:
    path = folder / "jobs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def spec_error(tmp_path: Path, data: Any) -> str:
    path = write_job(tmp_path, data)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert "\n" not in message, "the message is one line"
    assert message.startswith(f"{path}: "), "the message names the job file first"
    return message


def test_a_minimal_spec_gets_documented_defaults_and_absolute_paths(tmp_path: Path) -> None:
    """Defaults are the named constants; paths are taken from the job file's folder."""
    path = write_job(tmp_path, BASE, "translate.yaml")
    spec = load_spec(path)
    assert spec.name == "translate"
    assert spec.path == path
    assert spec.input.path == (tmp_path / "jobs" / "data" / "in.csv").resolve()
    assert spec.output.path == (tmp_path / "jobs").resolve() / "out" / "translate.parquet"
    assert spec.parameters.seed == DEFAULT_SEED
    assert spec.execution.concurrency == DEFAULT_CONCURRENCY
    assert spec.execution.max_retries == DEFAULT_MAX_RETRIES
    assert spec.execution.request_timeout_s == DEFAULT_REQUEST_TIMEOUT_S
    assert spec.execution.requests_per_minute is None
    assert spec.api.base_url == DEFAULT_BASE_URL and spec.api.allow_insecure_http is False
    assert spec.cache.enabled is True and spec.cache.path is None
    assert spec.budget.max_cost is None
    assert spec.preflight.over_long == "fail"
    assert spec.pricing is None
    assert "top_p=None" in repr(spec.parameters), "config objects have a readable repr"


def test_the_full_issue_example_loads(tmp_path: Path) -> None:
    """Every key the issue names is accepted with its documented value."""
    data = with_changes(
        {
            "name": "translate-zh-en",
            "parameters": {
                "seed": 1234, "max_tokens": 1500, "temperature": 0.7, "top_p": 0.8, "top_k": 50,
                "repetition_penalty": 1.1, "presence_penalty": 0.0, "stop": ["###"],
                "enable_search": False, "result_format": "message",
            },
            "execution": {
                "concurrency": 16, "requests_per_minute": 300, "tokens_per_minute": 300000,
                "max_retries": 8, "request_timeout_s": 120,
            },
            "output": {"path": "out/translate.parquet"},
            "api": {"base_url": "https://dashscope.aliyuncs.com/api/v1", "allow_insecure_http": False},
            "pricing": {"currency": "CNY", "input_per_1k": 0.008, "output_per_1k": 0.008},
            "cache": {"enabled": True, "path": "cache"},
            "budget": {"max_cost": 5},
            "preflight": {"over_long": "error"},
            "model_limits": {"max_input_tokens": 7000, "max_output_tokens": 1500},
        }
    )
    spec = load_spec(write_job(tmp_path, data))
    assert spec.name == "translate-zh-en"
    assert spec.parameters.stop == ["###"]
    assert spec.output.path == (tmp_path / "jobs" / "out" / "translate.parquet").resolve()
    assert spec.cache.path == (tmp_path / "jobs" / "cache").resolve()
    assert spec.budget.max_cost == 5.0
    assert spec.preflight.over_long == "error"


@pytest.mark.parametrize(
    "stop", ["###", ["a", "b"], [1, 2], [[1, 2], [3]]], ids=["str", "list-str", "list-int", "list-list-int"]
)
def test_every_documented_stop_shape_is_accepted(tmp_path: Path, stop: Any) -> None:
    """stop is str, list[str], list[int] or list[list[int]]."""
    assert load_spec(write_job(tmp_path, with_changes({"parameters.stop": stop}))).parameters.stop == stop


BAD_SPECS: list[tuple[str, dict[str, Any], list[str]]] = [
    # unknown or misspelt keys, at each level, with a suggestion
    ("top-level typo", {"paramters": {"seed": 1}}, ["unknown key 'paramters'", "did you mean 'parameters'?"]),
    ("input typo", {"input.id_colum": "id"}, ["input: unknown key 'id_colum'", "'id_column'"]),
    ("prompt typo", {"prompt.sytem": "x"}, ["prompt: unknown key 'sytem'", "'system'"]),
    ("parameters typo", {"parameters.temprature": 0.5}, ["parameters: unknown key 'temprature'", "'temperature'"]),
    ("unknown parameter", {"parameters.n": 2}, ["parameters: unknown key 'n'", "valid keys:"]),
    ("execution typo", {"execution.concurency": 4}, ["execution: unknown key 'concurency'", "'concurrency'"]),
    ("output typo", {"output.pth": "x.parquet"}, ["output: unknown key 'pth'", "'path'"]),
    ("api typo", {"api.base_ulr": "https://x"}, ["api: unknown key 'base_ulr'", "'base_url'"]),
    ("pricing typo", {"pricing": {"input_per_1k": 1, "output_per_1k": 1, "curency": "CNY"}}, ["'currency'"]),
    ("cache typo", {"cache.enable": True}, ["cache: unknown key 'enable'", "'enabled'"]),
    ("budget typo", {"budget.max_costs": 1}, ["budget: unknown key 'max_costs'", "'max_cost'"]),
    ("preflight typo", {"preflight.overlong": "fail"}, ["preflight: unknown key 'overlong'", "'over_long'"]),
    ("limits typo", {"model_limits.max_input": 5}, ["model_limits: unknown key 'max_input'", "'max_input_tokens'"]),
    # missing keys
    ("no model", {"model": DELETE}, ["missing key 'model'", "qwen-turbo"]),
    ("no input", {"input": DELETE}, ["missing key 'input'"]),
    ("no input path", {"input.path": DELETE}, ["missing key 'input.path'"]),
    ("no prompt", {"prompt": DELETE}, ["missing key 'prompt'"]),
    ("pricing incomplete", {"pricing": {"input_per_1k": 1}}, ["missing key 'pricing.output_per_1k'"]),
    # prompt source
    ("two prompt sources", {"prompt.prompt_column": "text"}, ["prompt: give exactly one of", "template, prompt_column"]),
    ("no prompt source", {"prompt.template": DELETE}, ["prompt: give exactly one of", "got none"]),
    ("format spec", {"prompt.template": "{text:>10}"}, ["prompt.template", "{text:>10}", "format specs"]),
    ("conversion", {"prompt.template": "{text!r}"}, ["prompt.template", "{text!r}", "conversions"]),
    ("attribute", {"prompt.template": "{text.upper}"}, ["prompt.template", "{text.upper}", "attribute or index"]),
    ("index", {"prompt.template": "{text[0]}"}, ["prompt.template", "{text[0]}", "attribute or index"]),
    ("positional", {"prompt.template": "hi {}"}, ["prompt.template", "names no column"]),
    ("lone brace", {"prompt.template": "a { b"}, ["prompt.template", "{{"]),
    ("empty column name", {"prompt": {"prompt_column": ""}}, ["prompt.prompt_column: must not be empty"]),
    # wrong types
    ("model not str", {"model": 3}, ["model: must be a string, got 3 (int)"]),
    ("input not mapping", {"input": "data.csv"}, ["input: must be a mapping of keys"]),
    ("seed str", {"parameters.seed": "1234"}, ["parameters.seed: must be an integer, got '1234' (str)"]),
    ("seed bool", {"parameters.seed": True}, ["parameters.seed: must be an integer"]),
    ("seed float", {"parameters.seed": 1.5}, ["parameters.seed: must be an integer"]),
    ("temperature str", {"parameters.temperature": "hot"}, ["parameters.temperature: must be a number"]),
    ("enable_search str", {"parameters.enable_search": "yes"}, ["parameters.enable_search: must be true or false"]),
    ("concurrency str", {"execution.concurrency": "16"}, ["execution.concurrency: must be an integer"]),
    ("result_format", {"parameters.result_format": "json"}, ["parameters.result_format: must be one of 'text' or 'message'"]),
    ("over_long", {"preflight.over_long": "skip"}, ["preflight.over_long: must be one of 'fail' or 'error'"]),
    ("name with slash", {"name": "a/b"}, ["name: must be a plain file name"]),
    # every documented range
    ("seed < 0", {"parameters.seed": -1}, ["parameters.seed: must be in [0, 9223372036854775807], got -1"]),
    ("seed too big", {"parameters.seed": 2**63}, ["parameters.seed: must be in [0, 9223372036854775807]"]),
    ("temperature 2", {"parameters.temperature": 2}, ["parameters.temperature: must be in [0, 2), got 2"]),
    ("temperature < 0", {"parameters.temperature": -0.1}, ["parameters.temperature: must be in [0, 2), got -0.1"]),
    ("temperature nan", {"parameters.temperature": float("nan")}, ["parameters.temperature: must be a finite number, got nan"]),
    ("rpm inf", {"execution.requests_per_minute": float("inf")}, ["execution.requests_per_minute: must be a finite number, got inf"]),
    ("top_p 0", {"parameters.top_p": 0}, ["parameters.top_p: must be in (0, 1], got 0"]),
    ("top_p 1.5", {"parameters.top_p": 1.5}, ["parameters.top_p: must be in (0, 1], got 1.5"]),
    ("top_k < 0", {"parameters.top_k": -1}, ["parameters.top_k: must be >= 0, got -1"]),
    ("repetition_penalty 0", {"parameters.repetition_penalty": 0}, ["parameters.repetition_penalty: must be > 0, got 0"]),
    ("presence_penalty 2.5", {"parameters.presence_penalty": 2.5}, ["parameters.presence_penalty: must be in [-2, 2], got 2.5"]),
    ("presence_penalty -3", {"parameters.presence_penalty": -3}, ["parameters.presence_penalty: must be in [-2, 2], got -3"]),
    ("max_tokens 0", {"parameters.max_tokens": 0}, ["parameters.max_tokens: must be >= 1, got 0"]),
    ("max_tokens over model", {"parameters.max_tokens": 1501}, ["parameters.max_tokens: Range of max_tokens should be [1, 1500]", "got 1501"]),
    ("stop mixed", {"parameters.stop": ["a", 1]}, ["parameters.stop: must be a str, list[str], list[int] or list[list[int]]"]),
    ("stop empty", {"parameters.stop": []}, ["parameters.stop: must be a str"]),
    ("stop bools", {"parameters.stop": [True]}, ["parameters.stop"]),
    ("stop ragged", {"parameters.stop": [[1], "a"]}, ["parameters.stop"]),
    ("concurrency 0", {"execution.concurrency": 0}, ["execution.concurrency: must be in [1, 4096], got 0"]),
    ("concurrency 4097", {"execution.concurrency": 4097}, ["execution.concurrency: must be in [1, 4096], got 4097"]),
    ("rpm 0", {"execution.requests_per_minute": 0}, ["execution.requests_per_minute: must be > 0, got 0"]),
    ("tpm < 0", {"execution.tokens_per_minute": -5}, ["execution.tokens_per_minute: must be > 0, got -5"]),
    ("max_retries -1", {"execution.max_retries": -1}, ["execution.max_retries: must be in [0, 100], got -1"]),
    ("max_retries 101", {"execution.max_retries": 101}, ["execution.max_retries: must be in [0, 100], got 101"]),
    ("timeout 0", {"execution.request_timeout_s": 0}, ["execution.request_timeout_s: must be in (0, 3600], got 0"]),
    ("timeout 3601", {"execution.request_timeout_s": 3601}, ["execution.request_timeout_s: must be in (0, 3600]"]),
    ("max_cost 0", {"budget.max_cost": 0}, ["budget.max_cost: must be > 0, got 0"]),
    ("negative price", {"pricing": {"input_per_1k": -1, "output_per_1k": 1}}, ["pricing.input_per_1k: must be >= 0"]),
    ("limits 0", {"model_limits.max_output_tokens": 0}, ["model_limits.max_output_tokens: must be >= 1"]),
    # the API key's safety
    ("plain http", {"api.base_url": "http://example.com/api/v1"}, ["api.base_url", "unencrypted", "allow_insecure_http: true"]),
    ("not a url", {"api.base_url": "dashscope"}, ["api.base_url", "not an http(s) URL"]),
    # paths
    ("output is input", {"output.path": "data/in.csv"}, ["output.path is the input file", "choose another output path"]),
]


@pytest.mark.parametrize(("changes", "expected"), [case[1:] for case in BAD_SPECS], ids=[case[0] for case in BAD_SPECS])
def test_a_bad_spec_is_one_line_naming_the_key_and_the_fix(
    tmp_path: Path, changes: dict[str, Any], expected: list[str]
) -> None:
    """Each mistake raises SpecError whose single line names the file, the key and what to do."""
    message = spec_error(tmp_path, with_changes(changes))
    for fragment in expected:
        assert fragment in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: qwen-turbo\ninput: {path: a.csv\n", "not valid YAML"),
        ("model: [unclosed\n", "line"),
        ("- just\n- a list\n", "a list, not a mapping"),
        ("", "is empty"),
        ("42\n", "a int, not a mapping"),
    ],
    ids=["unclosed-flow", "unclosed-list", "list-top-level", "empty", "scalar"],
)
def test_malformed_or_non_mapping_yaml_is_a_spec_error(tmp_path: Path, text: str, expected: str) -> None:
    """YAML that does not parse, or is not a mapping, is a one-line SpecError."""
    assert expected in spec_error(tmp_path, text)


def test_a_missing_job_file_is_a_spec_error(tmp_path: Path) -> None:
    """A path that does not exist names itself and says so."""
    with pytest.raises(SpecError, match="job file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_a_job_file_that_is_not_utf8_is_a_spec_error(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are reported, not a UnicodeDecodeError."""
    path = tmp_path / "job.yaml"
    path.write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(path)


def test_model_limits_raise_the_max_tokens_bound(tmp_path: Path) -> None:
    """model_limits.max_output_tokens overrides the catalog, so a larger max_tokens is accepted."""
    data = with_changes({"parameters.max_tokens": 4000, "model_limits.max_output_tokens": 8192})
    spec = load_spec(write_job(tmp_path, data))
    info = resolve_model(spec, builtin())
    assert info is not None and info.max_output_tokens == 8192
    assert spec.parameters.max_tokens == 4000


def test_model_limits_lowering_the_output_limit_caps_the_default(tmp_path: Path) -> None:
    """A lowered max_output_tokens also lowers the model's default max_tokens."""
    spec = load_spec(write_job(tmp_path, with_changes({"model_limits": {"max_output_tokens": 100, "max_input_tokens": 50}})))
    info = resolve_model(spec, builtin())
    assert info is not None
    assert (info.max_output_tokens, info.default_max_tokens, info.max_input_tokens) == (100, 100, 50)


def test_an_unknown_model_loads_and_resolves_to_none(tmp_path: Path) -> None:
    """An unknown model is the caller's warning, not a spec error; no max_tokens bound applies."""
    spec = load_spec(write_job(tmp_path, with_changes({"model": "qwen-future", "parameters.max_tokens": 99999})))
    assert resolve_model(spec, builtin()) is None
    assert price_for(spec, None) is None


def test_the_spec_price_overrides_the_catalog(tmp_path: Path) -> None:
    """pricing: gives a flat Price from the job spec; without it the catalog's price is used."""
    plain = load_spec(write_job(tmp_path, BASE))
    info = resolve_model(plain, builtin())
    assert info is not None and price_for(plain, info) is info.price
    priced = load_spec(write_job(tmp_path, with_changes({"pricing": {"currency": "USD", "input_per_1k": 0.5, "output_per_1k": 2}})))
    price = price_for(priced, info)
    assert price is not None and price.source == "job spec" and price.currency == "USD"
    tier = price.tier_for(10)
    assert (tier.input_per_million, tier.output_per_million) == (500.0, 2000.0)


def test_plain_http_to_loopback_is_allowed_in_the_spec(tmp_path: Path) -> None:
    """The emulator on 127.0.0.1 needs no opt-in; anything else over http does."""
    spec = load_spec(write_job(tmp_path, with_changes({"api.base_url": "http://127.0.0.1:8080/api/v1"})))
    assert spec.api.base_url == "http://127.0.0.1:8080/api/v1"
    insecure = with_changes({"api": {"base_url": "http://10.0.0.5/api/v1", "allow_insecure_http": True}})
    assert load_spec(write_job(tmp_path, insecure)).api.allow_insecure_http is True


@pytest.mark.parametrize(
    ("url", "allow", "ok"),
    [
        ("https://dashscope.aliyuncs.com/api/v1", False, True),
        ("http://127.0.0.1:8000/api/v1", False, True),
        ("http://127.9.8.7/api/v1", False, True),
        ("http://[::1]:9000/api/v1", False, True),
        ("http://localhost:9000/api/v1", False, True),
        ("http://LOCALHOST/api/v1", False, True),
        ("http://example.com/api/v1", False, False),
        ("http://10.0.0.1/api/v1", False, False),
        ("http://128.0.0.1/api/v1", False, False),
        ("http://localhost.example.com/api/v1", False, False),
        ("http://example.com/api/v1", True, True),
        ("ftp://example.com/", True, False),
        ("not a url", True, False),
    ],
)
def test_check_base_url_keeps_the_key_off_plain_http(url: str, allow: bool, ok: bool) -> None:
    """Plain http only to loopback unless allowed; other schemes never. Refusal is a ConfigError."""
    if ok:
        check_base_url(url, allow)
    else:
        with pytest.raises(ConfigError, match="base URL"):
            check_base_url(url, allow)


def test_templates_are_parsed_into_literals_and_columns() -> None:
    """Doubled braces are literal; each field is one plain column."""
    assert parse_template("a {x} {{b}} {y}") == (("a ", "x"), (" {b} ", "y"))
    spec = JobSpec.model_validate(with_changes({"prompt.template": "{a}{b}{a}"}))
    assert spec.prompt.template_columns == ["a", "b"]
    assert spec.prompt.columns == ["a", "b"]


def test_a_spec_built_in_code_without_an_output_path_needs_one_given(tmp_path: Path) -> None:
    """load_spec fills output.path; a spec built in code has none, so job_paths asks for it by name."""
    data = with_changes({"input.path": str(tmp_path / "in.csv")})
    spec = JobSpec.model_validate(data)
    with pytest.raises(ConfigError) as refused:
        job_paths(spec)
    assert str(refused.value) == "job spec: output.path is not set; give output.path or --output"
    assert job_paths(spec, tmp_path / "out.parquet").output == tmp_path / "out.parquet"


# --- property: load_spec raises only SpecError on anything a YAML file can hold ---------------

_KEYS = st.sampled_from(
    ["name", "model", "input", "path", "id_column", "prompt", "template", "system", "prompt_column",
     "messages_column", "parameters", "seed", "max_tokens", "temperature", "top_p", "stop", "execution",
     "concurrency", "output", "api", "base_url", "pricing", "cache", "budget", "max_cost", "preflight",
     "over_long", "model_limits", "x"]
) | st.text(max_size=8)
_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _VALUES, max_size=8) | st.fixed_dictionaries({}, optional={
    "model": _VALUES, "input": st.fixed_dictionaries({"path": _VALUES}, optional={"id_column": _VALUES}),
    "prompt": st.dictionaries(_KEYS, _VALUES, max_size=3), "parameters": st.dictionaries(_KEYS, _VALUES, max_size=3),
}))
def test_load_spec_on_random_mappings_raises_only_spec_error(data: dict[Any, Any]) -> None:
    """Whatever the mapping holds, load_spec returns a JobSpec or raises SpecError, nothing else."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        try:
            spec = load_spec(path)
        except SpecError as exc:
            assert "\n" not in str(exc)
        else:
            assert isinstance(spec, JobSpec)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_load_spec_on_random_text_raises_only_spec_error(text: str) -> None:
    """Arbitrary file text is a SpecError, never a yaml or pydantic exception."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        with pytest.raises(SpecError):
            load_spec(path)
