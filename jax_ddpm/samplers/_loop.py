"""The timestep loop every sampler shares: one ``lax.scan`` over a grid, fed a key or pre-drawn noise.

``noise`` is either a PRNG key (the noise for timestep ``i`` is ``normal(fold_in(key, i))``,
drawn inside the program) or a pre-drawn ``[T, *x_T.shape]`` array whose row ``i`` is the
noise of timestep ``i`` (for parity with torch_ref, which takes the same array).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

EpsFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def is_key(noise) -> bool:
    """A typed PRNG key or a raw ``uint32[2]``-style key (not a noise array)."""
    if jax.dtypes.issubdtype(noise.dtype, jax.dtypes.prng_key):
        return True
    return noise.dtype == jnp.uint32 and noise.ndim == 1


def scan_timesteps(step: Callable, x_T: jnp.ndarray, noise, timesteps: int) -> jnp.ndarray:
    """Runs ``x = step(x, i, z_i)`` for i = T-1 ... 0 in one scan; the result clipped to [-1, 1]."""
    ts = jnp.arange(timesteps - 1, -1, -1, dtype=jnp.int32)
    if is_key(noise):
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
