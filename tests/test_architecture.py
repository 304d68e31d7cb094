"""The layout's rules, checked on the source: no import cycles, dependencies point one way, losses needs only
torch and numpy.

Every import counts, also those inside functions (a lazy import hides a cycle, it does not remove
it); imports under `if TYPE_CHECKING:` do not run and are left out.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("losses", "searchspace", "trainers")  # installed as marginsearch.<folder>
LAYER = {"losses": 0, "searchspace": 1, "trainers": 2}  # trainers → searchspace → losses


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out["marginsearch." + ".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything module `name` imports at run time (third-party too)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            target = node.args[0].value
            if target.startswith("."):  # import_module(".name", __name__)
                target = f"{package}{target}"
            found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in (w for w in GRAPH[v] if w in GRAPH):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in GRAPH[v]:
                out.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_every_module_and_the_lazy_imports():
    assert len(MODULES) > 40
    assert "marginsearch.searchspace.ray_backend" in GRAPH["marginsearch.searchspace.search"]  # an import_module string


def test_no_import_cycle_among_the_packages_modules():
    assert _cycles() == []


def test_dependencies_point_one_way():
    wrong = [f"{name} imports {target}" for name, targets in GRAPH.items() for target in targets
             if target.startswith("marginsearch.")
             and LAYER[target.split(".")[1]] > LAYER[name.split(".")[1]]]
    assert wrong == []


def test_losses_imports_nothing_but_torch_numpy_and_the_standard_library():
    # matplotlib: only `python -m marginsearch.losses --plot`
    allowed = {"torch", "numpy", "marginsearch", "matplotlib"}
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    third_party = {target.split(".")[0] for name, targets in GRAPH.items() if name.startswith("marginsearch.losses")
                   for target in targets} - stdlib
    assert third_party <= allowed, third_party - allowed
