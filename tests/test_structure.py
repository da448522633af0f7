"""The package's architecture, read from its import graph (module-level and deferred imports alike): no cycle,
no tool imports another (a tool's package, such as `sweep/`, is one tool), the sweep's modules import only those
below them, and wandb stays out of the core and the runner."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.quick  # seconds in all: part of `pytest -m quick`


PACKAGE = REPO / "cifar_resnet"
TOOLS = {"sweep", "agent", "report", "bench"}
WITHOUT_WANDB = {"config", "model", "data", "engine", "fused", "pack", "checkpoint", "records", "files", "errors", "process",
                 "names", "credentials", "table", "runner", "trainer", "run_contract"}
MAX_LEVELS = 9  # errors, config, data, engine, runner, tracking, train, cli, __main__
# The sweep's modules, each above those it may import: command -> local -> view and plan -> state.
SWEEP_LAYERS = {"sweep.state": 0, "sweep.plan": 1, "sweep.view": 1, "sweep.local": 2, "sweep.command": 3}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(package modules imported, top-level third-party names imported) by one file."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    internal, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package and package != "__init__" else []
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{target}.{alias.name}" if target else alias.name
                internal.add(submodule if submodule in MODULES else target)
        elif isinstance(node, ast.ImportFrom):
            external.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            external.update(alias.name.split(".")[0] for alias in node.names)
    return {name for name in internal if name in MODULES and name != own}, external


MODULES = {module_name(path) for path in PACKAGE.rglob("*.py")}


@pytest.fixture(scope="module")
def graph() -> dict[str, tuple[set[str], set[str]]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def tool_of(module: str) -> str | None:
    return module.split(".")[0] if module.split(".")[0] in TOOLS else None


def test_no_tool_imports_another(graph):
    crossings = [(module, target) for module, (internal, _) in graph.items() for target in internal
                 if tool_of(target) and tool_of(module) != tool_of(target) and module not in ("cli", "__main__")]
    assert crossings == []


def test_the_sweeps_modules_import_only_those_below_them(graph):
    assert {module for module in graph if tool_of(module) == "sweep"} == {"sweep", *SWEEP_LAYERS}
    upward = [(module, target) for module, layer in SWEEP_LAYERS.items() for target in graph[module][0]
              if target in SWEEP_LAYERS and SWEEP_LAYERS[target] >= layer]
    assert upward == []


def test_import_graph_has_no_cycle_and_few_levels(graph):
    levels: dict[str, int] = {}

    def level(module: str, path: tuple[str, ...] = ()) -> int:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module not in levels:
            # A submodule importing its own package's __init__ (for nothing but its name) is not a level.
            below = [target for target in graph[module][0] if not module.startswith(f"{target}.")]
            levels[module] = 1 + max((level(target, (*path, module)) for target in below), default=0)
        return levels[module]

    assert max(level(module) for module in graph) <= MAX_LEVELS, levels


def test_no_test_module_imports_another():
    """What test modules share lives in tests/helpers/ (and conftest.py): a test module is no library."""
    tests = REPO / "tests"
    test_modules = {path.stem for path in tests.glob("test_*.py")}
    imported = set()
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            imported |= {(path.name, name.split(".")[0]) for name in names if name.split(".")[0] in test_modules}
    assert imported == set()


def test_wandb_stays_out_of_the_core_and_the_runner(graph):
    assert [module for module in WITHOUT_WANDB if "wandb" in graph[module][1]] == []
    # ... also through what they import from the package
    reachable, frontier = set(), list(WITHOUT_WANDB)
    while frontier:
        module = frontier.pop()
        if module not in reachable:
            reachable.add(module)
            frontier += graph[module][0]
    assert {"tracking", "wandb_sweep"} & reachable == set()
