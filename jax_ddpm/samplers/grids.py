"""Timestep grids: which of the T training timesteps a sampler visits, and the schedule respaced to them.

A grid is a strictly increasing int64 NumPy array of ``num_steps`` timesteps in ``[0, T)``,
built on the host (static: the chain's length is part of the compiled program). Row ``i`` of
a pre-drawn noise array belongs to ``grid[i]``; a chain visits the grid from the top down.

The spacings are diffusers' (0.42.1) definitions, which follow Lin et al. (2024), "Common
Diffusion Noise Schedules and Sample Steps are Flawed", Table 2:

- ``leading``: ``arange(n) * (T // n) + steps_offset`` (DDPMScheduler's and DDIMScheduler's
  default; never reaches T - 1 unless n divides T and the offset fills the gap);
- ``trailing``: ``round(arange(T, 0, -T / n)) - 1`` (always starts at T - 1);
- ``linspace``: ``round(linspace(0, T - 1, n))`` (both ends).

DPM-Solver++ (``DPMSolverMultistepScheduler.set_timesteps``) defines leading and linspace on
``n + 1`` points and drops the lowest one, since its last step goes to sigma = 0 rather than to
a grid point: :func:`dpm_solver_grid`.

``steps_offset`` is diffusers' too; diffusers adds it for ``leading`` only and silently
ignores it otherwise -- here a non-zero offset with another spacing is refused.

:func:`respaced_schedule` is the schedule of the grid's own Markov chain (Nichol & Dhariwal
2021, "Improved DDPM", section 4 and their ``respace.py``; diffusers' DDPMScheduler with
``num_inference_steps``): ``abar`` of the grid points, betas ``1 - abar_i / abar_{i-1}``.
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from ..schedules import DiffusionSchedule

SPACINGS = ("leading", "trailing", "linspace")


def check_num_steps(num_steps, timesteps: int) -> int:
    """``num_steps`` (None: all ``timesteps``) as an int in [1, T]; ValueError otherwise."""
    if num_steps is None:
        return int(timesteps)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= timesteps:
        raise ValueError(f"num_steps must be an integer from 1 to the schedule's T = {timesteps}, got {num_steps!r}")
    return int(num_steps)


def check_spacing(spacing: str, steps_offset) -> tuple[str, int]:
    """``(spacing, steps_offset)`` if ``spacing`` is in SPACINGS and the offset a non-negative int it uses."""
    if spacing not in SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0:
        raise ValueError(f"steps_offset must be a non-negative integer, got {steps_offset!r}")
    if steps_offset and spacing != "leading":
        raise ValueError(f"steps_offset applies to timestep_spacing 'leading' only (diffusers ignores it for "
                         f"{spacing!r}), got steps_offset={steps_offset} with {spacing!r}")
    return spacing, int(steps_offset)


def _checked(grid: np.ndarray, timesteps: int, what: str) -> np.ndarray:
    grid = np.sort(np.asarray(grid, np.int64))
    if grid[-1] >= timesteps:
        raise ValueError(f"{what} reaches timestep {int(grid[-1])}, beyond the schedule's T - 1 = {timesteps - 1}: "
                         f"lower steps_offset or num_steps")
    if np.any(np.diff(grid) == 0):
        raise ValueError(f"{what} repeats timesteps ({grid.tolist()}): use fewer steps or another spacing")
    return grid


def _trailing(T: int, n: int) -> np.ndarray:
    """``round(T - k T / n) - 1``, k = 0..n-1: diffusers' ``round(arange(T, 0, -T / n)) - 1`` (the same
    floating-point values), always n points. diffusers' ``arange`` yields n + 1 points when
    ``T / (T / n)`` rounds above n (T = 17, n = 7, and 27044 of the (T, n <= T <= 1000) pairs),
    the last one -1, which indexes ``alphas_cumprod[-1]``: that extra step is not taken here."""
    return np.round(T - np.arange(n) * (T / n)).astype(np.int64) - 1


def timestep_grid(timesteps: int, num_steps: int | None = None, spacing: str = "leading",
                  steps_offset: int = 0) -> np.ndarray:
    """The ``num_steps`` timesteps (ascending, int64) of DDPMScheduler / DDIMScheduler ``set_timesteps``.

    ``num_steps`` None or T with offset 0 gives ``arange(T)`` for every spacing.

    Raises:
      ValueError: ``num_steps`` not in [1, T], an unknown spacing, an offset it does not
        use, a grid that leaves [0, T) or repeats a timestep.
    """
    T = int(timesteps)
    n = check_num_steps(num_steps, T)
    spacing, offset = check_spacing(spacing, steps_offset)
    if spacing == "leading":
        grid = np.arange(n, dtype=np.int64) * (T // n) + offset
    elif spacing == "trailing":
        grid = _trailing(T, n)
    else:
        grid = np.linspace(0, T - 1, n).round().astype(np.int64)
    return _checked(grid, T, f"the {spacing} grid of {n} steps")


def dpm_solver_grid(timesteps: int, num_steps: int | None = None, spacing: str = "linspace",
                    steps_offset: int = 0) -> np.ndarray:
    """The timesteps (ascending) of DPMSolverMultistepScheduler ``set_timesteps`` (lambda_min_clipped = -inf).

    leading: ``arange(n + 1) * (T // (n + 1)) + steps_offset`` without its lowest point;
    linspace: ``round(linspace(0, T - 1, n + 1))`` without 0; trailing as :func:`timestep_grid`.
    """
    T = int(timesteps)
    n = check_num_steps(num_steps, T)
    spacing, offset = check_spacing(spacing, steps_offset)
    if spacing == "leading":
        grid = (np.arange(n + 1, dtype=np.int64) * (T // (n + 1)))[1:] + offset
    elif spacing == "linspace":
        grid = np.linspace(0, T - 1, n + 1).round().astype(np.int64)[1:]
    else:
        grid = _trailing(T, n)
    return _checked(grid, T, f"the {spacing} grid of {n} DPM-Solver steps")


def is_full(grid: np.ndarray, timesteps: int) -> bool:
    """Whether ``grid`` is every timestep 0 .. T-1 (the chain is today's T-step one)."""
    return len(grid) == timesteps and bool(np.all(grid == np.arange(timesteps)))


def grid_abar(schedule: DiffusionSchedule, grid: np.ndarray):
    """``(abar, 1 - abar)`` at the grid points and at each point's predecessor (abar = 1 before the first).

    ``1 - abar`` is taken as ``sqrt_one_minus_alphas_cumprod ** 2``, which keeps its relative
    accuracy at small t (``1 - fl32(abar)`` would cancel: 3e-8 absolute on 1e-4 at t = 0).
    Returns four float32 arrays [n]: abar, one_minus_abar, abar_prev, one_minus_abar_prev.
    """
    idx = jnp.asarray(grid, jnp.int32)
    abar = schedule.alphas_cumprod[idx]
    om = jnp.square(schedule.sqrt_one_minus_alphas_cumprod[idx])
    abar_prev = jnp.concatenate([jnp.ones((1,), abar.dtype), abar[:-1]])
    om_prev = jnp.concatenate([jnp.zeros((1,), om.dtype), om[:-1]])
    return abar, om, abar_prev, om_prev


def one_minus_ratio(abar, om, abar_prev, om_prev):
    """``1 - abar_t / abar_s`` (the respaced beta) in float32 without cancellation.

    ``1 - r`` (r = abar_t / abar_s, rounded to 2 ulp) loses ``ulp / (1 - r)`` where abar is
    near 1 (small t); ``((1 - abar_t) - (1 - abar_s)) / abar_s`` loses ``ulp(1 - abar) /
    (abar_s - abar_t)`` where abar is near 0 (the top of a linear T = 1000 grid: 3e-3 relative
    at t = 980). The first is taken where ``abar_t + abar_s < 1``, the second elsewhere; each
    is then within a few ulp of the float64 value.
    """
    return jnp.where(abar + abar_prev < 1.0, 1.0 - abar / abar_prev, (om - om_prev) / abar_prev)


def respaced_schedule(schedule: DiffusionSchedule, grid: np.ndarray) -> DiffusionSchedule:
    """The schedule of the chain over ``grid``: entry i is the step grid[i] -> grid[i-1] (-> x_0 for i = 0).

    ``beta_i = 1 - abar_i / abar_{i-1}`` (:func:`one_minus_ratio`), and every other array from it
    as ``schedule_arrays`` does, in the
    schedule's dtype inside the program (the schedule may be traced). The full grid returns
    ``schedule`` itself, so a T-step chain is today's to the bit.
    """
    if is_full(grid, schedule.timesteps):
        return schedule
    idx = jnp.asarray(grid, jnp.int32)
    abar, om, abar_prev, om_prev = grid_abar(schedule, grid)
    betas = one_minus_ratio(abar, om, abar_prev, om_prev)
    alphas = abar / abar_prev
    post_var = betas * om_prev / om
    return DiffusionSchedule(
        betas=betas, alphas=alphas, alphas_cumprod=abar, alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=schedule.sqrt_alphas_cumprod[idx],
        sqrt_one_minus_alphas_cumprod=schedule.sqrt_one_minus_alphas_cumprod[idx],
        sqrt_recip_alphas_cumprod=schedule.sqrt_recip_alphas_cumprod[idx],
        sqrt_recipm1_alphas_cumprod=schedule.sqrt_recipm1_alphas_cumprod[idx],
        posterior_variance=post_var,
        posterior_log_variance_clipped=jnp.log(jnp.concatenate([post_var[1:2], post_var[1:]]))
        if len(grid) > 1 else jnp.log(post_var),
        posterior_mean_coef1=betas * jnp.sqrt(abar_prev) / om,
        posterior_mean_coef2=om_prev * jnp.sqrt(alphas) / om,
    )


__all__ = ["SPACINGS", "check_num_steps", "check_spacing", "dpm_solver_grid", "grid_abar", "is_full",
           "one_minus_ratio", "respaced_schedule", "timestep_grid"]
