"""The package's layering, checked from its source: no import cycles (counting imports inside
functions, which hide them from Python), and jobs/ scripts that only hand over to dcgh_dist.jobs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.py"))


def _modules() -> dict[str, Path]:
    out = {}
    for p in (REPO / "dcgh_dist").rglob("*.py"):
        parts = p.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the dcgh_dist modules it imports anywhere in its source (``from pkg import mod``
    counts as ``pkg.mod``)."""
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dcgh_dist"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("dcgh_dist")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package():
    graph = import_graph(_modules())
    assert graph["dcgh_dist.train.runner"] >= {"dcgh_dist.train.loop"}  # the graph sees real edges
    assert cycles(graph) == []


@pytest.mark.parametrize("name", JOBS)
def test_each_job_script_hands_over_to_its_module(name):
    """jobs/<name>.py runs dcgh_dist.jobs.<name>.main and holds no logic of its own, so tests,
    benchmarks and other programs call the module, never the script."""
    tree = ast.parse((REPO / "jobs" / f"{name}.py").read_text())
    defs = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defs == [], f"jobs/{name}.py defines {defs}: move them to dcgh_dist/jobs/{name}.py"
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert f"dcgh_dist.jobs.{name}" in imported
    proc = subprocess.run([sys.executable, f"jobs/{name}.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: "), proc.stderr


def test_nothing_imports_a_script():
    """No module, test or benchmark loads a file of jobs/ (by path or through sys.path)."""
    offenders = []
    for p in [*(REPO / "tests").glob("*.py"), *(REPO / "benchmarks").glob("*.py"), *(REPO / "dcgh_dist").rglob("*.py")]:
        if p == Path(__file__):
            continue
        text = p.read_text()
        for needle in ('/ "jobs"', '"jobs")', "'jobs')"):
            for line in text.splitlines():
                if needle in line and ("sys.path" in line or "spec_from_file_location" in line):
                    offenders.append(f"{p.relative_to(REPO)}: {line.strip()}")
    assert offenders == []


def test_codes_are_the_bottom_layer_and_models_sit_below_indexes():
    """What a code is (bit order, packing, Hamming, the ``name@K`` key) is defined once, below
    everything that makes or reads codes; models know nothing of indexes."""
    from dcgh_dist.codes import length_key, length_suffix

    graph = import_graph(_modules())
    assert graph["dcgh_dist.codes"] == set()
    assert graph["dcgh_dist.metrics"] == {"dcgh_dist.codes"}
    for name, deps in graph.items():
        if name.startswith("dcgh_dist.models"):
            assert not {d for d in deps if d.startswith("dcgh_dist.index")}, name
        if name.startswith("dcgh_dist.data"):  # data is below models: the model builds its inputs
            assert not {d for d in deps if d.startswith("dcgh_dist.models")}, name
    assert (length_key("image_codes", 32, 32), length_key("image_codes", 16, 32)) == ("image_codes", "image_codes@16")
    assert (length_suffix(64, 64), length_suffix(128, 64)) == ("", "@128")
