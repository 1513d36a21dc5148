"""The side under test: jax_ddpm's model, schedule, weights and train state as the checks use them.

The U-Net comes from the architecture registry (``get_arch('chapter')``), weights cross
over through ``jax_ddpm.convert`` with the architecture's weight table, and train states
are assembled by ``training.train_state_from_variables``. Compiled functions are built once
per context and configuration (``Context.memo``). Every jax_ddpm function is looked up on
its module when called, so a test can monkeypatch it (``test_can_fail.py``).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax_ddpm import convert, schedules, training
from jax_ddpm.models import SinusoidalPositionEmbeddings as JaxEmbedding
from jax_ddpm.models.registry import get_arch

from .inputs import Net

if TYPE_CHECKING:  # pragma: no cover
    from .context import Context

ARCH = "chapter"  # the architecture every U-Net case builds (torch_ref.model.UNet's twin)


def config(net: Net):
    """The registry config for ``net``."""
    return get_arch(ARCH).config_cls(img_channels=net.img_channels, time_emb_dim=net.time_emb_dim,
                                      features=tuple(net.features))


def weight_table(net: Net) -> list:
    """The architecture's rows (torch_name, flax_path, layout) for ``net``."""
    return get_arch(ARCH).weight_table(config(net))


def variables(state_dict: Mapping[str, np.ndarray], net: Net) -> dict:
    """torch_ref names -> Flax variables (jnp arrays on the current default device)."""
    return jax.tree_util.tree_map(jnp.asarray, convert.from_torch_state_dict(state_dict, table=weight_table(net)))


def state_dict(variables: Mapping[str, Any], net: Net) -> dict[str, np.ndarray]:
    """Flax variables (or a params-shaped tree under 'params') -> torch_ref names, NumPy."""
    return convert.to_torch_state_dict(jax.tree_util.tree_map(np.asarray, variables), table=weight_table(net))


def embedding_module(dim: int):
    """jax_ddpm's SinusoidalPositionEmbeddings(dim) (``JaxEmbedding`` is looked up when called)."""
    return JaxEmbedding(dim)


def fns(ctx: "Context", net: Net) -> SimpleNamespace:
    """The Flax U-Net and its compiled functions, built once per context and configuration.

    ``fwd_train(v, x, t) -> (eps, mutated)``, ``fwd_eval(v, x, t) -> eps`` ([B, H, W, C]),
    ``loss_and_grad(params, batch_stats, schedule, x0, t, noise) -> ((loss, stats), grads)``,
    ``train_step(state, x0, t, noise) -> (state, metrics)``.
    """

    def build():
        model = get_arch(ARCH).build(config(net), dtype=jnp.float32, conv_impl="auto")

        def loss(params, batch_stats, schedule, x0, t, noise):
            return training.loss_fn(params, batch_stats, model.apply, schedule, x0, t, noise)

        return SimpleNamespace(
            model=model,
            fwd_train=jax.jit(lambda v, x, t: model.apply(v, x, t, train=True, mutable=["batch_stats"])),
            fwd_eval=jax.jit(lambda v, x, t: model.apply(v, x, t, train=False)),
            loss_and_grad=jax.jit(jax.value_and_grad(loss, has_aux=True)),
            train_step=jax.jit(training.train_step_with_noise),
        )

    return ctx.memo(("jax_fns", ARCH, config(net)), build)


def schedule(ctx: "Context", timesteps: int, kind: str) -> schedules.DiffusionSchedule:
    """``make_schedule(timesteps, kind)``, once per context."""
    return ctx.memo(("jax_schedule", timesteps, kind), lambda: schedules.make_schedule(timesteps, kind))


def train_state(f: SimpleNamespace, variables: Mapping[str, Any], tx, sched) -> training.TrainState:
    """A TrainState holding the given (converted) variables instead of a fresh init; no EMA, step 0."""
    return training.train_state_from_variables(variables, f.model.apply, tx, sched, ema_decay=0.0, step=0)


__all__ = ["ARCH", "JaxEmbedding", "config", "embedding_module", "fns", "schedule", "state_dict", "train_state",
           "variables", "weight_table"]
