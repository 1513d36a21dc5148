"""The chapter's printed sampling loop (errata E2, E3), kept for comparison only."""
from __future__ import annotations

import jax.numpy as jnp

from ..diffusion import _at
from ..schedules import DiffusionSchedule
from ._loop import EpsFn, scan_timesteps


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

    return scan_timesteps(step, x_T, noise, schedule.timesteps)
