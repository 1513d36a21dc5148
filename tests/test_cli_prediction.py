"""`jax-ddpm train --prediction {eps,x0,v}`: the loss regresses that target; the choice is in
config.json, the checkpoint identity (a resume with another one is refused in one line), the
torch-named safetensors metadata and the diffusers export (`prediction_type`), and comes back
from `convert --from-diffusers`; every sampler reads it; old files without it are eps.

One tiny v-prediction unet2d run (a subprocess, one level of 8 channels, 2 steps, a checkpoint
every step, its grids drawn with ddim in 5 steps) serves the module; DDPMPipeline (torch and diffusers: skipped
without them) samples its export the same as `jax-ddpm sample` fed the same x_T and noise.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_util import cli_env
from jax_ddpm import checkpoint as ckpt
from jax_ddpm.app import config as cfg
from jax_ddpm.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

LEGACY = Path(__file__).resolve().parent / "data" / "legacy-0.1.0"
T, S, STEPS = 10, 8, 2
V_UNET = ["--arch", "unet2d", "--block-out-channels", "8", "--layers-per-block", "1", "--attention-levels", "none",
          "--norm-num-groups", "4", "--attention-head-dim", "8", "--image-size", str(S), "--timesteps", str(T),
          "--batch-size", "16", "--ema-decay", "0.9", "--num-samples", "4", "--log-every", "1", "--quiet",
          "--xla-flags", "none",
          "--prediction", "v", "--sample-sampler", "ddim", "--sample-num-steps", "5"]
NO_FLAGS = ["--xla-flags", "none"]


def v_cmd(workdir, *more, steps: int = STEPS) -> list[str]:
    return [sys.executable, "-m", "jax_ddpm.cli", "train", "--workdir", str(workdir), *V_UNET, "--steps", str(steps),
            "--checkpoint-every", "1", *more]


def _train(cmd, env) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("jax-ddpm"), err
    return err


def _meta(workdir, step: int) -> dict:
    return json.loads(Path(ckpt.checkpoint_dir(str(workdir)), str(step), "meta", "metadata").read_text())


@pytest.fixture(scope="module")
def v_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prediction") / "v_run"
    _train(v_cmd(workdir), cli_env(tmp_path_factory))
    return workdir


# ----------------------------------------------------------------------------- train
def test_the_prediction_and_the_grid_sampler_are_recorded(v_run):
    saved = json.loads((v_run / "config.json").read_text())
    assert saved["diffusion"]["prediction"] == "v" and saved["sample_sampler"] == "ddim"
    grid = {"sampler": "ddim", "num_steps": 5, "clip_denoised": True}  # ddim takes the run's clipping
    assert saved["sample_grid"] == grid and saved["sampling"] == cfg.SAMPLING_DEFAULTS
    meta = _meta(v_run, STEPS)
    assert meta["identity"]["diffusion.prediction"] == "v" and meta["sample_grid"] == grid
    from jax_ddpm.app.workdir import load_run

    assert load_run(str(v_run)).state.prediction == "v"  # the restore template carries the static field


def test_the_loss_regresses_v(v_run):
    """Step 2's logged loss is the library's v loss of checkpoint 1's parameters on step 2's batch,
    t and noise (and not the eps loss of the same output)."""
    from jax_ddpm import training
    from jax_ddpm.app import factories
    from jax_ddpm.app.workdir import load_run
    from jax_ddpm.data import BatchIterator, DataPosition, load_image_set

    run = load_run(str(v_run), 1)
    state, seed = run.state, run.config.seed
    images = load_image_set("digits", S, 1, "auto")
    x0 = jnp.asarray(images[BatchIterator(images, 16, seed, DataPosition(*run.meta["data_position"])).next_indices()])
    t, noise = training.draw_t_and_noise(factories.run_keys(seed)["train"], state.step, x0, T)

    @jax.jit
    def losses(params):
        return {p: training.loss_fn(params, None, state.apply_fn, state.schedule, x0, t, noise, prediction=p)[0]
                for p in ("v", "eps")}

    loss = {k: float(v) for k, v in losses(state.params).items()}
    logged = json.loads((v_run / "metrics.jsonl").read_text().splitlines()[1])
    assert logged["step"] == 2 and state.prediction == "v"
    np.testing.assert_allclose(logged["loss"], loss["v"], rtol=1e-5)
    assert abs(loss["eps"] - loss["v"]) > 1e-3 * loss["v"]


def _copy_at(v_run, tmp_path, step: int) -> Path:
    workdir = tmp_path / "copy"
    shutil.copytree(v_run, workdir)
    for later in range(step + 1, STEPS + 1):
        shutil.rmtree(workdir / "checkpoints" / str(later))
    return workdir


@pytest.mark.slow  # a second training subprocess (9 s at load 4.5, 2 cores); the refusal below runs by default
def test_resume_from_a_checkpoint_is_bit_identical(v_run, tmp_path, tmp_path_factory):
    """Checkpoint 1 resumed to step 2 equals the uninterrupted run: the restore template carries
    the static ``prediction`` (a template at eps would resume regressing eps)."""
    from test_cli_resume import _final_tree

    workdir = _copy_at(v_run, tmp_path, 1)
    _train(v_cmd(workdir), cli_env(tmp_path_factory))
    expected, got = (jax.tree_util.tree_leaves_with_path(_final_tree(w, STEPS)) for w in (v_run, workdir))
    assert [p for p, _ in expected] == [p for p, _ in got]
    for (path, e), (_, g) in zip(expected, got):
        assert e.dtype == g.dtype and np.array_equal(e, g), f"{jax.tree_util.keystr(path)} differs"


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_resume_with_another_prediction_is_refused(v_run, tmp_path, capsys, prediction):
    workdir = _copy_at(v_run, tmp_path, STEPS)
    before = sorted((p.relative_to(workdir), p.stat().st_mtime_ns) for p in workdir.rglob("*") if p.is_file())
    argv = v_cmd(workdir, "--prediction", prediction, steps=STEPS + 1)[3:]
    assert main(argv) == 2
    assert f"holds a run with other settings (--prediction was v, now {prediction}); resume with" in _one_line(capsys)
    after = sorted((p.relative_to(workdir), p.stat().st_mtime_ns) for p in workdir.rglob("*") if p.is_file())
    assert after == before


def test_identities_without_the_field_are_eps():
    """Not today's default (x0): what runs saved before --prediction computed."""
    new = cfg.identity(cfg.TrainConfig(workdir="w"))
    assert new["diffusion.prediction"] == "x0"
    old = {k: v for k, v in new.items() if k != "diffusion.prediction"}
    assert cfg.identity_mismatch(old, new) == "--prediction was eps, now x0"
    eps = cfg.identity(cfg.TrainConfig(workdir="w", diffusion=cfg.DiffusionConfig(prediction="eps")))
    assert cfg.identity_mismatch(old, eps) is None
    v = cfg.identity(cfg.TrainConfig(workdir="w", diffusion=cfg.DiffusionConfig(prediction="v")))
    assert cfg.identity_mismatch(old, v) == "--prediction was eps, now v"
    assert cfg.train_config_from_identity("w", old).diffusion.prediction == "eps"
    legacy = _meta(LEGACY / "workdir", 4)["identity"]
    assert "diffusion.prediction" not in legacy and cfg.train_config_from_identity("w", legacy).diffusion.prediction \
        == "eps"


def test_a_bad_prediction_is_one_line(tmp_path, capsys):
    assert main(["train", "--workdir", str(tmp_path / "w"), "--prediction", "velocity"]) == 2
    assert "--prediction: invalid choice: 'velocity'" in _one_line(capsys)
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- sample
@pytest.mark.slow  # another chain to compile; dpmpp_2m through the command: tests/test_cli_samplers.py
def test_dpmpp_2m_samples_a_v_model(v_run, tmp_path):
    """(ddpm: the DDPMPipeline comparison below; ddim: the final grid and the test after it.)"""
    out = tmp_path / "x.npz"
    assert main(["sample", "--workdir", str(v_run), "--num", "3", "--sampler", "dpmpp_2m", "--num-steps", "3",
                 "--out", str(out), *NO_FLAGS]) == 0
    with np.load(out) as f:
        x = f["samples"]
    assert x.shape == (3, S, S, 1) and np.isfinite(x).all() and np.abs(x).max() <= 1


@pytest.fixture(scope="module")
def ddim_chain(v_run):
    """The library's ddim chain of the v run (5 steps, clipped; compiled once for the two tests below)."""
    from jax_ddpm.app import factories
    from jax_ddpm.app.workdir import load_run
    from jax_ddpm.sampling import make_sample_fn

    run = load_run(str(v_run))
    chain = make_sample_fn(factories.build_model(run.config), "ddim", "batch", prediction="v", num_steps=5,
                           clip_denoised=True)
    return run, lambda x_T, key: np.asarray(chain(run.state.ema_variables, run.state.schedule, x_T, key))


def test_the_final_grid_is_the_recorded_sampler(v_run, ddim_chain):
    """samples.png is ddim (5 steps, clipped) of the v model on the grid's fixed x_T and noise."""
    from PIL import Image

    from jax_ddpm.app import factories
    from jax_ddpm.images import make_grid, to_uint8

    run, chain = ddim_chain
    key = factories.run_keys(run.config.seed)["sample"]
    x = chain(jax.random.normal(jax.random.fold_in(key, 0), (4, S, S, 1)), jax.random.fold_in(key, 1))
    assert np.mean(np.abs(x) < 1) > 0.5  # mostly not clipped: the grid says something
    got = np.asarray(Image.open(v_run / "samples.png"))
    want = make_grid(to_uint8(x))
    assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_ddim_eta_0_is_deterministic_and_the_librarys_chain(v_run, ddim_chain, tmp_path):
    """`sample --sampler ddim --num-steps 5 --eta 0` on a model without BatchNorm runs the library's
    chain image by image (``jax.vmap``, image i's noise key ``fold_in(fold_in(key(seed), 1), i)``,
    x_T ``normal(fold_in(key(seed), 0))``): the same calls give its samples bit for bit, and so
    do any other keys (eta 0 adds no noise). The batched chain of the same images differs by
    rounding only (measured 2.7e-7). (The chapter's BatchNorm run, one batch with the command's
    key: tests/test_cli_samplers.py, slow.)"""
    out = tmp_path / "x.npz"
    assert main(["sample", "--workdir", str(v_run), "--num", "4", "--sampler", "ddim", "--num-steps", "5", "--eta",
                 "0", "--seed", "3", "--out", str(out), *NO_FLAGS]) == 0
    with np.load(out) as f:
        ours = f["samples"]
    run, batched = ddim_chain
    key = jax.random.key(3)
    x_T = jax.random.normal(jax.random.fold_in(key, 0), (4, S, S, 1))
    from jax_ddpm.app import factories
    from jax_ddpm.sampling import make_sample_fn

    chain = make_sample_fn(factories.build_model(run.config), "ddim", "batch", prediction="v", num_steps=5,
                           clip_denoised=True)
    per_image = jax.jit(jax.vmap(lambda x, k: chain(run.state.ema_variables, run.state.schedule, x[None], k)[0]))
    for noise_key in (jax.random.fold_in(key, 1), jax.random.key(99)):  # the command's, and another
        keys = jax.vmap(lambda i: jax.random.fold_in(noise_key, i))(jnp.arange(4))
        assert np.array_equal(ours, np.asarray(per_image(x_T, keys)))
    np.testing.assert_allclose(ours, batched(x_T, key), rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------- convert
def test_torch_named_safetensors_carry_the_prediction(v_run, tmp_path):
    from jax_ddpm.app.workdir import load_run
    from jax_ddpm.convert import load_safetensors

    out = tmp_path / "v.safetensors"
    assert main(["convert", "--workdir", str(v_run), "--out", str(out)]) == 0
    assert load_safetensors(out)[1]["prediction"] == "v"
    assert main(["convert", "--workdir", str(tmp_path / "back"), "--from-torch", str(out)]) == 0
    back = load_run(str(tmp_path / "back"))
    assert back.config.diffusion.prediction == "v" and back.state.prediction == "v"
    from jax_ddpm.app.convert import _run_config_from_metadata

    old = load_safetensors(LEGACY / "model.safetensors")[1]
    assert "prediction" not in old  # a file without the key is eps
    assert _run_config_from_metadata(cfg.ConvertConfig(workdir="w", from_torch="f"), old).diffusion.prediction == "eps"


@pytest.fixture(scope="module")
def exported(v_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("v_diffusers") / "pipeline"
    assert main(["convert", "--workdir", str(v_run), "--to-diffusers", str(out)]) == 0
    return out


def test_the_diffusers_export_says_v_prediction_and_comes_back(exported, tmp_path, capsys):
    sched = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    workdir = tmp_path / "imported"
    capsys.readouterr()
    assert main(["convert", "--from-diffusers", str(exported), "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "prediction v" in out and "--prediction v" in out  # the fine-tune command keeps it
    from jax_ddpm.app.workdir import load_run

    assert load_run(str(workdir)).config.diffusion.prediction == "v"


@pytest.mark.parametrize("prediction_type, prediction", [("epsilon", "eps"), ("sample", "x0"),
                                                         ("v_prediction", "v")])
def test_diffusers_prediction_types_map_both_ways(prediction_type, prediction):
    from jax_ddpm.app.diffusers_folder import run_settings_from_scheduler, scheduler_settings_from_run

    diffusion, sampling = run_settings_from_scheduler({"prediction_type": prediction_type}, "x")
    assert diffusion.prediction == prediction
    assert scheduler_settings_from_run(diffusion, sampling)["prediction_type"] == prediction_type
    with pytest.raises(cfg.ConfigError, match="^x: prediction_type 'flow': must be one of epsilon, sample, "
                                              "v_prediction$"):
        run_settings_from_scheduler({"prediction_type": "flow"}, "x")


def test_ddpm_pipeline_samples_the_v_export_as_jax_ddpm_does(v_run, exported, tmp_path, monkeypatch):
    """DDPMPipeline (v_prediction, fixed_small, clip_sample, all T steps) fed our x_T and noises
    against `jax-ddpm sample --noise`. Measured max abs difference 2.4e-7 (in the pipeline's [0, 1]
    units, 10 steps, CPU); tolerance 1e-5, 40x that: the float32 coefficients round differently
    (diffusers' from a float32 alphas_cumprod, ours float64-derived), as in the eps comparison of
    tests/test_cli_diffusers.py (1.7e-5 over 50 steps, tolerance 1e-4)."""
    torch = pytest.importorskip("torch", reason="needs torch and diffusers (pip install -e '.[test]')")
    diffusers = pytest.importorskip("diffusers", reason="needs diffusers (pip install -e '.[test]')")
    from diffusers.pipelines.ddpm import pipeline_ddpm
    from diffusers.schedulers import scheduling_ddpm

    n = 4
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal((n, S, S, 1)).astype(np.float32)
    noises = rng.standard_normal((T, n, S, S, 1)).astype(np.float32)
    np.savez(tmp_path / "noise.npz", x_T=x_T, noises=noises)
    out = tmp_path / "ours.npz"
    assert main(["sample", "--workdir", str(v_run), "--noise", str(tmp_path / "noise.npz"), "--out", str(out),
                 *NO_FLAGS]) == 0
    with np.load(out) as f:
        ours = (f["samples"] + 1) / 2
    # the pipeline draws x_T first, then the scheduler one noise per step t = T-1 ... 1 (none at t = 0)
    draws = [x_T] + [noises[t] for t in range(T - 1, 0, -1)]
    fed = iter(torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in draws)
    monkeypatch.setattr(pipeline_ddpm, "randn_tensor", lambda *a, **k: next(fed))
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: next(fed))
    pipe = diffusers.DDPMPipeline.from_pretrained(str(exported))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(batch_size=n, num_inference_steps=T, output_type="np").images
    assert next(fed, None) is None  # every draw was ours
    diff = np.abs(ours - theirs).max()
    print(f"jax-ddpm sample vs DDPMPipeline, v_prediction, {T} steps: max abs {diff:.1e}")
    assert theirs.shape == ours.shape and diff < 1e-5
