"""The benchmark scripts in bench/ still start: what they import exists (modules, and the names
taken from this project's), and the ones with a command line answer ``--help``. (What they
measure is run by hand: docs/benchmarks.md.)"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "bench").glob("*.py"))
# Workers that another benchmark starts with its own arguments: no --help of their own.
WORKERS = {"bare_loop.py": "bench/train_throughput.py launches it with a recipe",
           "merge_contenders.py": "bench/merge_bench.py runs its subcommands"}


def _imports(tree: ast.AST) -> dict[str, list[str]]:
    """Absolute imports: module -> the names taken from it (empty for ``import module``)."""
    found: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.setdefault(alias.name, [])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.setdefault(node.module, []).extend(a.name for a in node.names)
    return found


def _resolves(module: str, names: list[str], ours: bool) -> bool:
    try:
        if importlib.util.find_spec(module) is None:
            return False
    except ModuleNotFoundError:  # a parent package is missing
        return False
    if not ours:
        return True
    mod = importlib.import_module(module)  # ours: the names must exist too
    return all(hasattr(mod, n) or (hasattr(mod, "__path__")
                                   and importlib.util.find_spec(f"{module}.{n}") is not None)
               for n in names)


def _top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_what_a_benchmark_imports_exists(script: Path):
    """Modules resolve, and the names taken from this project's modules exist. The test
    helpers (tests/support) count only for a script that puts tests/ on its own path."""
    source = script.read_text()
    adds_tests = re.search(r"sys\.path\.insert\(.*\"tests\"", source) is not None
    adds_bench = re.search(r"sys\.path\.insert\(.*__file__\)\.resolve\(\)\.parent\)",
                           source) is not None
    missing = []
    for module, names in sorted(_imports(ast.parse(source)).items()):
        top = module.split(".")[0]
        sibling = REPO / "bench" / f"{module}.py"
        if sibling.is_file():  # another benchmark's helpers: on the path only if it says so
            defined = _top_level_names(ast.parse(sibling.read_text()))
            if not adds_bench or set(names) - defined:
                missing.append(f"{module}: {', '.join(sorted(set(names) - defined))}"
                               if adds_bench else f"{module} (bench/ is not on the path)")
        elif top == "support" and not adds_tests:
            missing.append(f"{module} (tests/ is not on the script's path)")
        elif not _resolves(module, names, ours=top in ("moe_merge", "support")):
            missing.append(module if not names else f"{module}: {', '.join(names)}")
    assert not missing, f"bench/{script.name} imports {missing}: no such module or name"


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.name not in WORKERS],
                         ids=lambda p: p.name)
def test_a_benchmark_answers_help(script: Path):
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, f"bench/{script.name} --help: {proc.stderr[-500:]}"
    assert proc.stdout.startswith("usage:"), proc.stdout[:200]
