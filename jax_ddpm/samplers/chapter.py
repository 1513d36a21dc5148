"""The chapter's printed sampling loop (errata E2, E3), kept for comparison only."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..diffusion import _at
from ..parameterization import check_prediction, predict_eps
from ..schedules import DiffusionSchedule
from ._loop import ModelFn, reject_unknown, scan_timesteps


def chapter_grid(timesteps: int, num_steps: int | None = None, *, prediction: str = "eps", **unknown) -> np.ndarray:
    """Checks the settings (ValueError, one sentence): no options, all T steps. Returns arange(T)."""
    reject_unknown("chapter", unknown, ())
    check_prediction(prediction)
    if num_steps is not None and num_steps != timesteps:
        raise ValueError(f"the chapter sampler runs all T = {timesteps} steps, got num_steps={num_steps!r}")
    return np.arange(timesteps)


def chapter_sample(eps_fn: ModelFn, schedule: DiffusionSchedule, x_T: jnp.ndarray, noise, *,
                   prediction: str = "eps", num_steps: int | None = None, **unknown) -> jnp.ndarray:
    """The chapter's printed loop, mirrored for comparison only (errata E2, E3).

    ``x = (x - (1 - abar_t) / sqrt(1 - abar_t) eps) / sqrt(abar_t)``, plus
    ``sqrt(beta_t) z`` only when ``i > 1``: each step jumps to the predicted x_0. It runs all
    T steps (``num_steps`` None or T) and has no options; an x0 or v model's output is turned
    into eps first (:mod:`jax_ddpm.parameterization`).
    """
    chapter_grid(schedule.timesteps, num_steps, prediction=prediction, **unknown)

    def step(x, i, z):
        t = jnp.full((x.shape[0],), i, jnp.int32)
        alpha = _at(schedule.alphas_cumprod, t, x)
        beta = _at(schedule.betas, t, x)
        out = eps_fn(x, t)
        eps = out if prediction == "eps" else predict_eps(schedule, x, t, out, prediction)
        x = (1 / jnp.sqrt(alpha)) * (x - ((1 - alpha) / jnp.sqrt(1 - alpha)) * eps)
        return x + jnp.where(i > 1, jnp.sqrt(beta), 0.0) * z

    return scan_timesteps(step, x_T, noise, schedule.timesteps)
