"""Rows for the min-SNR-gamma loss weighting (``jax_ddpm.diffusion.min_snr_weights`` and the
weighted ``prediction_loss``): the weight of every t, and the loss of given model outputs."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_ddpm import diffusion

from .. import jax_side
from ..context import Context
from ..core import Measure, abs_rel, elementwise_rel
from ..inputs import normal, rng
from ..references import Reference


def check_loss_weights(ctx: Context, ref: Reference, kind: str, timesteps: int, gamma: float,
                       prediction: str) -> Measure:
    """The weight of each t = 0 .. T-1 (float32 [T], jitted as the train step computes it) against
    the reference's; elementwise rel (abs: the worst element)."""
    f = ctx.memo(("jit_min_snr_weights", gamma, prediction),
                 lambda: jax.jit(lambda s: diffusion.min_snr_weights(s, gamma, prediction)))
    ours = np.asarray(f(jax_side.schedule(ctx, timesteps, kind)))
    theirs = ref.loss_weights(ctx, kind, timesteps, gamma, prediction)
    if ours.dtype != np.float32 or ours.shape != (timesteps,):
        return Measure(math.nan, math.nan, f"weights {ours.dtype}{ours.shape}", ok=False)
    worst = int(np.argmax(np.abs(ours.astype(np.float64) - theirs) / np.abs(theirs)))
    return Measure(abs_rel(ours, theirs)[0], elementwise_rel(ours, theirs),
                   f"weights {theirs.min():.3g}..{theirs.max():.3g}, worst at t={worst}")


def check_weighted_loss(ctx: Context, ref: Reference, kind: str, timesteps: int, gamma: float,
                        prediction: str) -> Measure:
    """``prediction_loss(..., snr_gamma=gamma)`` of given outputs [8, 16, 16, 1] (x0, noise and
    one t per image drawn across [0, T), t = 0 and T - 1 included) against the reference's; rel."""
    gen = rng("weighted_loss", kind, timesteps, gamma, prediction)
    shape = (8, 16, 16, 1)
    x0 = gen.uniform(-1, 1, shape).astype(np.float32)
    noise, out = normal(gen, shape), normal(gen, shape)
    t = np.concatenate([[0, timesteps - 1], gen.integers(0, timesteps, 6)]).astype(np.int64)
    f = ctx.memo(("jit_weighted_loss", gamma, prediction), lambda: jax.jit(
        lambda o, s, x, tt, n: diffusion.prediction_loss(o, s, x, tt, n, prediction, gamma)))
    ours = float(f(jnp.asarray(out), jax_side.schedule(ctx, timesteps, kind), jnp.asarray(x0),
                   jnp.asarray(t, jnp.int32), jnp.asarray(noise)))
    theirs = ref.weighted_loss(ctx, kind, timesteps, gamma, prediction, out, x0, t, noise)
    return Measure(abs(ours - theirs), abs(ours - theirs) / abs(theirs), f"loss {theirs:.5f}")


__all__ = ["check_loss_weights", "check_weighted_loss"]
