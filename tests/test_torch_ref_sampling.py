"""The reverse step and samplers of torch_ref against DDPM closed forms in float64.

The denoiser is a stub whose eps is a known function of (x, t), so the oracle needs no
network: eps(x, t) = 0.7 tanh(x) + 0.1 sin(0.05 t). Closed forms (Ho et al. 2020, eq. 7, 11):
  mean       = (x - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)
  beta_tilde = beta_t (1 - abar_{t-1}) / (1 - abar_t)
  clipped:     x0 = clip((x - sqrt(1 - abar_t) eps) / sqrt(abar_t), -1, 1),
               mean = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x0 + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x
The chapter's printed step (E2, E3) is x0_pred(x, eps) + [i > 1] sqrt(beta_t) z.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from torch_ref.diffusion import DiffusionProcess
from torch_ref.sampling import chapter_sample, chapter_step, p_mean_variance, p_sample, sample

F32_EPS = 2.0 ** -23
T = 100
SHAPE = (6, 2, 4, 4)  # [B, C, H, W]
T_VALUES = np.array([0, 1, 2, T // 2, T - 2, T - 1])  # one per example of the batch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One torch thread: the shared 2-core CPU makes 2 intra-op threads much slower under load."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class StubEps(nn.Module):
    """eps(x, t) = 0.7 tanh(x) + 0.1 sin(0.05 t); records the training flag at every call."""

    def __init__(self, fail_at_call: int | None = None):
        super().__init__()
        self.modes: list[bool] = []
        self.fail_at_call = fail_at_call

    def forward(self, x, t):
        self.modes.append(self.training)
        if self.fail_at_call is not None and len(self.modes) == self.fail_at_call:
            raise RuntimeError("stub failure")
        return 0.7 * torch.tanh(x) + 0.1 * torch.sin(0.05 * t.float()).view(-1, 1, 1, 1)


def oracle_eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return 0.7 * np.tanh(x) + 0.1 * np.sin(0.05 * t.astype(np.float64))[:, None, None, None]


def oracle_schedule(kind: str, timesteps: int = T) -> dict[str, np.ndarray]:
    """float64 betas, alphas, abar, abar_prev from the formulas. Each [timesteps]."""
    if kind == "linear":
        betas = 1e-4 + (0.02 - 1e-4) * np.arange(timesteps, dtype=np.float64) / (timesteps - 1)
    else:
        s, u = 0.008, np.arange(timesteps + 1, dtype=np.float64)
        f = np.cos((u / timesteps + s) / (1 + s) * np.pi / 2) ** 2
        betas = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
    abar = np.cumprod(1 - betas)
    return {"beta": betas, "alpha": 1 - betas, "abar": abar, "abar_prev": np.concatenate([[1.0], abar[:-1]])}


def _b(v: np.ndarray, t: np.ndarray) -> np.ndarray:
    return v[t][:, None, None, None]


def oracle_posterior(sch, x, t, variance, clip):
    """Returns (mean, var, err_scale): float64 closed forms and the float32 error scale."""
    x = x.astype(np.float64)
    eps = oracle_eps(x, t)
    beta, alpha, abar, abar_prev = (_b(sch[k], t) for k in ("beta", "alpha", "abar", "abar_prev"))
    if clip:
        x0_raw = (x - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
        c1 = beta * np.sqrt(abar_prev) / (1 - abar)
        c2 = (1 - abar_prev) * np.sqrt(alpha) / (1 - abar)
        mean = c1 * np.clip(x0_raw, -1, 1) + c2 * x
        scale = np.abs(c1) * (np.abs(x) + np.abs(np.sqrt(1 - abar) * eps)) / np.sqrt(abar) + np.abs(c2 * x)
    else:
        coef = beta / np.sqrt(1 - abar)
        mean = (x - coef * eps) / np.sqrt(alpha)
        scale = (np.abs(x) + np.abs(coef * eps)) / np.sqrt(alpha)
    var = beta if variance == "beta" else beta * (1 - abar_prev) / (1 - abar)
    return mean, np.broadcast_to(var, x.shape), scale


def oracle_x0_pred(sch, x, t):
    """The chapter's printed update without noise: (x - sqrt(1 - abar) eps) / sqrt(abar)."""
    x = x.astype(np.float64)
    abar = _b(sch["abar"], t)
    return (x - np.sqrt(1 - abar) * oracle_eps(x, t)) / np.sqrt(abar)


def _x(seed: int, std: float = 1.5, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


# --- one step ------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_p_mean_variance_matches_closed_form(kind, variance, clip):
    diffusion, sch = DiffusionProcess(T, kind), oracle_schedule(kind)
    model = StubEps()
    x = _x(0)
    t = torch.from_numpy(T_VALUES)
    mean, var = p_mean_variance(diffusion, model(x, t), x, t, variance, clip)
    want_mean, want_var, scale = oracle_posterior(sch, x.numpy(), T_VALUES, variance, clip)
    if clip:  # the clip must bind on some entries and not on others, or the test shows nothing
        frac = np.mean(np.abs(oracle_x0_pred(sch, x.numpy(), T_VALUES)) > 1)
        assert 0.2 < frac < 0.9, frac
    err = np.abs(mean.numpy().astype(np.float64) - want_mean)
    # Measured max err / (eps32 * scale) over the 8 cases: 0.92 (no clip), 1.07 (clip); max
    # abs err 5.3e-6, at the cosine schedule's t = T-1 (1/sqrt(alpha) = 31.6). Clip binds on
    # 45% (linear) / 65% (cosine) of the entries.
    assert np.all(err <= 4 * F32_EPS * scale), f"max ratio {np.max(err / (F32_EPS * scale)):.3g}"
    var = np.broadcast_to(var.numpy().astype(np.float64), SHAPE)
    # float32 buffers: <= half an ulp (2^-24 rel) from float64; var[t=0] = 0 for beta_tilde
    assert np.all(np.abs(var - want_var) <= 2 ** -24 * want_var)


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_p_mean_variance_reads_x0_and_v_models(prediction, clip):
    """X1: the model output read as x0 (the clean image) or v = sqrt(abar) eps - sqrt(1 - abar) x0;
    the mean is the posterior mean of that x0 (clipped with ``clip``), never formed through eps."""
    kind = "cosine"
    diffusion, sch = DiffusionProcess(T, kind), oracle_schedule(kind)
    x, out, t = _x(0), _x(1, std=0.8), torch.from_numpy(T_VALUES)
    mean, _ = p_mean_variance(diffusion, out, x, t, "beta_tilde", clip, prediction=prediction)
    xs, o = x.numpy().astype(np.float64), out.numpy().astype(np.float64)
    beta, alpha, abar, abar_prev = (_b(sch[k], T_VALUES) for k in ("beta", "alpha", "abar", "abar_prev"))
    x0 = o if prediction == "x0" else np.sqrt(abar) * xs - np.sqrt(1 - abar) * o
    if clip:  # binds on some entries and not on others
        assert 0.05 < np.mean(np.abs(x0) > 1) < 0.9
        x0 = np.clip(x0, -1, 1)
    c1, c2 = beta * np.sqrt(abar_prev) / (1 - abar), (1 - abar_prev) * np.sqrt(alpha) / (1 - abar)
    want = c1 * x0 + c2 * xs
    scale = np.abs(c1) * (np.abs(x0) + np.abs(xs) + np.abs(o)) + np.abs(c2 * xs)
    err = np.abs(mean.numpy().astype(np.float64) - want)
    # float32 products of float32 coefficients: measured max 0.74 eps32 * scale over the 4 cases (clip binds
    # on 22% (x0) and 42% (v) of the entries)
    assert np.all(err <= 4 * F32_EPS * scale), f"max ratio {np.max(err / (F32_EPS * scale)):.3g}"
    eps_read, _ = p_mean_variance(diffusion, out, x, t, "beta_tilde", clip)  # the same output read as eps differs
    assert np.abs(eps_read.numpy() - mean.numpy()).max() > 1e-2


def test_p_mean_variance_unknown_prediction_raises():
    diffusion, x = DiffusionProcess(T, "linear"), _x(0)
    with pytest.raises(ValueError, match="prediction"):
        p_mean_variance(diffusion, x, x, torch.from_numpy(T_VALUES), prediction="score")


def test_p_mean_variance_unknown_variance_raises():
    diffusion, x = DiffusionProcess(T, "linear"), _x(0)
    with pytest.raises(ValueError, match="variance"):
        p_mean_variance(diffusion, x, x, torch.from_numpy(T_VALUES), variance="learned")


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_p_sample_matches_closed_form(kind, variance):
    diffusion, sch = DiffusionProcess(T, kind), oracle_schedule(kind)
    x, z = _x(1), _x(2, std=1.0)
    for i in (T - 1, T // 2, 2, 1, 0):
        out = p_sample(StubEps(), diffusion, x, i, noise=z, variance=variance)
        t = np.full(SHAPE[0], i)
        mean, var, scale = oracle_posterior(sch, x.numpy(), t, variance, clip=False)
        want = mean + (np.sqrt(var) * z.numpy() if i > 0 else 0.0)
        scale = scale + (np.sqrt(var) * np.abs(z.numpy()) if i > 0 else 0.0)
        err = np.abs(out.numpy().astype(np.float64) - want)
        # measured max err / (eps32 * scale): 1.3
        assert np.all(err <= 4 * F32_EPS * scale), (i, float(err.max()))


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_p_sample_adds_noise_at_t1_not_t0(variance):
    """E3 fixed: noise at every step but the last; i = 1 is noisy, i = 0 is the mean."""
    diffusion, x = DiffusionProcess(T, "cosine"), _x(3)
    z1, z2 = _x(4, 1.0), _x(5, 1.0)
    t1 = torch.ones(SHAPE[0], dtype=torch.long)
    mean1, var1 = p_mean_variance(diffusion, StubEps()(x, t1), x, t1, variance)
    a, b = (p_sample(StubEps(), diffusion, x, 1, noise=z, variance=variance) for z in (z1, z2))
    assert torch.allclose(a - b, torch.sqrt(var1) * (z1 - z2), atol=1e-6, rtol=0)
    assert (a - mean1).abs().max() > 1e-3  # sigma_1 = 0.020 (beta_tilde) / 0.033 (beta)
    t0 = torch.zeros(SHAPE[0], dtype=torch.long)
    mean0, _ = p_mean_variance(diffusion, StubEps()(x, t0), x, t0, variance)
    outs = [p_sample(StubEps(), diffusion, x, 0, noise=z, variance=variance) for z in (z1, z2, None)]
    assert all(torch.equal(o, mean0) for o in outs)


def test_p_sample_generator_reproducible():
    diffusion, x = DiffusionProcess(T, "linear"), _x(6)
    a = p_sample(StubEps(), diffusion, x, 10, generator=torch.Generator().manual_seed(7))
    b = p_sample(StubEps(), diffusion, x, 10, generator=torch.Generator().manual_seed(7))
    c = p_sample(StubEps(), diffusion, x, 10, noise=torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)))
    d = p_sample(StubEps(), diffusion, x, 10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(a, d)


# --- the chapter's printed step (E2, E3) ---------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_chapter_step_is_x0_prediction_not_posterior(kind):
    """E2: the printed update is the x0 prediction; it equals the posterior mean only at t = 0
    (abar_0 = alpha_0) and the gap grows with t."""
    diffusion, sch = DiffusionProcess(T, kind), oracle_schedule(kind)
    x = _x(8, std=1.0)
    gaps = {}
    for i in (0, 1, 2, 10, T // 2, T - 1):
        got = chapter_step(StubEps(), diffusion, x, i, noise=torch.zeros(SHAPE))
        t = np.full(SHAPE[0], i)
        want = oracle_x0_pred(sch, x.numpy(), t)
        abar = _b(sch["abar"], t)
        eps = np.abs(oracle_eps(x.numpy(), t))
        # the printed formula forms 1 - abar from the float32 abar buffer: its rounding
        # (<= eps32/2 * abar) is amplified by 1 / (1 - abar) near t = 0, hence the last term.
        scale = (np.abs(x.numpy()) + np.sqrt(1 - abar) * eps + eps * abar / (2 * np.sqrt(1 - abar))) / np.sqrt(abar)
        # measured max err / (eps32 * scale): 0.76 (linear), 1.25 (cosine)
        assert np.all(np.abs(got.numpy() - want) <= 4 * F32_EPS * scale), i
        post, _, _ = oracle_posterior(sch, x.numpy(), t, "beta_tilde", clip=False)
        gaps[i] = float(np.sqrt(np.mean((want - post) ** 2)))  # RMS gap, float64 oracle values
    # Measured RMS gap between the printed update and the posterior mean (x ~ N(0, 1), stub
    # eps, T = 100), t = 0 / 1 / 2 / 10 / 50 / 99:
    #   linear 5e-16 / 0.0022 / 0.0058 / 0.036 / 0.114 / 0.213
    #   cosine 2e-17 / 0.0064 / 0.0127 / 0.056 / 0.112 / 1.1e3 (1/sqrt(abar_99) after the 0.999 clip)
    # i.e. >= 1e4 times the float32 tolerance of either step from t = 1 up.
    assert gaps[0] < 1e-12
    assert gaps[1] > 1e-3 and gaps[T // 2] > 0.05 and gaps[T - 1] > 0.1
    assert gaps[1] < gaps[2] < gaps[10] < gaps[T // 2] < gaps[T - 1]


def test_chapter_step_skips_noise_at_t1():
    """E3: no noise at i = 1 (nor at i = 0); noise sqrt(beta_t) z from i = 2 up."""
    diffusion, x = DiffusionProcess(T, "cosine"), _x(9)
    z1, z2 = _x(10, 1.0), _x(11, 1.0)
    for i in (0, 1):
        outs = [chapter_step(StubEps(), diffusion, x, i, noise=z) for z in (z1, z2, None)]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), i
    a, b = (chapter_step(StubEps(), diffusion, x, 2, noise=z) for z in (z1, z2))
    assert torch.allclose(a - b, diffusion.betas[2].sqrt() * (z1 - z2), atol=1e-6, rtol=0)
    # the posterior sampler differs at i = 1 exactly where the chapter does not add noise
    p1 = [p_sample(StubEps(), diffusion, x, 1, noise=z) for z in (z1, z2)]
    assert not torch.equal(p1[0], p1[1])


# --- whole chains: eval mode (E4), clamp, the chain against the oracle -------------------


@pytest.mark.parametrize("sampler", [sample, chapter_sample], ids=["sample", "chapter_sample"])
def test_samplers_use_eval_mode_and_restore_it(sampler):
    diffusion, x_T = DiffusionProcess(10, "linear"), _x(12, shape=(2, 1, 4, 4))
    model = StubEps().train()
    sampler(model, diffusion, x_T, generator=torch.Generator().manual_seed(0))
    assert model.modes == [False] * 10  # every step in eval mode (E4)
    assert model.training  # training mode restored
    model = StubEps().eval()
    sampler(model, diffusion, x_T, generator=torch.Generator().manual_seed(0))
    assert not model.training  # eval stays eval
    model = StubEps(fail_at_call=4).train()
    with pytest.raises(RuntimeError, match="stub failure"):
        sampler(model, diffusion, x_T, generator=torch.Generator().manual_seed(0))
    assert model.training  # restored even when a step fails


T_CHAIN = 20


def _oracle_chain(sch, x_T, noises, variance, chapter):
    """The whole ancestral chain in float64; noises[i] is the noise added at step i."""
    x = x_T.astype(np.float64)
    for i in range(len(sch["beta"]) - 1, -1, -1):
        t = np.full(x.shape[0], i)
        if chapter:
            x = oracle_x0_pred(sch, x, t) + (np.sqrt(sch["beta"][i]) * noises[i] if i > 1 else 0.0)
        else:
            mean, var, _ = oracle_posterior(sch, x, t, variance, clip=False)
            x = mean + (np.sqrt(var) * noises[i] if i > 0 else 0.0)
    return np.clip(x, -1, 1), x


@pytest.mark.parametrize("sampler", ["beta", "beta_tilde", "chapter"])
def test_sample_chain_matches_oracle_and_is_clamped(sampler):
    diffusion, sch = DiffusionProcess(T_CHAIN, "linear"), oracle_schedule("linear", T_CHAIN)
    shape = (3, 1, 6, 6)
    x_T = _x(13, std=1.0, shape=shape)
    noises = torch.randn((T_CHAIN, *shape), generator=torch.Generator().manual_seed(14))
    if sampler == "chapter":
        got = chapter_sample(StubEps(), diffusion, x_T, noises=noises)
    else:
        got = sample(StubEps(), diffusion, x_T, noises=noises, variance=sampler)
    want, unclamped = _oracle_chain(sch, x_T.numpy(), noises.numpy().astype(np.float64), sampler, sampler == "chapter")
    assert got.min() >= -1 and got.max() <= 1
    assert np.abs(unclamped).max() > 1  # the clamp binds: the chain leaves [-1, 1]
    # measured max abs err after 20 steps: 3.2e-7 (beta), 2.6e-7 (beta_tilde), 3.5e-7 (chapter)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=2e-6)
