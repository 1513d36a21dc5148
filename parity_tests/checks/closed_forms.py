"""Checks of the closed forms: schedules, q_sample, the sinusoidal embedding, the reverse step."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_ddpm import diffusion

from .. import jax_side
from ..context import Context
from ..core import Measure, abs_rel, elementwise_rel, fmt
from ..inputs import normal, rng
from ..references import Reference


def check_schedule(ctx: Context, ref: Reference, kind: str, timesteps: int) -> Measure:
    """Every DiffusionSchedule array (float32 [T]) the reference has, elementwise rel.

    The oracle and torch_ref give all of them; diffusers' scheduler holds betas, alphas
    and alphas_cumprod (the note counts what was compared).
    """
    ours = jax_side.schedule(ctx, timesteps, kind)
    theirs = ref.schedule(ctx, kind, timesteps)
    names = [f.name for f in dataclasses.fields(ours) if f.name in theirs]
    worst_abs, worst_rel, worst = 0.0, 0.0, ""
    for name in names:
        a, b = np.asarray(getattr(ours, name)), theirs[name]
        if a.dtype != np.float32 or a.shape != (timesteps,):
            return Measure(math.nan, math.nan, f"{name}: {a.dtype}{a.shape}", ok=False)
        worst_abs = max(worst_abs, abs_rel(a, b)[0])
        rel = elementwise_rel(a, b)
        if rel >= worst_rel:
            worst_rel, worst = rel, name
    n = len(names)
    if not n:
        return Measure(math.nan, math.nan, "the reference gave none of DiffusionSchedule's arrays", ok=False)
    return Measure(worst_abs, worst_rel, f"{n} arrays, worst {worst}" if worst_rel else f"{n} arrays, all bit-equal")


def check_q_sample(ctx: Context, ref: Reference, kind: str, timesteps: int, at: str) -> Measure:
    """x_t [8, 16, 16, 3] for t = 0, T-1 or random t, same x0 and noise."""
    gen = rng("q_sample", kind, timesteps, at)
    shape = (8, 16, 16, 3)
    x0 = gen.uniform(-1, 1, shape).astype(np.float32)
    noise = normal(gen, shape)
    t = {"0": np.zeros(8, np.int64), "T-1": np.full(8, timesteps - 1, np.int64),
         "random": gen.integers(0, timesteps, 8)}[at]
    f = ctx.memo("jit_q_sample", lambda: jax.jit(diffusion.q_sample))
    ours = np.asarray(f(jax_side.schedule(ctx, timesteps, kind), jnp.asarray(x0), jnp.asarray(t, jnp.int32),
                        jnp.asarray(noise)))
    theirs = ref.q_sample(ctx, kind, timesteps, x0, t, noise)
    return Measure(*abs_rel(ours, theirs), f"|x_t| <= {np.abs(theirs).max():.2f}")


def check_embedding(ctx: Context, ref: Reference, dim: int, timesteps: int, exact_argument: bool = False) -> Measure:
    """SinusoidalPositionEmbeddings [T, dim] for every t in [0, T), jitted and eager.

    ``exact_argument`` compares with sin/cos of the float64 argument ``t * f_k``, and so
    measures the float32 rounding of the argument that torch_ref shares (up to
    ~t * 2^-24 * (2 + 2/e)); otherwise with the reference's own embedding (the oracle's at
    the argument a float32 program forms).
    """
    t = np.arange(timesteps)
    f = ctx.memo(("jit_embedding", dim), lambda: jax.jit(lambda t: jax_side.embedding_module(dim).apply({}, t)))
    jitted = np.asarray(f(jnp.asarray(t, jnp.int32)))
    eager = np.asarray(jax_side.embedding_module(dim).apply({}, jnp.asarray(t, jnp.int32)))  # jit may constant-fold
    theirs = ref.embedding(ctx, t, dim, exact_argument=exact_argument)
    (j_abs, j_rel), (e_abs, e_rel) = abs_rel(jitted, theirs), abs_rel(eager, theirs)
    return Measure(max(j_abs, e_abs), max(j_rel, e_rel), f"jit {fmt(j_abs)}, eager {fmt(e_abs)}")


def check_posterior_step(ctx: Context, ref: Reference, kind: str, timesteps: int, variance: str,
                         clip: bool) -> Measure:
    """p_mean_variance (mean and variance of the reverse step), every t at once, x_t [T, 8, 8, 1]."""
    gen = rng("posterior", kind, timesteps, variance, clip)
    t = np.arange(timesteps)
    x_t = normal(gen, (timesteps, 8, 8, 1))
    eps = normal(gen, (timesteps, 8, 8, 1))
    f = ctx.memo(("jit_p_mean_variance", variance, clip), lambda: jax.jit(
        lambda s, e, x, t: diffusion.p_mean_variance(s, e, x, t, variance, clip)))
    mean, var = f(jax_side.schedule(ctx, timesteps, kind), jnp.asarray(eps), jnp.asarray(x_t),
                  jnp.asarray(t, jnp.int32))
    r_mean, r_var = ref.p_mean_variance(ctx, kind, timesteps, eps, x_t, t, variance, clip)
    m_abs, m_rel = abs_rel(mean, r_mean)
    v_abs, v_rel = abs_rel(np.asarray(var).reshape(-1), np.asarray(r_var).reshape(-1))
    return Measure(max(m_abs, v_abs), max(m_rel, v_rel), f"mean rel {fmt(m_rel)}, var rel {fmt(v_rel)}, "
                                                            f"|mean| <= {np.abs(r_mean).max():.1f}")
