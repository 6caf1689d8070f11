"""The layers point one way: flows/ on top, tasks/ below it, ssl_model/ at the bottom."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ABOVE = {"ssl_model": {"tasks", "flows", "deployments"}, "tasks": {"flows", "deployments"}}


def imported(path: Path) -> set[str]:
    """The top-level packages a module imports, at any depth of its code (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_no_module_imports_a_layer_above_it(package):
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules
    upward = {str(p.relative_to(ROOT)): sorted(imported(p) & ABOVE[package]) for p in modules}
    assert not {k: v for k, v in upward.items() if v}


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from flows.pipeline import pipeline\n    import flows.cli\n")
    assert imported(bad) == {"flows"}
