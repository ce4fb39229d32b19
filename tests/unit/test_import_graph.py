"""No import cycles between the modules of multiproxy/ and engines/.

The graph has an edge A -> B for every module-level import in A of a module B of these packages (`import x.y`,
`from x import y`, `from . import y`, `from .y import z`), including imports under module-level `if`/`try`
blocks. Imports inside functions and methods are left out: they run when called, not when A is imported
(a second test counts them too). Importing `a.b.c` also imports its packages `a` and `a.b`, so those are
edges too, except the packages that contain A (they are imported before A anyway).
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = {"multiproxy": "multiproxy", "multiproxy_engines": "engines"}     # package -> its directory


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the packages, by dotted name (a package by its own name, from its __init__.py)."""
    found = {}
    for package, directory in PACKAGES.items():
        for path in sorted((ROOT / directory).rglob("*.py")):
            parts = [package] + list(path.relative_to(ROOT / directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(tree: ast.Module, in_functions: bool):
    """Import statements that run when the module is imported (not inside a def or a lambda); with
    `in_functions`, also those that run when a function is called."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not in_functions:
            continue
        else:
            stack.extend(ast.iter_child_nodes(node))


def _targets(name: str, is_package: bool, node, modules) -> set[str]:
    """The modules of ours that an import statement in module `name` loads.

    The packages above `name` are left out unless the statement takes a name defined in one of them (`from .
    import helper`): they are imported before `name` anyway, and `from . import sibling` needs only the sibling.
    """
    own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1 + is_package)}
    wanted = []
    if isinstance(node, ast.Import):
        wanted = [alias.name for alias in node.names]
    else:
        if node.level:
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module
        for alias in node.names:
            submodule = f"{origin}.{alias.name}"
            if submodule in modules:
                wanted.append(submodule)
            else:
                wanted.append(origin)
                own_packages.discard(origin)      # a name defined in the package itself: a real edge
        wanted.append(origin)
    out = set()
    for target in wanted:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):         # importing a.b.c imports a and a.b first
            prefix = ".".join(parts[:i])
            if prefix in modules and prefix != name and prefix not in own_packages:
                out.add(prefix)
    return out


def import_graph(in_functions: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for node in _imports(tree, in_functions):
            edges |= _targets(name, path.name == "__init__.py", node, modules)
        graph[name] = edges
    return graph


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module, or a module importing itself."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
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
                    if len(component) > 1 or node in graph[node]:
                        components.append(sorted(component))
    return components


def _a_cycle(graph, component: list[str]) -> list[str]:
    """One concrete cycle through the component's first module, for the failure message."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & members):
            if child == start:
                return paths[node] + [start]
            if child not in paths:
                paths[child] = paths[node] + [child]
                queue.append(child)
    return component


def test_the_graph_sees_the_packages():
    graph = import_graph()
    assert "multiproxy.cli" in graph and "multiproxy_engines.postgres.client" in graph
    assert "multiproxy.engine" in graph["multiproxy_engines.postgres.client"]
    assert "multiproxy.pool" in graph["multiproxy.proxy"]


def test_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(_strongly_connected(graph)) == [["a", "b", "c"], ["e"]]
    assert _a_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    graph = import_graph()
    cycles = [" -> ".join(_a_cycle(graph, component)) + f"   (modules in the cycle: {', '.join(component)})"
              for component in _strongly_connected(graph)]
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(cycles)


def test_no_import_cycles_through_function_level_imports_either():
    """A cycle hidden in an import inside a function (config <-> tokens, lab.stack <-> lab.failover used to be)
    is still two modules that cannot be understood, or moved, one without the other."""
    graph = import_graph(in_functions=True)
    cycles = [" -> ".join(_a_cycle(graph, component)) for component in _strongly_connected(graph)]
    assert not cycles, "import cycles (counting imports inside functions):\n" + "\n".join(cycles)


def test_the_core_does_not_import_the_lab():
    """multiproxy/*.py never loads multiproxy.lab when imported (`multiproxy lab` loads it on demand)."""
    graph = import_graph()
    core = [name for name in graph if not name.startswith(("multiproxy.lab", "multiproxy_engines"))]
    seen, todo = set(), list(core)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(graph[name])
    assert not {name for name in seen if name.startswith("multiproxy.lab")}
