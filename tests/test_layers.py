"""The package's layering (shared/DESIGN.md, docs/architecture.md) checked over every import, those inside
functions included: dependencies point one way, the peers above models/ do not lean on each other,
measure/ stands on core alone, and no two modules import each other (directly or around a circle).

    core <- patterns <- sparse <- mechanisms <- nn <- models <- {hf, distributed, analysis, bench, lra, apps} <- cli
    measure <- {bench, lra, analysis, apps, cli};  measure -> core only
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "src" / "longrange"

#: each layer may import itself and the layers before it
LAYERS = ["core", "patterns", "sparse", "mechanisms", "nn", "models", "peers", "cli"]
#: the applications on top of models/: each may use the layers below and measure/, never one another
PEERS = {"hf", "distributed", "analysis", "bench", "lra", "apps"}
#: who may use measure/ (which itself depends on core only)
MEASURE_USERS = {"bench", "lra", "analysis", "apps", "cli"}
#: top-level modules and the layer they belong to (the root package re-exports the public API)
MODULES = {"functional": "mechanisms", "__init__": "cli"}
#: below models/ nothing knows about command lines, consoles or plots
PRESENTATION = ("typer", "rich", "matplotlib")


def package_of(module: str) -> str:
    """'longrange.sparse.engine' -> 'sparse'; 'longrange.functional' -> 'functional'; 'longrange' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(package: str) -> str:
    if package in PEERS:
        return "peers"
    if package in MODULES:
        return MODULES[package]
    return package


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path, runtime_only: bool = False) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import statement of the file;
    runtime_only leaves out those under `if TYPE_CHECKING:` (annotations only: no import at run time)."""
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    typing_only = {id(n) for f in ast.walk(tree) if isinstance(f, ast.If) and ast.unparse(f.test).endswith(
        "TYPE_CHECKING") for n in ast.walk(f)} if runtime_only else set()
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno, id(node) in inner))
            out.extend((f"{node.module}.{a.name}", node.lineno, id(node) in inner) for a in node.names)
        elif isinstance(node, ast.Import):
            out.extend((a.name, node.lineno, id(node) in inner) for a in node.names)
    return out


def source_files() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py"))


def known_modules() -> set[str]:
    return {module_name(p) for p in source_files()}


def test_every_package_has_a_place_in_the_layers():
    packages = {package_of(module_name(p)) for p in source_files()}
    unplaced = sorted(p for p in packages if layer_of(p) not in LAYERS and p != "measure")
    assert not unplaced, f"packages {unplaced} are not in tests/test_layers.py's LAYERS: place them"


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    here = package_of(module_name(path))
    wrong = []
    for target, line, inner in imports(path):
        where = f"{path.relative_to(PACKAGE)}:{line}{' (inside a function)' if inner else ''}"
        if not target.startswith("longrange.") or target.split(".")[1] not in {
                package_of(m) for m in known_modules()}:
            if target.split(".")[0] in PRESENTATION and layer_of(here) in LAYERS[:LAYERS.index("models") + 1]:
                wrong.append(f"{where}: {here} imports {target.split('.')[0]}; below models/ nothing draws or prints")
            continue
        there = package_of(target)
        if there == here:
            continue
        if here == "measure":
            if there != "core":
                wrong.append(f"{where}: measure/ imports {there}; it depends on core only")
            continue
        if there == "measure":
            if here not in MEASURE_USERS:
                wrong.append(f"{where}: {here} imports measure/; only {sorted(MEASURE_USERS)} may")
            continue
        mine, theirs = LAYERS.index(layer_of(here)), LAYERS.index(layer_of(there))
        if theirs > mine or (theirs == mine and layer_of(here) == "peers"):
            wrong.append(f"{where}: {here} imports {there} ({layer_of(there)} is not below {layer_of(here)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_modules():
    """Imports between files form no circle (a function-local import may not hide one either; an import
    for annotations only, under `if TYPE_CHECKING:`, runs never and is left out)."""
    names = known_modules()
    graph: dict[str, set[str]] = {m: set() for m in names}
    for path in source_files():
        me = module_name(path)
        for target, _, _ in imports(path, runtime_only=True):
            if target in names and target != me and not (me.startswith(target + ".") or target == "longrange"):
                graph[me].add(target)  # a module may import its own package's __init__ (the parent re-exports)
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the components with more than one module."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_catches_what_it_should():
    """The rules bite: an upward import, a peer leaning on a peer and a circle are each reported."""
    assert LAYERS.index(layer_of("mechanisms")) < LAYERS.index(layer_of("models"))
    assert layer_of("bench") == layer_of("lra") == "peers"
    assert strongly_connected({"a": {"b"}, "b": {"a"}, "c": set()}) == [{"a", "b"}]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []
