"""pytest wiring for the whole repository: how the suite splits over the machine's cores.

README's `python -m pytest` runs on two pytest-xdist workers (``-n 2 --dist loadgroup`` in
pyproject.toml). Each worker is a process of its own, so whatever the tests share in memory
must stay on one worker: the tests are grouped by what they share —

- every parity test: one session context (models and compiled functions, parity_tests/conftest.py);
- tests/test_parallel.py and tests/test_bf16.py: one two-device subprocess (``sharded_worker_result``);
- any other test: its module (module-scoped fixtures).

The command tests' one trained tiny run (``cli_util.shared_run``) and the XLA compilation cache
live in a folder all workers share, so neither needs a group.

Without xdist (``-p no:xdist``, or ``-n 0``) the groups are ignored and everything runs in one process.
"""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED_SUBPROCESS = {"test_parallel.py", "test_bf16.py"}


def xdist_group_of(path: Path) -> str:
    """The worker group of a test file (see the module docstring)."""
    if path.parent.name == "parity_tests":
        return "parity"
    if path.name in SHARED_SUBPROCESS:
        return "sharded"
    return path.name


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(name=xdist_group_of(Path(str(item.fspath)))))
