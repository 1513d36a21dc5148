"""Samplers: one module per algorithm, one signature, one registry.

Every sampler has the same signature (as in k-diffusion)::

    sampler(model_fn, schedule, x_T, noise, *, prediction="eps", num_steps=None, **options)
        -> x_0 in [-1, 1]

``model_fn(x, t) -> output`` is the network (``t`` an int32 [B] array); ``prediction`` says
whether its output is eps, x0 or v (:mod:`jax_ddpm.parameterization`). ``num_steps`` None
runs all T steps; fewer run a grid of that many timesteps (:mod:`.grids`). ``noise`` is a PRNG
key or a pre-drawn ``[num_steps, *x_T.shape]`` array whose row i is the noise of the grid's
i-th timestep in ascending order (:mod:`._loop`). Each sampler runs as one ``lax.scan`` over
its static grid: jit the caller once per (shape, num_steps). Options a sampler does not have,
and bad values, raise ValueError with one sentence (:func:`check_options` checks them without
running anything).

- ``ddpm``: Ho et al. 2020, Algorithm 2, respaced as Nichol & Dhariwal 2021; options
  ``variance`` (beta_tilde), ``clip_denoised`` (False), ``timestep_spacing`` (leading),
  ``steps_offset`` (0);
- ``ddim``: Song et al. 2021, eq. 12 / 16; ``eta`` (0), ``timestep_spacing`` (leading),
  ``steps_offset`` (0), ``clip_denoised`` (False);
- ``dpmpp_2m``: Lu et al. 2022, DPM-Solver++(2M); ``timestep_spacing`` (linspace),
  ``steps_offset`` (0), ``lower_order_final`` (True), ``final_sigmas_type`` (zero);
- ``chapter``: the chapter's printed loop (errata E2, E3); no options, all T steps.

A new sampler is one module and one entry in ``_SAMPLERS`` (and ``_GRIDS``) below.
"""
from __future__ import annotations

from typing import Callable

from ._loop import EpsFn, ModelFn, is_key, scan_grid, scan_timesteps
from .chapter import chapter_grid, chapter_sample
from .ddim import ddim_grid, ddim_sample
from .ddpm import ddpm_grid, ddpm_sample
from .dpmpp_2m import dpmpp_2m_grid, dpmpp_2m_sample
from .grids import SPACINGS, dpm_solver_grid, respaced_schedule, timestep_grid

_SAMPLERS: dict[str, Callable] = {"ddpm": ddpm_sample, "ddim": ddim_sample, "dpmpp_2m": dpmpp_2m_sample,
                                  "chapter": chapter_sample}
SAMPLERS: tuple[str, ...] = tuple(_SAMPLERS)


# name -> grid(T, num_steps, *, prediction, **options): checks the options, returns the timesteps visited
_GRIDS: dict[str, Callable] = {"ddpm": ddpm_grid, "ddim": ddim_grid, "dpmpp_2m": dpmpp_2m_grid,
                               "chapter": chapter_grid}


def get_sampler(name: str) -> Callable:
    """The sampler registered as ``name``. Raises ValueError naming the known ones."""
    try:
        return _SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}") from None


def sampler_grid(name: str, timesteps: int, *, prediction: str = "eps", num_steps: int | None = None, **options):
    """The timesteps (ascending int64 [num_steps]) sampler ``name`` visits with these settings.

    Raises ValueError (one sentence) for an unknown sampler, option or value -- what the
    sampler itself would raise -- without building or running anything.
    """
    get_sampler(name)
    return _GRIDS[name](timesteps, num_steps, prediction=prediction, **options)


def check_options(name: str, timesteps: int, *, prediction: str = "eps", num_steps: int | None = None,
                  **options) -> None:
    """ValueError (one sentence) unless sampler ``name`` accepts these settings for a T-step schedule."""
    sampler_grid(name, timesteps, prediction=prediction, num_steps=num_steps, **options)


__all__ = ["EpsFn", "ModelFn", "SAMPLERS", "SPACINGS", "chapter_sample", "check_options", "ddim_sample",
           "ddpm_sample", "dpm_solver_grid", "dpmpp_2m_sample", "get_sampler", "is_key", "respaced_schedule",
           "sampler_grid", "scan_grid", "scan_timesteps", "timestep_grid"]
