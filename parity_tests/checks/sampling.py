"""Checks of sampling: one reverse step with the U-Net, and whole chains (output and trajectory)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_ddpm import diffusion, sampling

from .. import jax_side, oracle
from ..context import Context
from ..core import Measure, abs_rel
from ..inputs import SAMPLER_NET, SAMPLER_TRAIN_STEPS, Net, cast, digits, normal, rng
from ..references import Reference


def _sampler_model(ctx: Context, ref: Reference, net: Net, trained: bool):
    """(reference model, jax fns, eval variables): briefly trained on digits, or random init."""

    def build():
        model = ref.unet(ctx, net, seed=5)
        if trained:  # a few Adam steps on real digits (cosine, T = 100, as the chapter trains)
            opt = ref.optimizer(model, "adam", 1e-3)
            data = digits(net.size, 256, seed=1)
            gen = rng("sampler_train", net)
            for _ in range(SAMPLER_TRAIN_STEPS):
                x0 = data[gen.choice(len(data), 16, replace=False)]
                t = gen.integers(0, 100, 16)
                ref.train_step(ctx, model, opt, "cosine", 100, x0, t, normal(gen, x0.shape))
        return model, jax_side.fns(ctx, net), jax_side.variables(ref.state_dict(model), net)

    return ctx.memo(("sampler_model", ref.name, net, trained), build)


def check_sampler_step(ctx: Context, ref: Reference, step: int, variance: str, clip: bool, kind: str = "cosine",
                       timesteps: int = 100) -> Measure:
    """One reverse step x_i -> x_{i-1} [B, H, W, C]: the reference's vs UNet(eval) + p_mean_variance + sigma z."""
    net = SAMPLER_NET
    model, fns, variables = _sampler_model(ctx, ref, net, trained=True)
    gen = rng("sampler_step", step, variance, clip, kind, timesteps)
    shape = (net.batch, net.size, net.size, net.img_channels)
    if step == timesteps - 1:
        x = normal(gen, shape)
    else:  # a noised digit, as the chain would see it at this step
        x = oracle.q_sample(oracle.schedule(kind, timesteps), digits(net.size, net.batch, seed=2),
                            np.full(net.batch, step), normal(gen, shape)).astype(np.float32)
    z = normal(gen, shape)
    theirs = ref.p_sample(ctx, model, kind, timesteps, x, step, z, variance, clip)

    def jax_step(v, s, x, t, z):
        mean, var = diffusion.p_mean_variance(s, fns.model.apply(v, x, t, train=False), x, t, variance, clip)
        return mean + jnp.where(t[:, None, None, None] > 0, jnp.sqrt(var), 0.0) * z

    f = ctx.memo(("jit_sampler_step", net, variance, clip), lambda: jax.jit(jax_step))
    ours = f(variables, jax_side.schedule(ctx, timesteps, kind), jnp.asarray(x),
             jnp.full((net.batch,), step, jnp.int32), jnp.asarray(z))
    return Measure(*abs_rel(ours, theirs), f"max |x| {np.abs(theirs).max():.1f}")


def _chain_run(ctx: Context, ref: Reference, sampler: str, variance: str, clip: bool, kind: str, timesteps: int,
               trained: bool, net: Net, prediction: str = "eps"):
    """One chain on both sides from the same x_T and pre-drawn noise [T, B, H, W, C].

    Runs the libraries' own samplers (the reference's ``sample``; jax_ddpm's ddpm_sample /
    chapter_sample through ``get_sampler``, jitted as make_sample_fn does) and records the
    state every step feeds the U-Net (the adapter's record; ``jax.debug.callback`` in the JAX
    eps_fn): the unclamped trajectory x_{T-1} .. x_0, not hidden by the final clamp.
    ``prediction``: the U-Net's output read as eps, x0 or v on both sides (the network is the
    same eps-trained one: what is compared is each library's reading of an x0 or v output).
    """

    def build():
        model, fns, variables = _sampler_model(ctx, ref, net, trained)
        gen = rng("chain", sampler, variance, clip, kind, timesteps, trained, net)  # the same draws for every prediction
        shape = (net.batch, net.size, net.size, net.img_channels)
        x_T = cast(normal(gen, shape), net)
        noise = cast(normal(gen, (timesteps,) + shape), net)  # row i is added at step i
        theirs, ref_traj = ref.sample(ctx, model, sampler, kind, timesteps, x_T, noise, variance, clip,
                                      **({} if prediction == "eps" else {"prediction": prediction}))
        jax_traj: dict[int, np.ndarray] = {}

        def record(x, t):
            jax_traj[int(np.asarray(t)[0])] = np.asarray(x)

        def build_fn():
            opts = {} if sampler == "chapter" else {"variance": variance, "clip_denoised": clip}
            if prediction != "eps":  # (eps: the call the chain has always made)
                opts["prediction"] = prediction
            fn = sampling.get_sampler(sampler)

            def eps_fn_of(v):
                def eps_fn(x, t):
                    jax.debug.callback(record, x, t)
                    return fns.model.apply(v, x, t, train=False)
                return eps_fn

            return jax.jit(lambda v, s, x, n: fn(eps_fn_of(v), s, x, n, **opts))

        f = build_fn()  # not memoised: the callback writes into this run's dict
        ours = np.asarray(f(variables, jax_side.schedule(ctx, timesteps, kind), jnp.asarray(x_T), jnp.asarray(noise)))
        jax.effects_barrier()
        return ours, theirs, ref_traj, jax_traj

    return ctx.memo(("chain", ref.name, sampler, variance, clip, kind, timesteps, trained, net, prediction), build)


def check_chain(ctx: Context, ref: Reference, part: str, sampler: str, variance: str = "beta_tilde",
                clip: bool = False, kind: str = "cosine", timesteps: int = 100, trained: bool = True,
                net: Net = SAMPLER_NET, prediction: str = "eps") -> Measure:
    """A whole chain: ``part='x0'`` the clamped output; ``'trajectory'`` every step's state, rel to its scale."""
    ours, theirs, ref_traj, jax_traj = _chain_run(ctx, ref, sampler, variance, clip, kind, timesteps, trained, net,
                                                  prediction)
    model_note = "trained" if trained else "random-init"
    if part == "x0":
        at_edge = float(np.mean(np.abs(theirs) >= 1.0))
        return Measure(*abs_rel(ours, theirs), f"{model_note} model; {100 * at_edge:.1f}% of pixels clamped at +-1")
    steps = sorted(ref_traj)
    if steps != list(range(timesteps)) or sorted(jax_traj) != steps:
        return Measure(math.nan, math.nan, f"recorded {len(ref_traj)} reference / {len(jax_traj)} jax steps",
                       ok=False)
    errs = {i: abs_rel(jax_traj[i], ref_traj[i]) for i in steps}
    worst = max(steps, key=lambda i: errs[i][1])
    scale = max(float(np.abs(ref_traj[i]).max()) for i in steps)
    return Measure(max(e[0] for e in errs.values()), errs[worst][1],
                   f"{model_note} model; worst at step {worst}; max |x_t| {scale:.2g}")
