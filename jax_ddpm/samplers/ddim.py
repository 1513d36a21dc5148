"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12 and 16)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..parameterization import check_prediction, to_eps, to_x0
from ..schedules import DiffusionSchedule
from ._loop import ModelFn, check_flag, check_noise, reject_unknown, scan_grid
from .grids import grid_abar, one_minus_ratio, timestep_grid

OPTIONS = ("eta", "timestep_spacing", "steps_offset", "clip_denoised")


def check_eta(eta) -> float:
    """``eta`` as a float if it is a finite number >= 0; ValueError otherwise."""
    if isinstance(eta, (bool, np.bool_)) or not isinstance(eta, (int, float, np.integer, np.floating)) \
            or not 0 <= float(eta) < float("inf"):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    return float(eta)


def ddim_grid(timesteps: int, num_steps: int | None = None, *, prediction: str = "eps", eta: float = 0.0,
              timestep_spacing: str = "leading", steps_offset: int = 0, clip_denoised: bool = False, **unknown):
    """Checks the options (ValueError, one sentence) and returns the grid [num_steps] (ascending)."""
    reject_unknown("ddim", unknown, OPTIONS)
    check_prediction(prediction)
    check_eta(eta)
    check_flag("clip_denoised", clip_denoised)
    return timestep_grid(timesteps, num_steps, timestep_spacing, steps_offset)


def ddim_sample(model_fn: ModelFn, schedule: DiffusionSchedule, x_T: jnp.ndarray, noise, *,
                prediction: str = "eps", num_steps: int | None = None, eta: float = 0.0,
                timestep_spacing: str = "leading", steps_offset: int = 0, clip_denoised: bool = False,
                **unknown) -> jnp.ndarray:
    """DDIM: from grid point t to the next one below, s (Song et al. 2021, eq. 12)::

        x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
        sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)      (eq. 16)

    with abar_s = 1 after the lowest grid point (diffusers' ``set_alpha_to_one=True``), so the
    last step returns x0_hat and adds no noise. ``eta`` 0 is deterministic, 1 is the DDPM
    posterior (``ddpm`` with ``beta_tilde`` on the same grid). ``clip_denoised`` clips x0_hat
    to [-1, 1] and takes eps_hat from the clipped x0_hat (so the step stays on the line
    through x_t; diffusers' ``clip_sample`` with ``use_clipped_model_output=True``). The
    grid is :func:`~jax_ddpm.samplers.grids.timestep_grid` (diffusers' spacings, default
    ``leading`` as DDIMScheduler's). The result is clipped to [-1, 1].

    Paper vs diffusers: DDIMScheduler.step takes ``prev_t = t - T // n`` whatever the
    spacing. That is the next grid point for ``leading`` and for ``trailing`` when n divides
    T, but not for ``linspace`` nor ``trailing`` otherwise (T = 1000, n = 50, linspace: 19 of
    the 50 steps land between grid points, t = 41 going to 21 where the grid's next point is
    20; the next step starts from 20 all the same). Here every step goes to the next grid point, as the paper's
    sub-sequence tau does (section 4.2); tests/test_samplers.py shows the difference.

    ``noise``: a key or ``[num_steps, *x_T.shape]`` (row i: the grid's i-th timestep; row 0
    is unused, as the last step has sigma = 0). Raises ValueError for a bad option.
    """
    grid = ddim_grid(schedule.timesteps, num_steps, prediction=prediction, eta=eta,
                     timestep_spacing=timestep_spacing, steps_offset=steps_offset, clip_denoised=clip_denoised,
                     **unknown)
    eta, clip_denoised = check_eta(eta), bool(clip_denoised)
    check_noise(noise, len(grid), x_T.shape)  # before any array is built
    idx = jnp.asarray(grid, jnp.int32)
    abar, om, abar_prev, om_prev = grid_abar(schedule, grid)
    # s = the next grid point. sigma^2 = eta^2 (1 - abar_s) q, q = (1 - abar_t / abar_s) / (1 - abar_t)
    # (one_minus_ratio: no cancellation), and 1 - abar_s - sigma^2 = (1 - abar_s) ((1 - eta^2) + eta^2 (1 - q))
    # with 1 - q = abar_t (1 - abar_s) / (abar_s (1 - abar_t)) >= 0: the direct difference cancels where
    # abar_t << abar_s (cosine's top step: 2e-4 instead of 1e-5 at T = 100, eta = 1)
    var = (eta ** 2) * om_prev * one_minus_ratio(abar, om, abar_prev, om_prev) / om
    keep = (1.0 - eta ** 2) + (eta ** 2) * (abar * om_prev) / (abar_prev * om)
    per_step = {"alpha": schedule.sqrt_alphas_cumprod[idx], "sigma": schedule.sqrt_one_minus_alphas_cumprod[idx],
                "c_x0": jnp.sqrt(abar_prev), "c_eps": jnp.sqrt(jnp.maximum(om_prev * keep, 0.0)),
                "c_z": jnp.sqrt(var)}

    def step(x, row, z):
        t = jnp.full((x.shape[0],), row["t"], jnp.int32)
        c = {k: v.astype(x.dtype) for k, v in row.items() if k not in ("i", "t")}
        out = model_fn(x, t)
        x0 = to_x0(x, out, c["alpha"], c["sigma"], prediction)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = to_eps(x, x0, c["alpha"], c["sigma"], "x0")
        else:
            eps = to_eps(x, out, c["alpha"], c["sigma"], prediction)
        x = c["c_x0"] * x0 + c["c_eps"] * eps
        return x + c["c_z"] * z if eta else x

    x = scan_grid(step, x_T, noise, grid, x_T.shape, x_T.dtype, per_step)
    return jnp.clip(x, -1.0, 1.0)
