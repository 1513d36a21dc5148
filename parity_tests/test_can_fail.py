"""The suite can fail: a deliberately broken component turns its parity row red.

Each test monkeypatches one break into jax_ddpm (never committed), runs the same case the
parity suite runs on a fresh context (nothing compiled before the break is reused), and
asserts that the row fails with a measured error far above its tolerance.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ddpm import convert, diffusion, schedules, training
from jax_ddpm.models import SinusoidalPositionEmbeddings, TorchBatchNorm, unet
from parity_tests import report


@pytest.fixture
def fresh_ctx(parity_ctx) -> report.Context:
    return report.make_context(parity_ctx.device)


def _run(ctx: report.Context, component: str) -> report.Row:
    return report.run_case(ctx, report.find_case(component))


def test_swapped_schedule_sqrt_fails(monkeypatch, fresh_ctx):
    real = schedules.schedule_arrays

    def swapped(betas):
        a = dict(real(betas))
        a["sqrt_alphas_cumprod"], a["sqrt_one_minus_alphas_cumprod"] = (a["sqrt_one_minus_alphas_cumprod"],
                                                                        a["sqrt_alphas_cumprod"])
        return a

    monkeypatch.setattr(schedules, "schedule_arrays", swapped)
    for component in ("schedule cosine T=100 vs oracle", "schedule cosine T=100 vs torch",
                      "q_sample cosine T=1000 t=random vs torch"):
        row = _run(fresh_ctx, component)
        assert not row.passed and row.measured > 100 * row.tol, row.message()


class BiasedVarBatchNorm(TorchBatchNorm):
    """TorchBatchNorm without torch's unbiased running variance (Flax's own rule)."""

    @nn.compact
    def __call__(self, x, train):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        count = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        if train:
            mean = jnp.mean(x, (0, 1, 2))
            var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
            if not self.is_initializing():
                ra_mean.value = 0.9 * ra_mean.value + 0.1 * mean
                ra_var.value = 0.9 * ra_var.value + 0.1 * var  # the break: biased
                count.value = count.value + 1
        else:
            mean, var = ra_mean.value, ra_var.value
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


def test_biased_running_variance_fails(monkeypatch, fresh_ctx):
    monkeypatch.setattr(unet, "TorchBatchNorm", BiasedVarBatchNorm)
    row = _run(fresh_ctx, "bn running stats 3 train fwd 1ch 16px b4 f8-64")
    assert not row.passed and row.measured > 100 * row.tol, row.message()


class Float32ExpEmbedding(SinusoidalPositionEmbeddings):
    """The embedding before the fix: frequencies from XLA's float32 exp."""

    @nn.compact
    def __call__(self, time):
        half_dim = self.dim // 2
        emb = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -(np.log(10000) / (half_dim - 1)))
        emb = time.astype(jnp.float32)[:, None] * emb[None, :]
        return jnp.concatenate((jnp.sin(emb), jnp.cos(emb)), axis=-1)


def test_float32_exp_embedding_fails(monkeypatch, fresh_ctx):
    """The row that found the float32-exp frequencies: eagerly 1 ulp off torch's, times t = 999: 1.5e-5.

    (Under jit XLA constant-folds the exp and happened to agree; the row checks both.)
    """
    monkeypatch.setattr(report, "JaxEmbedding", Float32ExpEmbedding)
    row = _run(fresh_ctx, "embedding dim=32 t<1000 vs torch")
    assert not row.passed and row.measured > 5 * row.tol, row.message()


def test_unflipped_conv_transpose_fails(monkeypatch, fresh_ctx):
    real = convert._from_torch

    def no_flip(a, layout):
        return np.ascontiguousarray(a.transpose(2, 3, 0, 1)) if layout == "conv_transpose" else real(a, layout)

    monkeypatch.setattr(convert, "_from_torch", no_flip)
    row = _run(fresh_ctx, "unet forward eval 1ch 16px b4 f8-64")
    assert not row.passed and row.measured > 100 * row.tol, row.message()


def test_chapter_alpha_bar_in_step_fails(monkeypatch, fresh_ctx):
    """E2 put back: the step divides by sqrt(abar_t) instead of sqrt(alpha_t)."""
    real = diffusion.p_mean_variance

    def e2(schedule, eps, x_t, t, variance="beta_tilde", clip_denoised=False):
        mean, var = real(schedule, eps, x_t, t, variance, clip_denoised)
        fix = jnp.sqrt(diffusion._at(schedule.alphas, t, x_t) / diffusion._at(schedule.alphas_cumprod, t, x_t))
        return mean * fix, var

    monkeypatch.setattr(diffusion, "p_mean_variance", e2)
    row = _run(fresh_ctx, "reverse-step mean/var linear T=100 beta_tilde vs oracle")
    assert not row.passed and row.measured > 100 * row.tol, row.message()


@pytest.mark.slow
def test_adam_with_wrong_lr_fails(monkeypatch, fresh_ctx):
    """lr 10% high: every element beyond 1e-5 (the fraction row) and the optimiser-alone row."""
    real = training.make_optimizer
    monkeypatch.setattr(training, "make_optimizer", lambda lr=1e-3, grad_clip=None: real(1.1 * lr, grad_clip))
    net = report.SAMPLER_NET.label
    for component in (f"adam 10 steps, each from torch's state: params {net}",
                      f"adam 10 steps, torch's grads -> optax: params {net}"):
        row = _run(fresh_ctx, component)
        assert not row.passed, row.message()
