"""The layers of segtrain, read from the source: every import of a segtrain
module by another package (at module level or inside a function) points down the stack, so
the packages form no cycle. A new package or top-level module gets a place in LAYERS."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "segtrain"

# bottom first; a unit may import the units of the levels below its own, and only the top
# level (the entry points and the API, which only call down) may import its own level
LAYERS: list[set[str]] = [
    {"errors"},
    {"core"},                              # precision, distributed, checkpoint I/O, rng, JSON
    {"data", "models", "losses", "viz"},
    {"eval", "submission"},                       # inference, metrics, CRF; benchmark formats
    {"engine"},                                   # the loop and its callbacks
    {"config_schema", "builders"},   # the schema every entry point applies; config -> objects
    {"runs", "run_start"},   # a run folder or .pt -> config, checkpoint, model; a start's claim
    {"app", "__main__", "evaluate", "predict", "export", "protocol", "reproduce", "flops", "api",
     "cli", "sweep_summary",
     "sweeper",  # sweeper: Hydra's, an entry point
     "__init__"},
]
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}
TOP = len(LAYERS) - 1


def unit_of(module: str) -> str:
    """The package (or top-level module) of ``segtrain.<unit>...``; ``__init__`` for the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def imported_modules(path: Path) -> set[str]:
    """Every segtrain module ``path`` imports anywhere in its body (``from a import b`` counts
    ``a`` and ``a.b``, since ``b`` may be a module)."""
    module, is_package = module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) + is_package - node.level]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "segtrain" or name.startswith("segtrain.")}


def package_graph() -> dict[str, dict[str, set[str]]]:
    """unit -> {imported unit -> the modules of ``unit`` that import it}."""
    graph: dict[str, dict[str, set[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module, _ = module_name(path)
        source = unit_of(module)
        edges = graph.setdefault(source, {})
        for name in imported_modules(path):
            if name == "segtrain":  # ``from segtrain import x`` is counted as segtrain.x
                continue
            target = unit_of(name)
            if target != source:
                edges.setdefault(target, set()).add(module)
    return graph


def find_cycle(graph: dict[str, dict[str, set[str]]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(unit: str) -> list[str] | None:
        state[unit] = "open"
        stack.append(unit)
        for target in sorted(graph.get(unit, {})):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[unit] = "done"
        stack.pop()
        return None

    for unit in sorted(graph):
        if unit not in state and (cycle := visit(unit)):
            return cycle
    return None


def test_every_package_has_a_place_in_the_layers():
    units = {unit_of(module_name(p)[0]) for p in PACKAGE.rglob("*.py")}
    assert units - LEVEL.keys() == set(), "add these to LAYERS in tests/test_layers.py"


def test_no_cycle_between_packages():
    assert find_cycle(package_graph()) is None


def test_every_import_points_down_the_stack():
    upward = []
    for source, edges in package_graph().items():
        for target, modules in edges.items():
            if target not in LEVEL or source not in LEVEL:
                continue  # reported by the test above
            if LEVEL[target] < LEVEL[source] or LEVEL[source] == LEVEL[target] == TOP:
                continue
            upward.append(f"{', '.join(sorted(modules))} imports segtrain.{target}")
    assert upward == []


@pytest.mark.parametrize("source, expected", [
    ("import segtrain.engine.trainer", {"segtrain.engine.trainer"}),
    ("from segtrain.core import checkpoint", {"segtrain.core", "segtrain.core.checkpoint"}),
    ("def f():\n    from ..core.rng import rng_state", {"segtrain.core.rng",
                                                        "segtrain.core.rng.rng_state"}),
    ("from . import metrics", {"segtrain.eval", "segtrain.eval.metrics"}),
    ("import torch\nfrom typing import Any", set()),
])
def test_the_import_reader_sees_absolute_relative_and_function_level_imports(tmp_path,
                                                                           monkeypatch,
                                                                           source, expected):
    # a module placed at segtrain/eval/x.py of a scratch package
    package = tmp_path / "segtrain"
    (package / "eval").mkdir(parents=True)
    module = package / "eval" / "x.py"
    module.write_text(source + "\n")
    monkeypatch.setitem(globals(), "PACKAGE", package)
    assert imported_modules(module) == expected


def test_a_cycle_and_an_upward_import_are_found():
    graph = {"eval": {"engine": {"segtrain.eval.crf"}}, "engine": {"eval": {"segtrain.engine.t"}}}
    assert find_cycle(graph) == ["engine", "eval", "engine"]
    assert find_cycle({"engine": {"eval": {"segtrain.engine.t"}}, "eval": {}}) is None


CALLBACKS = PACKAGE / "engine" / "callbacks"


def test_no_callback_module_imports_another_callback_module():
    """Callbacks share nothing but the trainer (its run record, checkpoints and stop state)
    and the hooks' base: so their order in the trainer's list is free."""
    modules = {module_name(p)[0] for p in CALLBACKS.glob("*.py")} - {
        "segtrain.engine.callbacks", "segtrain.engine.callbacks.base"}
    leaning = sorted(f"{module_name(path)[0]} imports {name}"
                     for path in CALLBACKS.glob("*.py")
                     for name in imported_modules(path) if name in modules
                     and name != module_name(path)[0])
    assert leaning == []
