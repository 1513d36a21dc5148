"""Checks of the samplers (ddpm, ddim, dpmpp_2m, chapter) driven by the analytic denoiser.

Both sides run the same chain (``references.oracle_samplers.ChainSpec``) from the same x_T and
pre-drawn noise, the model being the exact posterior mean of Gaussian data
(``oracle_samplers.denoiser_tables``): no network, so what differs is the sampler and its
arithmetic. jax_ddpm's side is the registered sampler (``samplers.get_sampler``), jitted once
per (sampler, options, num_steps, prediction, shape, dtype) and context; its model records
every state it is fed (``jax.debug.callback``). A row measures the largest difference over
the trajectory (every state fed to the model, unclamped) and the clamped x_0, and fails
outright when the two sides visit different timesteps.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_ddpm import samplers, schedules

from ..context import Context
from ..core import Measure
from ..inputs import normal, rng
from ..references import Reference
from ..references.oracle_samplers import ChainSpec, denoiser_tables, gaussian_mu


def _np_dtype(spec: ChainSpec):
    return np.float64 if spec.dtype == "float64" else np.float32


def chain_inputs(spec: ChainSpec) -> tuple[np.ndarray, np.ndarray]:
    """x_T [B, H, W, C] and noise [n, B, H, W, C] (row i: the grid's i-th timestep), float32 draws."""
    gen = rng("sampler chain", spec)
    return normal(gen, spec.shape), normal(gen, (spec.n,) + tuple(spec.shape))


def jax_schedule(ctx: Context, spec: ChainSpec) -> schedules.DiffusionSchedule:
    """float32: ``make_schedule`` (what users sample with); float64: the same arrays kept in float64."""
    if spec.dtype == "float32":
        return ctx.memo(("jax_schedule", spec.timesteps, spec.kind),
                        lambda: schedules.make_schedule(spec.timesteps, spec.kind))

    def build():
        betas = (schedules.linear_beta_schedule if spec.kind == "linear" else schedules.cosine_beta_schedule)(
            spec.timesteps)
        return schedules.DiffusionSchedule(**{k: jnp.asarray(v, jnp.float64)
                                              for k, v in schedules.schedule_arrays(betas).items()})

    return ctx.memo(("jax_schedule_f64", spec.timesteps, spec.kind), build)


def _compiled(ctx: Context, spec: ChainSpec):
    """(jitted ``f(schedule, A, B, mu, x_T, noise) -> x_0``, the dict its model records into)."""

    def build():
        record: dict[int, np.ndarray] = {}
        fn = samplers.get_sampler(spec.sampler)
        settings = dict(spec.opts, prediction=spec.prediction)
        if spec.num_steps is not None:
            settings["num_steps"] = spec.num_steps

        def keep(x, t):
            record[int(np.asarray(t)[0])] = np.asarray(x)

        def run(schedule, A, B, mu, x_T, noise):
            def model_fn(x, t):
                jax.debug.callback(keep, x, t)
                return A[t][:, None, None, None] * x + B[t][:, None, None, None] * mu  # [B, H, W, C]

            return fn(model_fn, schedule, x_T, noise, **settings)

        return jax.jit(run), record

    key = ("jax_sampler", spec.sampler, spec.num_steps, spec.prediction, spec.options, spec.shape, spec.dtype)
    return ctx.memo(key, build)


def jax_chain(ctx: Context, spec: ChainSpec, x_T: np.ndarray, noise: np.ndarray):
    """jax_ddpm's chain: (clamped x_0, {t: state fed to the model})."""
    f, record = _compiled(ctx, spec)
    dt = _np_dtype(spec)
    A, B = denoiser_tables(spec.kind, spec.timesteps, spec.prediction)
    record.clear()
    out = f(jax_schedule(ctx, spec), jnp.asarray(A.astype(dt)), jnp.asarray(B.astype(dt)),
            jnp.asarray(gaussian_mu(spec.shape[1:]).astype(dt)), jnp.asarray(x_T.astype(dt)),
            jnp.asarray(noise.astype(dt)))
    out = np.asarray(out)
    jax.effects_barrier()
    return out, dict(record)


def check_sampler_chain(ctx: Context, ref: Reference, spec: ChainSpec) -> Measure:
    """A whole chain vs the reference's: max |a - b| over every state fed to the model and the clamped x_0."""
    x_T, noise = chain_inputs(spec)
    theirs, ref_traj = ref.sampler_chain(ctx, spec, x_T, noise)
    ours, jax_traj = jax_chain(ctx, spec, x_T, noise)
    if sorted(jax_traj) != sorted(ref_traj):
        return Measure(math.nan, math.nan, f"timesteps differ: jax {sorted(jax_traj)} vs reference "
                                           f"{sorted(ref_traj)}", ok=False)
    errs = {t: float(np.max(np.abs(np.asarray(jax_traj[t], np.float64) - ref_traj[t]))) for t in ref_traj}
    final = float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)))
    worst = max(errs, key=errs.get)
    abs_err = max(final, errs[worst])
    scale = max([float(np.max(np.abs(theirs)))] + [float(np.max(np.abs(v))) for v in ref_traj.values()])
    clamped = float(np.mean(np.abs(theirs) >= 1.0))
    note = (f"x_0 {final:.2e}, trajectory {errs[worst]:.2e} (worst at t={worst}); {len(ref_traj)} steps, "
            f"{100 * clamped:.0f}% of x_0 clamped")
    return Measure(abs_err, abs_err / scale if scale else math.nan, note)


__all__ = ["chain_inputs", "check_sampler_chain", "jax_chain", "jax_schedule"]
