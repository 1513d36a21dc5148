"""torch_ref training: train_step on real digits, reproducibility, the demo CLI and the
safetensors round trip of torch_ref.weights."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from torch_ref.data import digits_tensor
from torch_ref.diffusion import DiffusionProcess
from torch_ref.model import UNet
from torch_ref.training import loss_fn, make_optimizer, train_step
from torch_ref.weights import load_unet, save_unet

SMALL = [8, 16, 32, 64]
SIZE = 16
BATCH = 8


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One torch thread: the shared 2-core CPU makes 2 intra-op threads much slower under load."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits_batch() -> torch.Tensor:
    data = digits_tensor(SIZE)  # [1797, 1, 16, 16] in [-1, 1]
    assert data.shape == (1797, 1, SIZE, SIZE) and data.min() >= -1 and data.max() <= 1
    return data[:BATCH].clone()


def _model(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(1, 32, SMALL)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_loss_fn_is_mse_of_predicted_noise(digits_batch):
    """loss_fn = mean over all elements of (eps_theta(x_t, t) - eps)^2, x_t from the closed form."""
    model, diffusion = _model().eval(), DiffusionProcess(100, "cosine")
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 100, (BATCH,), generator=gen)
    noise = torch.randn(digits_batch.shape, generator=gen)
    with torch.no_grad():
        loss = loss_fn(model, diffusion, digits_batch, t, noise)
        abar = diffusion.alphas_cumprod[t].double().view(-1, 1, 1, 1)
        x_t = (abar.sqrt() * digits_batch.double() + (1 - abar).sqrt() * noise.double()).float()
        want = np.mean((model(x_t, t).numpy().astype(np.float64) - noise.numpy()) ** 2)
    assert loss.item() == pytest.approx(want, rel=1e-6)  # measured rel err 5.8e-9


def test_train_step_decreases_loss_on_fixed_batch(digits_batch):
    model, diffusion = _model(), DiffusionProcess(100, "cosine")
    opt = make_optimizer(model, 1e-3)
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(0, 100, (BATCH,), generator=gen)
    noise = torch.randn(digits_batch.shape, generator=gen)
    losses = [train_step(model, diffusion, opt, digits_batch, t, noise).item() for _ in range(12)]
    assert model.training
    with torch.no_grad():
        final = loss_fn(model, diffusion, digits_batch, t, noise).item()
    # measured (seed 0 init, Adam 1e-3): 1.072, 0.987, 0.927, ... 0.643; after the 12th step 0.622
    assert final < 0.7 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_train_step_generator_reproducible(digits_batch):
    diffusion = DiffusionProcess(100, "cosine")

    def run(gen_seed: int) -> dict[str, torch.Tensor]:
        model = _model(0)
        opt = make_optimizer(model)
        gen = torch.Generator().manual_seed(gen_seed)
        for _ in range(3):
            train_step(model, diffusion, opt, digits_batch, generator=gen)
        return _state(model)

    a, b, c = run(5), run(5), run(6)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # params and BN buffers, bit for bit
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # the generator feeds t first, then the noise: passing them explicitly gives the same step
    model_g, model_e = _model(0), _model(0)
    opt_g, opt_e = make_optimizer(model_g), make_optimizer(model_e)
    train_step(model_g, diffusion, opt_g, digits_batch, generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    t = torch.randint(0, 100, (BATCH,), generator=gen)
    noise = torch.randn(digits_batch.shape, generator=gen)
    train_step(model_e, diffusion, opt_e, digits_batch, t, noise)
    assert all(torch.equal(v, model_e.state_dict()[k]) for k, v in model_g.state_dict().items())


def test_save_load_unet_round_trip(tmp_path, digits_batch):
    model, diffusion = _model(3), DiffusionProcess(10, "linear")
    opt = make_optimizer(model)
    train_step(model, diffusion, opt, digits_batch, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "m.safetensors"
    save_unet(path, model, 10, "linear", 32)
    loaded, meta = load_unet(path)
    assert meta == {"img_channels": "1", "time_emb_dim": "32", "features": "8,16,32,64",
                    "timesteps": "10", "schedule": "linear"}
    assert not loaded.training
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:  # running stats and num_batches_tracked included
        assert torch.equal(want[k], got[k]), k
    x, t = digits_batch[:2], torch.tensor([0, 9])
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t), loaded(x, t))


def test_load_unet_refuses_another_architecture(tmp_path, capsys):
    """jax_ddpm writes ``arch``; torch_ref has only the chapter's U-Net."""
    from safetensors.torch import save_file

    from torch_ref.sample import main as sample_main

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"arch": "unet2d", "timesteps": "10", "schedule": "linear"})
    with pytest.raises(ValueError, match="holds arch 'unet2d'; torch_ref has only the chapter's U-Net"):
        load_unet(path)
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--weights", str(path), "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "torch_ref has only the chapter's U-Net" in err and "Traceback" not in capsys.readouterr().err


def test_load_unet_rejects_missing_metadata(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in _model().state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="metadata lacks"):
        load_unet(path)


def test_train_cli_writes_samples_and_weights(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch_ref.train", "--steps", "2", "--features", "8,16,32,64",
         "--image-size", "16", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "step 2/2 loss" in proc.stdout
    with Image.open(out / "samples.png") as img:
        assert img.mode == "L" and img.size == (4 * 16, 16)  # --num-samples 4 in one row
    weights = out / "model.safetensors"
    model, meta = load_unet(weights)
    assert meta == {"img_channels": "1", "time_emb_dim": "32", "features": "8,16,32,64",
                    "timesteps": "100", "schedule": "cosine"}
    on_disk = load_file(str(weights))
    state = model.state_dict()
    assert on_disk.keys() == state.keys()
    for k, v in on_disk.items():
        assert torch.equal(state[k], v), k
    # trained two steps: every BatchNorm tracked 2 batches per forward (E5)
    assert all(v.item() == 4 for k, v in state.items() if k.endswith("num_batches_tracked"))
