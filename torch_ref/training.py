"""One training step of chapter 20.3.3, with every random draw passed in."""
from __future__ import annotations

import torch
import torch.nn as nn


def make_optimizer(model, lr=1e-3):
    return torch.optim.Adam(model.parameters(), lr=lr)


def make_lr_scheduler(optimizer, schedule="constant", decay_steps=0, end_factor=0.0):
    """The learning rate over the steps (not in the chapter, which trains at a constant rate):
    None for ``constant``; ``cosine``: ``CosineAnnealingLR`` from the optimizer's lr down to
    ``end_factor`` times it over ``decay_steps`` steps. Call its ``step()`` after each
    ``train_step``. (torch's rate rises again after ``decay_steps``; jax_ddpm holds it there.)"""
    if schedule == "constant":
        return None
    if schedule != "cosine":
        raise ValueError(f"schedule must be constant or cosine, got {schedule!r}")
    lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=end_factor * lr)


def min_snr_weights(diffusion, gamma, prediction="eps"):
    """Not in the chapter: the min-SNR-gamma loss weight of each t (Hang et al. 2023), written as
    diffusers' training scripts write it (``torch.stack([snr, gamma]).min``, divided by SNR for
    eps and by SNR + 1 for v), then divided by its mean over t as jax_ddpm does. SNR from the
    float32 buffers ``sqrt_alphas_cumprod / sqrt_one_minus_alphas_cumprod`` (computed in float64)."""
    snr = (diffusion.sqrt_alphas_cumprod / diffusion.sqrt_one_minus_alphas_cumprod) ** 2
    weights = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction == "eps":
        weights = weights / snr
    elif prediction == "v":
        weights = weights / (snr + 1)
    elif prediction != "x0":
        raise ValueError(f"prediction must be eps, x0 or v, got {prediction!r}")
    return weights / weights.mean()


def loss_fn(model, diffusion, images, t, noise, snr_gamma=0.0):
    """MSE between the true and the predicted noise (the chapter's ``nn.MSELoss()``).

    ``snr_gamma`` > 0 (not in the chapter): each image's MSE weighted by
    :func:`min_snr_weights` at its t, then the batch mean (diffusers' scripts' reduction)."""
    x_t, noise = diffusion(images, t, noise)
    predicted_noise = model(x_t, t)
    if not snr_gamma:
        return nn.functional.mse_loss(predicted_noise, noise)
    per_image = nn.functional.mse_loss(predicted_noise, noise, reduction="none").mean(dim=(1, 2, 3))
    return (min_snr_weights(diffusion, snr_gamma)[t] * per_image).mean()


def train_step(model, diffusion, optimizer, images, t=None, noise=None, generator=None):
    """One Adam step. ``t`` and ``noise`` are drawn from ``generator`` when not given."""
    model.train()
    if t is None:
        t = torch.randint(0, diffusion.timesteps, (images.shape[0],), generator=generator).to(images.device)
    if noise is None:
        noise = torch.randn(images.shape, generator=generator).to(images.device)
    loss = loss_fn(model, diffusion, images, t, noise)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()
