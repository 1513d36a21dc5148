"""pytest wiring for the whole repository: how the suite splits over the machine's cores.

README's `python -m pytest` runs on two pytest-xdist workers (``-n 2 --dist loadscope`` in
pyproject.toml, scheduled by ``pytest_xdist_make_scheduler`` below). Each worker is a process of
its own, so whatever the tests share in memory must stay on one worker: the tests are grouped
by what they share —

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


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's load-scope scheduler with our groups as its scopes (xdist_group_of).

    Not the ``xdist_group`` marker: with pytest 9.2, pytest-xdist 3.8's ``--dist loadgroup``
    writes the group into ``item._nodeid``, which pytest no longer reads (``Node.nodeid`` is
    ``str(self._id)``), so the groups were silently dropped and every module-scoped fixture
    (and the parity context) was built on both workers. A scheduler works on the node ids the
    controller sees, whatever pytest's internals; a whole group goes to one worker, largest first.
    """
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(Path(nodeid.split("::", 1)[0]))

    return GroupScheduling(config, log)
