"""Beta schedules and the forward diffusion process, as in chapter 20.3.1.

Precision rule (P1, shared with ``jax_ddpm.schedules``): every schedule array is
computed in float64 and stored as float32. The chapter computes in float32
(``torch.linspace`` default dtype); computing in float64 is the only change here, and it
is what lets the two frameworks agree to the last float32 bit instead of to ~1e-6.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

SCHEDULES = ("linear", "cosine")


def linear_beta_schedule(timesteps, start=0.0001, end=0.02):
    # P1: float64 (the chapter: torch.linspace(start, end, timesteps), float32).
    return torch.linspace(start, end, timesteps, dtype=torch.float64)


def cosine_beta_schedule(timesteps, s=0.008):
    """Nichol & Dhariwal (2021), eq. 17, betas clipped to [0, 0.999]."""
    steps = timesteps + 1
    x = torch.linspace(0, timesteps, steps, dtype=torch.float64)  # P1: float64
    alphas_cumprod = torch.cos(((x / timesteps) + s) / (1 + s) * np.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return torch.clip(betas, 0, 0.999)


class DiffusionProcess(nn.Module):
    """Holds the schedule as float32 buffers and adds noise: ``x_t = sqrt(abar_t) x_0 + sqrt(1-abar_t) eps``."""

    def __init__(self, timesteps, beta_schedule="linear"):
        super().__init__()
        self.timesteps = timesteps

        if beta_schedule == "linear":
            betas = linear_beta_schedule(timesteps)
        elif beta_schedule == "cosine":
            betas = cosine_beta_schedule(timesteps)
        else:
            raise ValueError(f"beta_schedule must be one of {SCHEDULES}, got {beta_schedule!r}")

        # Everything below is computed in float64 from the float64 betas and stored as
        # float32 (P1). The chapter registers betas, alphas_cumprod, sqrt_alphas_cumprod and
        # sqrt_one_minus_alphas_cumprod; the remaining buffers are what the corrected
        # sampler needs (E2): alpha_t and the DDPM posterior q(x_{t-1} | x_t, x_0).
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)  # 連續乘積
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": torch.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": torch.sqrt(1 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": torch.sqrt(1 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": torch.sqrt(1 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            # posterior_variance[0] is 0: log is clipped by repeating the t=1 value (Ho et al.).
            "posterior_log_variance_clipped": torch.log(
                torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            ),
            "posterior_mean_coef1": betas * torch.sqrt(alphas_cumprod_prev) / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.to(torch.float32))

    def forward(self, x_0, t, noise=None, generator=None):
        # 對輸入圖像增加噪聲. noise or a generator can be passed in so every draw is reproducible.
        if noise is None:
            noise = torch.randn(x_0.shape, generator=generator, dtype=x_0.dtype, device=x_0.device)

        sqrt_alphas_cumprod_t = self.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
        sqrt_one_minus_alphas_cumprod_t = self.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)

        x_t = sqrt_alphas_cumprod_t * x_0 + sqrt_one_minus_alphas_cumprod_t * noise
        return x_t, noise  # 回傳加噪的圖片和噪聲
