"""The package's import graph has no cycles (function-level imports included) and the layers hold."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# import name -> folder (envs/ and policies/ are installed as rl_adapt.envs and rl_adapt.policies)
ROOTS = {"rl_adapt": REPO / "rl_adapt", "rl_adapt.envs": REPO / "envs", "rl_adapt.policies": REPO / "policies"}


def _modules() -> dict[str, Path]:
    out = {}
    for name, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([name, *parts])] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file, top level or inside functions)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            for t in targets:
                while t and t not in modules:  # `from pkg import name`: the name may be a module or an attribute
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert len(graph) > 30  # the walk found the package
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lower_layers_do_not_import_upper_ones():
    """measures and data never import the engine, evaluation, training or the CLI; the engine never imports
    evaluation or the CLI; nothing but the CLI imports the command modules."""
    graph = import_graph()
    upper = {"rl_adapt.measures": ("rl_adapt.engine", "rl_adapt.evaluation", "rl_adapt.training", "rl_adapt.commands"),
             "rl_adapt.data": ("rl_adapt.engine", "rl_adapt.evaluation", "rl_adapt.training", "rl_adapt.commands"),
             "rl_adapt.engine": ("rl_adapt.evaluation", "rl_adapt.commands", "rl_adapt.cli")}
    bad = [(m, t) for m, targets in graph.items() for low, ups in upper.items() if m.startswith(low)
           for t in targets if t.startswith(ups)]
    assert bad == []
    commands = [(m, t) for m, targets in graph.items() for t in targets
                if t.startswith("rl_adapt.commands") and not m.startswith(("rl_adapt.commands", "rl_adapt.cli"))]
    assert commands == []
