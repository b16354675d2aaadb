"""The emulator imports only wire shapes and shared pure pieces, never the client it is used to test.

Allowed outside ``qwen_batch.emulator``: ``wire`` (paths, headers, error codes), ``types``
(what ``wire`` is written in), ``tokens`` and ``catalog`` (counting and models, shared so
client and emulator agree by construction), ``argtypes`` (pure argparse value checks) and
the package itself for ``__version__``. The check is made on the source (every import
statement, also inside functions) and on a fresh interpreter (what importing the emulator
really loads, the package's ``__init__`` included).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import qwen_batch

PACKAGE = Path(qwen_batch.__file__).parent
# errors and version are what ``import qwen_batch`` itself loads (the public API's error classes
# and version): pure, importing nothing else of the package.
SHARED = frozenset({
    "qwen_batch.wire", "qwen_batch.types", "qwen_batch.tokens", "qwen_batch.catalog", "qwen_batch.argtypes",
    "qwen_batch.errors", "qwen_batch.version",
})
PACKAGE_ATTRIBUTES = frozenset({"__version__"})


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative).with_suffix(".py").is_file() or (PACKAGE.parent / relative / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """The ``qwen_batch`` modules (or ``qwen_batch:attribute`` names) one source file imports."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return _imports_of(path.read_text(encoding="utf-8"), package)


def _imports_of(source: str, package: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "qwen_batch")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            if source.split(".")[0] != "qwen_batch":
                continue
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.add(candidate if _is_module(candidate) else (source if source != "qwen_batch" else f"qwen_batch:{alias.name}"))
    return found


def _allowed(name: str) -> bool:
    if name.startswith("qwen_batch:"):
        return name.partition(":")[2] in PACKAGE_ATTRIBUTES
    return name in SHARED or name == "qwen_batch.emulator" or name.startswith("qwen_batch.emulator.")


def test_the_emulators_own_imports_stay_inside_the_emulator_and_the_shared_pieces() -> None:
    crossing = {
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in sorted((PACKAGE / "emulator").rglob("*.py"))
        for name in _imports(path)
        if not _allowed(name)
    }
    assert not crossing


def test_the_shared_pieces_import_only_each_other() -> None:
    crossing = {
        f"{shared} imports {name}"
        for shared in sorted(SHARED)
        for name in _imports(PACKAGE.parent / (shared.replace(".", "/") + ".py"))
        if name not in SHARED
    }
    assert not crossing


def test_importing_the_emulator_loads_no_client_module() -> None:
    code = (
        "import json, sys\n"
        "import qwen_batch.emulator, qwen_batch.emulator.cli, qwen_batch.emulator.__main__\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'qwen_batch' or m.startswith('qwen_batch.'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = json.loads(done.stdout)
    assert "qwen_batch.emulator.pipeline" in loaded  # the probe saw the emulator itself
    client = [name for name in loaded if name != "qwen_batch" and not _allowed(name)]
    assert not client


def test_the_scan_resolves_every_form_of_import_so_a_crossing_one_is_caught() -> None:
    source = (
        "from .. import tokens, __version__\n"
        "from ..wire import ERRORS\n"
        "from .validate import ApiError\n"
        "import qwen_batch.backends.dashscope\n"
        "def late():\n"
        "    from ..runner import Runner\n"
        "    from .. import prepare\n"
    )
    names = _imports_of(source, "qwen_batch.emulator")
    assert names == {"qwen_batch.tokens", "qwen_batch:__version__", "qwen_batch.wire", "qwen_batch.emulator.validate",
                     "qwen_batch.backends.dashscope", "qwen_batch.runner", "qwen_batch:prepare"}
    assert {name for name in names if not _allowed(name)} == {
        "qwen_batch.backends.dashscope", "qwen_batch.runner", "qwen_batch:prepare"}
