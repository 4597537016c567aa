"""Each package's modules depend on each other one way: no import cycle; only ``__main__`` imports the CLI, and
gptcore imports neither Ray nor MLflow.

The graph is read from the source with `ast` (nothing is imported), function-local imports included: a cycle
hidden inside a function still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "gptcore")


def module_names(package: str = "orchestrator") -> dict[str, Path]:
    """Every module of ``package`` by dotted name (``orchestrator`` for its ``__init__``)."""
    modules = {}
    root = REPO / package
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every name ``module`` imports anywhere in its file: its package's modules as such, anything else by the
    dotted name it is imported from."""
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
        targets.update(names)
    targets.discard(module)
    return targets


def imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its file."""
    return {name for name in imported_names(module, path, modules) if name in modules}


def import_graph(package: str = "orchestrator") -> dict[str, set[str]]:
    modules = module_names(package)
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


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    cycle = find_cycle(import_graph(package))
    assert cycle is None, f"import cycle in {package}: " + " -> ".join(cycle)


def test_gptcore_imports_neither_ray_nor_mlflow_nor_the_orchestrator():
    """gptcore works on its own: the orchestrator is the only code that knows Ray and MLflow."""
    modules = module_names("gptcore")
    found = {
        module: sorted(name for name in imported_names(module, path, modules) if name.split(".")[0] in FORBIDDEN)
        for module, path in modules.items()
    }
    assert {module: names for module, names in found.items() if names} == {}


FORBIDDEN = {"ray", "mlflow", "orchestrator"}


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
