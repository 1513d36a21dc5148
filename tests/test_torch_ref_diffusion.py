"""DiffusionProcess.forward (q_sample) against the closed form in float64.

x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with abar_t = prod_{s<=t} (1 - beta_s) taken
from a NumPy float64 oracle of the schedules (not from torch_ref's buffers).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_ref.diffusion import DiffusionProcess

F32_EPS = 2.0 ** -23
SHAPE = (6, 3, 8, 8)  # [B, C, H, W]


def oracle_alphas_cumprod(T: int, kind: str) -> np.ndarray:
    """abar_t for t = 0..T-1, float64, from the schedule formulas. Returns [T]."""
    if kind == "linear":
        betas = 1e-4 + (0.02 - 1e-4) * np.arange(T, dtype=np.float64) / (T - 1)
    else:
        s, x = 0.008, np.arange(T + 1, dtype=np.float64)
        f = np.cos((x / T + s) / (1 + s) * np.pi / 2) ** 2
        betas = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
    return np.cumprod(1 - betas)


def oracle_q_sample(abar: np.ndarray, x0: np.ndarray, t: np.ndarray, eps: np.ndarray):
    """Returns (x_t [B, C, H, W] float64, per-element error scale |a x0| + |b eps|)."""
    a = np.sqrt(abar[t])[:, None, None, None]
    b = np.sqrt(1 - abar[t])[:, None, None, None]
    x0, eps = x0.astype(np.float64), eps.astype(np.float64)
    return a * x0 + b * eps, np.abs(a * x0) + np.abs(b * eps)


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(SHAPE, generator=gen) * 2 - 1
    eps = torch.randn(SHAPE, generator=gen)
    return x0, eps


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("T", [10, 100, 1000])
def test_forward_matches_closed_form(T, kind):
    diffusion = DiffusionProcess(T, kind)
    abar = oracle_alphas_cumprod(T, kind)
    x0, eps = _inputs(T)
    rng = np.random.default_rng(T)
    cases = {
        "t=0": np.zeros(SHAPE[0], np.int64),
        "t=T-1": np.full(SHAPE[0], T - 1, np.int64),
        "random t": rng.integers(0, T, SHAPE[0]),
    }
    for label, t in cases.items():
        x_t, noise = diffusion(x0, torch.from_numpy(t), noise=eps)
        assert noise is eps  # the noise passed in is the noise used and returned
        assert x_t.dtype == torch.float32 and x_t.shape == SHAPE
        want, scale = oracle_q_sample(abar, x0.numpy(), t, eps.numpy())
        err = np.abs(x_t.numpy().astype(np.float64) - want)
        # float32 buffers (<= 0.5 ulp each) times float32 inputs, one add: <= ~2 ulp of
        # |a x0| + |b eps|. Measured max err / (eps32 * scale): 1.16 over all cases here
        # (max abs err 2.5e-7).
        assert np.all(err <= 2 * F32_EPS * scale), f"{label}: max err {err.max():.3g}"


def test_forward_t0_and_last_step_limits():
    """At t = 0 x_t is almost x_0; at the cosine schedule's last step it is almost pure noise."""
    diffusion = DiffusionProcess(1000, "cosine")
    x0, eps = _inputs(0)
    x_first, _ = diffusion(x0, torch.zeros(SHAPE[0], dtype=torch.long), noise=eps)
    x_last, _ = diffusion(x0, torch.full((SHAPE[0],), 999), noise=eps)
    # abar_0 = 1 - beta_0 (cosine T=1000: beta_0 = 4.1e-5) so x_t - x_0 is ~ sqrt(beta_0) eps
    assert torch.allclose(x_first, x0, atol=0.03, rtol=0)  # measured 0.024
    # abar_{T-1} = 2.4e-9, so |x_t - eps| <= sqrt(abar) |x0| ~ 4.9e-5 (measured 4.93e-5)
    assert torch.allclose(x_last, eps, atol=1e-4, rtol=0)


def test_forward_generator_reproducible():
    diffusion = DiffusionProcess(100, "cosine")
    x0, _ = _inputs(1)
    t = torch.tensor([0, 5, 50, 99, 17, 3])
    x_a, n_a = diffusion(x0, t, generator=torch.Generator().manual_seed(123))
    x_b, n_b = diffusion(x0, t, generator=torch.Generator().manual_seed(123))
    x_c, n_c = diffusion(x0, t, generator=torch.Generator().manual_seed(124))
    assert torch.equal(x_a, x_b) and torch.equal(n_a, n_b)
    assert not torch.equal(n_a, n_c)
    # the drawn noise is a standard normal draw from that generator, and x_t is built from it
    assert torch.equal(n_a, torch.randn(SHAPE, generator=torch.Generator().manual_seed(123)))
    x_n, _ = diffusion(x0, t, noise=n_a)
    assert torch.equal(x_a, x_n)


def test_forward_broadcasts_per_example_t():
    """Each example gets its own t: row i of a batch equals that example run alone."""
    diffusion = DiffusionProcess(100, "linear")
    x0, eps = _inputs(2)
    t = torch.tensor([3, 97, 0, 50, 50, 99])
    x_t, _ = diffusion(x0, t, noise=eps)
    for i in range(SHAPE[0]):
        row, _ = diffusion(x0[i : i + 1], t[i : i + 1], noise=eps[i : i + 1])
        assert torch.equal(x_t[i : i + 1], row)


@pytest.mark.parametrize("bad", ["quadratic", "Linear", ""])
def test_unknown_schedule_raises(bad):
    with pytest.raises(ValueError, match="beta_schedule"):
        DiffusionProcess(10, bad)
