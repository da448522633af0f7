"""The package's architecture, read from its import graph (module-level and deferred imports alike): no cycle,
its three floors (core, one run, tools: docs/development.md, "The code") each importing only from itself and the
floors below, no tool imports another (a tool's package, such as `sweep/`, is one tool), the sweep's modules
import only those below them, and wandb stays out of the core and the runner; its files: none over 600 lines, a
subpackage's `__init__.py` only its docstring, and a run folder's file names in records.py alone. Outside it, the
benchmarks (benchmarks/, not installed) and the tests use only its public names, and the package imports nothing of
theirs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.quick  # seconds in all: part of `pytest -m quick`


PACKAGE = REPO / "cifar_resnet"
TOOLS = {"sweep", "agent", "report"}
# Modules, and packages standing for every module in them.
WITHOUT_WANDB = {"config", "model", "data", "engine", "packing", "checkpoint", "records", "files", "errors", "logs",
                 "signals", "threads", "children", "staggered", "names", "credentials", "table", "runner",
                 "run_contract"}
# The floors, top-level names (a package stands for every module in it); each imports only its own and those below.
RUN_FLOOR = {"runner", "packing", "tracking", "train", "wandb_sweep"}
TOOL_FLOOR = TOOLS | {"cli", "__main__"}
MAX_LEVELS = 10  # errors, config, engine.device, engine.step, engine.loop, runner, packing.client, train, cli, __main__
MAX_FILE_LINES = 600
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


def floor_of(module: str) -> int:
    top = module.split(".")[0]
    return 2 if top in TOOL_FLOOR else 1 if top in RUN_FLOOR else 0


def test_each_floor_imports_only_from_itself_and_the_floors_below(graph):
    upward = sorted(f"{module} -> {target}" for module, (internal, _) in graph.items() for target in internal
                    if floor_of(target) > floor_of(module))
    assert not upward, f"imports from a higher floor: {upward}"


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


# What a test file may be named after besides a module: the journeys across modules (e2e_*), and what lies beside
# the code (each may be followed by `_` and what in it the file guards).
TEST_AREAS = ("e2e", "docs", "example_sweeps", "ci_inputs", "deploy", "docker", "gpu", "structure")


def test_each_test_file_is_named_after_the_modules_it_guards_or_an_area():
    """`test_engine_step.py` guards engine/step.py and `test_benchmarks.py` benchmarks/: a file's name is one or more
    module or package names (a subpackage's modules by their path or their own name), or starts with one of
    TEST_AREAS; never the work that added it (`test_newcomer.py`)."""
    names = set()
    for root in (PACKAGE, REPO / "benchmarks"):
        for path in root.rglob("*.py"):
            parts = (root.name, *path.relative_to(root).with_suffix("").parts)
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            names |= {"_".join(parts[start:]) for start in range(1 if root == PACKAGE else 0, len(parts))}

    def modules_only(stem: str) -> bool:
        return stem in names or any(stem.startswith(f"{name}_") and modules_only(stem[len(name) + 1:])
                                    for name in names)

    misnamed = [path.name for path in sorted((REPO / "tests").glob("test_*.py"))
                if not modules_only(stem := path.stem.removeprefix("test_"))
                and not any(stem == area or stem.startswith(f"{area}_") for area in TEST_AREAS)]
    assert misnamed == []


def test_wandb_stays_out_of_the_core_and_the_runner(graph):
    without_wandb = {module for module in graph if module.split(".")[0] in WITHOUT_WANDB}
    assert {"engine.loop", "data.sources", "runner"} <= without_wandb
    assert [module for module in without_wandb if "wandb" in graph[module][1]] == []
    # ... also through what they import from the package
    reachable, frontier = set(), list(without_wandb)
    while frontier:
        module = frontier.pop()
        if module not in reachable:
            reachable.add(module)
            frontier += graph[module][0]
    assert {"tracking", "wandb_sweep"} & reachable == set()


def test_a_run_folders_files_are_named_in_records_alone():
    """`records.RunFolder` names a run folder's files; every other module reaches them through it."""
    file_names = {"record.json", "progress.json", "best.pt", "last.pt", "run.log"}
    named = {(str(path.relative_to(PACKAGE)), node.value) for path in PACKAGE.rglob("*.py")
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Constant) and node.value in file_names}
    assert {path for path, _ in named} == {"records.py"}


def test_no_package_file_is_over_600_lines():
    """The developers' guide: a file that grows past this holds more than one job."""
    lengths = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert {path: lines for path, lines in lengths.items() if lines > MAX_FILE_LINES} == {}


def test_a_subpackages_init_holds_only_its_docstring():
    """No re-exports and no work at import time: a subpackage's modules are imported by their own names."""
    bodies = {str(path.relative_to(PACKAGE)): ast.parse(path.read_text()).body
              for path in PACKAGE.glob("*/__init__.py")}
    assert {"engine/__init__.py", "data/__init__.py"} <= bodies.keys()
    assert [path for path, body in bodies.items()
            if len(body) != 1 or not isinstance(body[0], ast.Expr) or not isinstance(body[0].value, ast.Constant)
            ] == []


def private_names_used(path: Path) -> set[str]:
    """The package's private names (`_name`) a file outside it uses: imported from one of its modules, read as an
    attribute of a module of it imported, or written in a string (a monkeypatch target, code run in a child)."""
    tree = ast.parse(path.read_text())
    modules: dict[str, str] = {}  # local name -> the package module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "cifar_resnet":
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                if module_name_of(target) in MODULES:
                    modules[alias.asname or alias.name] = target
        elif isinstance(node, ast.Import):
            modules.update({alias.asname: alias.name for alias in node.names
                            if alias.asname and alias.name.split(".")[0] == "cifar_resnet"})
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "cifar_resnet":
            used |= {f"{node.module}.{alias.name}" for alias in node.names if is_private(alias.name)}
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                and is_private(node.attr):
            used.add(f"{modules[node.value.id]}.{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            used |= {f"{module}.{name}" for module, name in
                     re.findall(r"\b(cifar_resnet(?:\.\w+)*)(?:\.| import )(_[a-z]\w*)", node.value)}
    return used


def module_name_of(dotted: str) -> str:
    return dotted.removeprefix("cifar_resnet.") if dotted != "cifar_resnet" else "__init__"


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_nothing_outside_the_package_uses_its_private_names():
    files = sorted([*(REPO / "benchmarks").rglob("*.py"), *(REPO / "tests").rglob("*.py")])
    files.remove(Path(__file__))  # this file names them, in the set above
    used = {(path.relative_to(REPO).as_posix(), name) for path in files for name in private_names_used(path)}
    assert used == set()


def test_the_package_imports_nothing_of_the_benchmarks_or_the_tests(graph):
    assert [module for module, (_, external) in graph.items() if external & {"benchmarks", "tests", "conftest"}] == []
