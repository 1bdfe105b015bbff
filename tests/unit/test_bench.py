"""The benchmark scripts in bench/ still start: what they import exists, and the ones with a
command line answer ``--help``. (What they measure is run by hand: docs/benchmarks.md.)"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "bench").glob("*.py"))
# Workers that another benchmark starts with its own arguments: no --help of their own.
WORKERS = {"bare_loop.py": "bench/train_throughput.py launches it with a recipe",
           "merge_contenders.py": "bench/merge_bench.py runs its subcommands"}


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_what_a_benchmark_imports_exists(script: Path, monkeypatch):
    """Module paths resolve as they do when the script runs (bench/ and tests/ on sys.path)."""
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    monkeypatch.syspath_prepend(str(script.parent))
    missing = []
    for name in sorted(_imports(ast.parse(script.read_text()))):
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(name)
    assert not missing, f"bench/{script.name} imports {missing}: no such module"


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.name not in WORKERS],
                         ids=lambda p: p.name)
def test_a_benchmark_answers_help(script: Path):
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, f"bench/{script.name} --help: {proc.stderr[-500:]}"
    assert proc.stdout.startswith("usage:"), proc.stdout[:200]
