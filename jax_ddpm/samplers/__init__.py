"""Samplers: one module per algorithm, one signature, one registry.

Every sampler has the same signature (as in k-diffusion)::

    sampler(eps_fn, schedule, x_T, noise, **options) -> x_0 in [-1, 1]

``eps_fn(x, t) -> eps`` is the denoiser (``t`` an int32 [B] array); ``noise`` is a PRNG key
or a pre-drawn ``[T, *x_T.shape]`` array (``_loop.scan_timesteps``). Each sampler runs as
one ``lax.scan``: jit the caller once. A new sampler is one module and one entry in
``_SAMPLERS`` below.
"""
from __future__ import annotations

from typing import Callable

from ._loop import EpsFn, is_key, scan_timesteps
from .chapter import chapter_sample
from .ddpm import ddpm_sample

_SAMPLERS: dict[str, Callable] = {"ddpm": ddpm_sample, "chapter": chapter_sample}
SAMPLERS: tuple[str, ...] = tuple(_SAMPLERS)


def get_sampler(name: str) -> Callable:
    """The sampler registered as ``name``. Raises ValueError naming the known ones."""
    try:
        return _SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}") from None


__all__ = ["EpsFn", "SAMPLERS", "chapter_sample", "ddpm_sample", "get_sampler", "is_key", "scan_timesteps"]
