"""`--lr-schedule`: constant (every run before the option) or cosine decay; the optimizer state,
the options and their refusals, old folders, and a run's logged rate, resume and note.

The rates themselves are checked against torch's CosineAnnealingLR, diffusers' cosine schedule and a
float64 oracle in parity_tests ("lr cosine" rows); here the closed form is only the yardstick for
what the command logs."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cli_util import cli_env, train_cmd
from jax_ddpm import training
from jax_ddpm.app.config import ConfigError, OptimConfig


def _cosine(lr, step, n, f):
    """The rate of update ``step`` (0-based): cosine from lr to f * lr over n updates, then held."""
    step = min(step, n)
    return lr * (f + (1 - f) * (1 + math.cos(math.pi * step / n)) / 2)


# ----------------------------------------------------------------------------- the library
def test_constant_keeps_the_optimizer_state_of_the_runs_before_the_option():
    """A constant rate adds nothing to optax's state, so checkpoints saved before the option restore."""
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    for clip in (None, 1.0):
        before = optax.adam(1e-3, b1=0.9, b2=0.999, eps=1e-8)
        before = optax.chain(optax.clip_by_global_norm(clip), before) if clip else before
        now = training.make_optimizer(1e-3, clip)
        assert jax.tree.structure(now.init(params)) == jax.tree.structure(before.init(params))
    cosine = training.make_optimizer(1e-3, 1.0, schedule="cosine", decay_steps=10)
    assert jax.tree.structure(cosine.init(params)) != jax.tree.structure(now.init(params))  # it counts steps


def test_the_optimizer_steps_with_the_schedules_rate():
    """With the same gradient at every step Adam's m_hat / sqrt(v_hat) is the same at every step, so
    update i divided by the constant-rate optimizer's update i is rate(i) / lr."""
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.5, 0.25, -1.0])}
    n, f, lr = 8, 0.25, 1e-2
    opt = training.make_optimizer(lr, None, schedule="cosine", decay_steps=n, end_factor=f)
    ref = training.make_optimizer(lr)
    s, r = opt.init(params), ref.init(params)
    for i in range(n + 3):
        u, s = opt.update(grads, s, params)
        v, r = ref.update(grads, r, params)
        np.testing.assert_allclose(np.asarray(u["w"]) / np.asarray(v["w"]), _cosine(lr, i, n, f) / lr, rtol=1e-5)


def test_learning_rate_values_and_refusals():
    rate = training.learning_rate(1e-3, "cosine", 100, 0.1)
    for i in (0, 1, 50, 99, 100, 101, 1000):
        assert float(rate(i)) == pytest.approx(_cosine(1e-3, i, 100, 0.1), rel=1e-6)
    assert float(training.learning_rate(2e-3)(12345)) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="lr schedule 'linear'"):
        training.learning_rate(1e-3, "linear")
    with pytest.raises(ValueError, match="decay_steps 0"):
        training.learning_rate(1e-3, "cosine", 0)
    with pytest.raises(ValueError, match="end_factor 1.5"):
        training.learning_rate(1e-3, "cosine", 10, 1.5)
    with pytest.raises(ValueError, match="not 'constant'"):
        training.make_optimizer(1e-3, schedule="constant", decay_steps=10)


# ----------------------------------------------------------------------------- the options
def _config(argv):
    from jax_ddpm.app.cli import build_parser
    from jax_ddpm.app.config import train_config_from_args

    return train_config_from_args(build_parser().parse_args(["train", "--workdir", "/tmp/x", *argv])).optim


def test_the_options():
    o = _config([])
    assert (o.lr_schedule, o.lr_decay_steps, o.lr_end_factor) == ("constant", 0, 0.0)
    o = _config(["--lr-schedule", "cosine", "--steps", "700"])
    assert (o.lr_schedule, o.lr_decay_steps, o.lr_end_factor) == ("cosine", 700, 0.0)  # decays over the run
    o = _config(["--lr-schedule", "cosine", "--lr-decay-steps", "500", "--lr-end-factor", "0.2"])
    assert (o.lr_schedule, o.lr_decay_steps, o.lr_end_factor) == ("cosine", 500, 0.2)


@pytest.mark.parametrize("argv,needle", [
    (["--lr-decay-steps", "10"], "--lr-decay-steps: only with a decaying --lr-schedule (cosine)"),
    (["--lr-schedule", "constant", "--lr-end-factor", "0.1"], "--lr-end-factor: only with a decaying"),
    (["--lr-schedule", "cosine", "--lr-decay-steps", "0"], "--lr-decay-steps must be a positive integer, got 0"),
    (["--lr-schedule", "cosine", "--lr-end-factor", "1"], "--lr-end-factor must be in [0, 1)"),
    (["--lr-schedule", "cosine", "--lr-end-factor", "nan"], "--lr-end-factor must be"),
])
def test_bad_options_are_refused(argv, needle):
    with pytest.raises(ConfigError) as e:
        _config(argv)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_cli_refuses_in_one_line(tmp_path, capsys):
    from jax_ddpm.cli import main

    assert main(["train", "--workdir", str(tmp_path / "w"), "--lr-schedule", "step"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lr-schedule: invalid choice: 'step'" in err
    assert main(["train", "--workdir", str(tmp_path / "w"), "--lr-end-factor", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lr-end-factor: only with" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_a_folder_saved_before_the_option_trained_at_a_constant_rate():
    from jax_ddpm.app.cli import build_parser
    from jax_ddpm.app.config import complete_identity, identity, train_config_from_args

    saved = identity(train_config_from_args(build_parser().parse_args(
        ["train", "--workdir", "/tmp/x", "--lr-schedule", "cosine", "--lr-end-factor", "0.3"])))
    assert saved["optim.lr_schedule"] == "cosine" and saved["optim.lr_end_factor"] == 0.3
    for field in ("optim.lr_schedule", "optim.lr_decay_steps", "optim.lr_end_factor"):
        del saved[field]
    old = complete_identity(saved)
    assert (old["optim.lr_schedule"], old["optim.lr_decay_steps"], old["optim.lr_end_factor"]) == ("constant", 0, 0.0)


# ----------------------------------------------------------------------------- a run
N, F, STEPS = 15, 0.1, 20  # the decay ends before the run does
LR = OptimConfig().lr  # TINY leaves --lr at the default
SCHEDULE = ["--lr-schedule", "cosine", "--lr-decay-steps", str(N), "--lr-end-factor", str(F)]


def _train(tmp_path_factory, workdir, *more, steps):
    cmd = [a for a in train_cmd(workdir, *more, steps=steps, every=10) if a != "--quiet"]
    done = subprocess.run(cmd, env=cli_env(tmp_path_factory), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def _metrics(workdir):
    return {r["step"]: r for r in map(json.loads, open(workdir / "metrics.jsonl"))}


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory):
    """A tiny run with a cosine rate to 0.1x over 15 updates, trained for 20."""
    workdir = tmp_path_factory.mktemp("lr") / "run"
    return workdir, _train(tmp_path_factory, workdir, *SCHEDULE, steps=STEPS)


def test_metrics_log_the_rate_of_each_step_and_hold_it_after_the_decay(cosine_run):
    workdir, _ = cosine_run
    rows = _metrics(workdir)
    assert sorted(rows) == [5, 10, 15, 20]
    for step, row in rows.items():  # the rate of the update that reached the step (update step - 1)
        assert row["lr"] == pytest.approx(_cosine(LR, step - 1, N, F), rel=1e-6), step
    assert rows[5]["lr"] > rows[15]["lr"] > F * LR
    assert rows[20]["lr"] == pytest.approx(F * LR, rel=1e-6)


def test_the_run_says_when_the_decay_ends(cosine_run):
    _, err = cosine_run
    assert "note: the cosine learning rate ends at step 15 (--lr-decay-steps); steps 16-20 train at its " \
           f"final rate, 0.1 x --lr {LR:g}" in err


def test_a_bare_resume_takes_the_runs_schedule(cosine_run, capsys):
    """The three options are one group: a resume that gives none takes all three from the run
    (so a longer --steps does not stretch the decay); one that gives another is refused."""
    from jax_ddpm.app.cli import build_parser, given_options
    from jax_ddpm.app.config import train_config_from_args
    from jax_ddpm.app.resume_settings import with_run_settings

    workdir, _ = cosine_run
    argv = ["train", "--workdir", str(workdir), "--steps", "40"]
    config, taken = with_run_settings(train_config_from_args(build_parser().parse_args(argv)), given_options(argv))
    o = config.optim
    assert (o.lr_schedule, o.lr_decay_steps, o.lr_end_factor) == ("cosine", N, F)
    assert (taken["optim.lr_schedule"], taken["optim.lr_decay_steps"], taken["optim.lr_end_factor"]) == ("cosine", N, F)
    from jax_ddpm.cli import main

    before = sorted(p.name for p in workdir.rglob("*"))
    assert main([*argv, "--lr-schedule", "cosine", "--lr-end-factor", "0.1"]) == 2  # decays over --steps 40 now
    err = capsys.readouterr().err.strip()
    # the note naming what was taken from the run, then the one-line refusal
    assert "Traceback" not in err and "--lr-decay-steps was 15, now 40" in err.splitlines()[-1], err
    assert sorted(p.name for p in workdir.rglob("*")) == before


@pytest.mark.slow
def test_a_resume_continues_the_decay_bit_identically(cosine_run, tmp_path_factory):
    """The restored optimizer state keeps optax's step count: a run trained to step 10 and resumed
    with the bare command logs the losses of the run that never stopped, bit for bit (slow: two
    more launches; test_cli_resume checks the constant rate's resume array by array)."""
    straight, _ = cosine_run
    resumed = straight.parent / "resumed"
    _train(tmp_path_factory, resumed, *SCHEDULE, steps=10)
    done = subprocess.run([sys.executable, "-m", "jax_ddpm.cli", "train", "--workdir", str(resumed), "--steps",
                           str(STEPS), "--log-every", "5", "--checkpoint-every", "10", "--num-samples", "16"],
                          env=cli_env(tmp_path_factory), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = _metrics(straight), _metrics(resumed)
    for step in (15, 20):
        assert (b[step]["loss"], b[step]["grad_norm"], b[step]["lr"]) == \
            (a[step]["loss"], a[step]["grad_norm"], a[step]["lr"]), step
