"""Shared by the tests/test_cli_*.py modules: run `jax-ddpm` in a subprocess, one tiny trained run.

Every subprocess shares one persistent XLA compilation cache under pytest's session
folder, so only the first run pays for compiling the tiny model's programs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

TINY = ["--features", "8,16,32,64", "--image-size", "8", "--timesteps", "10", "--batch-size", "16",
        "--ema-decay", "0.9", "--num-samples", "16", "--log-every", "5", "--quiet"]
SHARED_STEPS = 60
SHARED_EVERY = 10  # checkpoints 40, 50, 60 are kept (--keep-checkpoints 3)


def session_root(tmp_path_factory):
    """The folder every process of this pytest session shares: the base temp folder, or under
    pytest-xdist (one base temp folder per worker) the folder above the workers' ones."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def cache_dir(tmp_path_factory) -> str:
    return str(session_root(tmp_path_factory) / "jax_cache")


def cli_env(tmp_path_factory, **extra) -> dict:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir(tmp_path_factory),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               JAX_PLATFORMS="cpu")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_cmd(workdir, *more, steps: int = SHARED_STEPS, every: int = SHARED_EVERY) -> list[str]:
    """``python -m jax_ddpm.cli train`` on the tiny model; later options override earlier ones."""
    return [sys.executable, "-m", "jax_ddpm.cli", "train", "--workdir", str(workdir), *TINY,
            "--steps", str(steps), "--checkpoint-every", str(every), *more]


RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_runner.py")


def runner_cmd(cmd: list[str], nan_at_step: int | None = None, step_delay: float | None = None) -> list[str]:
    """``cmd`` (from :func:`train_cmd`) run through ``tests/train_runner.py`` with its test hooks."""
    hooks = ([] if nan_at_step is None else ["--nan-at-step", str(nan_at_step)]) + \
            ([] if step_delay is None else ["--step-delay", str(step_delay)])
    return [sys.executable, RUNNER, *hooks, *cmd[3:]]


def shared_run(tmp_path_factory):
    """The session's one uninterrupted tiny run (trained on first use, then reused read-only).

    Shared by all xdist workers: the first to ask trains it while holding a lock; the others
    wait for the lock and find it finished (``samples.png`` is written last)."""
    import fcntl

    root = session_root(tmp_path_factory)
    workdir = root / "shared_tiny_run"
    with open(root / "shared_tiny_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (workdir / "samples.png").exists():
            done = subprocess.run(train_cmd(workdir), env=cli_env(tmp_path_factory), capture_output=True,
                                  timeout=600)
            assert done.returncode == 0, done.stderr.decode()[-2000:]
    return workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The shared run as a fixture (a test module imports ``trained`` and ``run_copy`` to use them)."""
    return shared_run(tmp_path_factory)


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the shared run, to change or break."""
    wd = tmp_path / "run"
    shutil.copytree(trained, wd)
    return wd
