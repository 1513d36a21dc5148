"""jax_ddpm never imports torch, not even indirectly at import time."""
from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = "import sys, {mod}; bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); " \
        "print(bad); sys.exit(1 if bad else 0)"


@pytest.mark.parametrize("mod", ["jax_ddpm", "jax_ddpm.cli"])
def test_import_does_not_import_torch(mod):
    r = subprocess.run([sys.executable, "-c", CHECK.format(mod=mod)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"importing {mod} imported torch: {r.stdout}{r.stderr}"


def test_no_submodule_imports_torch():
    code = ("import pkgutil, sys, importlib, jax_ddpm\n"
            "for m in pkgutil.walk_packages(jax_ddpm.__path__, 'jax_ddpm.'):\n"
            "    importlib.import_module(m.name)\n"
            "    if 'torch' in sys.modules: print(m.name); sys.exit(1)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"this module imported torch: {r.stdout}{r.stderr}"
