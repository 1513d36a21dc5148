"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), over all T timesteps or a respaced grid."""
from __future__ import annotations

import jax.numpy as jnp

from ..diffusion import VARIANCES, p_mean_variance_pred
from ..parameterization import check_prediction
from ..schedules import DiffusionSchedule
from ._loop import ModelFn, check_flag, check_noise, reject_unknown, scan_grid, scan_timesteps
from .grids import is_full, respaced_schedule, timestep_grid

OPTIONS = ("variance", "clip_denoised", "timestep_spacing", "steps_offset")


def ddpm_grid(timesteps: int, num_steps: int | None = None, *, prediction: str = "eps",
              variance: str = "beta_tilde", clip_denoised: bool = False, timestep_spacing: str = "leading",
              steps_offset: int = 0, **unknown):
    """Checks the options (ValueError, one sentence) and returns the grid [num_steps] (ascending)."""
    reject_unknown("ddpm", unknown, OPTIONS)
    check_prediction(prediction)
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    check_flag("clip_denoised", clip_denoised)
    return timestep_grid(timesteps, num_steps, timestep_spacing, steps_offset)


def ddpm_sample(model_fn: ModelFn, schedule: DiffusionSchedule, x_T: jnp.ndarray, noise,
                variance: str = "beta_tilde", clip_denoised: bool = False, *, prediction: str = "eps",
                num_steps: int | None = None, timestep_spacing: str = "leading", steps_offset: int = 0,
                **unknown) -> jnp.ndarray:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), optionally respaced.

    ``x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z``, with
    ``sigma_t^2 = beta_t`` (``variance='beta'``, diffusers' ``fixed_large``) or the posterior
    variance (``'beta_tilde'``, ``fixed_small``), and no noise at the last step. For an
    ``x0``/``v`` model, and with ``clip_denoised`` (the predicted x_0 clipped to [-1, 1] at
    every step), the mean is the posterior mean of the predicted x_0. The result is clipped
    to [-1, 1].

    ``num_steps`` < T runs the chain of the grid ``timestep_grid(T, num_steps,
    timestep_spacing, steps_offset)`` (diffusers' spacings, default ``leading`` as
    DDPMScheduler's) with the respaced betas ``1 - abar_i / abar_{i-1}`` of Nichol & Dhariwal
    (2021), :func:`~jax_ddpm.samplers.grids.respaced_schedule` -- what DDPMScheduler does with
    ``num_inference_steps``. One difference: DDPMScheduler adds noise whenever the timestep is
    > 0, so a grid whose lowest point is above 0 (trailing, or an offset) gets noise at its
    last step too (``beta_tilde``: variance clamped to 1e-20; ``beta``: ``1 - abar_{t_0}``);
    here the last step never adds noise, as in Algorithm 2. ``num_steps`` None (or T with
    offset 0, any spacing) is the T-step chain, the same program as before respacing existed.

    ``noise``: a key or ``[num_steps, *x_T.shape]`` (row i: the grid's i-th timestep; row 0
    is unused). Raises ValueError for a bad option (:func:`ddpm_grid`).
    """
    grid = ddpm_grid(schedule.timesteps, num_steps, prediction=prediction, variance=variance,
                     clip_denoised=clip_denoised, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                     **unknown)
    clip_denoised = bool(clip_denoised)
    check_noise(noise, len(grid), x_T.shape)  # before any array is built
    if is_full(grid, schedule.timesteps):
        def step(x, i, z):
            t = jnp.full((x.shape[0],), i, jnp.int32)
            mean, var = p_mean_variance_pred(schedule, model_fn(x, t), x, t, variance, clip_denoised, prediction)
            return mean + jnp.where(i > 0, jnp.sqrt(var), 0.0) * z

        return scan_timesteps(step, x_T, noise, schedule.timesteps)

    respaced = respaced_schedule(schedule, grid)

    def respaced_step(x, row, z):
        i = jnp.full((x.shape[0],), row["i"], jnp.int32)  # index into the respaced schedule
        t = jnp.full((x.shape[0],), row["t"], jnp.int32)  # the timestep the model sees
        mean, var = p_mean_variance_pred(respaced, model_fn(x, t), x, i, variance, clip_denoised, prediction)
        return mean + jnp.where(row["i"] > 0, jnp.sqrt(var), 0.0) * z

    x = scan_grid(respaced_step, x_T, noise, grid, x_T.shape, x_T.dtype)
    return jnp.clip(x, -1.0, 1.0)
