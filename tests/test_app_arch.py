"""The application layer with an architecture other than the chapter's: the test-only
``groupnorm_test`` of tests/test_registry.py (no BatchNorm, so no ``batch_stats``) registered
for one test, through train, load, export, import and sample in-process."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jax_ddpm.app.config import (ConvertConfig, DiffusionConfig, ModelConfig, OptimConfig, SampleConfig, TrainConfig,
                                 check_arch)
from jax_ddpm.app.convert import export_weights, import_weights
from jax_ddpm.app.sample import sample
from jax_ddpm.app.train import train
from jax_ddpm.app.workdir import load_run
from jax_ddpm.convert import load_safetensors
from jax_ddpm.models import registry
from test_registry import GN_ARCH

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def gn_registered(monkeypatch):
    monkeypatch.setitem(registry.ARCHITECTURES, GN_ARCH.name, GN_ARCH)


@pytest.mark.slow  # 27 s; --arch unet2d (no BatchNorm) goes through the command in tests/test_cli_unet2d.py
def test_a_model_without_batch_stats_trains_converts_and_samples(gn_registered, tmp_path, capsys):
    model = check_arch(ModelConfig(arch=GN_ARCH.name, image_size=8, channels=1))
    workdir = str(tmp_path / "run")
    config = TrainConfig(workdir=workdir, model=model, diffusion=DiffusionConfig(timesteps=10),
                         optim=OptimConfig(batch_size=8), steps=3, checkpoint_every=3, num_samples=4, log_every=1,
                         quiet=True, bn_stats="running")
    assert train(config) == 0
    run = load_run(workdir)
    assert run.step == 3 and run.config.model.arch == GN_ARCH.name and run.state.batch_stats is None

    out = tmp_path / "gn.safetensors"
    assert export_weights(ConvertConfig(workdir=workdir, out=str(out))) == 0
    tensors, meta = load_safetensors(out)
    assert set(tensors) == {name for name, _, _ in GN_ARCH.weight_table(None)}  # no batch_stats rows
    assert meta["arch"] == GN_ARCH.name and meta["timesteps"] == "10" and meta["image_size"] == "8"

    imported = str(tmp_path / "imported")
    assert import_weights(ConvertConfig(workdir=imported, from_torch=str(out))) == 0
    back = load_run(imported)
    assert back.config.model == run.config.model and back.state.batch_stats is None
    for a, b in zip(jax.tree_util.tree_leaves(back.state.params), jax.tree_util.tree_leaves(run.state.ema_params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    assert sample(SampleConfig(workdir=imported, out=str(tmp_path / "s.npz"), num=2, bn_stats="running")) == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["samples"].shape == (2, 8, 8, 1) and np.isfinite(f["samples"]).all()
