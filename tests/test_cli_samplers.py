"""`jax-ddpm sample --sampler {ddpm,ddim,dpmpp_2m,chapter} --num-steps N --eta E --timestep-spacing S
--steps-offset K` and `train --sample-sampler ...`: every sampler samples a trained work folder;
ddim with eta 0 is deterministic and is the library's chain, to the bit; bad combinations are
one line, exit status 2, checked before the weights load, nothing written; the defaults are
today's (ddpm over all T steps, the run's variance and clipping), also for old folders.

The work folder is the session's shared tiny chapter run (``cli_util.shared_run``: T = 10,
--bn-stats batch); the samplers on a unet2d (v prediction: ddpm against DDPMPipeline, ddim
against the library, dpmpp_2m) are in tests/test_cli_prediction.py. Each sampler's chain is
another program to compile, so by default only dpmpp_2m samples here; ``-m slow`` runs the rest.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from cli_util import TINY, shared_run
from jax_ddpm.app import config as cfg
from jax_ddpm.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

LEGACY = Path(__file__).resolve().parent / "data" / "legacy-0.1.0"
N, S, T = 16, 8, 10  # --bn-stats batch: 16 images, no warning
NO_FLAGS = ["--xla-flags", "none"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return shared_run(tmp_path_factory)


def _sample(run_dir, out, *options) -> np.ndarray:
    assert main(["sample", "--workdir", str(run_dir), "--num", str(N), "--out", str(out), *options, *NO_FLAGS]) == 0
    with np.load(out) as f:
        return f["samples"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("jax-ddpm"), err
    return err


@pytest.mark.parametrize("sampler, options", [
    ("dpmpp_2m", ["--num-steps", "4"]),
    # another chain to compile each (ddpm over all T steps: the DDPMPipeline comparison of tests/test_cli_prediction.py)
    pytest.param("ddpm", ["--num-steps", "4", "--timestep-spacing", "trailing"], marks=pytest.mark.slow),
    pytest.param("ddim", ["--num-steps", "5", "--eta", "0.5", "--timestep-spacing", "linspace"],
                 marks=pytest.mark.slow),
    pytest.param("chapter", [], marks=pytest.mark.slow),
])
def test_each_sampler_samples_a_trained_folder(run_dir, tmp_path, capsys, sampler, options):
    x = _sample(run_dir, tmp_path / "x.npz", "--sampler", sampler, *options)
    assert x.shape == (N, S, S, 1) and np.isfinite(x).all() and np.abs(x).max() <= 1
    assert f"wrote {N} samples from step 60" in capsys.readouterr().out


@pytest.mark.slow  # two chains to compile (~17 s on the shared CPU); on a unet2d: tests/test_cli_prediction.py
def test_ddim_eta_0_is_deterministic_and_the_librarys_chain(run_dir, tmp_path):
    """The command's x_T (``normal(fold_in(key(seed), 0))``) through ``make_sample_fn`` gives its
    samples bit for bit, and so does any other noise key: with eta 0 no step noise is used
    (--bn-stats batch: the whole batch in one chain with the command's noise key)."""
    from jax_ddpm.app.factories import build_model
    from jax_ddpm.app.workdir import load_run
    from jax_ddpm.sampling import make_sample_fn

    ours = _sample(run_dir, tmp_path / "ours.npz", "--sampler", "ddim", "--num-steps", "5", "--eta", "0",
                   "--seed", "3")
    run = load_run(str(run_dir))
    key = jax.random.key(3)
    x_T = jax.random.normal(jax.random.fold_in(key, 0), (N, S, S, 1))
    chain = make_sample_fn(build_model(run.config), "ddim", "batch", num_steps=5, eta=0.0, clip_denoised=True)
    for noise_key in (jax.random.fold_in(key, 1), jax.random.key(99)):  # the command's, and another
        want = np.asarray(chain(run.state.ema_variables, run.state.schedule, x_T, noise_key))
        assert np.array_equal(ours, want)


def test_dpmpp_2m_follows_the_runs_clipping(run_dir, tmp_path):
    """dpmpp_2m clips its data predictions as the run says (on for runs trained here): the
    command's samples are the library's clipped chain bit for bit, and not the unclipped one."""
    from jax_ddpm.app.factories import build_model
    from jax_ddpm.app.workdir import load_run
    from jax_ddpm.sampling import make_sample_fn

    ours = _sample(run_dir, tmp_path / "ours.npz", "--sampler", "dpmpp_2m", "--num-steps", "4", "--seed", "3")
    run = load_run(str(run_dir))
    assert run.sampling["clip_denoised"] is True
    key = jax.random.key(3)
    x_T = jax.random.normal(jax.random.fold_in(key, 0), (N, S, S, 1))
    got = {clip: np.asarray(make_sample_fn(build_model(run.config), "dpmpp_2m", "batch", num_steps=4,
                                           clip_denoised=clip, prediction=run.config.diffusion.prediction)(run.state.ema_variables, run.state.schedule, x_T,
                                                               jax.random.fold_in(key, 1)))
           for clip in (True, False)}
    assert np.array_equal(ours, got[True])
    assert not np.array_equal(got[True], got[False])


def test_a_noise_file_has_a_row_per_step(run_dir, tmp_path, capsys):
    np.savez(tmp_path / "noise.npz", x_T=np.zeros((2, S, S, 1), np.float32),
             noises=np.zeros((T, 2, S, S, 1), np.float32))
    out = tmp_path / "x.npz"
    assert main(["sample", "--workdir", str(run_dir), "--sampler", "ddim", "--num-steps", "5", "--noise",
                 str(tmp_path / "noise.npz"), "--out", str(out), *NO_FLAGS]) == 2
    assert f"noises has shape ({T}, 2, {S}, {S}, 1), expected (5, 2, {S}, {S}, 1)" in _one_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("options, needle", [
    (["--sampler", "ddim", "--num-steps", "11"], "--num-steps must be an integer from 1 to the schedule's T = 10, "
                                                 "got 11"),
    (["--sampler", "ddim", "--eta", "-0.5"], "--eta must be in [0, inf), got -0.5"),
    (["--sampler", "dpmpp_2m", "--eta", "0.5"], "--eta: --sampler dpmpp_2m has no such setting (--sampler ddim has)"),
    (["--eta", "1"], "--eta: --sampler ddpm has no such setting (--sampler ddim has)"),
    (["--sampler", "ddim", "--timestep-spacing", "trailing", "--steps-offset", "1"],
     "--steps-offset applies to timestep_spacing 'leading' only (diffusers ignores it for 'trailing'), got "
     "steps_offset=1 with 'trailing'"),
    (["--num-steps", "5", "--steps-offset", "3"], "--steps-offset: the leading grid of 5 steps reaches timestep 11, "
                                                  "beyond the schedule's T - 1 = 9"),
    (["--sampler", "chapter", "--num-steps", "5"], "--num-steps: the chapter sampler runs all T = 10 steps"),
    (["--sampler", "chapter", "--timestep-spacing", "linspace"], "--timestep-spacing: --sampler chapter has no such "
                                                                 "setting (--sampler ddpm, ddim and dpmpp_2m have)"),
    (["--sampler", "chapter", "--no-clip-denoised"], "--clip-denoised: --sampler chapter has no such setting "
                                                     "(--sampler ddpm, ddim and dpmpp_2m have)"),
    (["--sampler", "ddim", "--variance", "beta"], "--variance: --sampler ddim has no such setting"),
    (["--timestep-spacing", "cosine"], "--timestep-spacing: invalid choice: 'cosine'"),
])
def test_bad_sample_combinations_are_one_line_before_loading(run_dir, tmp_path, capsys, monkeypatch, options,
                                                             needle):
    from jax_ddpm.app import sample as sample_module

    def must_not_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the options were checked")

    monkeypatch.setattr(sample_module, "load_run", must_not_load)
    out = tmp_path / "x.png"
    assert main(["sample", "--workdir", str(run_dir), "--out", str(out), *options, *NO_FLAGS]) == 2
    assert needle in _one_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("options, needle", [
    (["--sample-sampler", "dpmpp_2m", "--sample-eta", "0.3"], "--sample-eta: --sample-sampler dpmpp_2m has no such "
                                                              "setting (--sample-sampler ddim has)"),
    (["--sample-num-steps", "11"], "--sample-num-steps must be an integer from 1 to the schedule's T = 10, got 11"),
    (["--sample-sampler", "ddim", "--sample-eta", "-1"], "--sample-eta must be in [0, inf), got -1.0"),
    (["--sample-timestep-spacing", "linspace", "--sample-steps-offset", "1"],
     "--sample-steps-offset applies to timestep_spacing 'leading' only"),
    (["--sample-sampler", "euler"], "--sample-sampler: invalid choice: 'euler'"),
])
def test_bad_train_grid_combinations_are_one_line(tmp_path, capsys, options, needle):
    workdir = tmp_path / "w"
    assert main(["train", "--workdir", str(workdir), *TINY, *options, *NO_FLAGS]) == 2
    assert needle in _one_line(capsys)
    assert not workdir.exists()


def test_the_defaults_are_todays(run_dir):
    """sample: ddpm over all T steps with the run's variance and clipping; train's grids: the same,
    recorded in config.json and the checkpoint; an old folder has no record and is eps."""
    from jax_ddpm.app.sample import sampler_options
    from jax_ddpm.app.workdir import recorded_run

    default = cfg.SampleConfig(workdir="w", out="x.png")
    assert (default.sampler, default.num_steps) == ("ddpm", None)
    assert sampler_options(default, cfg.SAMPLING_DEFAULTS, T) == cfg.SAMPLING_DEFAULTS  # the T-step chain
    grid = {"sampler": "ddpm", "num_steps": None, **cfg.SAMPLING_DEFAULTS}
    assert json.loads((run_dir / "config.json").read_text())["sample_grid"] == grid
    recorded = recorded_run(str(run_dir))
    assert recorded.step == 60 and recorded.meta["sample_grid"] == grid
    old = recorded_run(str(LEGACY / "workdir"))
    assert old.step == 4 and "sample_grid" not in old.meta and old.config.diffusion.prediction == "eps"
    assert old.sampling == cfg.SAMPLING_DEFAULTS
