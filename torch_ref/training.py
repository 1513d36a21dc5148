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


def loss_fn(model, diffusion, images, t, noise):
    """MSE between the true and the predicted noise (the chapter's ``nn.MSELoss()``)."""
    x_t, noise = diffusion(images, t, noise)
    predicted_noise = model(x_t, t)
    return nn.functional.mse_loss(predicted_noise, noise)


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
