"""The layering contract, read from the source (AST), not from what happens to be imported.

``jax_ddpm`` never names ``parity_tests``, ``benchmarks``, ``torch_ref``, ``torch`` or
``diffusers`` — not at the top, not lazily inside a function, not through
``importlib.import_module("...")`` or ``__import__``. ``torch_ref`` never names ``jax``,
``flax``, ``optax`` or ``jax_ddpm``. The checker itself is tested on sources that break the
rule, so a checker that finds nothing cannot pass.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY_FORBIDDEN = ("parity_tests", "benchmarks", "torch_ref", "torch", "diffusers")
TORCH_REF_FORBIDDEN = ("jax", "jaxlib", "flax", "optax", "orbax", "jax_ddpm")


def imported_roots(source: str) -> list[tuple[int, str]]:
    """(line, top-level package) for every absolute import and every string-named dynamic import."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value.split(".")[0]))
    return found


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, root in imported_roots(path.read_text()):
            if root in forbidden:
                out.append(f"{path.relative_to(REPO)}:{line} imports {root}")
    return out


@pytest.mark.parametrize("source, root", [
    ("import torch\n", "torch"),
    ("import torch.nn as nn\n", "torch"),
    ("def f():\n    from parity_tests.report import main\n    return main\n", "parity_tests"),
    ("import importlib\nm = importlib.import_module('benchmarks.__main__')\n", "benchmarks"),
    ("m = __import__('diffusers')\n", "diffusers"),
    ("try:\n    import torch_ref\nexcept ImportError:\n    pass\n", "torch_ref"),
])
def test_checker_finds_each_kind_of_import(source, root):
    assert root in [r for _, r in imported_roots(source)]


def test_checker_ignores_relative_imports_and_strings():
    roots = [r for _, r in imported_roots("from . import torch\nx = 'import torch'\n")]
    assert "torch" not in roots


def test_checker_flags_a_file_added_to_the_library(tmp_path, monkeypatch):
    """The repository scan itself: a library copy with one offending module is caught."""
    lib = tmp_path / "jax_ddpm"
    lib.mkdir()
    (lib / "ok.py").write_text("import jax\n")
    (lib / "bad.py").write_text("def parity():\n    from parity_tests import report\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert violations("jax_ddpm", LIBRARY_FORBIDDEN) == ["jax_ddpm/bad.py:2 imports parity_tests"]


def test_jax_ddpm_imports_no_reference_or_harness():
    assert violations("jax_ddpm", LIBRARY_FORBIDDEN) == []


def test_torch_ref_imports_no_jax():
    assert violations("torch_ref", TORCH_REF_FORBIDDEN) == []
