"""The package layers a newcomer can draw, checked on the source (no imports run).

    orchestration                         stages, Dagster, DVC, CLI
    engine_rounds                         the data engine's rounds that use the model
    data_engine        ram_model          corpus, ingest, parsing, labels | model, training, inference
    ramflow_io                            shared I/O: on-disk formats, shards, params.yaml

A package imports only the packages below it (and third-party code); ``data_engine`` and
``ram_model`` never import each other. Every import counts, at module level or inside a
function. An import inside a function is kept only where it buys start-up time or avoids an
optional heavy dependency, and then says so with a ``# lazy: <reason>`` comment: an import of
our own packages placed in a function without that comment is the old way of dodging a cycle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the packages of ours it may import (besides itself)
ALLOWED: dict[str, frozenset[str]] = {
    "ramflow_io": frozenset(),
    "data_engine": frozenset({"ramflow_io"}),
    "ram_model": frozenset({"ramflow_io"}),
    "engine_rounds": frozenset({"ramflow_io", "data_engine", "ram_model"}),
    "orchestration": frozenset({"ramflow_io", "data_engine", "ram_model", "engine_rounds"}),
}
# top-level folders outside the layering (they may import anything)
OUTSIDE = {"tests", "bench", "deploy", "docs"}
LAZY_MARK = "# lazy:"


@dataclass(frozen=True)
class ImportSite:
    path: Path
    line: int
    module: str          # absolute module name ("" for ``from . import x`` resolved to the package)
    in_function: bool
    marked_lazy: bool    # the statement (or the line above it) carries ``# lazy: <reason>``


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    """``from ..x import y`` in ``pkg/sub/mod.py`` -> ``pkg.x``."""
    if node.level == 0:
        return node.module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def import_sites(path: Path) -> list[ImportSite]:
    """Every import statement of one file, with where it sits and whether it is marked lazy."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source, filename=str(path))
    sites: list[ImportSite] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                text = "\n".join(lines[max(child.lineno - 2, 0): child.end_lineno])
                mods = ([a.name for a in child.names] if isinstance(child, ast.Import)
                        else [_absolute(child, path)])
                sites.extend(ImportSite(path, child.lineno, m, in_function, LAZY_MARK in text) for m in mods)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return sites


def package_sites(package: str) -> list[ImportSite]:
    files = sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)
    assert files, f"no sources under {package}/"
    return [site for f in files for site in import_sites(f)]


def ours(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in ALLOWED else None


def test_every_package_is_in_the_layering():
    """A new top-level package must be placed in ALLOWED (or be one of the folders outside)."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - OUTSIDE == set(ALLOWED), "update ALLOWED (and the README layout) for new packages"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_layers(package):
    wrong = [f"{s.path.relative_to(ROOT)}:{s.line} imports {s.module}"
             for s in package_sites(package)
             if ours(s.module) not in (None, package) and ours(s.module) not in ALLOWED[package]]
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package]) or 'nothing of ours'}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_function_level_imports_of_ours_say_why(package):
    unmarked = [f"{s.path.relative_to(ROOT)}:{s.line} imports {s.module} inside a function"
                for s in package_sites(package)
                if s.in_function and ours(s.module) and not s.marked_lazy]
    assert not unmarked, ("move these to the top of the module (the layers allow it), or mark them "
                          f"'{LAZY_MARK} <reason>' when they buy start-up time:\n" + "\n".join(unmarked))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_the_package_is_scanned(package):
    """The scan sees module-level imports of the package's own layer below (guards the walker)."""
    sites = package_sites(package)
    assert any(not s.in_function for s in sites)
    if ALLOWED[package]:
        assert {ours(s.module) for s in sites} & ALLOWED[package], f"{package} imports none of its layers below"


def test_the_scan_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The walker itself: nested, relative and marked imports are all found."""
    pkg = tmp_path / "data_engine" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    mod = pkg / "mod.py"
    mod.write_text("from ..x import y\n"
                   "def f():\n"
                   "    import ram_model.model\n"
                   "    class C:\n"
                   "        def g(self):\n"
                   "            # lazy: start-up\n"
                   "            from engine_rounds import run_engine\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    sites = {(s.module, s.in_function, s.marked_lazy) for s in import_sites(mod)}
    assert sites == {("data_engine.x", False, False), ("ram_model.model", True, False),
                     ("engine_rounds", True, True)}


def module_graph() -> dict[str, set[str]]:
    """``{module: modules of ours it imports}``, counting every import (module level and inside
    functions, lazy or not). ``from pkg import name`` points at ``pkg.name`` when that is a module;
    a module's import of its own parent package is left out (Python loads the parent first anyway)."""
    files = {_module_name(f): f for pkg in ALLOWED for f in sorted((ROOT / pkg).rglob("*.py"))
             if "__pycache__" not in f.parts}

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        return next((m for m in (".".join(parts[:i]) for i in range(len(parts), 0, -1)) if m in files), None)

    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, path)
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for target in filter(None, map(resolve, targets)):
                if target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_no_import_cycles_even_through_lazy_imports():
    """Lazy imports exist for start-up time only: counting them too, no module of ours reaches
    itself through its imports (a cycle would be what a function-level import used to hide)."""
    cycles = import_cycles(module_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]
    graph = module_graph()
    assert len(graph) > 50 and any(graph.values())
