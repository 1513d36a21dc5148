"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Algorithm 2: multistep second order, data prediction, midpoint)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..parameterization import check_prediction, to_x0
from ..schedules import DiffusionSchedule
from ._loop import ModelFn, check_flag, check_noise, reject_unknown, scan_grid
from .grids import dpm_solver_grid

OPTIONS = ("timestep_spacing", "steps_offset", "lower_order_final", "final_sigmas_type", "clip_denoised")
FINAL_SIGMAS = ("zero", "sigma_min")
LOWER_ORDER_FINAL_BELOW = 15  # diffusers: lower_order_final applies to grids of fewer steps


def dpmpp_2m_grid(timesteps: int, num_steps: int | None = None, *, prediction: str = "eps",
                  timestep_spacing: str = "linspace", steps_offset: int = 0, lower_order_final: bool = True,
                  final_sigmas_type: str = "zero", clip_denoised: bool = False, **unknown):
    """Checks the options (ValueError, one sentence) and returns the grid [num_steps] (ascending)."""
    reject_unknown("dpmpp_2m", unknown, OPTIONS)
    check_prediction(prediction)
    check_flag("lower_order_final", lower_order_final)
    check_flag("clip_denoised", clip_denoised)
    if final_sigmas_type not in FINAL_SIGMAS:
        raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS}, got {final_sigmas_type!r}")
    return dpm_solver_grid(timesteps, num_steps, timestep_spacing, steps_offset)


def second_order_steps(num_steps: int, lower_order_final: bool = True, final_sigmas_type: str = "zero") -> np.ndarray:
    """bool [num_steps], ascending like the grid: which steps are second order.

    The first step (from the top of the grid) has no previous x0 and is first order; the last
    one is first order when it goes to sigma = 0 (``final_sigmas_type='zero'``: it returns the
    x0 prediction, as lambda = inf leaves nothing to extrapolate) or, with
    ``lower_order_final``, on grids of fewer than 15 steps -- diffusers' rule.
    """
    second = np.ones(num_steps, bool)
    second[-1] = False  # the first step taken: grid[n-1]
    if final_sigmas_type == "zero" or (lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW):
        second[0] = False
    return second


def dpmpp_2m_sample(model_fn: ModelFn, schedule: DiffusionSchedule, x_T: jnp.ndarray, noise, *,
                    prediction: str = "eps", num_steps: int | None = None, timestep_spacing: str = "linspace",
                    steps_offset: int = 0, lower_order_final: bool = True, final_sigmas_type: str = "zero",
                    clip_denoised: bool = False, **unknown) -> jnp.ndarray:
    """DPM-Solver++(2M): with ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``, ``lambda =
    log(alpha / sigma)``, from grid point s to t (h = lambda_t - lambda_s) with the data
    predictions m0 (at s) and m1 (at the point before s, h_0 = lambda_s - lambda_{s-1})::

        x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) (m0 + (m0 - m1) / (2 r)),  r = h_0 / h

    (Lu et al. 2022, Algorithm 2; diffusers' ``solver_type='midpoint'``), first order
    (``r`` term dropped: DDIM with eta 0) where :func:`second_order_steps` says. The last step
    goes to ``sigma = 0`` (``final_sigmas_type='zero'``: x_0 is the last x0 prediction) or to
    the sigma of t = 0 (``'sigma_min'``). ``clip_denoised`` clips each data prediction to
    [-1, 1] before it is used and kept as the next step's m1 (diffusers' ``thresholding=True``
    with ``sample_max_value=1.0``, where its dynamic threshold s is clamped to 1: plain
    clipping; off by default, as diffusers'). Deterministic: ``noise`` (a key or ``[num_steps,
    *x_T.shape]``, for the shared signature) is checked and not used. The grid is
    :func:`~jax_ddpm.samplers.grids.dpm_solver_grid` (default ``linspace``, as diffusers').

    h and the coefficients are computed from the schedule's sqrt(abar) and sqrt(1 - abar)
    (each rounded once from float64): ``h = log((alpha_t sigma_s) / (sigma_t alpha_s))`` and
    ``1 - e^{-h} = -expm1(-h)``, where diffusers goes through float32 sigmas of a float32
    cumprod. The result is clipped to [-1, 1].
    """
    grid = dpmpp_2m_grid(schedule.timesteps, num_steps, prediction=prediction, timestep_spacing=timestep_spacing,
                         steps_offset=steps_offset, lower_order_final=lower_order_final,
                         final_sigmas_type=final_sigmas_type, clip_denoised=clip_denoised, **unknown)
    clip_denoised = bool(clip_denoised)
    n = len(grid)
    check_noise(noise, len(grid), x_T.shape)  # before any array is built
    idx = jnp.asarray(grid, jnp.int32)
    alpha, sigma = schedule.sqrt_alphas_cumprod[idx], schedule.sqrt_one_minus_alphas_cumprod[idx]
    # the target of step i is grid point i - 1; step 0 goes to sigma = 0 (or to t = 0's sigma)
    if final_sigmas_type == "zero":
        end_alpha, end_sigma = jnp.ones((1,), alpha.dtype), jnp.zeros((1,), sigma.dtype)
    else:
        end_alpha, end_sigma = schedule.sqrt_alphas_cumprod[:1], schedule.sqrt_one_minus_alphas_cumprod[:1]
    alpha_to = jnp.concatenate([end_alpha, alpha[:-1]])
    sigma_to = jnp.concatenate([end_sigma, sigma[:-1]])
    h = jnp.log((alpha_to * sigma) / (sigma_to * alpha))  # [n]; inf at a final sigma = 0
    a = sigma_to / sigma
    b = alpha_to * -jnp.expm1(-h)
    second = second_order_steps(n, bool(lower_order_final), final_sigmas_type)
    # r_i = h_{i+1} / h_i: the previous step's h over this one's (the previous step is i + 1)
    h_before = jnp.concatenate([h[1:], jnp.ones((1,), h.dtype)])
    c = jnp.where(jnp.asarray(second), 0.5 * b * h / jnp.where(jnp.asarray(second), h_before, 1.0), 0.0)
    per_step = {"alpha": alpha, "sigma": sigma, "a": a, "b": b, "c": c}

    def step(carry, row, z):
        del z
        x, m_prev = carry
        t = jnp.full((x.shape[0],), row["t"], jnp.int32)
        k = {name: v.astype(x.dtype) for name, v in row.items() if name not in ("i", "t")}
        m0 = to_x0(x, model_fn(x, t), k["alpha"], k["sigma"], prediction)
        if clip_denoised:
            m0 = jnp.clip(m0, -1.0, 1.0)
        return k["a"] * x + k["b"] * m0 + k["c"] * (m0 - m_prev), m0

    x, _ = scan_grid(step, (x_T, jnp.zeros_like(x_T)), noise, grid, x_T.shape, x_T.dtype, per_step)
    return jnp.clip(x, -1.0, 1.0)
