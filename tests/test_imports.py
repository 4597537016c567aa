"""The orchestrator's modules depend on each other one way: no import cycle, and only ``__main__`` imports the CLI.

The graph is read from the source with `ast` (nothing is imported), function-local imports included: a cycle
hidden inside a function still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "orchestrator"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (``orchestrator`` for its ``__init__``)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from .x import y
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from orchestrator import sweep` imports the module orchestrator.sweep; `import Experiment` its package
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        targets.update(name for name in names if name in modules)
    targets.discard(module)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}  # "active" while on the DFS stack, then "done"
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "active"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "active":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read():
    """The parser sees module-level, function-local and ``from orchestrator import`` imports."""
    graph = import_graph()
    assert {"orchestrator.cli", "orchestrator.sweep", "orchestrator.experiment"} <= set(graph)
    assert "orchestrator.experiment" in graph["orchestrator"]  # from orchestrator.experiment import ASHA, ...
    assert "orchestrator.sweep" in graph["orchestrator.cli"]  # inside cmd_run
    assert "orchestrator.experiment" in graph["orchestrator.sweep"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in orchestrator: " + " -> ".join(cycle)


def test_only_main_imports_the_cli():
    importers = sorted(m for m, targets in import_graph().items() if "orchestrator.cli" in targets)
    assert importers == ["orchestrator.__main__"], f"modules importing orchestrator.cli: {importers}"


def test_corpus_preparation_does_not_import_torch():
    """Ray's preparation tasks import `orchestrator.prepare` and `gptcore.corpus`: no torch (a second per process)."""
    import subprocess
    import sys

    code = "import sys, orchestrator.prepare, gptcore.corpus; print(sorted({'torch', 'mlflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
