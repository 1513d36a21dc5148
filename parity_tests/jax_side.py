"""The side under test: jax_ddpm's model, schedule, weights and train state as the checks use them.

The U-Net comes from the architecture registry (``get_arch('chapter')`` for a ``Net``,
``get_arch('unet2d')`` for a ``UNet2DNet``), weights cross over through ``jax_ddpm.convert``
with the architecture's weight table, and train states are assembled by
``training.train_state_from_variables``. Compiled functions are built once per context,
configuration and dtype (``Context.memo``). Every jax_ddpm function is looked up on its
module when called, so a test can monkeypatch it (``test_can_fail.py``).

A float64 ``UNet2DNet`` builds the model with ``dtype=float64``; its case runs with JAX's x64
enabled (``core.run_case``), so the converted weights and inputs stay float64.
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

ARCH = "chapter"  # the architecture a ``Net`` builds (torch_ref.model.UNet's twin)


def arch_name(net) -> str:
    """The registry name of ``net``'s architecture: ``net.arch`` ('unet2d'), else the chapter's."""
    return getattr(net, "arch", ARCH)


def config(net):
    """The registry config for ``net``."""
    if arch_name(net) == ARCH:
        return get_arch(ARCH).config_cls(img_channels=net.img_channels, time_emb_dim=net.time_emb_dim,
                                          features=tuple(net.features))
    return get_arch(arch_name(net)).config_cls(**dict(net.settings))


def dtype(net):
    """The compute dtype of ``net``'s model: float64 for a float64 ``UNet2DNet``, else float32."""
    return jnp.float64 if getattr(net, "dtype", "float32") == "float64" else jnp.float32


def weight_table(net) -> list:
    """The architecture's rows (torch_name, flax_path, layout) for ``net``."""
    return get_arch(arch_name(net)).weight_table(config(net))


def variables(state_dict: Mapping[str, np.ndarray], net: Net) -> dict:
    """torch_ref names -> Flax variables (jnp arrays on the current default device)."""
    return jax.tree_util.tree_map(jnp.asarray, convert.from_torch_state_dict(state_dict, table=weight_table(net)))


def state_dict(variables: Mapping[str, Any], net: Net) -> dict[str, np.ndarray]:
    """Flax variables (or a params-shaped tree under 'params') -> torch_ref names, NumPy."""
    return convert.to_torch_state_dict(jax.tree_util.tree_map(np.asarray, variables), table=weight_table(net))


def embedding_module(dim: int):
    """jax_ddpm's SinusoidalPositionEmbeddings(dim) (``JaxEmbedding`` is looked up when called)."""
    return JaxEmbedding(dim)


def zero_gradient_params(net) -> frozenset[str]:
    """The parameters whose exact gradient is 0, in the weight table's names.

    The attention's key bias (unet2d's ``...to_k.bias``): softmax over the keys is unchanged
    when one vector is added to every key (``q . (k_j + b) = q . k_j + q . b``, the same for
    every j), so d loss / d b = 0 and both frameworks return rounding noise (measured 1e-9 of
    the largest gradient in float32, 1e-16 in float64). A per-tensor relative error of noise
    is meaningless; the checks compare these against the largest gradient instead.
    """
    if arch_name(net) != "unet2d":
        return frozenset()
    return frozenset(name for name, _, _ in weight_table(net) if name.endswith(".to_k.bias"))


def init_shapes(ctx: "Context", net) -> dict:
    """The Flax variables' shapes and dtypes (``jax.eval_shape`` of ``init``: nothing compiled), once per config."""

    def build():
        f = fns(ctx, net)
        x = jnp.zeros((1, net.size, net.size, net.img_channels), dtype(net))
        return jax.eval_shape(lambda: f.model.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32), train=True))

    return ctx.memo(("jax_init_shapes", arch_name(net), config(net), str(dtype(net))), build)


def fns(ctx: "Context", net: Net) -> SimpleNamespace:
    """The Flax U-Net and its compiled functions, built once per context and configuration.

    ``fwd_train(v, x, t) -> (eps, mutated)``, ``fwd_eval(v, x, t) -> eps`` ([B, H, W, C]),
    ``loss_and_grad(params, batch_stats, schedule, x0, t, noise) -> ((loss, stats), grads)``,
    ``train_step(state, x0, t, noise) -> (state, metrics)``.
    """

    def build():
        model = get_arch(arch_name(net)).build(config(net), dtype=dtype(net), conv_impl="auto")

        def loss(params, batch_stats, schedule, x0, t, noise):
            return training.loss_fn(params, batch_stats, model.apply, schedule, x0, t, noise)

        return SimpleNamespace(
            model=model,
            fwd_train=jax.jit(lambda v, x, t: model.apply(v, x, t, train=True, mutable=["batch_stats"])),
            fwd_eval=jax.jit(lambda v, x, t: model.apply(v, x, t, train=False)),
            loss_and_grad=jax.jit(jax.value_and_grad(loss, has_aux=True)),
            train_step=jax.jit(training.train_step_with_noise),
        )

    return ctx.memo(("jax_fns", arch_name(net), config(net), str(dtype(net))), build)


def schedule(ctx: "Context", timesteps: int, kind: str) -> schedules.DiffusionSchedule:
    """``make_schedule(timesteps, kind)``, once per context."""
    return ctx.memo(("jax_schedule", timesteps, kind), lambda: schedules.make_schedule(timesteps, kind))


def train_state(f: SimpleNamespace, variables: Mapping[str, Any], tx, sched) -> training.TrainState:
    """A TrainState holding the given (converted) variables instead of a fresh init; no EMA, step 0."""
    return training.train_state_from_variables(variables, f.model.apply, tx, sched, ema_decay=0.0, step=0)


__all__ = ["ARCH", "JaxEmbedding", "arch_name", "config", "dtype", "embedding_module", "fns", "init_shapes", "schedule",
           "state_dict", "train_state", "variables", "weight_table", "zero_gradient_params"]
