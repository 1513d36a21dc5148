"""`jax-ddpm convert --from-diffusers` / `--to-diffusers` on folders diffusers itself wrote
(`save_pretrained` of a random tiny UNet2DModel in a tmp folder; no hub download): the
scheduler's settings become the run's, `sample` follows diffusers' DDPMScheduler step for
step, the export gives back the same tensors and scheduler; bad folders and schedulers are
one line, exit status 2, nothing written. Skipped without torch and diffusers.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch and diffusers (pip install -e '.[test]')")
diffusers = pytest.importorskip("diffusers", reason="needs diffusers (pip install -e '.[test]')")

from safetensors.numpy import load_file  # noqa: E402

from jax_ddpm.app.workdir import load_run  # noqa: E402
from jax_ddpm.cli import main  # noqa: E402
from jax_ddpm.convert import to_torch_state_dict  # noqa: E402
from jax_ddpm.diffusers_io import config_from_diffusers  # noqa: E402
from jax_ddpm.models import unet2d  # noqa: E402
from jax_ddpm.schedules import make_schedule  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

T, N, S, C = 50, 4, 8, 3
SCHEDULER = dict(num_train_timesteps=T, beta_schedule="linear", beta_start=2e-4, beta_end=0.03,
                 variance_type="fixed_large", clip_sample=False)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def torch_unet():
    """A config no other test uses: 3 channels, attention at the highest resolution only (and in
    the mid block), one head of 8, Ho et al.'s eps, padding, sin-first and shift."""
    torch.manual_seed(7)
    return diffusers.UNet2DModel(sample_size=S, in_channels=C, out_channels=C, block_out_channels=(16, 32),
                                 layers_per_block=1, down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "AttnUpBlock2D"), attention_head_dim=8,
                                 norm_num_groups=8, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False,
                                 freq_shift=1).eval()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, torch_unet):
    folder = tmp_path_factory.mktemp("diffusers") / "pipeline"
    diffusers.DDPMPipeline(unet=torch_unet, scheduler=diffusers.DDPMScheduler(**SCHEDULER)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def imported(tmp_path_factory, pipeline_dir):
    workdir = tmp_path_factory.mktemp("imported") / "run"
    assert main(["convert", "--from-diffusers", str(pipeline_dir), "--workdir", str(workdir)]) == 0
    return workdir


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("jax-ddpm: error: "), err
    return err


def test_import_takes_the_weights_and_the_scheduler_settings(imported, pipeline_dir):
    run = load_run(str(imported))
    d = run.config.diffusion
    assert (run.step, d.timesteps, d.schedule, d.beta_start, d.beta_end) == (0, T, "linear", 2e-4, 0.03)
    assert run.sampling == {"variance": "beta", "clip_denoised": False}  # fixed_large, clip_sample false
    assert (run.config.model.arch, run.config.model.image_size, run.config.model.channels) == ("unet2d", S, C)
    config = unet2d.config_from_fields(C, run.config.model.arch_config)
    assert config == config_from_diffusers(json.loads((pipeline_dir / "unet" / "config.json").read_text()))
    want = load_file(pipeline_dir / "unet" / WEIGHTS)
    for part in (run.state.params, run.state.ema_params):
        got = to_torch_state_dict({"params": part}, table=unet2d.weight_table(config))
        assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


def _diffusers_chain(unet, x_T: np.ndarray, noises: np.ndarray, monkeypatch) -> np.ndarray:
    """DDPMScheduler (the pipeline's settings), all T steps, our noises: noises[t] is added at t."""
    from diffusers.schedulers import scheduling_ddpm

    scheduler = diffusers.DDPMScheduler(**SCHEDULER)
    scheduler.set_timesteps(T)
    current = {}
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor",
                        lambda shape, **kw: torch.from_numpy(noises[current["t"]].transpose(0, 3, 1, 2).copy()))
    x = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        for t in scheduler.timesteps:
            current["t"] = int(t)
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return np.clip(x.numpy().transpose(0, 2, 3, 1), -1, 1)


def test_sample_follows_diffusers_ddpm_scheduler(imported, torch_unet, tmp_path, monkeypatch, capsys):
    """Same weights, x_T and noises: `jax-ddpm sample` (its defaults: the imported fixed_large, no
    clipping) against DDPMScheduler.step. Measured max abs difference 1.7e-5 (float32:
    diffusers recomputes beta_t from alphas_cumprod in float32; ours are float64-derived)."""
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal((N, S, S, C)).astype(np.float32)
    noises = rng.standard_normal((T, N, S, S, C)).astype(np.float32)
    np.savez(tmp_path / "noise.npz", x_T=x_T, noises=noises)
    out = tmp_path / "ours.npz"
    assert main(["sample", "--workdir", str(imported), "--noise", str(tmp_path / "noise.npz"), "--out", str(out)]) == 0
    with np.load(out) as f:
        ours = f["samples"]
    theirs = _diffusers_chain(torch_unet, x_T, noises, monkeypatch)
    diff = np.abs(ours - theirs).max()
    print(f"jax-ddpm sample vs diffusers DDPMScheduler, {T} steps: max abs {diff:.1e}")
    assert diff < 1e-4


def test_sample_options_override_the_run_settings():
    from jax_ddpm.app.config import ConfigError, SampleConfig
    from jax_ddpm.app.sample import sampler_options

    run = {"variance": "beta", "clip_denoised": False}
    base = SampleConfig(workdir="w", out="x.png")
    assert sampler_options(base, run) == run
    assert sampler_options(SampleConfig(workdir="w", out="x.png", variance="beta_tilde", clip_denoised=True), run) == {
        "variance": "beta_tilde", "clip_denoised": True}
    assert sampler_options(SampleConfig(workdir="w", out="x.png", sampler="chapter"), run) == {}
    with pytest.raises(ConfigError, match="^--variance: --sampler chapter has no such setting"):
        sampler_options(SampleConfig(workdir="w", out="x.png", sampler="chapter", variance="beta"), run)


def test_export_gives_back_the_same_tensors_and_scheduler(imported, pipeline_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["convert", "--workdir", str(imported), "--to-diffusers", str(out)]) == 0
    assert "wrote a DDPMPipeline folder (EMA weights, step 0" in capsys.readouterr().out
    got, want = load_file(out / "unet" / WEIGHTS), load_file(pipeline_dir / "unet" / WEIGHTS)
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)
    read = [json.loads((folder / "scheduler" / "scheduler_config.json").read_text()) for folder in (out, pipeline_dir)]
    assert read[0] == read[1]
    unet_configs = [json.loads((folder / "unet" / "config.json").read_text()) for folder in (out, pipeline_dir)]
    assert config_from_diffusers(unet_configs[0]) == config_from_diffusers(unet_configs[1])
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out))
    assert all(np.array_equal(v.numpy(), want[k]) for k, v in pipe.unet.state_dict().items())


def test_a_unet_folder_takes_ddpm_schedulers_defaults(torch_unet, tmp_path, capsys):
    folder = tmp_path / "unet"
    torch_unet.save_pretrained(folder)
    assert main(["convert", "--from-diffusers", str(folder), "--workdir", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "is a UNet folder (no model_index.json): using DDPMScheduler's defaults (T=1000, linear betas" in err
    run = load_run(str(tmp_path / "run"))
    d = run.config.diffusion
    assert (d.timesteps, d.schedule, d.beta_start, d.beta_end) == (1000, "linear", 1e-4, 0.02)
    assert run.sampling == {"variance": "beta_tilde", "clip_denoised": True}


@pytest.mark.parametrize("timesteps", [10, 50, 1000])
def test_diffusers_betas_are_ours(timesteps):
    """squaredcos_cap_v2 is our cosine schedule bit for bit; linear is torch.linspace in float32,
    within 1 ulp of ours (float64 linspace rounded to float32)."""
    cos = diffusers.DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2").betas.numpy()
    np.testing.assert_array_equal(np.asarray(make_schedule(timesteps, "cosine").betas), cos)
    lin = diffusers.DDPMScheduler(num_train_timesteps=timesteps, beta_start=2e-4, beta_end=0.03).betas.numpy()
    np.testing.assert_array_max_ulp(np.asarray(make_schedule(timesteps, "linear", beta_start=2e-4,
                                                             beta_end=0.03).betas), lin, maxulp=1)


def _edit_scheduler(folder, **changes):
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, needle", [
    ({"beta_schedule": "scaled_linear"}, "beta_schedule 'scaled_linear': not supported (jax_ddpm has linear and "
                                         "cosine = squaredcos_cap_v2)"),
    ({"prediction_type": "flow"}, "prediction_type 'flow': must be one of epsilon, sample, v_prediction"),
    ({"variance_type": "learned_range"}, "variance_type 'learned_range': only fixed_small and fixed_large"),
    ({"clip_sample": True, "clip_sample_range": 2.0}, "clip_sample_range 2.0: only 1 is supported"),
    ({"thresholding": True}, "thresholding True: dynamic thresholding is not supported"),
    ({"trained_betas": [0.1] * T}, "trained_betas"),
    ({"_class_name": "PNDMScheduler"}, "only DDPMScheduler and DDIMScheduler settings are read"),
    ({"num_train_timesteps": 1}, "num_train_timesteps: timesteps must be an integer >= 2, got 1"),
])
def test_unsupported_schedulers_are_refused(pipeline_dir, tmp_path, capsys, changes, needle):
    folder = tmp_path / "pipeline"
    shutil.copytree(pipeline_dir, folder)
    _edit_scheduler(folder, **changes)
    workdir = tmp_path / "run"
    assert main(["convert", "--from-diffusers", str(folder), "--workdir", str(workdir)]) == 2
    err = _one_line(capsys)
    assert err.startswith(f"jax-ddpm: error: --from-diffusers {folder / 'scheduler' / 'scheduler_config.json'}: ")
    assert needle in err, err
    assert not workdir.exists()


def test_bad_folders_are_refused(torch_unet, imported, pipeline_dir, tmp_path, capsys):
    cases = []
    pickled = tmp_path / "pickled"
    torch_unet.save_pretrained(pickled, safe_serialization=False)  # diffusion_pytorch_model.bin only
    cases.append((pickled, "only pickle weights (diffusion_pytorch_model.bin); jax_ddpm reads safetensors only"))
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(pipeline_dir / "unet" / WEIGHTS, no_config / WEIGHTS)
    cases.append((no_config, "neither model_index.json (a pipeline) nor config.json (a UNet)"))
    cases.append((tmp_path / "missing", "no such folder"))
    for folder, needle in cases:
        workdir = tmp_path / f"run_{folder.name}"
        assert main(["convert", "--from-diffusers", str(folder), "--workdir", str(workdir)]) == 2
        assert needle in _one_line(capsys)
        assert not workdir.exists()
    before = sorted(p.name for p in imported.rglob("*"))
    assert main(["convert", "--from-diffusers", str(pipeline_dir), "--workdir", str(imported)]) == 2
    assert "already holds a run; import into a new --workdir" in _one_line(capsys)
    assert sorted(p.name for p in imported.rglob("*")) == before
    assert main(["convert", "--from-diffusers", str(pipeline_dir), "--out", str(tmp_path / "x.safetensors"),
                 "--workdir", str(tmp_path / "w")]) == 2
    assert "convert needs exactly one of --out FILE or --to-diffusers DIR (export), --from-torch FILE or " \
           "--from-diffusers DIR (import); got --out and --from-diffusers" in _one_line(capsys)
