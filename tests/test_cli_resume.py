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
    assert "--lr was 0.0003, now 0.01" in err  # the default --lr
    after = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(workdir) for p in fs}
    assert after == before


def _saved_identity(workdir, step=STEPS) -> dict:
    from jax_ddpm.app.config import complete_identity

    meta = json.load(open(os.path.join(ckpt.checkpoint_dir(str(workdir)), str(step), "meta", "metadata")))
    return complete_identity(meta["identity"])


def _config_for(argv):
    from jax_ddpm.app.cli import build_parser, given_options
    from jax_ddpm.app.config import train_config_from_args
    from jax_ddpm.app.resume_settings import with_run_settings

    return with_run_settings(train_config_from_args(build_parser().parse_args(argv)), given_options(argv))


def test_resume_takes_the_options_not_given_from_the_run(reference_run):
    """The bare command on the tiny run: every identity option is the run's (not today's defaults);
    an option given stays as given (and check_resume then refuses it, the test above)."""
    from jax_ddpm.app.config import TrainConfig, identity

    saved = _saved_identity(reference_run)
    assert saved["model.features"] != list(TrainConfig(workdir="").model.features)  # the test can fail
    config, taken = _config_for(["train", "--workdir", str(reference_run)])
    assert identity(config) == saved
    assert taken["model.features"] == [8, 16, 32, 64] and taken["diffusion.timesteps"] == 10
    assert "optim.lr" not in taken and "diffusion.schedule" not in taken  # the same as the defaults
    config, taken = _config_for(["train", "--workdir", str(reference_run), "--lr", "0.01", "--features=16,32,64,128"])
    assert config.optim.lr == 0.01 and list(config.model.features) == [16, 32, 64, 128]
    assert config.model.image_size == saved["model.image_size"] and config.optim.batch_size == saved["optim.batch_size"]
    assert "model.features" not in taken and "optim.lr" not in taken
    config, taken = _config_for(["train", "--workdir", str(reference_run), "--schedule", "linear"])
    assert config.diffusion.schedule == "linear" and config.model.features == (8, 16, 32, 64)


def test_bare_command_resumes_and_says_what_it_took(tmp_path, reference_run, capsys):
    import shutil

    from jax_ddpm.cli import main

    workdir = tmp_path / "copy"
    shutil.copytree(reference_run, workdir)
    assert main(["train", "--workdir", str(workdir), "--steps", str(STEPS)]) == 0  # already there: nothing trained
    err = capsys.readouterr().err
    assert "with its own settings for the options not given: " in err and "--features 8,16,32,64" in err
    assert "--timesteps 10" in err and "--lr" not in err, err
    assert f"already at step {STEPS}" in err
