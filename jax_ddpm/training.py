"""Training state and a pure train step (flax examples/imagenet/train.py style).

``batch_stats`` is optional: a model without BatchNorm (GroupNorm, say) has none, and the
state, the loss, checkpoints and convert carry ``None`` for it.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from .diffusion import eps_mse_loss, prediction_loss, q_sample
from .parameterization import check_prediction
from .schedules import DiffusionSchedule


class TrainState(flax.struct.PyTreeNode):
    """Everything a step reads and writes. ``apply_fn`` and ``tx`` are static."""

    step: jnp.ndarray
    params: Any
    batch_stats: Any  # None for a model without BatchNorm statistics
    opt_state: Any
    ema_params: Any  # None when ema_decay == 0
    schedule: DiffusionSchedule
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)
    prediction: str = flax.struct.field(pytree_node=False, default="eps")  # what the model regresses: eps, x0, v
    timestep_draw: str = flax.struct.field(pytree_node=False, default="per-image")  # see draw_t_and_noise
    snr_gamma: float = flax.struct.field(pytree_node=False, default=0.0)  # min-SNR loss weighting; 0 = none

    @property
    def variables(self):
        return model_variables(self.params, self.batch_stats)

    @property
    def ema_variables(self):
        return model_variables(self.params if self.ema_params is None else self.ema_params, self.batch_stats)


def model_variables(params, batch_stats=None) -> dict:
    """``{'params': ...}`` plus ``'batch_stats'`` when the model has them."""
    return {"params": params} if batch_stats is None else {"params": params, "batch_stats": batch_stats}


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(lr: float, schedule: str = "constant", decay_steps: int = 0,
                  end_factor: float = 0.0) -> optax.Schedule:
    """The learning rate of update ``i`` (0-based: the i-th optimizer step uses ``rate(i)``).

    - ``constant``: ``lr`` (``decay_steps`` and ``end_factor`` must be left at 0);
    - ``cosine``: ``lr * (f + (1 - f) * (1 + cos(pi * i / N)) / 2)`` for ``i <= N``
      (``N = decay_steps``, ``f = end_factor``), then held at ``f * lr``: torch's
      ``CosineAnnealingLR(T_max=N, eta_min=f * lr)`` stepped once per update, up to ``N``
      (torch's rises again after ``N``); ``optax.cosine_decay_schedule(lr, N, alpha=f)``.

    Raises:
      ValueError: an unknown schedule, ``decay_steps`` < 1 for cosine, ``end_factor`` outside [0, 1].
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
    if schedule == "constant":
        if decay_steps or end_factor:
            raise ValueError("decay_steps and end_factor belong to a decaying lr schedule, not 'constant'")
        return optax.constant_schedule(lr)
    if int(decay_steps) != decay_steps or decay_steps < 1:
        raise ValueError(f"decay_steps {decay_steps!r}: a cosine schedule decays over at least 1 step")
    if not 0.0 <= end_factor <= 1.0:
        raise ValueError(f"end_factor {end_factor!r}: expected a fraction of lr in [0, 1]")
    return optax.cosine_decay_schedule(lr, int(decay_steps), alpha=end_factor)


def make_optimizer(lr: float = 1e-3, grad_clip: float | None = None, *, schedule: str = "constant",
                   decay_steps: int = 0, end_factor: float = 0.0) -> optax.GradientTransformation:
    """Adam with torch.optim.Adam's defaults (b1=0.9, b2=0.999, eps=1e-8), optional global-norm clip,
    and the learning rate of :func:`learning_rate` (``schedule``, ``decay_steps``, ``end_factor``).

    A constant rate is passed to optax as the float ``lr``, so its optimizer state is the one
    every run before the schedules had (a decaying one adds optax's step count)."""
    rate = learning_rate(lr, schedule, decay_steps, end_factor)
    adam = optax.adam(lr if schedule == "constant" else rate, b1=0.9, b2=0.999, eps=1e-8)
    return optax.chain(optax.clip_by_global_norm(grad_clip), adam) if grad_clip else adam


def create_train_state(model, key: jax.Array, image_shape: tuple[int, int, int], schedule: DiffusionSchedule,
                       tx: optax.GradientTransformation, ema_decay: float = 0.0, *,
                       prediction: str = "eps", timestep_draw: str = "per-image",
                       snr_gamma: float = 0.0) -> TrainState:
    """Initialises the model (torch's default init) for images of ``image_shape`` = (H, W, C).

    ``prediction``: what the model learns to output (``eps``, ``x0`` or ``v``; see
    :mod:`jax_ddpm.parameterization`); ``timestep_draw``: see :func:`draw_t_and_noise`;
    ``snr_gamma``: the loss's min-SNR weighting (:func:`jax_ddpm.diffusion.min_snr_weights`; 0: none)."""
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    # jitted: eager init of the U-Net dispatches hundreds of small ops
    variables = jax.jit(model.init, static_argnames="train")(key, x, jnp.zeros((1,), jnp.int32), train=True)
    return train_state_from_variables(variables, model.apply, tx, schedule, ema_decay, prediction=prediction,
                                      timestep_draw=timestep_draw, snr_gamma=snr_gamma)


def train_state_from_variables(variables, apply_fn: Callable, tx: optax.GradientTransformation,
                               schedule: DiffusionSchedule, ema_decay: float = 0.0, step: int = 0, *,
                               prediction: str = "eps", timestep_draw: str = "per-image",
                               snr_gamma: float = 0.0) -> TrainState:
    """The one place a ``TrainState`` is assembled: ``variables`` (``{'params'[, 'batch_stats']}``)
    with a fresh optimizer state (``tx.init``) and EMA equal to the parameters.

    The schedule and the EMA are copies: the state is donated to the train step, which must
    not see one buffer twice, and the caller keeps its own arrays.
    """
    params = variables["params"]
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params, batch_stats=variables.get("batch_stats"),
                      opt_state=tx.init(params), schedule=jax.tree_util.tree_map(jnp.copy, schedule),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params) if ema_decay else None,
                      apply_fn=apply_fn, tx=tx, ema_decay=ema_decay, prediction=check_prediction(prediction),
                      timestep_draw=check_timestep_draw(timestep_draw), snr_gamma=check_snr_gamma(snr_gamma))


def loss_fn(params, batch_stats, apply_fn, schedule: DiffusionSchedule, x0, t, noise, dropout_key=None,
            prediction: str = "eps", snr_gamma: float = 0.0):
    """MSE of the model's output against the ``prediction`` target (eps: the noise; x0; v) on
    ``x_t = q_sample(x0, t, noise)`` (:func:`jax_ddpm.diffusion.prediction_loss`); returns
    (loss, new batch_stats). ``'eps'`` is the epsilon-MSE this function always computed.

    ``batch_stats`` None: a model without BatchNorm statistics (returned as None).
    ``dropout_key``: the key of the model's dropout layers (``rngs={'dropout': key}``); a
    model without dropout ignores it, a model with dropout > 0 needs it. ``snr_gamma`` > 0: the
    per-image min-SNR weighting (:func:`jax_ddpm.diffusion.prediction_loss`).
    """
    x_t = q_sample(schedule, x0, t, noise)
    rngs = None if dropout_key is None else {"dropout": dropout_key}
    if batch_stats is None:
        out = apply_fn({"params": params}, x_t, t, train=True, rngs=rngs)
        return _loss(out, schedule, x0, t, noise, prediction, snr_gamma), None
    out, mutated = apply_fn({"params": params, "batch_stats": batch_stats}, x_t, t, train=True,
                            mutable=["batch_stats"], rngs=rngs)
    return _loss(out, schedule, x0, t, noise, prediction, snr_gamma), mutated["batch_stats"]


def _loss(out, schedule, x0, t, noise, prediction, snr_gamma=0.0):
    """eps unweighted: ``eps_mse_loss(out, noise)`` exactly as before; else ``prediction_loss``."""
    if prediction == "eps" and not snr_gamma:
        return eps_mse_loss(out, noise)
    return prediction_loss(out, schedule, x0, t, noise, prediction, snr_gamma)


def check_snr_gamma(gamma: float) -> float:
    """``gamma`` as a float if it is 0 (no weighting) or a finite positive number."""
    gamma = float(gamma)
    if not (gamma == 0 or 0 < gamma < float("inf")):
        raise ValueError(f"snr_gamma must be 0 (no weighting) or a finite number > 0, got {gamma}")
    return gamma


def apply_gradients(state: TrainState, grads, batch_stats) -> TrainState:
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if state.ema_decay:
        # Written out, not optax.incremental_update(params, ema, 1 - d): that computes
        # (1 - d) * p + d * e, which XLA contracts into another fused multiply-add and rounds
        # 1-2 ulp differently, so a work folder trained before could not resume to the same bits.
        d = state.ema_decay
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state.ema_params, params)
    else:
        ema = None
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                         ema_params=ema)


def _global_norm(tree) -> jnp.ndarray:
    """sqrt(sum of squares) over every leaf (optax renames its helper between versions)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree_util.tree_leaves(tree)))


def train_step_with_noise(state: TrainState, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray,
                          dropout_key: jax.Array | None = None):
    """One Adam step on given timesteps and noise (and dropout key). Returns (state, metrics)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, batch_stats), grads = grad_fn(state.params, state.batch_stats, state.apply_fn, state.schedule, x0, t, noise,
                                         dropout_key, state.prediction, state.snr_gamma)
    metrics = {"loss": loss, "grad_norm": _global_norm(grads)}
    return apply_gradients(state, grads, batch_stats), metrics


TIMESTEP_DRAWS = ("per-image", "per-batch")


def check_timestep_draw(draw: str) -> str:
    if draw not in TIMESTEP_DRAWS:
        raise ValueError(f"timestep_draw must be one of {TIMESTEP_DRAWS}, got {draw!r}")
    return draw


def draw_t_and_noise(key: jax.Array, step: jnp.ndarray, x0: jnp.ndarray, timesteps: int,
                     timestep_draw: str = "per-image"):
    """t ~ U{0..T-1} and eps ~ N(0, I) from ``fold_in(key, step)``.

    ``timestep_draw``: ``'per-image'`` draws a t for each image (Ho et al.'s Algorithm 1);
    ``'per-batch'`` gives every image of the batch the first image's t (the same key, so the
    first t is the same in both). A model whose BatchNorm is normalised with the statistics of
    the sample batch while sampling (the chapter's U-Net: every image of a sampling batch is at
    the same t) then sees the same kind of batch in training as in sampling; docs/quality.md
    measures what that does to the samples."""
    k_t, k_n = jax.random.split(jax.random.fold_in(key, step))
    t = jax.random.randint(k_t, (x0.shape[0],), 0, timesteps, jnp.int32)
    if check_timestep_draw(timestep_draw) == "per-batch":
        t = jnp.full_like(t, t[0])
    return t, jax.random.normal(k_n, x0.shape, jnp.float32)


# The dropout keys are a stream of their own: fold_in(fold_in(key, DROPOUT_STREAM), step). t and
# the noise keep their derivation (fold_in(key, step), split), so runs written before dropout
# existed resume to the same bits. fold_in(key, DROPOUT_STREAM) equals no fold_in(key, step)
# for the steps a run takes (step < DROPOUT_STREAM).
DROPOUT_STREAM = 0x64726F70  # "drop"


def dropout_key_at(key: jax.Array, step: jnp.ndarray) -> jax.Array:
    """The dropout key of step ``step`` (independent of :func:`draw_t_and_noise`'s keys)."""
    return jax.random.fold_in(jax.random.fold_in(key, DROPOUT_STREAM), step)


def train_step(state: TrainState, batch: jnp.ndarray, key: jax.Array):
    """Pure step: draws t and noise from ``fold_in(key, state.step)`` and the dropout key from
    :func:`dropout_key_at`. Jit with ``donate_argnums=0``."""
    t, noise = draw_t_and_noise(key, state.step, batch, state.schedule.timesteps, state.timestep_draw)
    return train_step_with_noise(state, batch, t, noise, dropout_key_at(key, state.step))
