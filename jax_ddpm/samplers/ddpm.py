"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) over all T timesteps."""
from __future__ import annotations

import jax.numpy as jnp

from ..diffusion import p_mean_variance
from ..schedules import DiffusionSchedule
from ._loop import EpsFn, scan_timesteps


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

    return scan_timesteps(step, x_T, noise, schedule.timesteps)
