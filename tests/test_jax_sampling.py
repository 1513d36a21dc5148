"""jax_ddpm.sampling with an analytic denoiser: jit == eager, key-driven == pre-drawn noise,
chains vs a float64 NumPy loop over the oracle's reverse step, errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ddpm import sampling, schedules
from parity_tests import oracle
from parity_tests.variants import VARIANT_IDS, VARIANTS

T = 12
SHAPE = (3, 8, 8, 2)  # [B, H, W, C]
W = 0.3  # the analytic denoiser: eps(x, t) = W x + t / T


def eps_fn(x, t):
    return W * x + (t.astype(x.dtype) / T)[:, None, None, None]


def eps_np(x, t):
    return W * x + (np.asarray(t, np.float64) / T)[:, None, None, None]


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal((T,) + SHAPE).astype(np.float32)


SAMPLERS = [("ddpm", {"variance": "beta_tilde"}), ("ddpm", {"variance": "beta"}),
            ("ddpm", {"variance": "beta_tilde", "clip_denoised": True}), ("chapter", {})]
IDS = ["ddpm-beta_tilde", "ddpm-beta", "ddpm-clip", "chapter"]


_COMPILED: dict = {}  # one jitted program per (sampler, options), shared by the tests below


def _run(variant, name, opts, schedule, x_T, noise):
    key = (variant.__name__, name, tuple(sorted(opts.items())))
    if key not in _COMPILED:
        fn = sampling.get_sampler(name)
        _COMPILED[key] = variant(lambda s, x, n: fn(eps_fn, s, x, n, **opts))
    return np.asarray(_COMPILED[key](schedule, x_T, noise))


@pytest.mark.parametrize("name, opts", SAMPLERS, ids=IDS)
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_jit_equals_eager(name, opts, kind):
    s = schedules.make_schedule(T, kind)
    x_T, noise = _inputs()
    jitted, eager = (_run(v, name, opts, s, jnp.asarray(x_T), jnp.asarray(noise)) for v in VARIANTS)
    # XLA fusion vs op by op, a few ulps a step. Cosine's clipped beta = 0.999 at t = T-1
    # makes the first step x / sqrt(0.001): |x| ~ 100, whose ulps (7.6e-6) the chain carries
    # to the end: measured 8.1e-6 (cosine), 2.4e-7 (linear).
    np.testing.assert_allclose(jitted, eager, rtol=0, atol=5e-5 if kind == "cosine" else 1e-6)


def _oracle_chain(kind: str, name: str, opts: dict, x_T: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The reverse chain in float64: the oracle's step (Ho et al., Alg. 2) or the chapter's printed update."""
    sched = oracle.schedule(kind, T)
    x = x_T.astype(np.float64)
    for i in range(T - 1, -1, -1):
        t = np.full(SHAPE[0], i)
        eps = eps_np(x, t)
        if name == "chapter":  # x <- (x - (1-abar)/sqrt(1-abar) eps) / sqrt(abar) + [i > 1] sqrt(beta) z
            abar, beta = sched["alphas_cumprod"][i], sched["betas"][i]
            x = (x - (1 - abar) / np.sqrt(1 - abar) * eps) / np.sqrt(abar) + (i > 1) * np.sqrt(beta) * noise[i]
        else:
            mean, var = oracle.p_mean_variance(sched, eps, x, t, opts["variance"], opts.get("clip_denoised", False))
            x = mean + (i > 0) * np.sqrt(var) * noise[i]
    return np.clip(x, -1, 1)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("name, opts", SAMPLERS, ids=IDS)
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_chain_matches_float64_oracle(variant, name, opts, kind):
    s = schedules.make_schedule(T, kind)
    x_T, noise = _inputs(1)
    got = _run(variant, name, opts, s, jnp.asarray(x_T), jnp.asarray(noise))
    want = _oracle_chain(kind, name, opts, x_T, noise)
    assert got.shape == SHAPE and np.all(np.abs(got) <= 1)
    # 12 fp32 steps (and clamped): measured <= 1e-6 linear; cosine's first step divides by
    # sqrt(0.001) (see test_jit_equals_eager): measured 1.3e-5
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 if kind == "cosine" else 1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("name, opts", [SAMPLERS[0], SAMPLERS[3]], ids=[IDS[0], IDS[3]])  # the noise plumbing is shared
def test_key_noise_equals_the_same_draws_pre_drawn(variant, name, opts):
    """A key means: the noise of step i is normal(fold_in(key, i)) -- the same as passing those draws."""
    s = schedules.make_schedule(T, "linear")
    x_T, _ = _inputs(2)
    key = jax.random.key(7)
    drawn = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), SHAPE, jnp.float32) for i in range(T)])
    from_key = _run(variant, name, opts, s, jnp.asarray(x_T), key)
    from_array = _run(variant, name, opts, s, jnp.asarray(x_T), drawn)
    np.testing.assert_allclose(from_key, from_array, rtol=0, atol=1e-6)
    raw_key = jax.random.PRNGKey(7)  # legacy uint32 keys work too
    assert _run(variant, name, opts, s, jnp.asarray(x_T), raw_key).shape == SHAPE


def test_wrong_noise_shape_raises():
    s = schedules.make_schedule(T, "linear")
    x_T, noise = _inputs()
    with pytest.raises(ValueError, match=r"noise must be a key or an array of shape \(12, 3, 8, 8, 2\)"):
        sampling.ddpm_sample(eps_fn, s, jnp.asarray(x_T), jnp.asarray(noise[:-1]))


def test_unknown_sampler_raises():
    with pytest.raises(ValueError, match="sampler must be one of"):
        sampling.get_sampler("euler")
    with pytest.raises(ValueError, match="sampler must be one of"):
        sampling.make_sample_fn(object(), "euler")


class _AnalyticModel:
    """Stands in for the UNet in make_sample_fn: ``apply(variables, x, t, train)``."""

    def apply(self, variables, x, t, train):
        assert train is False  # samplers run the model in eval mode (E4)
        return variables["w"] * x + (t.astype(x.dtype) / T)[:, None, None, None]


@pytest.mark.parametrize("name, opts", SAMPLERS, ids=IDS)
def test_make_sample_fn_is_the_sampler_on_the_model(name, opts):
    s = schedules.make_schedule(T, "cosine")
    x_T, noise = _inputs(3)
    sample = sampling.make_sample_fn(_AnalyticModel(), name, **opts)
    got = np.asarray(sample({"w": jnp.float32(W)}, s, jnp.asarray(x_T), jnp.asarray(noise)))
    np.testing.assert_allclose(got, _run(VARIANTS[0], name, opts, s, jnp.asarray(x_T), jnp.asarray(noise)),
                               rtol=0, atol=1e-6)
