"""The package's shape, measured from its imports (every ``import`` statement, deferred and ``TYPE_CHECKING`` ones
included): no import circles, imports only downwards through the declared layers, at most 8 layers of modules, and
one import path per name (a module's ``__all__`` lists only what it defines; the package ``__init__`` files are the
public API and may map names to the modules that define them)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "hf_rlhf_ext"
MAX_LAYERS = 8

# Lower layers never import higher ones. "core" is every module directly in hf_rlhf_ext/ (the maths, the sampler,
# π_ref, reward adapters, validation, results, plots, cards) except the console entry points.
LAYERS = ["evaluation", "core", "trainers", "callbacks", "compat", "lab", "run", "experiments", "entry", "recipes"]
ENTRY_POINTS = {"cli", "pretrained"}


def _module_files() -> dict[str, Path]:
    """Every module of the package (the top-level recipes/ installs as hf_rlhf_ext.recipes), by dotted name."""
    files = {}
    for base, prefix in ((ROOT / PACKAGE, PACKAGE), (ROOT / "recipes", f"{PACKAGE}.recipes")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([prefix, *parts])] = path
    return files


MODULES = _module_files()


def _targets(module: str, node: ast.AST, is_package: bool) -> list[str]:
    """The package modules one import statement reads (``from pkg import sub`` reads ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        subs = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in MODULES]
        names = subs or [source]
    out = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.append(name)
    return out


@functools.cache
def import_graph() -> dict[str, frozenset[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(_targets(module, node, path.name == "__init__.py"))
        graph[module] = frozenset(found)
    return graph


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return LAYERS.index("core")  # the package root: lazy names only
    if parts[1] in LAYERS:  # a subpackage (its __init__ included)
        return LAYERS.index(parts[1])
    if len(parts) == 2:
        return LAYERS.index("entry" if parts[1] in ENTRY_POINTS else "core")
    raise ValueError(f"{module}: a subpackage missing from LAYERS")


def cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def depth(graph: dict[str, frozenset[str]]) -> dict[str, int]:
    """Each module's layer count: 1 + the deepest module it imports (the graph must be acyclic)."""

    @functools.cache
    def d(v: str) -> int:
        return 1 + max((d(w) for w in graph[v]), default=0)

    return {v: d(v) for v in graph}


def test_the_measure_sees_circles_and_depth():
    circle = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset()}
    assert cycles(circle) == [["a", "b", "c"]]
    chain = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset(), "d": frozenset({"c"})}
    assert cycles(chain) == [] and depth(chain) == {"a": 3, "b": 2, "c": 1, "d": 2}


def test_the_graph_reads_relative_absolute_and_deferred_imports():
    graph = import_graph()
    assert "hf_rlhf_ext.trainers.kl_control" in graph["hf_rlhf_ext.callbacks.adaptive_kl"]  # from ..trainers...
    assert "hf_rlhf_ext.lab.task" in graph["hf_rlhf_ext.lab.build"]  # from . import task
    assert "hf_rlhf_ext.run.build" in graph["hf_rlhf_ext.experiments.sweeps"]  # deferred, inside a function
    assert "hf_rlhf_ext.run.build" in graph["hf_rlhf_ext.recipes.ppo"]  # a recipe, absolute import


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_imports_only_run_downwards():
    upwards = [f"{m} -> {t}" for m, targets in import_graph().items() for t in targets if layer(t) > layer(m)]
    assert upwards == []


def test_at_most_eight_layers():
    graph = import_graph()
    deepest = max(depth(graph).values())
    assert 4 <= deepest <= MAX_LAYERS  # 4: the measure is not trivially shallow (recipes -> run -> lab -> core)


def test_the_trainers_never_reach_the_lab_or_the_experiments():
    graph = import_graph()
    seen, todo = set(), [m for m in graph if m.startswith("hf_rlhf_ext.trainers.")]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    reached = {m.split(".")[1] for m in seen}
    assert not reached & {"lab", "run", "experiments", "recipes", "callbacks"}


@pytest.mark.parametrize("module", sorted(m for m, p in MODULES.items() if p.name != "__init__.py"))
def test_a_module_exports_only_what_it_defines(module):
    """``__all__`` of a module names its own definitions: a name imported from elsewhere has one home."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    defined, exported = set(), []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defined.add(name.id)
                if isinstance(target, ast.Name) and target.id == "__all__":
                    exported = [ast.literal_eval(e) for e in node.value.elts]
    assert [name for name in exported if name not in defined] == []
