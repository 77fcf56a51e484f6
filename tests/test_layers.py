"""The house in layers: a module imports only from the layers below it.

Every import counts: module level, function-local and ``TYPE_CHECKING``
ones alike.  Within one layer, modules may import each other, but the graph
stays acyclic.  A lower layer reaches an upper one only through protocols it
declares itself (see ``docs/architecture.md``), so there is no allowlist.
"""

from __future__ import annotations

import ast
import functools
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (module name or package prefix, layer), most specific first
LAYERS: list[tuple[str, int]] = [
    ("livemap_core", 0),
    ("livemap._version", 1),
    ("livemap.errors", 1),
    ("livemap._paths", 1),
    ("livemap._runtime", 2),
    ("livemap._feed", 3),
    ("livemap._live_map", 4),
    ("livemap._redis", 5),
    ("livemap.redis", 6),  # public: the shared map's names
    ("livemap.examples", 7),
    ("livemap", 6),  # the package itself: the public names, nothing else
]

# what code above the library (the examples) may import of it
PUBLIC = {"livemap", "livemap.errors", "livemap.redis", "livemap_core"}


def layer_of(module: str) -> int:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> list[pathlib.Path]:
    files: list[pathlib.Path] = []
    for package in ("livemap", "livemap_core"):
        files.extend(sorted((ROOT / package).rglob("*.py")))
        files.extend(sorted((ROOT / package).rglob("*.pyx")))
    return files


_PYX_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import|c?import\s+([\w.]+))", re.MULTILINE)


def imports_of(path: pathlib.Path) -> set[str]:
    """Every module of this project that ``path`` imports, anywhere in it."""
    me = module_name(path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".pyx":
        for match in _PYX_IMPORT.finditer(text):
            found.add(match.group(1) or match.group(2))
    else:
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = me.split(".")
                    base = base if is_package else base[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    assert node.module is not None
                    target = node.module
                found.add(target)
                # ``from package import submodule`` imports the submodule
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    if _exists(candidate):
                        found.add(candidate)
    return {m for m in found if m.split(".")[0] in ("livemap", "livemap_core") and m != me}


def _exists(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


@functools.cache
def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in source_files()}


def test_the_graph_is_read() -> None:
    """The reader sees the imports it must judge (a reader that saw nothing
    would pass every other test here)."""
    graph = import_graph()
    assert "livemap._runtime._component" in graph
    assert "livemap._runtime._context" in graph["livemap._runtime._component"]
    assert "livemap_core" in graph["livemap._runtime._targets"]
    assert "livemap._feed._each" in graph["livemap"]
    # relative imports and imports inside functions count too
    probe = ROOT / "livemap" / "_runtime" / "__init__.py"
    assert module_name(probe) == "livemap._runtime"


@pytest.mark.parametrize("module", sorted(import_graph()))
def test_no_import_goes_up(module: str) -> None:
    mine = layer_of(module)
    upward = sorted(
        f"{module} (layer {mine}) imports {target} (layer {layer_of(target)})"
        for target in import_graph()[module]
        if layer_of(target) > mine
    )
    assert upward == []


def test_examples_use_the_public_names_only() -> None:
    graph = import_graph()
    private = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module.startswith("livemap.examples")
        for target in targets
        if target not in PUBLIC and not target.startswith("livemap.examples")
    )
    assert private == []


def test_no_import_cycle() -> None:
    """Modules of one layer may import each other, but not in a cycle."""
    graph = {m: {t for t in ts if t in import_graph()} for m, ts in import_graph().items()}
    # the package itself re-exports; a submodule never imports it (checked
    # above by the layers), so leaving it in cannot hide a cycle
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_implementation_modules_are_private() -> None:
    """Public names live in ``livemap``, ``livemap.errors`` and
    ``livemap_core``; every other module is ``_``-prefixed (the examples
    aside, which are programs)."""
    public = sorted(
        module
        for module in import_graph()
        if module.startswith("livemap.")
        and not module.startswith("livemap.examples")
        and any(part.startswith("_") is False for part in module.split(".")[1:2])
        and module not in PUBLIC
    )
    assert public == []
