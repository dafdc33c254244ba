"""The import graph of msff (+ its Triton kernels, ``kernels/`` installed as ``msff.kernels``).

Built by parsing every module with :mod:`ast` (nothing is imported). Two kinds of edge:

* **module-level**: an ``import`` that runs when the module is imported (at top level, or inside a
  top-level ``if``/``try``/``with``/class body). A cycle here makes the import order matter
  (partially initialised modules).
* **function-level**: an ``import`` inside a function or method body; it runs when the function is
  called. A cycle through such an edge is a design smell: it usually hides a dependency that runs
  the wrong way (a policy module reaching back into the modules that use it).

``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``. The
implicit import of a parent package (``import a.b`` first runs ``a/__init__``) is not an edge, as in
pydeps/import-linter. Only first-party modules are nodes.

Run ``python tests/test_import_graph.py [prefix ...]`` to print the edges (``-`` module-level,
``~`` function-level) among modules whose names start with a prefix.
"""
from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: package name -> folder (the top-level kernels/ folder is installed as msff.kernels)
PACKAGES = {"msff": ROOT / "msff", "msff.kernels": ROOT / "kernels"}

#: compiled modules (no Python source to parse; nodes with no outgoing edges)
EXTENSIONS = ("msff._C",)

#: the backend/ops/kernels core: no cycle through these even counting function-level imports
CORE = ("msff.backend", "msff.backend_request", "msff._triton_env", "msff._version", "msff.ops",
        "msff.kernels", "msff._C")


def modules() -> dict[str, Path | None]:
    """Every first-party module name -> its file."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    for name in EXTENSIONS:
        out[name] = None
    return out


def _is_package(name: str, mods: dict[str, Path | None]) -> bool:
    return mods[name] is not None and mods[name].name == "__init__.py"


def _imports(tree: ast.AST):
    """(imported names, function-level?) for every import statement in ``tree``."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                yield child, [a.name for a in child.names], in_function
            elif isinstance(child, ast.ImportFrom):
                yield child, None, in_function
            yield from walk(child, fn)

    yield from walk(tree, False)


@functools.lru_cache(maxsize=None)
def import_graph() -> tuple[frozenset[tuple[str, str]], frozenset[tuple[str, str]]]:
    """(module-level edges, function-level edges) between first-party modules."""
    mods = modules()
    module_level, function_level = set(), set()
    for name, path in mods.items():
        if path is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        pkg = name if _is_package(name, mods) else name.rpartition(".")[0]
        for node, names, in_function in _imports(tree):
            targets = []
            if names is not None:
                targets = names
            else:
                base = node.module or ""
                if node.level:
                    anchor = pkg.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in mods else base)
            for t in targets:
                # a first-party name that is no module here (not yet committed, say) stays a node
                # of its own: walking up to its package would invent edges
                if (t == "msff" or t.startswith("msff.")) and t != name:
                    (function_level if in_function else module_level).add((name, t))
    return frozenset(module_level), frozenset(function_level - module_level)


def find_cycle(edges) -> list[str] | None:
    """One cycle (as a list of modules, first == last) in the directed graph, or None."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
    for v in graph.values():
        v.sort()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in graph.get(u, []):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def _in_core(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in CORE)


def test_the_graph_is_built_from_real_imports():
    """Guards the parser: edges that exist today must be found, with the right kind."""
    module_level, function_level = import_graph()
    assert ("msff.ops.lk_conv", "msff.ops.registry") in module_level
    assert ("msff.kernels.lkam_se", "msff.kernels.lk_conv") in module_level
    assert ("msff.ops.lk_conv", "msff.kernels.lk_conv") in function_level
    assert ("msff.ops._cuda", "msff._C") in module_level  # the compiled extension is a node
    assert len(modules()) > 40


def test_no_module_level_import_cycle():
    module_level, _ = import_graph()
    cycle = find_cycle(module_level)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_no_cycle_through_the_backend_ops_kernels_core():
    """Counting function-level imports too: the backend request, the ops (with their dispatch)
    and the kernels form a one-way chain request <- ops <- backend facade."""
    module_level, function_level = import_graph()
    core = {(a, b) for a, b in module_level | function_level if _in_core(a) and _in_core(b)}
    cycle = find_cycle(core)
    assert cycle is None, "import cycle in the backend/ops/kernels core: " + " -> ".join(cycle)


def test_leaves_import_nothing_first_party():
    """The backend request, triton_interpret and the version are leaves anyone may import."""
    module_level, function_level = import_graph()
    for leaf in ("msff.backend_request", "msff._triton_env", "msff._version"):
        assert leaf in modules()
        assert [e for e in module_level | function_level if e[0] == leaf] == []


def test_kernels_and_ops_do_not_import_the_backend_facade():
    """msff.backend re-exports the ops' dispatch; the ops and kernels import the leaves instead."""
    module_level, function_level = import_graph()
    bad = sorted(e for e in module_level | function_level
                 if (e[0].startswith("msff.ops") or e[0].startswith("msff.kernels"))
                 and e[1] == "msff.backend")
    assert bad == []


if __name__ == "__main__":
    prefixes = tuple(sys.argv[1:]) or CORE
    ml, fl = import_graph()
    keep = lambda e: e[0].startswith(prefixes) and e[1].startswith(prefixes)  # noqa: E731
    for a, b in sorted(filter(keep, ml)):
        print(f"{a} - {b}")
    for a, b in sorted(filter(keep, fl)):
        print(f"{a} ~ {b}")
    print("module-level cycle:", find_cycle(ml))
    print("cycle incl. function-level:", find_cycle(ml | fl))
