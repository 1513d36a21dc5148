"""Ancestral samplers, each one ``lax.scan`` over the timesteps (jit the caller once).

Every sampler has the same signature (as in k-diffusion)::

    sampler(eps_fn, schedule, x_T, noise, **options) -> x_0 in [-1, 1]

``eps_fn(x, t) -> eps`` is the denoiser (``t`` an int32 [B] array). ``noise`` is either a
PRNG key (the noise for step ``i`` is ``normal(fold_in(key, i))``, drawn inside the
program) or a pre-drawn ``[T, *x_T.shape]`` array whose row ``i`` is added at step ``i``
(for parity with torch_ref, which takes the same array).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from .diffusion import _at, p_mean_variance
from .schedules import DiffusionSchedule

EpsFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
SAMPLERS = ("ddpm", "chapter")


def _is_key(noise) -> bool:
    if jax.dtypes.issubdtype(noise.dtype, jax.dtypes.prng_key):
        return True
    return noise.dtype == jnp.uint32 and noise.ndim == 1


def _scan(step: Callable, x_T: jnp.ndarray, noise, timesteps: int) -> jnp.ndarray:
    """Runs ``x = step(x, i, z_i)`` for i = T-1 ... 0 in one scan."""
    ts = jnp.arange(timesteps - 1, -1, -1, dtype=jnp.int32)
    if _is_key(noise):
        key = noise

        def body(x, i):
            z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
            return step(x, i, z), None

        x, _ = jax.lax.scan(body, x_T, ts)
    else:
        if noise.shape != (timesteps,) + x_T.shape:
            raise ValueError(f"noise must be a key or an array of shape {(timesteps,) + x_T.shape}, got {noise.shape}")

        def body(x, inp):
            i, z = inp
            return step(x, i, z), None

        x, _ = jax.lax.scan(body, x_T, (ts, noise[::-1]))
    return jnp.clip(x, -1.0, 1.0)


def ddpm_sample(eps_fn: EpsFn, schedule: DiffusionSchedule, x_T: jnp.ndarray, noise,
                variance: str = "beta_tilde", clip_denoised: bool = False) -> jnp.ndarray:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2).

    ``x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z``, with
    ``sigma_t^2 = beta_t`` (``variance='beta'``) or the posterior variance
    (``'beta_tilde'``), and no noise at the last step. ``clip_denoised`` clips the
    predicted x_0 to [-1, 1] at every step. The result is clipped to [-1, 1].
    """

    def step(x, i, z):
        t = jnp.full((x.shape[0],), i, jnp.int32)
        mean, var = p_mean_variance(schedule, eps_fn(x, t), x, t, variance, clip_denoised)
        return mean + jnp.where(i > 0, jnp.sqrt(var), 0.0) * z

    return _scan(step, x_T, noise, schedule.timesteps)


def chapter_sample(eps_fn: EpsFn, schedule: DiffusionSchedule, x_T: jnp.ndarray, noise) -> jnp.ndarray:
    """The chapter's printed loop, mirrored for comparison only (errata E2, E3).

    ``x = (x - (1 - abar_t) / sqrt(1 - abar_t) eps) / sqrt(abar_t)``, plus
    ``sqrt(beta_t) z`` only when ``i > 1``: each step jumps to the predicted x_0.
    """

    def step(x, i, z):
        t = jnp.full((x.shape[0],), i, jnp.int32)
        alpha = _at(schedule.alphas_cumprod, t, x)
        beta = _at(schedule.betas, t, x)
        x = (1 / jnp.sqrt(alpha)) * (x - ((1 - alpha) / jnp.sqrt(1 - alpha)) * eps_fn(x, t))
        return x + jnp.where(i > 1, jnp.sqrt(beta), 0.0) * z

    return _scan(step, x_T, noise, schedule.timesteps)


def get_sampler(name: str) -> Callable:
    if name == "ddpm":
        return ddpm_sample
    if name == "chapter":
        return chapter_sample
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")


def model_eps_fn(model, variables) -> EpsFn:
    """The UNet in eval mode (running BatchNorm statistics) as an ``eps_fn``."""
    return lambda x, t: model.apply(variables, x, t, train=False)


BN_STATS = ("running", "batch")


def model_eps_fn_batch_stats(model, variables) -> EpsFn:
    """The UNet normalising with the statistics of the batch being sampled, as an ``eps_fn``.

    BatchNorm runs in training mode over the whole sample batch (all images at the same
    ``t``); the running statistics are neither used nor changed. The chapter's U-Net applies
    one BatchNorm to two convolutions (erratum E5), so its running statistics are a blend of
    two layers' and eval mode normalises both layers wrongly; batch statistics avoid that,
    but each image then depends on the rest of the batch (use batches of 16 or more).
    """

    def eps_fn(x, t):
        eps, _ = model.apply(variables, x, t, train=True, mutable=["batch_stats"])
        return eps

    return eps_fn


def make_sample_fn(model, sampler: str = "ddpm", bn_stats: str = "running", **options) -> Callable:
    """Returns ``sample(variables, schedule, x_T, noise) -> x_0``, jitted as one program.

    ``bn_stats``: ``'running'`` (eval mode, :func:`model_eps_fn`) or ``'batch'``
    (:func:`model_eps_fn_batch_stats`).
    """
    fn = get_sampler(sampler)
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
    make_eps_fn = model_eps_fn if bn_stats == "running" else model_eps_fn_batch_stats

    @jax.jit
    def sample(variables, schedule, x_T, noise):
        return fn(make_eps_fn(model, variables), schedule, x_T, noise, **options)

    return sample
