"""The house's rules, held by tests: rooms of a readable size and imports that form no circle.

A budget like tinygrad's: no file of the project over ``FILE_LINES`` lines, no function over
``FUNCTION_LINES``, ``core/`` (the math) under ``CORE_LINES`` in all. A file or function that must
be larger is listed in ``EXCEPTIONS`` with the reason.
"""

from __future__ import annotations

import ast

import pytest

from conftest import ROOT

PACKAGES = ("core", "cluster", "jobs", "bench")
FILE_LINES = 400
FUNCTION_LINES = 80
CORE_LINES = 1650
EXCEPTIONS: dict[str, str] = {}  # "path" or "path::function": why it may be larger


def sources():
    return sorted(p for package in PACKAGES for p in (ROOT / package).glob("*.py"))


def test_no_file_is_over_its_budget():
    over = {str(p.relative_to(ROOT)): n for p in sources() if (n := len(p.read_text().splitlines())) > FILE_LINES}
    assert {path: n for path, n in over.items() if path not in EXCEPTIONS} == {}


def test_no_function_is_over_its_budget():
    over = {}
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                name = f"{path.relative_to(ROOT)}::{node.name}"
                if lines > FUNCTION_LINES and name not in EXCEPTIONS:
                    over[name] = lines
    assert over == {}


def test_core_stays_under_its_size():
    lines = sum(len(p.read_text().splitlines()) for p in (ROOT / "core").glob("*.py"))
    assert lines <= CORE_LINES, f"core/ has {lines} lines; its budget is {CORE_LINES}"


def imports() -> dict[str, set[str]]:
    """Each module of core, cluster and jobs, and the project's modules it imports (at its top or in a
    function: both are edges a reader follows)."""
    graph = {}
    for package in ("core", "cluster", "jobs"):
        for path in (ROOT / package).glob("*.py"):
            module = f"{package}.{path.stem}" if path.stem != "__init__" else package
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [f"{node.module}.{a.name}" for a in node.names]
                    found |= {n if (ROOT / (n.replace(".", "/") + ".py")).exists() else node.module for n in names}
                elif isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
            graph[module] = {m for m in found if m.split(".")[0] in ("core", "cluster", "jobs")} - {module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_projects_imports_form_no_circle():
    assert circles(imports()) == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}, [["a", "b", "c"]]),
])
def test_circles_are_found_by_hand(graph, expected):
    assert circles(graph) == expected


def test_core_imports_nothing_of_cluster_or_jobs():
    assert {m: d for m, d in imports().items() if m.startswith("core") and
            any(x.startswith(("cluster", "jobs")) for x in d)} == {}


def test_cluster_imports_of_jobs_only_its_error_kinds():
    """One way, core <- cluster <- jobs; save the leaf jobs.errors (it imports nothing of the project's), whose
    two kinds of error cluster's errors are, so that gradavg's exit status goes by class."""
    assert {m: sorted(x for x in d if x.startswith("jobs") and x != "jobs.errors")
            for m, d in imports().items() if m.startswith("cluster")} == {m: [] for m in imports()
                                                                           if m.startswith("cluster")}
    assert imports()["jobs.errors"] == set()
