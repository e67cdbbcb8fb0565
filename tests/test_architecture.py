"""The shape of the package: objectives are plug-ins (no code outside jaxft/tasks/ asks which task
runs), and no module imports, directly or through others, a module that imports it back —
counting imports inside functions, which only hide a cycle until the function runs."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "jaxft")


def _modules() -> dict[str, str]:
    """Dotted module name → file, for every .py under jaxft/ (a package is its __init__.py)."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                found[dotted] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the jaxft modules it imports, at module level or in any function (static imports:
    `import a.b`, `from a import b`, relative ones resolved)."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from pkg import sub` imports the submodule when there is one, else the package.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 40 and "jaxft.sharding" in graph["jaxft.train"]  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_function_level_cycle(tmp_path, monkeypatch):
    """The check itself can fail: a function-level import that closes a loop is reported."""
    graph = import_graph()
    graph["jaxft.models.layers"].add("jaxft.train")  # as if layers imported train inside a function
    cycle = find_cycle(graph)
    assert cycle and cycle[0] == cycle[-1] and "jaxft.train" in cycle


def test_only_the_tasks_ask_which_task_runs():
    pattern = re.compile(r"task\s*[!=]=")
    offenders = []
    for name, path in _modules().items():
        if name.startswith("jaxft.tasks"):
            continue
        for number, line in enumerate(open(path), start=1):
            if pattern.search(line):
                offenders.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("line", ['if config.task == "classification":', "if cfg.task!='dpo':"])
def test_the_task_pattern_catches_a_branch(line):
    assert re.search(r"task\s*[!=]=", line)
