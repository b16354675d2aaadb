"""Rendering: rows become the exact native DashScope body, or a row problem; never an exception."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_batch.catalog import builtin
from qwen_batch.errors import SpecError
from qwen_batch.render import (
    MSG_ALTERNATE,
    MSG_CONTENT_REQUIRED,
    MSG_CONTENT_STRING,
    MSG_EMPTY_MESSAGES,
    MSG_LAST_NOT_USER,
    MSG_NO_USER,
    MSG_ROLE_OR_EMPTY,
    Renderer,
    RowProblem,
)
from qwen_batch.spec import DEFAULT_SEED, JobSpec, resolve_model
from qwen_batch.tokens import count_messages
from qwen_batch.types import Request
from qwen_batch.wire import native_body

BASE: dict[str, Any] = {
    "model": "qwen-turbo",
    "input": {"path": "in.csv", "id_column": "id"},
    "prompt": {"template": "Translate:\n{text}"},
}


def spec_of(**sections: Any) -> JobSpec:
    data = copy.deepcopy(BASE)
    for key, value in sections.items():
        data[key] = value
    return JobSpec.model_validate(data)


def renderer(**sections: Any) -> Renderer:
    spec = spec_of(**sections)
    return Renderer(spec, resolve_model(spec, builtin()))


def request(r: Renderer, row: dict[str, Any], index: int = 0) -> Request:
    out = r.render(index, row)
    assert isinstance(out, Request), out
    return out


def problem(r: Renderer, row: dict[str, Any], index: int = 0) -> RowProblem:
    out = r.render(index, row)
    assert isinstance(out, RowProblem), out
    return out


def canonical_sha(body: dict[str, Any]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_the_body_is_exactly_the_native_shape_with_defaults_filled() -> None:
    """model/input.messages/parameters only; seed, max_tokens, result_format always; nothing else unset."""
    req = request(renderer(), {"id": "a1", "text": "你好"}, index=3)
    assert native_body(req) == {
        "model": "qwen-turbo",
        "input": {"messages": [{"role": "user", "content": "Translate:\n你好"}]},
        "parameters": {"seed": DEFAULT_SEED, "max_tokens": 1500, "result_format": "text"},
    }
    assert (req.index, req.row_id, req.max_tokens) == (3, "a1", 1500)


def test_every_spec_parameter_lands_in_the_body_as_documented() -> None:
    """Each parameter is sent under DashScope's name with the spec's value."""
    parameters = {
        "seed": 7, "max_tokens": 321, "temperature": 0.7, "top_p": 0.8, "top_k": 50,
        "repetition_penalty": 1.1, "presence_penalty": -0.5, "stop": [[1, 2], [3]],
        "enable_search": False, "result_format": "message",
    }
    req = request(renderer(parameters=parameters), {"id": 1, "text": "x"})
    assert native_body(req)["parameters"] == parameters
    assert req.max_tokens == 321


def test_the_models_own_defaults_are_used_when_the_spec_is_silent() -> None:
    """max_tokens and result_format come from the catalog entry of the model."""
    info = builtin().get("qwen3-max")
    assert info is not None
    req = request(renderer(model="qwen3-max"), {"id": 1, "text": "x"})
    assert native_body(req)["parameters"]["max_tokens"] == info.default_max_tokens
    assert native_body(req)["parameters"]["result_format"] == info.default_result_format


def test_an_unknown_model_needs_an_explicit_max_tokens() -> None:
    """Without a catalog entry the default is unknown: SpecError names the key to set."""
    spec = spec_of(model="qwen-future")
    with pytest.raises(SpecError, match=r"parameters\.max_tokens"):
        Renderer(spec, None)
    limited = spec_of(model="qwen-future", model_limits={"max_output_tokens": 77})
    assert request(Renderer(limited, None), {"id": 1, "text": "x"}).max_tokens == 77
    explicit = spec_of(model="qwen-future", parameters={"max_tokens": 55})
    assert native_body(request(Renderer(explicit, None), {"id": 1, "text": "x"}))["parameters"]["result_format"] == "text"


def test_max_tokens_above_the_model_limit_is_refused_by_the_renderer_too() -> None:
    """The renderer enforces the same bound load_spec does (with the service's wording)."""
    spec = spec_of(parameters={"max_tokens": 5000})
    with pytest.raises(SpecError, match=r"Range of max_tokens should be \[1, 1500\]"):
        Renderer(spec, resolve_model(spec, builtin()))


def test_the_system_prompt_is_the_first_message() -> None:
    """prompt.system becomes a system message before the user message."""
    r = renderer(prompt={"system": "Be brief.", "template": "{text}"})
    assert native_body(request(r, {"id": 1, "text": "q"}))["input"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q"},
    ]


@pytest.mark.parametrize(
    "cell",
    ["{x}", "{text}", "{{text}}", "{0}", "%s %d %(name)s", "}{", "{", "${HOME}", "{text!r:>10}", "\\n"],
)
def test_braces_and_format_specifiers_in_cells_are_sent_literally(cell: str) -> None:
    """Cell data is never a template: whatever it holds is sent as it is."""
    r = renderer(prompt={"template": "A {text} B"})
    assert native_body(request(r, {"id": 1, "text": cell}))["input"]["messages"][0]["content"] == f"A {cell} B"


def test_doubled_braces_in_the_template_are_literal_braces() -> None:
    """{{ and }} in the template render as { and }."""
    r = renderer(prompt={"template": '{{"q": "{text}", "n": {n}}}'})
    content = native_body(request(r, {"id": 1, "text": "hi", "n": 3}))["input"]["messages"][0]["content"]
    assert content == '{"q": "hi", "n": 3}'


@pytest.mark.parametrize(
    ("cell", "text"),
    [(3, "3"), (1.5, "1.5"), (True, "true"), (False, "false"), ([1, 2], "[1, 2]"), ({"a": "b"}, '{"a": "b"}')],
)
def test_non_string_cells_render_as_the_file_writes_them(cell: Any, text: str) -> None:
    """Numbers as digits, booleans and lists/structs as JSON writes them (not Python's True, {'a': ...})."""
    assert native_body(request(renderer(), {"id": 1, "text": cell}))["input"]["messages"][0]["content"] == f"Translate:\n{text}"


def test_prompt_column_sends_the_cell_as_the_user_message() -> None:
    """prompt_column: the cell is the whole prompt."""
    r = renderer(prompt={"prompt_column": "q"})
    assert native_body(request(r, {"id": 1, "q": "{raw}"}))["input"]["messages"] == [{"role": "user", "content": "{raw}"}]


@pytest.mark.parametrize(
    ("prompt", "row", "message"),
    [
        ({"template": "T: {text}"}, {"id": 1, "text": None}, "column 'text' is null in this row"),
        ({"template": "T: {text}"}, {"id": 1}, "column 'text' is null in this row"),
        ({"template": "{text}"}, {"id": 1, "text": ""}, MSG_ROLE_OR_EMPTY),
        ({"prompt_column": "q"}, {"id": 1, "q": None}, "column 'q' is null in this row"),
        ({"prompt_column": "q"}, {"id": 1, "q": ""}, MSG_ROLE_OR_EMPTY),
    ],
    ids=["null-template-cell", "absent-cell", "empty-template", "null-prompt", "empty-prompt"],
)
def test_null_or_empty_prompt_cells_are_row_problems(prompt: dict[str, Any], row: dict[str, Any], message: str) -> None:
    """A row whose prompt is null or empty becomes an InvalidParameter row problem, not a request."""
    p = problem(renderer(prompt=prompt), row, index=4)
    assert (p.index, p.row_id, p.code) == (4, "1", "InvalidParameter")
    assert message in p.message


U, A, S = "user", "assistant", "system"


def conv(*pairs: tuple[str, Any]) -> list[dict[str, Any]]:
    return [{"role": role, "content": content} for role, content in pairs]


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        (None, "column 'conversation' is null in this row"),
        ("not json", "not a list of {role, content} messages (not JSON)"),
        ({"role": "user", "content": "x"}, "not a list of {role, content} messages"),
        ([], MSG_EMPTY_MESSAGES),
        (["hi"], "message 0 is not a {role, content} mapping"),
        ([{"role": "user"}], MSG_CONTENT_REQUIRED),
        (conv((U, ["part"])), MSG_CONTENT_STRING),
        (conv((U, "")), MSG_ROLE_OR_EMPTY),
        (conv(("tool", "x")), MSG_ROLE_OR_EMPTY),
        (conv((U, "a"), (S, "late system")), MSG_ROLE_OR_EMPTY),
        (conv((U, "a"), (U, "b")), MSG_ALTERNATE),
        (conv((U, "a"), (A, "b"), (A, "c"), (U, "d")), MSG_ALTERNATE),
        (conv((U, "a"), (A, "b")), MSG_LAST_NOT_USER),
        (conv((S, "only system")), MSG_NO_USER),
    ],
    ids=[
        "null", "bad-json", "not-a-list", "empty", "not-a-mapping", "no-content", "content-not-str",
        "empty-content", "unknown-role", "system-not-first", "two-users", "two-assistants", "last-assistant",
        "no-user",
    ],
)
def test_bad_messages_cells_are_row_problems_with_the_services_text(cell: Any, message: str) -> None:
    """A messages cell breaking the API's rules is an InvalidParameter row problem in the service's words."""
    p = problem(renderer(prompt={"messages_column": "conversation"}), {"id": "q1", "conversation": cell})
    assert p.code == "InvalidParameter" and p.row_id == "q1"
    assert message in p.message


def test_a_good_conversation_is_sent_and_gets_the_system_prompt_unless_it_has_one() -> None:
    """prompt.system is prepended to a conversation without a system message; a row's own one wins."""
    r = renderer(prompt={"system": "Default.", "messages_column": "c"})
    turns = conv((U, "a"), (A, "b"), (U, "c"))
    assert native_body(request(r, {"id": 1, "c": turns}))["input"]["messages"] == [{"role": "system", "content": "Default."}, *turns]
    own = conv((S, "Mine."), (U, "a"))
    assert native_body(request(r, {"id": 1, "c": own}))["input"]["messages"] == own


def test_a_conversation_may_be_a_json_string_and_extra_keys_are_dropped() -> None:
    """CSV cells hold conversations as JSON text; only role and content are sent."""
    r = renderer(prompt={"messages_column": "c"})
    cell = json.dumps([{"role": "user", "content": "hi", "name": None}])
    assert native_body(request(r, {"id": 1, "c": cell}))["input"]["messages"] == [{"role": "user", "content": "hi"}]


def test_row_id_is_the_id_cell_as_text_or_the_row_number() -> None:
    """With id_column the id's str(); without, str(index)."""
    assert request(renderer(), {"id": 42, "text": "x"}).row_id == "42"
    no_id = renderer(input={"path": "in.csv"})
    assert request(no_id, {"text": "x"}, index=9).row_id == "9"


def test_fingerprint_is_the_sha256_of_the_canonical_body_and_tokens_are_exact() -> None:
    """fingerprint = sha256(canonical JSON of body); input_tokens = count_messages of its messages."""
    r = renderer(prompt={"system": "Sys {not a field}", "template": "é {text} \u2028"}, parameters={"stop": "###"})
    for row in ({"id": 1, "text": 'quo"te\\ \x00 \U0001f600'}, {"id": 2, "text": "plain"}):
        req = request(r, row)
        assert req.fingerprint == canonical_sha(native_body(req))
        assert req.input_tokens == count_messages(native_body(req)["input"]["messages"], "qwen-turbo")
    c = renderer(prompt={"messages_column": "c"})
    req = request(c, {"id": 1, "c": conv((U, "a"), (A, "b"), (U, "c"))})
    assert req.fingerprint == canonical_sha(native_body(req))
    assert req.input_tokens == count_messages(native_body(req)["input"]["messages"], "qwen-turbo")


def test_fingerprint_ignores_the_row_index_and_id() -> None:
    """The same request at another position (or under another id) has the same fingerprint."""
    r = renderer()
    assert request(r, {"id": 1, "text": "x"}, 0).fingerprint == request(r, {"id": 2, "text": "x"}, 99).fingerprint


@pytest.mark.parametrize(
    "change",
    [
        {"model": "qwen-plus"},
        {"parameters": {"seed": 1235}},
        {"parameters": {"max_tokens": 1499}},
        {"parameters": {"temperature": 0.5}},
        {"parameters": {"top_p": 0.9}},
        {"parameters": {"top_k": 3}},
        {"parameters": {"repetition_penalty": 1.2}},
        {"parameters": {"presence_penalty": 1.0}},
        {"parameters": {"stop": "x"}},
        {"parameters": {"enable_search": True}},
        {"parameters": {"result_format": "message"}},
        {"prompt": {"system": "S", "template": "Translate:\n{text}"}},
        {"prompt": {"template": "Translate:\n{text}!"}},
    ],
)
def test_fingerprint_changes_when_any_parameter_or_message_changes(change: dict[str, Any]) -> None:
    """Every parameter and every message is covered by the fingerprint."""
    row = {"id": 1, "text": "x"}
    assert request(renderer(**change), row).fingerprint != request(renderer(), row).fingerprint


def test_fingerprint_changes_with_the_cell_text() -> None:
    """Different cell text, different request."""
    r = renderer()
    assert request(r, {"id": 1, "text": "a"}).fingerprint != request(r, {"id": 1, "text": "b"}).fingerprint


def test_bodies_do_not_share_mutable_parts() -> None:
    """Changing one request's body cannot change another's (or the renderer's parameters)."""
    r = renderer(prompt={"system": "S", "template": "{text}"})
    first, second = request(r, {"id": 1, "text": "a"}), request(r, {"id": 2, "text": "b"})
    first.parameters["seed"] = 0
    first.messages[0]["content"] = "changed"
    assert second.parameters["seed"] == DEFAULT_SEED
    assert second.messages[0]["content"] == "S"
    assert r.parameters["seed"] == DEFAULT_SEED


# --- properties ---------------------------------------------------------------------------------

_CELLS = st.none() | st.text() | st.integers() | st.floats() | st.booleans()


@settings(max_examples=300, deadline=None)
@given(text=_CELLS, other=_CELLS, index=st.integers(min_value=0, max_value=10**9))
def test_render_never_raises_on_arbitrary_cells(text: Any, other: Any, index: int) -> None:
    """Any cell content gives a Request or a RowProblem, never an exception."""
    r = renderer(prompt={"system": "s", "template": "{text}|{other}"})
    out = r.render(index, {"id": "k", "text": text, "other": other})
    assert isinstance(out, (Request, RowProblem))
    if isinstance(out, Request):
        assert out.fingerprint == canonical_sha(native_body(out))


_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from([U, A, S, "tool", ""]) | st.text(max_size=3), "content": _CELLS})


@settings(max_examples=300, deadline=None)
@given(cell=st.lists(_MESSAGE, max_size=5) | st.text() | _CELLS)
def test_render_never_raises_on_arbitrary_conversations(cell: Any) -> None:
    """Any messages cell gives a Request or a RowProblem, never an exception."""
    out = renderer(prompt={"messages_column": "c"}).render(0, {"id": 1, "c": cell})
    assert isinstance(out, (Request, RowProblem))


@settings(max_examples=50, deadline=None)
@given(texts=st.lists(st.text(min_size=1), min_size=1, max_size=8), data=st.data())
def test_fingerprints_do_not_depend_on_row_order(texts: list[str], data: st.DataObject) -> None:
    """Rendering the rows in any order gives each row the same fingerprint."""
    r = renderer(input={"path": "in.csv"})
    order = data.draw(st.permutations(range(len(texts))))
    forward = {t: request(r, {"text": t}, i).fingerprint for i, t in enumerate(texts)}
    shuffled = {texts[j]: request(r, {"text": texts[j]}, i).fingerprint for i, j in enumerate(order)}
    assert forward == shuffled


def test_text_that_cannot_be_encoded_is_a_row_problem() -> None:
    """A lone surrogate (possible in Python strings, never in valid UTF-8) cannot be sent."""
    assert "not valid Unicode" in problem(renderer(), {"id": 1, "text": "bad \ud800"}).message
    convo = renderer(prompt={"messages_column": "c"})
    assert "not valid Unicode" in problem(convo, {"id": 1, "c": conv((U, "\udfff"))}).message


def test_the_reasoning_cap_rides_on_every_request_and_leaves_the_fingerprint_alone() -> None:
    spec = spec_of()
    info = resolve_model(spec, builtin())
    plain, thinking = Renderer(spec, info), Renderer(spec, info, reasoning_cap=4000)
    row = {"text": "hello"}
    without, with_cap = request(plain, row), request(thinking, row)
    assert (without.reasoning_cap, with_cap.reasoning_cap) == (0, 4000)
    assert with_cap.worst_case_tokens == without.worst_case_tokens + 4000
    # The cap is the budget's bound, not part of what is asked: the same request either way.
    assert with_cap.fingerprint == without.fingerprint and native_body(with_cap) == native_body(without)
