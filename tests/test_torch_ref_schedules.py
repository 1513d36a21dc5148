"""torch_ref beta schedules and DiffusionProcess buffers against a float64 NumPy oracle.

The oracle below is written from the formulas (chapter 20.3.1; Ho et al. 2020 eq. 6-7;
Nichol & Dhariwal 2021 eq. 17), not from torch_ref's code: NumPy float64 throughout.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_ref.diffusion import DiffusionProcess, cosine_beta_schedule, linear_beta_schedule

TIMESTEPS = (10, 100, 1000)
F32_HALF_ULP_REL = 2.0 ** -24  # round-to-nearest float32: |fl(x) - x| <= 2^-24 |x| (5.96e-8)


def oracle_linear_betas(T: int, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    """beta_t = start + (end - start) * t / (T - 1), t = 0..T-1, float64. Returns [T]."""
    t = np.arange(T, dtype=np.float64)
    return start + (end - start) * t / (T - 1)


def oracle_cosine_betas_unclipped(T: int, s: float = 0.008) -> np.ndarray:
    """1 - abar(t+1)/abar(t), abar(t) = f(t)/f(0), f(t) = cos^2(((t/T)+s)/(1+s) * pi/2). Returns [T]."""
    t = np.arange(T + 1, dtype=np.float64)
    f = np.cos((t / T + s) / (1.0 + s) * (np.pi / 2.0)) ** 2
    abar = f / f[0]
    return 1.0 - abar[1:] / abar[:-1]


def oracle_betas(T: int, kind: str) -> np.ndarray:
    if kind == "linear":
        return oracle_linear_betas(T)
    return np.clip(oracle_cosine_betas_unclipped(T), 0.0, 0.999)


def oracle_buffers(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Every DiffusionProcess buffer from its definition, float64. Each value is [T]."""
    T = betas.shape[0]
    alphas = 1.0 - betas
    abar = np.array([np.prod(alphas[: i + 1]) for i in range(T)])  # explicit products, not cumprod
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
        "sqrt_recip_alphas_cumprod": 1.0 / np.sqrt(abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt((1.0 - abar) / abar),
        "posterior_variance": post_var,
        # log(0) at t = 0 is replaced by the t = 1 value (Ho et al.'s clipping).
        "posterior_log_variance_clipped": np.log(np.where(np.arange(T) == 0, post_var[1], post_var)),
        "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    }


def max_rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """Max |got - want| / |want|; entries where want == 0 must match exactly (else inf)."""
    got = np.asarray(got, np.float64)
    zero = want == 0
    if np.any(got[zero] != 0):
        return float("inf")
    if np.all(zero):
        return 0.0
    return float(np.max(np.abs(got[~zero] - want[~zero]) / np.abs(want[~zero])))


@pytest.mark.parametrize("T", TIMESTEPS)
def test_linear_schedule_matches_oracle(T):
    got = linear_beta_schedule(T)
    assert got.dtype == torch.float64 and got.shape == (T,)
    # measured max rel err 2.2e-16 (1 float64 ulp) for T in {10, 100, 1000}
    assert max_rel_err(got.numpy(), oracle_linear_betas(T)) <= 1e-15
    assert got[0].item() == pytest.approx(1e-4, rel=1e-15)
    assert got[-1].item() == pytest.approx(0.02, rel=1e-15)


@pytest.mark.parametrize("T", TIMESTEPS)
def test_cosine_schedule_matches_oracle(T):
    got = cosine_beta_schedule(T)
    assert got.dtype == torch.float64 and got.shape == (T,)
    # measured max rel err 0 (T=10, 100), 1.1e-13 (T=1000, on the smallest betas ~4e-5,
    # where 1 - abar_t/abar_{t-1} cancels and float64 cos differences of numpy vs torch show)
    assert max_rel_err(got.numpy(), oracle_betas(T, "cosine")) <= 1e-12


@pytest.mark.parametrize("T", TIMESTEPS)
def test_cosine_clip_binds_exactly_at_last_step(T):
    unclipped = oracle_cosine_betas_unclipped(T)
    # f(T) = cos^2(pi/2) ~ 0, so the last unclipped beta is ~1 and only it exceeds 0.999;
    # the one before it is ~0.74 (T=10) / ~0.75 (T=100, 1000).
    assert unclipped[-1] > 0.999
    assert np.all(unclipped[:-1] < 0.999)
    assert np.all(unclipped > 0.0)  # the lower clip at 0 never binds
    got = cosine_beta_schedule(T).numpy()
    assert got[-1] == 0.999  # clipped, exactly
    assert np.all(got[:-1] < 0.999)
    assert max_rel_err(got[:-1], unclipped[:-1]) <= 1e-12  # the rest untouched by the clip


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("T", TIMESTEPS)
def test_diffusion_process_buffers_match_oracle(T, kind):
    diffusion = DiffusionProcess(T, kind)
    want = oracle_buffers(oracle_betas(T, kind))
    got = dict(diffusion.named_buffers())
    assert set(got) == set(want)
    for name, value in want.items():
        buf = got[name]
        assert buf.dtype == torch.float32 and buf.shape == (T,), name
        # Computed in float64, stored float32: at most half a float32 ulp from the oracle
        # (plus float64 noise, <= 1e-12 rel). Measured over all 12 buffers, both schedules,
        # T in {10, 100, 1000}: max rel err 5.92e-8 (0.994 * 2^-24); every entry is exactly
        # float32(oracle), i.e. 0 ulp from the correctly rounded value; zeros exact.
        err = max_rel_err(buf.numpy(), value)
        assert err <= F32_HALF_ULP_REL * (1 + 1e-6) + 1e-12, f"{name}: rel err {err:.3g}"
    # the t = 0 entries the formulas pin down exactly
    assert got["posterior_variance"][0].item() == 0.0
    assert got["alphas_cumprod_prev"][0].item() == 1.0
    assert got["posterior_mean_coef2"][0].item() == 0.0
    assert got["posterior_mean_coef1"][0].item() == pytest.approx(1.0, rel=2 ** -23)
    assert got["posterior_log_variance_clipped"][0].item() == got["posterior_log_variance_clipped"][1].item()
