"""`jax-ddpm train` resumes exactly: a run SIGKILLed, then interrupted with Ctrl-C, then resumed
ends bit-identical to an uninterrupted run; a resume with other settings is refused.

Every run is a real subprocess (`python -m jax_ddpm.cli`) sharing one persistent XLA
compilation cache, so only the first one pays for compilation.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cli_util import SHARED_STEPS as STEPS, cli_env, runner_cmd, shared_run, train_cmd
from jax_ddpm import checkpoint as ckpt

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

def _final_tree(workdir, step=STEPS) -> dict:
    """The checkpoint's arrays as NumPy, read without a template (orbax's own metadata)."""
    import orbax.checkpoint as ocp

    path = os.path.join(ckpt.checkpoint_dir(str(workdir)), str(step), ckpt.STATE_ITEM)
    with ocp.StandardCheckpointer() as reader:
        tree = reader.restore(path)
    return jax.tree_util.tree_map(np.asarray, tree)


def _finalized_steps(workdir) -> list[int]:
    """Cheap poll: orbax renames a step's temporary folder to its bare number once finalized."""
    folder = ckpt.checkpoint_dir(str(workdir))
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def _kill_when(proc, workdir, min_steps: int, extra_delay: float, timeout: float = 240,
               sig: int = signal.SIGKILL) -> list[int]:
    """Sends ``sig`` to ``proc`` once ``min_steps`` complete checkpoints exist (+ a delay); returns them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before it could be killed: "
                        f"{proc.stderr.read().decode()[-500:]}")
        steps = _finalized_steps(workdir)
        if len(steps) >= min_steps:
            time.sleep(extra_delay)
            proc.send_signal(sig)
            proc.wait(timeout=120)
            return steps
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    return shared_run(tmp_path_factory)


def test_sigkill_and_resume_is_bit_identical(tmp_path, tmp_path_factory, reference_run):
    workdir = tmp_path / "killed"
    env = cli_env(tmp_path_factory)
    delay = 0.03  # seconds after each step (tests/train_runner.py): ~2 s of steps, room to kill mid-run
    # Kill 1: as soon as the first checkpoint is finalized (training is under way).
    proc = subprocess.Popen(runner_cmd(train_cmd(workdir), step_delay=delay), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    seen = _kill_when(proc, workdir, 1, 0.0)
    assert proc.returncode == -signal.SIGKILL and STEPS not in seen
    # Interrupt 2: a resumed run gets Ctrl-C (SIGINT) a moment after its next checkpoint; it
    # saves a checkpoint at the step it reached and exits with status 130. It also asks for
    # more steps: --steps may change on resume.
    proc = subprocess.Popen(runner_cmd(train_cmd(workdir, steps=STEPS + 20), step_delay=delay), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen2 = _kill_when(proc, workdir, len(seen) + 1, 0.07, sig=signal.SIGINT)
    err = proc.stderr.read().decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted; saved checkpoint" in err
    saved = int(err.split("saved checkpoint ")[1].split()[0])
    assert saved in ckpt.complete_steps(str(workdir)) and saved >= max(seen2)
    assert max(ckpt.complete_steps(str(workdir))) < STEPS, "interrupted too late: nothing left to resume"
    assert json.load(open(workdir / "config.json"))["steps"] == STEPS + 20
    # Resume to the end.
    done = subprocess.run(train_cmd(workdir), env=cli_env(tmp_path_factory), capture_output=True, timeout=400)
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    expected, got = _final_tree(reference_run), _final_tree(workdir)
    flat_e = jax.tree_util.tree_leaves_with_path(expected)
    flat_g = jax.tree_util.tree_leaves_with_path(got)
    assert [p for p, _ in flat_e] == [p for p, _ in flat_g]
    assert {"params", "ema_params", "opt_state", "batch_stats", "rng", "step"} <= set(expected)
    for (path, e), (_, g) in zip(flat_e, flat_g):
        assert e.dtype == g.dtype and e.shape == g.shape, jax.tree_util.keystr(path)
        assert np.array_equal(e, g), f"{jax.tree_util.keystr(path)} differs: max abs {np.abs(e - g).max()}"
    # The runs also saw the same batches: the data positions agree.
    meta_e = json.load(open(os.path.join(ckpt.checkpoint_dir(str(reference_run)), str(STEPS), "meta", "metadata")))
    meta_g = json.load(open(os.path.join(ckpt.checkpoint_dir(str(workdir)), str(STEPS), "meta", "metadata")))
    assert meta_e["data_position"] == meta_g["data_position"]
    # metrics.jsonl holds each logging step once, in order, after the resumes.
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    assert os.path.exists(workdir / "samples.png") and os.path.exists(workdir / "loss.png")


def test_resume_with_other_settings_is_refused(tmp_path, reference_run, capsys):
    import shutil

    from jax_ddpm.cli import main

    workdir = tmp_path / "copy"
    shutil.copytree(reference_run, workdir)
    before = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(workdir) for p in fs}
    code = main(train_cmd(workdir, "--lr", "0.01", steps=STEPS + 5)[3:])  # in-process: argv after "-m jax_ddpm.cli"
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "--lr was 0.001, now 0.01" in err
    after = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(workdir) for p in fs}
    assert after == before
