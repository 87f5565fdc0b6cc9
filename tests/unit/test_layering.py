"""Import layering of src/tdpo: no import cycles, and the layers that must not look up.

Every ``import`` / ``from ... import`` statement counts, at module level or inside a function
(a deferred import still ties the two modules together). ``from tdpo.x import y`` is an import
of the module ``tdpo.x.y`` when ``tdpo/x/y.py`` (or the package ``tdpo/x/y/``) exists, else of
``tdpo.x``. Only imports of tdpo modules make edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def module_files(src: Path = SRC, package: str = "tdpo") -> dict[str, Path]:
    """``{"tdpo.x.y": path}`` for every module of the package (``__init__`` as the package)."""
    files = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest prefix of the dotted ``name`` that is a known module."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: set[str]) -> dict[str, int]:
    """``{imported tdpo module: line of its first import}`` for one module's source."""
    is_package = path.name == "__init__.py"
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the current package, up level - 1 packages
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = package[: len(package) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # "from tdpo.x import y": the submodule tdpo.x.y when it exists, else tdpo.x itself.
            for alias in node.names:
                full = f"{stem}.{alias.name}"
                targets.append(full if full in modules else stem)
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                found.setdefault(resolved, node.lineno)
    return found


def import_graph(src: Path = SRC) -> dict[str, dict[str, int]]:
    files = module_files(src)
    names = set(files)
    return {module: imports_of(module, path, names) for module, path in files.items()}


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(root: str) -> None:
        # Iterative DFS: (node, iterator over its successors).
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter[0]
                    counter[0] += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def cycle_in(component: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """One cycle through the component's first module: [a, b, ..., a] (shortest, by BFS)."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph.get(node, ())):
                if succ not in members:
                    continue
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if succ not in previous:
                    previous[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {component}")


def describe_cycles(graph: dict[str, dict[str, int]]) -> list[str]:
    lines = []
    for component in strongly_connected(graph):
        cycle = cycle_in(component, graph)
        steps = " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:]))
        lines.append(f"{len(component)} modules [{', '.join(component)}]: {steps} -> {cycle[-1]}")
    return lines


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_graph_is_read():
    graph = import_graph()
    assert {"tdpo.rewards", "tdpo.backbones", "tdpo.world", "tdpo.prompts"} <= set(graph)
    assert "tdpo.errors" in graph["tdpo.rewards.hub"]
    assert sum(map(len, graph.values())) > 50


def test_no_import_cycles():
    cycles = describe_cycles(import_graph())
    assert not cycles, "import cycles in src/tdpo:\n" + "\n".join(cycles)


def test_rewards_know_nothing_of_the_world():
    graph = import_graph()
    bad = [
        f"{module} imports {target} (line {line})"
        for module, targets in graph.items()
        if _in(module, "tdpo.rewards")
        for target, line in targets.items()
        if _in(target, "tdpo.world")
    ]
    assert not bad, "\n".join(bad)


def test_backbones_do_not_import_rewards():
    graph = import_graph()
    bad = [
        f"{module} imports {target} (line {line})"
        for module, targets in graph.items()
        if _in(module, "tdpo.backbones")
        for target, line in targets.items()
        if _in(target, "tdpo.rewards")
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_finds_cycles(tmp_path):
    package = tmp_path / "tdpo"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from tdpo.sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def f():\n    from tdpo import c\n")
    (package / "c.py").write_text("import tdpo.a\n")
    (package / "d.py").write_text("from . import a\nfrom .sub.b import f\n")
    graph = import_graph(tmp_path)
    assert graph["tdpo.a"] == {"tdpo.sub.b": 1}
    assert graph["tdpo.sub.b"] == {"tdpo.c": 2}
    assert graph["tdpo.d"] == {"tdpo.a": 1, "tdpo.sub.b": 2}
    assert strongly_connected(graph) == [["tdpo.a", "tdpo.c", "tdpo.sub.b"]]
    (cycle,) = describe_cycles(graph)
    assert "tdpo.a (line 1) -> tdpo.sub.b (line 2) -> tdpo.c (line 1) -> tdpo.a" in cycle
