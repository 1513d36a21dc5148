"""pyproject.toml lists every package of the repository, so a wheel install has them all
(an editable install hides a missing one: it finds the folders on disk)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP = ("jax_ddpm", "torch_ref", "parity_tests", "benchmarks")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for top in TOP for p in (REPO / top).rglob("__init__.py")}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages"
    assert listed - on_disk == set(), "these are listed but do not exist"


def test_commands_are_entry_points_not_imports():
    commands = _pyproject()["project"]["entry-points"]["jax_ddpm.commands"]
    assert commands == {"parity": "parity_tests.cli:main", "bench": "benchmarks.__main__:main"}
