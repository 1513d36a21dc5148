"""The reference denoiser: UNet (E1 wiring), Block's shared BatchNorm (E5), ChapterUNet's
crash (E1 as printed) and SinusoidalPositionEmbeddings against a float64 NumPy oracle."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torch_ref.model import Block, ChapterUNet, SinusoidalPositionEmbeddings, UNet

SMALL = [8, 16, 32, 64]
CHAPTER = [64, 128, 256, 512]
TIME_EMB_DIM = 32
F32_EPS = 2.0 ** -23


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Run torch on one thread here: on the shared 2-core CPU, 2 intra-op threads under load
    made a small U-Net step ~50x slower (5.6 s vs 0.11 s measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batch(channels: int, size: int, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, channels, size, size), generator=gen)  # [B, C, H, W]
    t = torch.randint(0, 100, (batch,), generator=gen)  # [B]
    return x, t


def _forward_backward(model: UNet, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(x, t)
    # a loss that weights every output element differently, so no gradient cancels by symmetry
    weights = torch.linspace(0.5, 1.5, out.numel()).view_as(out)  # sums to != 0: bias grads too
    (out * weights).sum().backward()
    return out


def _assert_every_parameter_has_gradient(model: torch.nn.Module):
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_unet_forward_backward_small(channels, size, train):
    torch.manual_seed(0)
    model = UNet(channels, TIME_EMB_DIM, SMALL).train(train)
    x, t = _batch(channels, size)
    out = _forward_backward(model, x, t)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    _assert_every_parameter_has_gradient(model)


def test_unet_forward_backward_chapter_features():
    """The chapter's default widths [64, 128, 256, 512], once, at 16x16 (kept small for time)."""
    torch.manual_seed(0)
    model = UNet(3, TIME_EMB_DIM)  # default features
    assert [model.down1.conv1.in_channels, model.down1.conv1.out_channels,
            model.down2.conv1.out_channels, model.down3.conv1.out_channels] == CHAPTER
    x, t = _batch(3, 16)
    out = _forward_backward(model.train(), x, t)
    assert out.shape == x.shape
    _assert_every_parameter_has_gradient(model)
    with torch.no_grad():
        assert model.eval()(x, t).shape == x.shape


def test_unet_wiring_is_the_documented_e1_fix():
    """Forward hooks record every submodule's inputs and output; the data flow must be the
    one ERRATA/UNet docstring documents: up-blocks take cat(decoder input, same-size skip),
    the last skip is additive, no bottleneck."""
    torch.manual_seed(0)
    model = UNet(1, TIME_EMB_DIM, SMALL).eval()
    seen: dict[str, tuple[tuple, torch.Tensor]] = {}
    names = ["time_mlp", "inc", "down1", "down2", "down3", "up1", "up2", "up3", "outc"]
    for name in names:
        getattr(model, name).register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, (args, out)))
    x, t = _batch(1, 32)
    with torch.no_grad():
        final = model(x, t)
    assert not hasattr(model, "bottleneck")
    out = {k: v[1] for k, v in seen.items()}
    inp = {k: v[0][0] for k, v in seen.items()}
    temb = out["time_mlp"]
    assert torch.equal(inp["inc"], x)
    assert torch.equal(inp["down1"], out["inc"]) and torch.equal(inp["down2"], out["down1"])
    assert torch.equal(inp["down3"], out["down2"])
    assert torch.equal(inp["up1"], torch.cat([out["down3"], out["down3"]], dim=1))  # [B, 2*64, 4, 4]
    assert torch.equal(inp["up2"], torch.cat([out["up1"], out["down2"]], dim=1))  # [B, 2*32, 8, 8]
    assert torch.equal(inp["up3"], torch.cat([out["up2"], out["down1"]], dim=1))  # [B, 2*16, 16, 16]
    assert torch.equal(inp["outc"], out["up3"] + out["inc"])  # [B, 8, 32, 32]
    assert torch.equal(final, out["outc"])
    for name in ["down1", "down2", "down3", "up1", "up2", "up3"]:
        assert torch.equal(seen[name][0][1], temb), name  # every Block gets the same embedding
    assert [tuple(out[k].shape) for k in ["inc", "down1", "down2", "down3", "up1", "up2", "up3"]] == [
        (2, 8, 32, 32), (2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 32, 8, 8), (2, 16, 16, 16), (2, 8, 32, 32)]


def test_unet_rejects_wrong_number_of_features():
    with pytest.raises(ValueError, match="features"):
        UNet(1, TIME_EMB_DIM, [8, 16, 32])


def test_unet_eval_mode_is_per_example():
    """In eval mode BatchNorm uses running statistics: each example's output is independent
    of the rest of the batch (it is not in train mode)."""
    torch.manual_seed(0)
    model = UNet(1, TIME_EMB_DIM, SMALL)
    x, t = _batch(1, 16, batch=3)
    with torch.no_grad():
        model.eval()
        full, alone = model(x, t), model(x[:1], t[:1])
        assert torch.allclose(full[:1], alone, atol=1e-6, rtol=0)
        model.train()
        full_train, alone_train = model(x, t), model(x[:1], t[:1])
        assert not torch.allclose(full_train[:1], alone_train, atol=1e-3)


# --- E5: one BatchNorm2d applied twice per Block ------------------------------------------


def _oracle_block_train(block: Block, x: np.ndarray, temb: np.ndarray):
    """Block.forward in training mode re-derived in float64 from the chapter's formulas.

    Returns (output [B, C_out, H/2, W/2], running_mean [C_out], running_var [C_out]) with the
    BatchNorm running statistics after its two updates (momentum m, unbiased variance).
    """
    w = {k: torch.from_numpy(v.detach().numpy().astype(np.float64)) for k, v in block.state_dict().items()}
    bn = block.bnorm
    m, bn_eps = bn.momentum, bn.eps
    running_mean = w["bnorm.running_mean"].numpy().copy()
    running_var = w["bnorm.running_var"].numpy().copy()

    def batchnorm(h: torch.Tensor) -> torch.Tensor:
        nonlocal running_mean, running_var
        a = h.numpy()  # [B, C, H, W]
        n = a.shape[0] * a.shape[2] * a.shape[3]
        mean = a.mean(axis=(0, 2, 3))
        var_biased = ((a - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
        running_mean = (1 - m) * running_mean + m * mean
        running_var = (1 - m) * running_var + m * var_biased * n / (n - 1)
        y = (a - mean[None, :, None, None]) / np.sqrt(var_biased[None, :, None, None] + bn_eps)
        y = y * w["bnorm.weight"].numpy()[None, :, None, None] + w["bnorm.bias"].numpy()[None, :, None, None]
        return torch.from_numpy(y)

    h = batchnorm(F.relu(F.conv2d(torch.from_numpy(x), w["conv1.weight"], w["conv1.bias"], padding=1)))
    t = F.relu(torch.from_numpy(temb) @ w["time_mlp.weight"].T + w["time_mlp.bias"])  # [B, C_out]
    h = h + t[:, :, None, None]
    h = batchnorm(F.relu(F.conv2d(h, w["conv2.weight"], w["conv2.bias"], padding=1)))
    out = F.conv2d(h, w["transform.weight"], w["transform.bias"], stride=2, padding=1)
    return out.numpy(), running_mean, running_var


def test_block_batchnorm_updated_twice_matches_oracle():
    torch.manual_seed(0)
    block = Block(4, 6, TIME_EMB_DIM)
    with torch.no_grad():  # non-trivial affine and running stats, so every term of the update shows
        block.bnorm.weight.uniform_(0.5, 1.5)
        block.bnorm.bias.uniform_(-0.5, 0.5)
        block.bnorm.running_mean.uniform_(-1, 1)
        block.bnorm.running_var.uniform_(0.5, 2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((3, 4, 8, 8), generator=gen)
    temb = torch.randn((3, TIME_EMB_DIM), generator=gen)
    want_out, want_mean, want_var = _oracle_block_train(block, x.numpy().astype(np.float64),
                                                        temb.numpy().astype(np.float64))
    block.train()
    with torch.no_grad():
        out = block(x, temb)
    assert block.bnorm.num_batches_tracked.item() == 2
    # float32 CPU vs float64 oracle, measured max abs err: running_mean 7.8e-8 (values ~0.8),
    # running_var 1.3e-7 (values ~1.6), output 7.4e-7 (values ~1.6)
    np.testing.assert_allclose(block.bnorm.running_mean.numpy(), want_mean, rtol=0, atol=5e-7)
    np.testing.assert_allclose(block.bnorm.running_var.numpy(), want_var, rtol=0, atol=5e-7)
    np.testing.assert_allclose(out.numpy(), want_out, rtol=0, atol=5e-6)


def test_unet_every_block_tracks_two_batches_per_forward():
    torch.manual_seed(0)
    model = UNet(1, TIME_EMB_DIM, SMALL)
    blocks = [model.down1, model.down2, model.down3, model.up1, model.up2, model.up3]
    x, t = _batch(1, 16)
    with torch.no_grad():
        model.train()(x, t)
        assert [b.bnorm.num_batches_tracked.item() for b in blocks] == [2] * 6
        model.train()(x, t)
        assert [b.bnorm.num_batches_tracked.item() for b in blocks] == [4] * 6
        stats = [b.bnorm.running_mean.clone() for b in blocks]
        model.eval()(x, t)  # eval mode leaves the statistics alone
        assert [b.bnorm.num_batches_tracked.item() for b in blocks] == [4] * 6
        assert all(torch.equal(s, b.bnorm.running_mean) for s, b in zip(stats, blocks))
    bns = [mod for mod in model.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert len(bns) == 6  # one BatchNorm2d per Block, shared by both convs


# --- E1: the wiring as printed crashes -----------------------------------------------------


def test_chapter_unet_as_printed_raises_e1():
    torch.manual_seed(0)
    model = ChapterUNet(3, TIME_EMB_DIM)  # chapter defaults [64, 128, 256, 512]
    x, t = _batch(3, 16)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"expected input\[2, 512, 2, 2\] to have 1024 channels"):
        model(x, t)


def test_chapter_unet_small_features_raises_e1():
    model = ChapterUNet(1, TIME_EMB_DIM, SMALL)
    x, t = _batch(1, 32)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"expected input.*to have 128 channels"):
        model(x, t)


# --- SinusoidalPositionEmbeddings ----------------------------------------------------------


def oracle_sinusoidal(t: np.ndarray, dim: int) -> np.ndarray:
    """[sin(t f_j), cos(t f_j)], f_j = 10000^(-j / (dim/2 - 1)), j = 0..dim/2-1; float64 [N, dim]."""
    half = dim // 2
    freqs = 10000.0 ** (-np.arange(half, dtype=np.float64) / (half - 1))
    args = t.astype(np.float64)[:, None] * freqs[None, :]
    return np.concatenate([np.sin(args), np.cos(args)], axis=-1)


@pytest.mark.parametrize("dim", [8, 32, 128])
def test_sinusoidal_embeddings_match_oracle(dim):
    t = np.arange(1000)
    got = SinusoidalPositionEmbeddings(dim)(torch.from_numpy(t))
    assert got.shape == (1000, dim) and got.dtype == torch.float32
    want = oracle_sinusoidal(t, dim)
    err = np.abs(got.numpy().astype(np.float64) - want)
    # The frequency is exp of a float32 exponent up to ln(1e4) = 9.2, so the argument t f_j
    # carries a relative error ~ eps32 (1 + 9.2); sin/cos add ~ eps32. Bound per element:
    # eps32 (1 + |t f_j| (1 + ln 1e4)). Measured max err / bound: 0.27 (dim 8), 0.37 (32, 128);
    # max abs err 5.0e-6 (dim 8), 3.0e-5 (32), 4.5e-5 (128), all at t near 999.
    args = np.concatenate([t[:, None] * 10000.0 ** (-np.arange(dim // 2) / (dim // 2 - 1))] * 2, axis=-1)
    assert np.all(err <= F32_EPS * (1 + np.abs(args) * (1 + np.log(1e4))))
    # t = 0: sin = 0, cos = 1 exactly
    assert torch.equal(got[0], torch.cat([torch.zeros(dim // 2), torch.ones(dim // 2)]))
