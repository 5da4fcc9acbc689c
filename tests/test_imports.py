"""The import graph of mmx: no cycles between modules, and the layering the package is built on.

The graph is read from the source with ``ast``, never by importing mmx: imports inside functions count as much as
module-level ones (they run when the function does), and a module that fails to import still gets checked. Imports
under ``if TYPE_CHECKING:`` never run and are left out.

Package ``__init__`` files blur the picture, because importing ``mmx.model.cache`` runs ``mmx/model/__init__.py``,
which imports every module it re-exports. So an edge into a package ``__init__`` is counted only for names the
``__init__`` defines itself; a name it re-exports counts as an edge to the module that defines it, and an
``__init__``'s own re-exports are not edges at all. What is left is what each module's code needs.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(importlib.util.find_spec("mmx").origin).parent


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    in_function: bool

    def __str__(self) -> str:
        where = "in a function" if self.in_function else "at module level"
        return f"{self.source} -> {self.target} (line {self.line}, {where})"


@dataclass(frozen=True)
class Import:
    """One imported module (``name`` None) or one name imported from a module, with what the importer binds."""

    module: str
    name: str | None
    bound: str
    line: int
    in_function: bool


# ---------------------------------------------------------------------------------------------------- reading
@cache
def discover() -> dict[str, Path]:
    """Module name -> source file, a package standing for its ``__init__.py``. ``pkgutil.walk_packages`` would
    import every package to find its submodules; ``iter_modules`` over the directories finds them without running
    any of the code under test."""
    found = {"mmx": ROOT / "__init__.py"}

    def walk(directory: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(directory)], prefix):
            short = info.name.rpartition(".")[2]
            if info.ispkg:
                found[info.name] = directory / short / "__init__.py"
                walk(directory / short, info.name + ".")
            else:
                found[info.name] = directory / f"{short}.py"

    walk(ROOT, "mmx.")
    return found


def is_package(module: str) -> bool:
    return discover()[module].name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(module: str, level: int, name: str | None) -> str:
    """The absolute module of ``from <level dots><name> import ...`` written in ``module``."""
    if level == 0:
        return name or ""
    package = module if is_package(module) else module.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - (level - 1)]
    return ".".join(base + ([name] if name else []))


@cache
def parse(module: str) -> ast.Module:
    return ast.parse(discover()[module].read_text(encoding="utf-8"), filename=str(discover()[module]))


@cache
def imports(module: str, type_checking: bool = False) -> tuple[Import, ...]:
    """Every import statement of ``module``, module level and inside functions; those under
    ``if TYPE_CHECKING:`` only when ``type_checking`` (they tell where a lazily re-exported name comes from)."""
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body if type_checking else []:
                visit(child, in_function)
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.partition(".")[0]
                found.append(Import(alias.name, None, bound, node.lineno, in_function))
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node.level, node.module)
            for alias in node.names:
                found.append(Import(source, alias.name, alias.asname or alias.name, node.lineno, in_function))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(Import(node.args[0].value, None, "", node.lineno, in_function))
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(parse(module), False)
    return tuple(found)


def _known(name: str) -> str | None:
    """The module ``name`` is, else the innermost package of it that exists (``import mmx.x.gone`` still runs
    ``mmx.x``); None outside mmx."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in discover():
            return candidate
    return None


@cache
def _lazy_exports(package: str) -> dict[str, str]:
    """A package's ``_EXPORTS = {name: module}`` table, whose names its ``__getattr__`` imports on first access
    (:func:`mmx.utils.lazy.lazy_exports`)."""
    for node in parse(package).body:
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets) and isinstance(node.value, ast.Dict):
            pairs = zip(node.value.keys, node.value.values)
            return {k.value: v.value for k, v in pairs if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}
    return {}


@cache
def definer(package: str, name: str) -> str:
    """The module that defines ``name`` as seen from ``package``: followed through the package ``__init__``'s
    re-exports (eager imports, or lazy ones: an import under TYPE_CHECKING or an ``_EXPORTS`` table), else the
    ``__init__`` itself."""
    eager = [imp for imp in imports(package, type_checking=True) if imp.name is not None and not imp.in_function]
    sources = [(imp.module, imp.name) for imp in eager if imp.bound == name]
    if name in _lazy_exports(package):
        sources.append((_lazy_exports(package)[name], name))
    if not sources:
        return package
    module, original = sources[0]
    if f"{module}.{original}" in discover():
        return f"{module}.{original}"
    if module in discover() and is_package(module) and module != package:
        return definer(module, original)
    return _known(module) or package


@cache
def _names_used(module: str) -> set[str]:
    """Names the module's own code reads (import statements bind names; they do not use them)."""
    return {
        node.id for node in ast.walk(parse(module)) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
    }


def _is_reexport(module: str, imp: Import, target: str) -> bool:
    """A package ``__init__`` importing from its own package only to hand the names on. One whose own code uses
    the name depends on it like any module, so that edge stays."""
    inside = target == module or target.startswith(module + ".")
    return is_package(module) and inside and imp.bound not in _names_used(module)


@cache
def edges() -> tuple[Edge, ...]:
    out = []
    for module in discover():
        for imp in imports(module):
            if imp.name is None:  # import a.b.c
                target = _known(imp.module)
            elif f"{imp.module}.{imp.name}" in discover():  # from a.b import c, c a module
                target = f"{imp.module}.{imp.name}"
            elif imp.module in discover() and is_package(imp.module) and imp.name != "*":  # from a.b import name
                target = definer(imp.module, imp.name)
            else:
                target = _known(imp.module)
            if target is not None and target != module and not _is_reexport(module, imp, target):
                out.append(Edge(module, target, imp.line, imp.in_function))
    return tuple(out)


def graph(all_edges: tuple[Edge, ...]) -> dict[str, dict[str, Edge]]:
    """source -> target -> the first import statement making that edge."""
    out: dict[str, dict[str, Edge]] = {}
    for edge in sorted(all_edges, key=lambda e: (e.source, e.line)):
        out.setdefault(edge.source, {}).setdefault(edge.target, edge)
    return out


# ---------------------------------------------------------------------------------------------------- analysis
def cycles(g: dict[str, dict[str, Edge]]) -> list[list[Edge]]:
    """One shortest cycle through each strongly connected group of modules (Tarjan), as the chain of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:  # recursion depth is bounded by the number of modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(g):
        if v not in index:
            connect(v)
    return [_shortest_cycle(g, group) for group in groups]


def _shortest_cycle(g: dict[str, dict[str, Edge]], group: set[str]) -> list[Edge]:
    """The shortest cycle through the group's first module: one edge out of it, then the shortest way back."""
    start = min(group)
    inside = {v: {w: e for w, e in g.get(v, {}).items() if w in group} for v in group}
    cycles = []
    for w, first in sorted(inside[start].items()):
        back = [] if w == start else reaches(inside, w, lambda name: name == start)
        if back is not None:
            cycles.append([first, *back])
    if not cycles:
        raise AssertionError(f"no cycle through {start} in its strongly connected group")
    return min(cycles, key=len)


def reaches(g: dict[str, dict[str, Edge]], source: str, forbidden: Callable[[str], bool]) -> list[Edge] | None:
    """The shortest chain of imports from ``source`` to a module ``forbidden(name)`` accepts, if any."""
    paths = {source: []}
    frontier = [source]
    while frontier:
        following = []
        for v in frontier:
            for w, edge in sorted(g.get(v, {}).items()):
                if w in paths:
                    continue
                paths[w] = [*paths[v], edge]
                if forbidden(w):
                    return paths[w]
                following.append(w)
        frontier = following
    return None


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _chain(path: list[Edge]) -> str:
    return "\n    ".join(str(edge) for edge in path)


# ---------------------------------------------------------------------------------------------------- tests
def test_the_graph_reader_sees_what_the_code_imports():
    found = {(e.source, e.target) for e in edges()}
    assert len(discover()) > 50 and "mmx.model.modeling" in discover() and is_package("mmx.model")
    assert ("mmx.model.weights", "mmx.model.modeling") in found  # module level
    assert ("mmx.config", "mmx.presets") in found
    # A name re-exported by a package __init__ is an edge to the module that defines it, not to the __init__...
    assert definer("mmx.model", "load_model") == "mmx.model.weights"
    assert definer("mmx.model", "MiniMaxForCausalLM") == "mmx.model.modeling"
    # ...lazy re-exports (PEP 562, with the import under TYPE_CHECKING) included...
    assert definer("mmx", "MiniMaxConfig") == "mmx.config"
    # ...and an __init__'s re-exports are not edges of its own.
    assert not any(e.source == "mmx.model" for e in edges())


def test_cycle_finder_on_a_small_graph():
    def edge(a: str, b: str) -> Edge:
        return Edge(a, b, 1, False)

    g = graph((edge("a", "b"), edge("b", "c"), edge("c", "a"), edge("c", "d"), edge("d", "e"), edge("e", "d")))
    found = sorted([[(e.source, e.target) for e in cycle] for cycle in cycles(g)])
    assert found == [[("a", "b"), ("b", "c"), ("c", "a")], [("d", "e"), ("e", "d")]]
    assert cycles(graph((edge("a", "b"), edge("b", "c"), edge("a", "c")))) == []
    assert [e.target for e in reaches(g, "a", lambda m: m == "e")] == ["b", "c", "d", "e"]


def test_no_import_cycles():
    found = cycles(graph(edges()))
    report = "\n\n".join("  " + _chain(cycle) for cycle in found)
    assert not found, f"{len(found)} import cycle(s) between mmx modules:\n{report}"


# Layers that run models or serve them; the command line is built on them, never the other way.
LIBRARY_LAYERS = ("mmx.engine", "mmx.model", "mmx.ops", "mmx.chat", "mmx.train", "mmx.rl", "mmx.serve")


def _violations(sources: tuple[str, ...], forbidden: Callable[[str], bool]) -> list[str]:
    g = graph(edges())
    out = []
    for module in sorted(discover()):
        if _under(module, *sources) and not forbidden(module):
            path = reaches(g, module, forbidden)
            if path is not None:
                out.append("  " + _chain(path))
    return out


def test_library_layers_never_import_the_cli():
    bad = _violations(LIBRARY_LAYERS, lambda m: _under(m, "mmx.cli"))
    assert not bad, "modules that import mmx.cli (directly or through other modules):\n" + "\n".join(bad)


def test_rl_never_imports_the_training_loop():
    """RL shares pieces with pretraining (checkpoints, metrics, resume state), never the loop itself."""
    bad = _violations(("mmx.rl",), lambda m: m == "mmx.train.loop")
    assert not bad, "mmx.rl modules that import mmx.train.loop:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", ["mmx.serve", "mmx.chat"])
def test_serve_and_chat_never_import_torch(package):
    """The server and the chat formats work on text and token ids; torch stays behind the engine."""
    bad = [
        f"  {module} imports {imp.module} (line {imp.line}, {'in a function' if imp.in_function else 'module level'})"
        for module in sorted(discover())
        if _under(module, package)
        for imp in imports(module)
        if imp.module.partition(".")[0] == "torch"
    ]
    assert not bad, f"{package} imports torch:\n" + "\n".join(bad)
