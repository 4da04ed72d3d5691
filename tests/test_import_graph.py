"""The import graphs of geomoe_kernels and of the geomoe app have no cycles.

The graph is read from the source (ast), not from a running interpreter, so it holds for every
import a module makes, including the ones inside functions and under `if TYPE_CHECKING:`: a
function-local import is an edge like any other. A cycle is cut by moving code or by handing a
callable in (the dispatch registry gets its first-use check from the package's __init__), never by
moving an import into a function.

Edges: `import a.b` and `from a.b import c` give an edge to a.b, or to a.b.c where c is a submodule;
relative imports are resolved against the importing module's package. The implicit import of a
submodule's parent package (Python runs a package's __init__ before any of its submodules) is not an
edge: with it, every package whose __init__ imports one of its submodules would be a cycle."""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Optional, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"geomoe_kernels": ROOT, "geomoe": os.path.join(ROOT, "python")}


def modules(package: str) -> Dict[str, str]:
    """Module name -> file, for every .py file of `package` (a package is named by its __init__)."""
    base = PACKAGES[package]
    found = {}
    for folder, dirs, files in os.walk(os.path.join(base, package)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, name), base)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = os.path.join(folder, name)
    return found


def imports(module: str, path: str, known: Set[str]) -> Set[str]:
    """The modules in `known` that `module` (in file `path`) imports anywhere in its source."""
    is_package = os.path.basename(path) == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    out: Set[str] = set()

    def add(name: str) -> None:
        while name and name not in known:  # `import a.b.fn`-like names: the longest module prefix
            name = name.rpartition(".")[0]
        if name:
            out.add(name)

    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                source = ".".join(anchor + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                add(submodule if submodule in known else source)
    out.discard(module)
    return out


def graph(*packages: str) -> Dict[str, Set[str]]:
    found = {m: p for package in packages for m, p in modules(package).items()}
    return {m: imports(m, p, set(found)) for m, p in found.items()}


def find_cycle(g: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle as [a, b, ..., a], or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(m: str) -> Optional[List[str]]:
        state[m] = 1
        path.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def all_cycles_text(g: Dict[str, Set[str]]) -> str:
    """Every module on a cycle (the strongly connected parts of more than one module), for the message."""
    reach = {m: set() for m in g}
    for m in g:
        todo = list(g[m])
        while todo:
            n = todo.pop()
            if n not in reach[m]:
                reach[m].add(n)
                todo.extend(g[n])
    on_cycle = sorted(m for m in g if m in reach[m])
    return f"{len(on_cycle)} modules on a cycle: {', '.join(on_cycle)}"


def reachable(g: Dict[str, Set[str]], start: str) -> Set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(g[m])
    return seen


def test_the_graph_reader_sees_cycles_and_local_imports():
    g = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": set()}
    assert find_cycle(g) == ["p.a", "p.b", "p.c", "p.a"]
    assert find_cycle({"p.a": {"p.b"}, "p.b": set()}) is None
    # the reader itself: relative, absolute, function-local and submodule imports of the real package
    g = graph("geomoe_kernels")
    assert "geomoe_kernels.ops._declare" in g["geomoe_kernels.ops.permute"]  # from ._declare import ...
    assert "geomoe_kernels.backend" in g["geomoe_kernels.ops._declare"]  # from .. import backend
    assert "geomoe_kernels.verify" in g["geomoe_kernels.self_check"]  # imported inside a function
    assert "geomoe_kernels" not in g["geomoe_kernels.layout"]  # no implicit edge to the parent package


def test_geomoe_kernels_has_no_import_cycle():
    g = graph("geomoe_kernels")
    cycle = find_cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(cycle) + "\n" + all_cycles_text(g)


def test_geomoe_app_has_no_import_cycle():
    g = graph("geomoe")
    cycle = find_cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(cycle) + "\n" + all_cycles_text(g)


def test_the_library_never_imports_the_app():
    g = graph("geomoe_kernels", "geomoe")
    assert find_cycle(g) is None
    wrong = {m: sorted(n for n in g[m] if n.partition(".")[0] == "geomoe") for m in g if m.startswith("geomoe_kernels")}
    assert not any(wrong.values()), wrong


def test_the_dispatch_path_never_imports_the_verifier():
    """Dispatching an op loads the registry and the ops, not the self-check or its verification case."""
    g = graph("geomoe_kernels")
    for start in ("geomoe_kernels.backend", "geomoe_kernels.ops", "geomoe_kernels.ops._declare"):
        assert not reachable(g, start) & {"geomoe_kernels.verify", "geomoe_kernels.self_check"}, start
