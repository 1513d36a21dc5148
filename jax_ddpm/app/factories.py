"""Config -> the objects a run computes with: model, schedule, optimizer, states, the step.

The model is built only through the architecture registry (``ModelConfig.arch``); every
function here unpacks the frozen config into the scalars the library takes.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from .. import parallel
from ..schedules import DiffusionSchedule, make_schedule
from ..training import TrainState, create_train_state, learning_rate, make_optimizer, train_state_from_variables, train_step
from .config import ModelConfig, TrainConfig, arch_config
from .console import PROG


def build_model_from(model: ModelConfig) -> nn.Module:
    """The network of ``model``: ``arch.build(arch.config_from_fields(...), dtype=compute dtype)``."""
    arch, config = arch_config(model)
    return arch.build(config, dtype=parallel.compute_dtype(model.dtype))


def build_model(config: TrainConfig) -> nn.Module:
    return build_model_from(config.model)


def build_schedule(config: TrainConfig) -> DiffusionSchedule:
    d = config.diffusion
    return make_schedule(d.timesteps, d.schedule, beta_start=d.beta_start, beta_end=d.beta_end)


def build_optimizer(config: TrainConfig):
    o = config.optim
    return make_optimizer(o.lr, o.grad_clip or None, schedule=o.lr_schedule, decay_steps=o.lr_decay_steps,
                          end_factor=o.lr_end_factor)


def build_learning_rate(config: TrainConfig):
    """``rate(step)``: the learning rate of the update from ``step`` to ``step + 1`` (what metrics log)."""
    o = config.optim
    return learning_rate(o.lr, o.lr_schedule, o.lr_decay_steps, o.lr_end_factor)


def learning_rate_of_update(config: TrainConfig, update: int) -> float:
    """The rate of update ``update`` (0-based) as a float, for ``metrics.jsonl``."""
    return float(build_learning_rate(config)(update))


def lr_decay_note(config: TrainConfig, start: int) -> str | None:
    """The note ``train`` prints when a run from ``start`` to ``--steps`` outlasts its decaying
    rate (steps past ``lr_decay_steps`` train at the final rate); None otherwise."""
    o = config.optim
    if o.lr_schedule == "constant" or config.steps <= o.lr_decay_steps:
        return None
    return (f"{PROG}: note: the {o.lr_schedule} learning rate ends at step {o.lr_decay_steps} (--lr-decay-steps); "
            f"steps {max(o.lr_decay_steps, start) + 1}-{config.steps} train at its final rate, "
            f"{o.lr_end_factor:g} x --lr {o.lr:g}")


def image_shape(config: TrainConfig) -> tuple[int, int, int]:
    return (config.model.image_size, config.model.image_size, config.model.channels)


def run_keys(seed: int) -> dict[str, jax.Array]:
    """Independent typed keys for initialisation, training noise and sample grids."""
    init_key, train_key, sample_key = jax.random.split(jax.random.key(seed), 3)
    return {"init": init_key, "train": train_key, "sample": sample_key}


def make_init_fn(config: TrainConfig) -> Callable[[jax.Array, DiffusionSchedule], TrainState]:
    """``init(key, schedule) -> TrainState`` (jit it: eager init dispatches hundreds of tiny ops)."""
    model, tx, shape = build_model(config), build_optimizer(config), image_shape(config)

    def init(key, schedule):
        return create_train_state(model, key, shape, schedule, tx, config.optim.ema_decay,
                                  prediction=config.diffusion.prediction,
                                  timestep_draw=config.diffusion.timestep_draw,
                                  snr_gamma=config.diffusion.snr_gamma)

    return init


def init_state(config: TrainConfig, key: jax.Array, schedule: DiffusionSchedule) -> TrainState:
    """A fresh TrainState. The initialiser is compiled without XLA's backend optimisations:
    it runs once, and its many random draws otherwise compile much longer on CPU."""
    lowered = jax.jit(make_init_fn(config)).lower(key, schedule)
    try:
        compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    except Exception:  # a backend or jax version without the option
        compiled = lowered.compile()
    return compiled(key, schedule)


def state_from_variables(config: TrainConfig, variables, ema_params=None) -> TrainState:
    """A TrainState of ``config`` holding ``variables`` (``{'params'[, 'batch_stats']}``: imported
    or fine-tuned weights) with a fresh optimizer state, at step 0; the EMA starts at
    ``ema_params`` (default: the params; none if ``--ema-decay 0``). Nothing is compiled."""
    variables = jax.tree_util.tree_map(jnp.asarray, dict(variables))
    state = train_state_from_variables(variables, build_model(config).apply, build_optimizer(config),
                                       build_schedule(config), config.optim.ema_decay,
                                       prediction=config.diffusion.prediction,
                                       timestep_draw=config.diffusion.timestep_draw,
                                       snr_gamma=config.diffusion.snr_gamma)
    if ema_params is not None and state.ema_params is not None:
        state = state.replace(ema_params=jax.tree_util.tree_map(jnp.array, ema_params))
    return state


def abstract_state(config: TrainConfig) -> TrainState:
    """The TrainState's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), computed without FLOPs, and its
    static fields (``prediction``, ...): a restore onto this template keeps them."""
    return jax.eval_shape(make_init_fn(config), jax.random.key(0), build_schedule(config))


def make_step_fn(mesh: Mesh | None = None) -> Callable[[TrainState, np.ndarray, jax.Array], tuple[TrainState, dict]]:
    """``step_fn(state, local_batch, key) -> (state, metrics)``: the one place a train step is
    compiled and fed: ``parallel.make_sharded_train_step`` over ``mesh`` (every device by default).

    ``local_batch`` is this process's NumPy rows of the global batch ([B, H, W, C] in a
    single-process run); the state must be replicated on ``mesh`` (``parallel.shard_state``)
    and is donated; outputs come back replicated.
    """
    return parallel.make_sharded_train_step(parallel.make_mesh() if mesh is None else mesh, train_step)


__all__ = ["abstract_state", "build_learning_rate", "build_model", "build_model_from", "build_optimizer",
           "build_schedule", "image_shape", "init_state", "learning_rate_of_update", "lr_decay_note", "make_init_fn",
           "make_step_fn", "run_keys", "state_from_variables"]
