"""Ancestral sampling: the corrected DDPM step (E2-E4) and the chapter's printed loop.

Every random draw can be supplied: ``noise`` tensors, or a ``torch.Generator``.
References: Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Algorithm 2 and
eq. 6-7 (posterior q(x_{t-1} | x_t, x_0)).
"""
from __future__ import annotations

import torch

VARIANCES = ("beta", "beta_tilde")
# X1 (an extension, not in the chapter): what the network outputs. The chapter's is eps; x0 and v
# (v = sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022) are what jax_ddpm also trains
# (``--prediction``). A weights file says which in its ``prediction`` metadata (absent: eps).
PREDICTIONS = ("eps", "x0", "v")


def _at(buf, t, x):
    return buf[t].view(-1, *([1] * (x.dim() - 1)))


def predict_x0(diffusion, out, x, t, prediction="eps"):
    """The x_0 a model output implies at x_t: from eps, the output itself (x0), or sqrt(abar) x_t - sqrt(1-abar) v."""
    if prediction == "eps":
        return _at(diffusion.sqrt_recip_alphas_cumprod, t, x) * x - _at(diffusion.sqrt_recipm1_alphas_cumprod, t, x) * out
    if prediction == "x0":
        return out
    if prediction == "v":
        return _at(diffusion.sqrt_alphas_cumprod, t, x) * x - _at(diffusion.sqrt_one_minus_alphas_cumprod, t, x) * out
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def p_mean_variance(diffusion, eps, x, t, variance="beta_tilde", clip_denoised=False, prediction="eps"):
    """Mean and variance of p(x_{t-1} | x_t) given the model output ``eps`` (the predicted noise).

    E2: the mean is ``(x_t - beta_t / sqrt(1 - abar_t) * eps) / sqrt(alpha_t)``, with
    ``alpha_t = 1 - beta_t`` (the chapter uses ``abar_t``). With ``clip_denoised`` the
    predicted x0 is clipped to [-1, 1] and the posterior mean is formed from it.
    X1: for an x0 or v model (``prediction``) the output is not eps: the mean is always the
    posterior mean of the x0 it implies (clipped with ``clip_denoised``), never through eps.
    """
    if variance == "beta":
        var = _at(diffusion.betas, t, x)
    elif variance == "beta_tilde":
        var = _at(diffusion.posterior_variance, t, x)
    else:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if clip_denoised or prediction != "eps":
        x0 = predict_x0(diffusion, eps, x, t, prediction)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean = _at(diffusion.posterior_mean_coef1, t, x) * x0 + _at(diffusion.posterior_mean_coef2, t, x) * x
    else:
        coef = _at(diffusion.betas, t, x) / _at(diffusion.sqrt_one_minus_alphas_cumprod, t, x)
        mean = (x - coef * eps) / torch.sqrt(_at(diffusion.alphas, t, x))
    return mean, var


@torch.no_grad()
def p_sample(model, diffusion, x, i, noise=None, variance="beta_tilde", clip_denoised=False, generator=None,
             prediction="eps"):
    """One reverse step x_i -> x_{i-1} at the integer timestep ``i`` (T-1 ... 0)."""
    t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    out = model(x, t)
    mean, var = p_mean_variance(diffusion, out, x, t, variance, clip_denoised, prediction)
    if i == 0:  # E3: noise at every step but the last (the chapter also skips i = 1).
        return mean
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return mean + torch.sqrt(var) * noise


@torch.no_grad()
def sample(model, diffusion, x_T, noises=None, variance="beta_tilde", clip_denoised=False, generator=None,
           prediction="eps"):
    """Full ancestral chain from ``x_T``; the model is put in eval mode (E4).

    Args:
      prediction: what the model outputs (X1: eps, x0 or v).
      noises: optional ``[T, *x_T.shape]`` tensor; ``noises[i]`` is the noise added at
        step ``i`` (``noises[0]`` is unused). Otherwise drawn from ``generator``.
    Returns:
      x_0 clamped to [-1, 1].
    """
    was_training = model.training
    model.eval()
    try:
        x = x_T
        for i in range(diffusion.timesteps - 1, -1, -1):
            z = None if noises is None else noises[i]
            x = p_sample(model, diffusion, x, i, z, variance, clip_denoised, generator, prediction)
    finally:
        model.train(was_training)
    return x.clamp(-1, 1)


@torch.no_grad()
def chapter_step(model, diffusion, x, i, noise=None, generator=None):
    """The chapter's printed update, unchanged (E2 and E3 included). Not a DDPM step."""
    t = torch.tensor([i], device=x.device)
    predicted_noise = model(x, t.expand(x.shape[0]))
    alpha = diffusion.alphas_cumprod[t]  # E2: abar_t where alpha_t is needed
    beta = diffusion.betas[t]
    x = (1 / alpha.sqrt()) * (x - ((1 - alpha) / ((1 - alpha).sqrt())) * predicted_noise)
    if i > 1:  # E3: no noise at i = 1 either
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = x + (beta.sqrt() * noise)
    return x


@torch.no_grad()
def chapter_sample(model, diffusion, x_T, noises=None, generator=None):
    """The chapter's sampling loop as printed (E2, E3), but in eval mode (E4). Never the default."""
    was_training = model.training
    model.eval()
    try:
        x = x_T
        for i in range(diffusion.timesteps - 1, -1, -1):
            z = None if noises is None else noises[i]
            x = chapter_step(model, diffusion, x, i, z, generator)
    finally:
        model.train(was_training)
    return x.clamp(-1, 1)
