"""Job files read with YAML 1.2 meaning, or refused where a YAML 1.1 reader would differ.

PyYAML reads YAML 1.1: ``017`` is 15, ``1:30`` is 90, ``yes`` is true, ``1_000`` is 1000
and a repeated key silently wins. YAML 1.2 reads the first as 17 and the next three as
text. Rather than pick one reading for the user, a plain value the two versions read
differently is refused with its line and the fix (quote it, or write the value plainly);
everything else keeps its YAML 1.2 core-schema meaning (``0o17``, ``0x1F``, ``1e3``,
``.inf``, ``true``). Keys are names checked against the spec, so a key like ``n`` or ``on``
is read as text. A key given twice is refused with both lines.

Aliases are counted as they expand while the document is composed, so an anchor bomb is
refused after at most ``MAX_NODES`` values, in memory bounded by the file itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NoReturn

import yaml
from yaml.events import AliasEvent, Event, NodeEvent
from yaml.nodes import MappingNode, Node, ScalarNode

MAX_NODES = 100_000  # values in the expanded document; a job file has a few dozen
MAX_DEPTH = 64  # nesting levels; a job file has at most four, and composing is recursive
MAX_DIGITS = 1000  # in one number; Python's int() and repr() stop at 4300
SHOWN_CHARS = 40  # how much of a refused value a message quotes

STR_TAG = "tag:yaml.org,2002:str"
_YAML11_TAG = "tag:qwen-batch,2026:yaml-1.1-only"  # resolved here, refused in compose_node

# YAML 1.1 (PyYAML's own patterns, plus the y/n booleans of the 1.1 type repository).
_INT11 = r"[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+|[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+"
_FLOAT11 = (
    r"[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*"
)
_BOOL11_TRUE = frozenset({"y", "Y", "yes", "Yes", "YES", "on", "On", "ON"})
_BOOL11_FALSE = frozenset({"n", "N", "no", "No", "NO", "off", "Off", "OFF"})

# Plain values YAML 1.1 reads as a number or boolean and YAML 1.2 reads differently.
_NUMBER_11_ONLY = re.compile(
    rf"(?=[^_]*_)(?:{_INT11}|{_FLOAT11})\Z"  # digits grouped with _: 1.2 reads text
    r"|[-+]?0b[01]+\Z"  # binary: 1.2 reads text
    r"|[-+]0x[0-9a-fA-F]+\Z"  # signed hex: 1.2 reads text
    r"|[-+]?[1-9][0-9]*(?::[0-5]?[0-9])+\Z|[-+]?[0-9]+(?::[0-5]?[0-9])+\.[0-9]*\Z"  # base 60: 1.2 reads text
)
_LEADING_ZERO = re.compile(r"[-+]?0[0-9]+\Z")  # 1.1: octal (or text with 8, 9); 1.2: decimal
_BOOL_11_ONLY = re.compile(rf"(?:{'|'.join(sorted(_BOOL11_TRUE | _BOOL11_FALSE))})\Z")
_MERGE_KEY = re.compile(r"<<\Z")
_YAML11_ONLY = re.compile(rf"(?:{_NUMBER_11_ONLY.pattern}|{_LEADING_ZERO.pattern}|{_BOOL_11_ONLY.pattern}|<<\Z)")

# The YAML 1.2 core schema (yaml.org/spec/1.2.2, 10.3.2), in resolution order.
_CORE_PATTERNS = {
    "tag:yaml.org,2002:null": re.compile(r"(?:~|null|Null|NULL|)\Z"),
    "tag:yaml.org,2002:bool": re.compile(r"(?:true|True|TRUE|false|False|FALSE)\Z"),
    "tag:yaml.org,2002:int": re.compile(r"(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)\Z"),
    "tag:yaml.org,2002:float": re.compile(
        r"(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))\Z"
    ),
}
_TYPED_TAGS = frozenset(_CORE_PATTERNS) | {_YAML11_TAG}


class YamlRefused(yaml.YAMLError):
    """YAML that parses but is refused; ``line`` is 1-based and ``message`` says the fix."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


def load_yaml(text: str) -> Any:
    """The one document in ``text``, read as YAML 1.2. Raises YamlRefused or yaml.YAMLError."""
    loader = Yaml12Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _line(at: Node | Event) -> int:
    mark = at.start_mark
    assert mark is not None, "the parser marks every event and node it makes"
    return mark.line + 1


def _shown(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _yaml11_reading(text: str) -> object:
    """What PyYAML's YAML 1.1 rules make of the plain value ``text``."""
    if text in _BOOL11_TRUE or text in _BOOL11_FALSE:
        return text in _BOOL11_TRUE
    loader = yaml.SafeLoader("")
    try:
        # types-PyYAML leaves BaseResolver.resolve unannotated; it returns the tag (a str).
        tag: str = loader.resolve(ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
        return loader.construct_object(ScalarNode(tag, text))
    except ValueError:  # more digits than int() converts
        return text
    finally:
        loader.dispose()


def _version_clash(text: str) -> str | None:
    """Why YAML 1.1 and 1.2 read the plain value ``text`` differently, with the fix; None if they agree."""
    shown = _shown(text)
    quote = f'or quote it ("{shown}") if you mean the text'
    if _MERGE_KEY.match(text):
        return "'<<' (a merge key) is YAML 1.1 only; write the merged keys out in full"
    if _BOOL_11_ONLY.match(text):
        meant = "true" if _yaml11_reading(text) else "false"
        return f"{shown} is {meant} in YAML 1.1 but the text '{shown}' in YAML 1.2; write {meant} for a yes/no setting, {quote}"
    if _LEADING_ZERO.match(text):
        old, new = _yaml11_reading(text), int(text)
        if old == new:
            return None
        old_text = f"octal {old}" if isinstance(old, int) else f"the text '{shown}'"
        return (
            f"{shown} is {old_text} in YAML 1.1 but {new} in YAML 1.2; write the number without the leading zero "
            f"({new}), {quote}"
        )
    if _NUMBER_11_ONLY.match(text):
        old = _yaml11_reading(text)
        base60 = " (base 60)" if ":" in text else ""
        return (
            f"{shown} is the number {_shown(repr(old))}{base60} in YAML 1.1 but the text '{shown}' in YAML 1.2; "
            f"write {_shown(repr(old))} for the number, {quote}"
        )
    return None


def _core_tag(text: str) -> str:
    return next((tag for tag, pattern in _CORE_PATTERNS.items() if pattern.match(text)), STR_TAG)


_ScalarConstructor = Callable[[yaml.SafeLoader, ScalarNode], object]


def _checked(construct: _ScalarConstructor, what: str) -> _ScalarConstructor:
    """A core-schema constructor that refuses, with the line, a value its tag cannot hold."""
    def constructor(loader: yaml.SafeLoader, node: ScalarNode) -> object:
        value = loader.construct_scalar(node)
        if not _CORE_PATTERNS[node.tag].match(value):
            raise YamlRefused(_line(node), f"{_short_tag(node.tag)} {_shown(value)!r} is not {what}; "
                                           "write a plain YAML 1.2 value, or drop the tag")
        if len(value) > MAX_DIGITS:  # int() and repr() refuse numbers this long, and no setting needs one
            raise YamlRefused(_line(node), f"{_shown(value)} has more than {MAX_DIGITS} digits; shorten it")
        return construct(loader, node)
    return constructor


def _short_tag(tag: str) -> str:
    return _shown(tag.replace("tag:yaml.org,2002:", "!!"))


def _unsupported_tag(loader: Yaml12Loader, node: Node) -> NoReturn:
    raise YamlRefused(_line(node), f"the tag {_short_tag(node.tag)} is not used in job files; remove it")


class Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema, YAML 1.1 clashes, duplicate keys and alias bombs refused."""

    yaml_implicit_resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]] = {}  # not SafeLoader's 1.1 table

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._values = 0  # values composed so far, each alias counted as everything it stands for
        self._depth = 0
        self._anchored_sizes: dict[int, int] = {}  # id(anchored node) -> its expanded size, once complete

    # PyYAML passes a sequence item's position, a mapping value's key node, or None for a key;
    # types-PyYAML says `index: int`, so the two calls of the base method below are told so.
    def compose_node(self, parent: Node | None, index: Node | int | None) -> Node | None:
        # A node starts with a node event (alias, scalar, sequence or mapping start).
        event: NodeEvent = self.peek_event()  # type: ignore[no-untyped-call]  # unannotated in types-PyYAML
        if isinstance(event, AliasEvent):
            node = super().compose_node(parent, index)  # type: ignore[arg-type]  # see above
            size = self._anchored_sizes.get(id(node))
            if size is None:
                raise YamlRefused(_line(event), f"alias *{_shown(event.anchor or '')} is used inside its own anchor; "
                                                "a value cannot contain itself")
            self._count(size, event)
            return node
        self._count(1, event)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise YamlRefused(_line(event), f"values are nested more than {MAX_DEPTH} levels deep; "
                                            "a job file needs only a few levels")
        before = self._values
        try:
            node = super().compose_node(parent, index)  # type: ignore[arg-type]  # see above
        finally:
            self._depth -= 1
        if event.anchor is not None:
            self._anchored_sizes[id(node)] = self._values - before + 1
        if isinstance(node, ScalarNode) and node.tag in _TYPED_TAGS:
            # A key is checked against the spec's names, so `n:` or `on:` is only ever a name.
            is_key = isinstance(parent, MappingNode) and index is None and node.value != "<<"
            clash = None if is_key else _version_clash(node.value)
            if clash is not None:
                key = f"{_shown(index.value)}: " if isinstance(index, ScalarNode) else ""
                raise YamlRefused(_line(node), key + clash)
            if node.tag == _YAML11_TAG:  # 1.1 and 1.2 agree after all (07 is 7 in both)
                node.tag = _core_tag(node.value)
        return node

    def _count(self, values: int, event: Event) -> None:
        self._values += values
        if self._values > MAX_NODES:
            raise YamlRefused(_line(event), f"the document expands to more than {MAX_NODES:,} values "
                                            "(anchors and aliases repeat what they name); write the values out")

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # only an explicit !!merge gets here
                raise YamlRefused(_line(key_node), _version_clash("<<") or "")
            key = self.construct_object(key_node, deep=True)
            try:
                first = first_lines.get(key)
            except TypeError:  # an unhashable key: SafeConstructor names it
                continue
            if first is not None:
                lines = f"lines {first} and {_line(key_node)}" if first != _line(key_node) else f"both on line {first}"
                raise YamlRefused(_line(key_node), f"key {_shown(repr(key))} is given twice ({lines}); keep one")
            first_lines[key] = _line(key_node)
        return super().construct_mapping(node, deep=deep)


# The YAML 1.1 forms first, so that `017` does not reach the 1.2 integer pattern.
Yaml12Loader.add_implicit_resolver(_YAML11_TAG, _YAML11_ONLY, None)
for _tag, _pattern in _CORE_PATTERNS.items():
    Yaml12Loader.add_implicit_resolver(_tag, _pattern, None)
for _tag, _construct, _what in (
    ("tag:yaml.org,2002:null", yaml.SafeLoader.construct_yaml_null, "null"),
    ("tag:yaml.org,2002:bool", yaml.SafeLoader.construct_yaml_bool, "true or false"),
    ("tag:yaml.org,2002:int", yaml.SafeLoader.construct_yaml_int, "an integer"),
    ("tag:yaml.org,2002:float", yaml.SafeLoader.construct_yaml_float, "a number"),
):
    Yaml12Loader.add_constructor(_tag, _checked(_construct, _what))
for _tag in ("timestamp", "binary", "set", "omap", "pairs"):
    Yaml12Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _unsupported_tag)
Yaml12Loader.add_constructor(None, _unsupported_tag)
