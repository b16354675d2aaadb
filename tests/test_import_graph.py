"""The modules of ``qwen_batch`` import one way: no circle, the emulator apart, the CLI on top.

The graph counts every import of one ``qwen_batch`` module by another, wherever it is
written: at the top of the module, inside a function (the lazy imports that keep start-up
cheap) and under ``if TYPE_CHECKING:``. A function-local import is still a dependency, only a
later one; a type import is one that mypy follows and that a reader must follow to
understand a signature. Counting both is what found the circle of issue 13 (``job``,
``preflight``, ``resume``, ``summary``, ``work``, held together by type imports alone), which
no run-time import error would ever have shown.

``from X import name`` depends on the module ``X.name`` when there is one, else on ``X``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qwen_batch"
README = PACKAGE.parent / "README.md"

# What the emulator may use of the package: wire shapes and pure, shared pieces (data,
# counting, the error tree, argument parsing), never the client it is there to test.
EMULATOR_MAY_IMPORT = {
    "qwen_batch.argtypes",
    "qwen_batch.catalog",
    "qwen_batch.errors",
    "qwen_batch.tokens",
    "qwen_batch.types",
    "qwen_batch.version",
    "qwen_batch.wire",
}


def module_names(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package``."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` (at ``path``) imports, anywhere in its text."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in known:
                    found.add(submodule)
                elif source in known:
                    found.add(source)
    found.discard(name)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    names = module_names(package)
    return {name: imported_modules(name, path, set(names)) for name, path in names.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each group of modules that import each other (directly or round a circle), sorted."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        order[node] = low[node] = len(order)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in order:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], order[target])
        if low[node] == order[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return sorted(groups)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    pending = [start]
    while pending:
        for target in graph[pending.pop()]:
            if target not in seen:
                seen.add(target)
                pending.append(target)
    return seen


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_top_level_function_local_and_type_checking_imports(graph: dict[str, set[str]]) -> None:
    assert "qwen_batch.errors" in graph["qwen_batch.cache"]  # top level
    assert "qwen_batch.job" in graph["qwen_batch.cli"]  # inside a command function
    assert "qwen_batch.plan" in graph["qwen_batch.summary"]  # under TYPE_CHECKING only
    assert "qwen_batch.tokens" in graph["qwen_batch.emulator.pipeline"]  # ``from .. import tokens``
    assert "qwen_batch" not in graph["qwen_batch.emulator.pipeline"]


def test_the_cycle_finder_finds_a_circle_of_type_imports(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import B\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\n")
    (package / "c.py").write_text("def f():\n    from . import a\n")
    (package / "d.py").write_text("from . import a\n")
    assert cycles(import_graph(package)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_no_module_of_the_package_is_in_an_import_circle(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_the_emulator_imports_only_wire_shapes_and_pure_shared_pieces(graph: dict[str, set[str]]) -> None:
    emulator = {name for name in graph if name == "qwen_batch.emulator" or name.startswith("qwen_batch.emulator.")}
    used = set().union(*(reachable(graph, name) for name in emulator)) - emulator
    assert used <= EMULATOR_MAY_IMPORT, f"the emulator reaches client code: {sorted(used - EMULATOR_MAY_IMPORT)}"


def test_nothing_imports_the_cli_but_the_entry_point(graph: dict[str, set[str]]) -> None:
    importers = {name for name, targets in graph.items() if "qwen_batch.cli" in targets}
    assert importers == {"qwen_batch.__main__"}


def test_only_the_cli_the_public_api_and_the_ray_worker_import_the_composition_root(graph: dict[str, set[str]]) -> None:
    """The Ray worker runs ``prepare`` and ``execute`` on its shard, as the CLI does in one process."""
    importers = {name for name, targets in graph.items() if "qwen_batch.job" in targets}
    assert importers == {"qwen_batch", "qwen_batch.cli", "qwen_batch.engines.ray_worker"}


def test_nothing_below_the_public_api_imports_the_package_itself(graph: dict[str, set[str]]) -> None:
    """``qwen_batch/__init__.py`` is the top (it reaches ``job``): a module needing the version imports ``version``."""
    importers = {name for name, targets in graph.items() if "qwen_batch" in targets}
    assert importers == set()


def _layout_rows() -> list[str]:
    """The first column of README's Layout table: ``name.py`` or ``package/``, in order."""
    section = README.read_text(encoding="utf-8").split("### Layout", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)


def _layout_entry(module: str) -> str:
    """A module's row in the Layout table: its file, or the subpackage it belongs to."""
    parts = module.split(".")[1:]
    if not parts:
        return "__init__.py"
    return f"{parts[0]}/" if (PACKAGE / parts[0]).is_dir() else f"{parts[0]}.py"


def test_the_readme_layout_lists_every_module_once_in_import_order(graph: dict[str, set[str]]) -> None:
    rows = _layout_rows()
    assert len(rows) == len(set(rows))
    assert set(rows) == {_layout_entry(name) for name in graph}
    position = {row: index for index, row in enumerate(rows)}
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in graph.items()
        for target in targets
        if position[_layout_entry(target)] > position[_layout_entry(name)]
    )
    assert upward == [], "README's Layout table must list a module after every module it imports"
