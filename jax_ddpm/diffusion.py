"""Forward process, loss and posterior: small pure functions of a ``DiffusionSchedule``.

All images are NHWC. ``t`` is an int array of shape [B]. What the network predicts (eps, x0
or v) is :mod:`jax_ddpm.parameterization`'s; the functions here take eps unless they say so.
"""
from __future__ import annotations

import jax.numpy as jnp

from .parameterization import check_prediction, predict_x0, training_target
from .schedules import DiffusionSchedule

VARIANCES = ("beta", "beta_tilde")


def _at(arr: jnp.ndarray, t: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """arr[t] broadcast against x: [B] -> [B, 1, 1, 1]."""
    return arr[t].reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def q_sample(schedule: DiffusionSchedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
    """Samples q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020, eq. 4)."""
    return _at(schedule.sqrt_alphas_cumprod, t, x0) * x0 + _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def eps_mse_loss(eps_pred: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
    """Mean squared error over every element (torch's ``nn.MSELoss()``), in float32."""
    return jnp.mean(jnp.square(eps_pred.astype(jnp.float32) - eps.astype(jnp.float32)))


def min_snr_weights(schedule: DiffusionSchedule, gamma: float, prediction: str = "eps") -> jnp.ndarray:
    """The loss weight of each t [T], float32: min-SNR-gamma (Hang et al. 2023, "Efficient
    Diffusion Training via Min-SNR Weighting Strategy"; diffusers' training scripts'
    ``--snr_gamma``). With ``SNR_t = abar_t / (1 - abar_t)`` the weight of the x0 error is
    ``min(SNR_t, gamma)``, so the MSE of each prediction's target is weighted by ``min(SNR_t,
    gamma)`` (x0), ``min(SNR_t, gamma) / SNR_t`` (eps) or ``min(SNR_t, gamma) / (SNR_t + 1)`` (v);
    then divided by their mean over t = 0 .. T-1, so that the weighted loss keeps the scale of the
    unweighted one (and ``--grad-clip`` its meaning) where diffusers' scripts do not normalise.
    SNR is taken from the float64-derived ``sqrt_alphas_cumprod`` and
    ``sqrt_one_minus_alphas_cumprod`` (``1 - abar`` in float32 would lose the small t)."""
    check_prediction(prediction)
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    snr = jnp.square(schedule.sqrt_alphas_cumprod / schedule.sqrt_one_minus_alphas_cumprod)
    if prediction == "x0":
        w = jnp.minimum(snr, gamma)
    elif prediction == "eps":
        w = jnp.minimum(1.0, gamma / snr)  # min(SNR, gamma) / SNR, without 0 / 0 where SNR underflows
    else:
        w = jnp.minimum(snr, gamma) / (snr + 1)
    return (w / jnp.mean(w)).astype(jnp.float32)


def prediction_loss(model_out: jnp.ndarray, schedule: DiffusionSchedule, x0: jnp.ndarray, t: jnp.ndarray,
                    noise: jnp.ndarray, prediction: str = "eps", snr_gamma: float = 0.0) -> jnp.ndarray:
    """MSE (:func:`eps_mse_loss`) of the model output against the target of ``prediction``
    for ``x_t = q_sample(schedule, x0, t, noise)``: the noise, x0, or ``v = sqrt(abar_t) noise -
    sqrt(1 - abar_t) x0`` (:func:`jax_ddpm.parameterization.training_target`). ``'eps'`` is
    ``eps_mse_loss(model_out, noise)``, the same program as before prediction types existed.

    ``snr_gamma`` > 0: each image's MSE weighted by :func:`min_snr_weights` at its t, then
    averaged over the batch; 0: unweighted (what every run before the option computed)."""
    check_prediction(prediction)
    target = training_target(schedule, x0, t, noise, prediction)
    if not snr_gamma:
        return eps_mse_loss(model_out, target)
    per_image = jnp.mean(jnp.square(model_out.astype(jnp.float32) - target.astype(jnp.float32)),
                         axis=tuple(range(1, model_out.ndim)))
    return jnp.mean(min_snr_weights(schedule, snr_gamma, prediction)[t] * per_image)


def predict_x0_from_eps(schedule: DiffusionSchedule, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), as sqrt(1/abar) x_t - sqrt(1/abar - 1) eps."""
    return _at(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _at(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps


def posterior_mean_variance(schedule: DiffusionSchedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray):
    """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 6-7)."""
    mean = _at(schedule.posterior_mean_coef1, t, x_t) * x0 + _at(schedule.posterior_mean_coef2, t, x_t) * x_t
    return mean, _at(schedule.posterior_variance, t, x_t)


def _variance(schedule: DiffusionSchedule, t: jnp.ndarray, x_t: jnp.ndarray, variance: str) -> jnp.ndarray:
    if variance == "beta":
        return _at(schedule.betas, t, x_t)
    if variance == "beta_tilde":
        return _at(schedule.posterior_variance, t, x_t)
    raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")


def p_mean_variance_pred(schedule: DiffusionSchedule, out: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray,
                         variance: str = "beta_tilde", clip_denoised: bool = False, prediction: str = "eps"):
    """:func:`p_mean_variance` from a model output of any ``prediction`` type.

    ``'eps'`` is :func:`p_mean_variance` itself. For ``'x0'`` and ``'v'`` the mean is the
    posterior mean (Ho et al. 2020, eq. 7) of the predicted x_0 (clipped to [-1, 1] with
    ``clip_denoised``), never converted through eps.
    """
    if check_prediction(prediction) == "eps":
        return p_mean_variance(schedule, out, x_t, t, variance, clip_denoised)
    var = _variance(schedule, t, x_t, variance)
    x0 = predict_x0(schedule, x_t, t, out, prediction)
    if clip_denoised:
        x0 = jnp.clip(x0, -1.0, 1.0)
    mean, _ = posterior_mean_variance(schedule, x0, x_t, t)
    return mean, var


def p_mean_variance(schedule: DiffusionSchedule, eps: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray,
                    variance: str = "beta_tilde", clip_denoised: bool = False):
    """Mean and variance of p(x_{t-1} | x_t) from the predicted noise ``eps``.

    Without clipping the mean is ``(x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)``
    (Ho et al. 2020, Algorithm 2); with ``clip_denoised`` the predicted x_0 is clipped to
    [-1, 1] and the posterior mean is taken from it. ``variance`` is ``beta`` (sigma^2 =
    beta_t) or ``beta_tilde`` (the posterior variance).
    """
    if variance == "beta":
        var = _at(schedule.betas, t, x_t)
    elif variance == "beta_tilde":
        var = _at(schedule.posterior_variance, t, x_t)
    else:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if clip_denoised:
        x0 = jnp.clip(predict_x0_from_eps(schedule, x_t, t, eps), -1.0, 1.0)
        mean, _ = posterior_mean_variance(schedule, x0, x_t, t)
    else:
        coef = _at(schedule.betas, t, x_t) / _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
        mean = (x_t - coef * eps) / jnp.sqrt(_at(schedule.alphas, t, x_t))
    return mean, var
