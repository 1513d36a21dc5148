"""The timestep loop every sampler shares: one ``lax.scan`` over a grid, fed a key or pre-drawn noise.

``noise`` is either a PRNG key (the noise for the grid's i-th timestep, in ascending order, is
``normal(fold_in(key, i))``, drawn inside the program) or a pre-drawn ``[num_steps, *x_T.shape]``
array whose row ``i`` is the noise of the grid's i-th timestep (for parity with torch_ref and
diffusers, which take the same arrays). On the full grid (all T steps) ``i`` is the timestep.

:func:`scan_timesteps` is the T-step loop (ddpm on the full grid, chapter); :func:`scan_grid`
runs any grid and carries whatever the sampler needs.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

#: the network as a sampler sees it: ``model_fn(x, t) -> output`` (eps, x0 or v: ``prediction``)
ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
EpsFn = ModelFn  # the name before prediction types


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


def check_noise(noise, num_steps: int, shape: tuple) -> None:
    """ValueError unless ``noise`` is a key or an array of shape ``(num_steps, *shape)``."""
    if not is_key(noise) and tuple(noise.shape) != (num_steps,) + tuple(shape):
        raise ValueError(f"noise must be a key or an array of shape {(num_steps,) + tuple(shape)}, got {noise.shape}")


def scan_grid(step: Callable, carry: Any, noise, grid: np.ndarray, shape: tuple, dtype,
              per_step: Mapping[str, jnp.ndarray] | None = None) -> Any:
    """Runs ``carry = step(carry, row, z)`` down the grid (i = n-1 ... 0) in one ``lax.scan``.

    ``row`` holds ``i`` (int32), ``t = grid[i]`` (int32) and the i-th entry of each
    ``per_step`` array ([n, ...], ascending like the grid); ``z`` is the noise of step i
    [*shape] (see the module docstring). Returns the final carry (nothing clipped).
    """
    n = len(grid)
    check_noise(noise, n, shape)
    rows = {"i": jnp.arange(n, dtype=jnp.int32), "t": jnp.asarray(np.asarray(grid), jnp.int32),
            **dict(per_step or {})}
    rows = jax.tree_util.tree_map(lambda a: a[::-1], rows)
    if is_key(noise):
        key = noise

        def body(c, row):
            z = jax.random.normal(jax.random.fold_in(key, row["i"]), shape, dtype)
            return step(c, row, z), None

        carry, _ = jax.lax.scan(body, carry, rows)
    else:
        def body(c, inp):
            row, z = inp
            return step(c, row, z), None

        carry, _ = jax.lax.scan(body, carry, (rows, noise[::-1]))
    return carry


def reject_unknown(sampler: str, unknown: Mapping[str, Any], known: tuple[str, ...]) -> None:
    """ValueError naming the first option ``sampler`` does not have (``eta`` for dpmpp_2m, say)."""
    if unknown:
        name = next(iter(unknown))
        have = f"its options: {', '.join(known)}" if known else "it has none"
        raise ValueError(f"sampler {sampler!r} has no option {name!r} ({have})")


def check_flag(name: str, value) -> bool:
    """``value`` as a bool if it is one (a NumPy bool, 0 or 1 too); ValueError otherwise."""
    if not isinstance(value, (bool, np.bool_)) and not (isinstance(value, (int, np.integer)) and value in (0, 1)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)
