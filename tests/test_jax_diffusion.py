"""jax_ddpm.diffusion (q_sample, loss, predicted x0, posterior, reverse step) vs the float64 oracle."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jax_ddpm import diffusion, schedules
from parity_tests import oracle
from parity_tests.variants import VARIANT_IDS, VARIANTS

T = 100
SHAPE = (6, 8, 8, 3)  # [B, H, W, C]


def _inputs(kind: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([0, 1, 17, 50, T - 2, T - 1])
    return schedules.make_schedule(T, kind), oracle.schedule(kind, T), x0, noise, t


def _rel_to_scale(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_sample(variant, kind):
    s, ref, x0, noise, t = _inputs(kind)
    got = variant(diffusion.q_sample)(s, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    # |x_t| <= 5, three fp32 roundings: measured 3e-7
    np.testing.assert_allclose(np.asarray(got), oracle.q_sample(ref, x0, t, noise), rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_eps_mse_loss(variant):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 4, 8, 8, 1)).astype(np.float32)
    got = float(variant(diffusion.eps_mse_loss)(jnp.asarray(a), jnp.asarray(b)))
    want = float(np.mean((a.astype(np.float64) - b) ** 2))
    assert abs(got - want) / want <= 1e-6  # float32 mean of 256 squares: measured 6e-8


def _x0_terms(ref: dict, x_t, t, eps) -> np.ndarray:
    """|sqrt(1/abar) x_t| + |sqrt(1/abar - 1) eps|: the scale fp32 rounding acts on in predict_x0.

    At cosine t = T-1, 1/sqrt(abar) ~ 3e4 and the two terms cancel to |x_0| <= 1: the
    problem itself is ill-conditioned, so errors are bounded relative to the terms.
    """
    abar = ref["alphas_cumprod"][t].reshape(-1, 1, 1, 1)
    return np.abs(x_t / np.sqrt(abar)) + np.abs(np.sqrt(1 / abar - 1) * eps)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_predict_x0_from_eps(variant, kind):
    s, ref, x0, noise, t = _inputs(kind)
    x_t = oracle.q_sample(ref, x0, t, noise).astype(np.float32)
    got = np.asarray(variant(diffusion.predict_x0_from_eps)(s, jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(noise)))
    want = oracle.predict_x0(ref, x_t, t, noise)
    # elementwise <= 4 fp32 roundings of the terms (2^-22 = 2.4e-7); measured 1.2e-7 of them
    assert np.all(np.abs(got - want) <= 2.4e-7 * _x0_terms(ref, x_t, t, noise))


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_mean_variance(variant, kind):
    s, ref, x0, noise, t = _inputs(kind)
    x_t = oracle.q_sample(ref, x0, t, noise).astype(np.float32)
    mean, var = variant(diffusion.posterior_mean_variance)(s, jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(t))
    o_mean, o_var = oracle.posterior_mean_variance(ref, x0, x_t, t)
    assert _rel_to_scale(mean, o_mean) <= 1e-6  # measured 1e-7
    assert _rel_to_scale(np.asarray(var).reshape(-1), o_var.reshape(-1)) <= 1e-6


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_p_mean_variance(variant, variance, clip, kind):
    s, ref, x0, noise, t = _inputs(kind)
    x_t = oracle.q_sample(ref, x0, t, noise).astype(np.float32)
    eps = (noise + 0.1 * np.random.default_rng(2).standard_normal(SHAPE)).astype(np.float32)  # an imperfect model
    fn = variant(diffusion.p_mean_variance, static_argnums=(4, 5))
    mean, var = fn(s, jnp.asarray(eps), jnp.asarray(x_t), jnp.asarray(t), variance, clip)
    o_mean, o_var = oracle.p_mean_variance(ref, eps, x_t, t, variance, clip)
    if clip:  # the clipped x0 inherits predict_x0's conditioning, weighted by the posterior coefficients
        c1, c2 = (ref[k][t].reshape(-1, 1, 1, 1) for k in ("posterior_mean_coef1", "posterior_mean_coef2"))
        bound = 2.4e-7 * (c1 * _x0_terms(ref, x_t, t, eps) + np.abs(c2 * x_t))
        assert np.all(np.abs(np.asarray(mean) - o_mean) <= bound)
    else:
        assert _rel_to_scale(mean, o_mean) <= 1e-6  # measured <= 1.1e-7 (|mean| up to 1e2 at cosine t = T-1)
    assert _rel_to_scale(np.asarray(var).reshape(-1), o_var.reshape(-1)) <= 1e-6


def test_p_mean_variance_rejects_unknown_variance():
    s, _, x0, noise, t = _inputs("linear")
    with pytest.raises(ValueError, match="variance must be one of"):
        diffusion.p_mean_variance(s, jnp.asarray(noise), jnp.asarray(x0), jnp.asarray(t), "fixed_large")
