"""What the network predicts: eps, x0 or v -- training targets and conversions, in one place.

With ``alpha = sqrt(abar_t)`` and ``sigma = sqrt(1 - abar_t)`` (so ``x_t = alpha x_0 + sigma eps``,
Ho et al. 2020 eq. 4):

- ``eps``: the noise (Ho et al. 2020);
- ``x0``: the clean image (diffusers' ``prediction_type='sample'``);
- ``v``: ``alpha eps - sigma x_0`` (Salimans & Ho 2022, "Progressive Distillation", section 4;
  diffusers' ``v_prediction``). Then ``x_0 = alpha x_t - sigma v`` and ``eps = sigma x_t + alpha v``.

The functions on ``(alpha, sigma)`` take coefficients that broadcast against the images (the
samplers gather them per step); those on ``(schedule, t)`` look them up for ``t`` [B].
"""
from __future__ import annotations

import jax.numpy as jnp

from .schedules import DiffusionSchedule

PREDICTIONS = ("eps", "x0", "v")
#: diffusers' ``prediction_type`` for each (scheduler configs, model exports)
DIFFUSERS_PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def check_prediction(prediction) -> str:
    """``prediction`` if it is one of PREDICTIONS; ValueError otherwise."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


def alpha_sigma(schedule: DiffusionSchedule, t: jnp.ndarray, x: jnp.ndarray):
    """``(sqrt(abar_t), sqrt(1 - abar_t))`` for t [B], shaped [B, 1, ..., 1] in x's dtype."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    return (schedule.sqrt_alphas_cumprod[t].reshape(shape).astype(x.dtype),
            schedule.sqrt_one_minus_alphas_cumprod[t].reshape(shape).astype(x.dtype))


def target(x0: jnp.ndarray, eps: jnp.ndarray, alpha, sigma, prediction: str = "eps") -> jnp.ndarray:
    """The regression target for ``prediction``: ``eps``, ``x0`` or ``alpha eps - sigma x0``.

    For ``eps`` and ``x0`` the array itself is returned (no arithmetic: an eps loss is the same
    program as before prediction types existed)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    raise ValueError(check_prediction(prediction))


def to_x0(x_t: jnp.ndarray, out: jnp.ndarray, alpha, sigma, prediction: str = "eps") -> jnp.ndarray:
    """The x_0 a model output implies: ``(x_t - sigma eps) / alpha``, ``x0`` itself, ``alpha x_t - sigma v``."""
    if prediction == "eps":
        return (x_t - sigma * out) / alpha
    if prediction == "x0":
        return out
    if prediction == "v":
        return alpha * x_t - sigma * out
    raise ValueError(check_prediction(prediction))


def to_eps(x_t: jnp.ndarray, out: jnp.ndarray, alpha, sigma, prediction: str = "eps") -> jnp.ndarray:
    """The eps a model output implies: ``eps`` itself, ``(x_t - alpha x0) / sigma``, ``sigma x_t + alpha v``."""
    if prediction == "eps":
        return out
    if prediction == "x0":
        return (x_t - alpha * out) / sigma
    if prediction == "v":
        return sigma * x_t + alpha * out
    raise ValueError(check_prediction(prediction))


def from_x0(x_t: jnp.ndarray, x0: jnp.ndarray, alpha, sigma, prediction: str = "eps") -> jnp.ndarray:
    """The model output that implies ``x0`` at ``x_t`` (the inverse of :func:`to_x0`)."""
    if prediction == "x0":
        return x0
    eps = (x_t - alpha * x0) / sigma
    return target(x0, eps, alpha, sigma, prediction)


def training_target(schedule: DiffusionSchedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray,
                    prediction: str = "eps") -> jnp.ndarray:
    """:func:`target` at timesteps ``t`` [B] for ``x_t = q_sample(schedule, x0, t, noise)``."""
    if prediction in ("eps", "x0"):
        return target(x0, noise, None, None, prediction)
    return target(x0, noise, *alpha_sigma(schedule, t, x0), prediction)


def predict_x0(schedule: DiffusionSchedule, x_t: jnp.ndarray, t: jnp.ndarray, out: jnp.ndarray,
               prediction: str = "eps") -> jnp.ndarray:
    """:func:`to_x0` at timesteps ``t`` [B]."""
    return to_x0(x_t, out, *alpha_sigma(schedule, t, x_t), prediction)


def predict_eps(schedule: DiffusionSchedule, x_t: jnp.ndarray, t: jnp.ndarray, out: jnp.ndarray,
                prediction: str = "eps") -> jnp.ndarray:
    """:func:`to_eps` at timesteps ``t`` [B]."""
    return to_eps(x_t, out, *alpha_sigma(schedule, t, x_t), prediction)


__all__ = ["DIFFUSERS_PREDICTION_TYPES", "PREDICTIONS", "alpha_sigma", "check_prediction", "from_x0",
           "predict_eps", "predict_x0", "target", "to_eps", "to_x0", "training_target"]
