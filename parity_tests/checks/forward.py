"""Checks of the U-Net forward pass (train and eval mode) and of BatchNorm's running statistics."""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from .. import jax_side
from ..context import Context
from ..core import Measure, abs_rel, per_tensor
from ..inputs import Net, cast, normal, rng, timesteps
from ..references import Reference


def random_bn_stats(state: Mapping[str, np.ndarray], gen: np.random.Generator) -> dict[str, np.ndarray]:
    """``state`` with non-trivial running statistics, so eval mode is not the identity normalisation.

    Drawn in the state dict's order: running_mean ~ 0.2 N(0, 1), running_var ~ U(0.5, 2).
    """
    out = dict(state)
    for name, value in state.items():
        if name.endswith("running_mean"):
            out[name] = 0.2 * normal(gen, value.shape)
        elif name.endswith("running_var"):
            out[name] = gen.uniform(0.5, 2.0, value.shape).astype(np.float32)
    return out


def bn_names(state: Mapping[str, np.ndarray]) -> list[str]:
    """The running statistics' names, sorted."""
    return sorted(k for k in state if k.endswith(("running_mean", "running_var")))


def counts_equal(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    """Every num_batches_tracked of ``b`` equals ``a``'s."""
    names = [k for k in b if k.endswith("num_batches_tracked")]
    return all(int(a[k]) == int(b[k]) for k in names)


def check_forward(ctx: Context, ref: Reference, net: Net, mode: str) -> Measure:
    """U-Net output [B, H, W, C], train or eval mode, same converted weights and inputs; rel to output scale."""
    gen = rng("forward", net, mode)
    x = cast(normal(gen, (net.batch, net.size, net.size, net.img_channels)), net)
    t = timesteps(gen, net.batch, 1000)
    model = ref.unet(ctx, net, seed=1)
    if mode == "eval":
        ref.load_state_dict(model, random_bn_stats(ref.state_dict(model), gen))
    variables = jax_side.variables(ref.state_dict(model), net)  # before the forward mutates BN buffers
    fns = jax_side.fns(ctx, net)
    theirs = ref.forward(ctx, model, x, t, train=(mode == "train"))
    if mode == "train":
        ours, _ = fns.fwd_train(variables, jnp.asarray(x), jnp.asarray(t, jnp.int32))
    else:
        ours = fns.fwd_eval(variables, jnp.asarray(x), jnp.asarray(t, jnp.int32))
    return Measure(*abs_rel(ours, theirs), f"max |out| {np.abs(theirs).max():.2f}")


def check_bn_stats(ctx: Context, ref: Reference, net: Net, forwards: int = 3) -> Measure:
    """Running mean/var and num_batches_tracked after ``forwards`` train-mode forwards (E5: 2 updates each)."""
    gen = rng("bn", net, forwards)
    model = ref.unet(ctx, net, seed=2)
    variables = jax_side.variables(ref.state_dict(model), net)
    fns = jax_side.fns(ctx, net)
    for _ in range(forwards):
        x = normal(gen, (net.batch, net.size, net.size, net.img_channels))
        t = timesteps(gen, net.batch, 1000)
        ref.forward(ctx, model, x, t, train=True)
        _, mutated = fns.fwd_train(variables, jnp.asarray(x), jnp.asarray(t, jnp.int32))
        variables = {"params": variables["params"], "batch_stats": mutated["batch_stats"]}
    theirs, ours = ref.state_dict(model), jax_side.state_dict(variables, net)
    m = per_tensor(ours, theirs, bn_names(theirs))
    counts_ok = counts_equal(ours, theirs)
    count = next(int(v) for k, v in theirs.items() if k.endswith("num_batches_tracked"))
    return dataclasses.replace(m, ok=counts_ok, note=f"{m.note}; num_batches_tracked {count} "
                                                     f"{'equal' if counts_ok else 'DIFFER'}")
