"""torch's ``GroupNorm`` over NHWC (or [B, N, C]) input, for :mod:`jax_ddpm.models.unet2d`.

The statistics (:func:`group_norm_stats`, two passes, per channel first), the forward
(:func:`group_norm`), the same forward with its gradient written out for training
(:func:`group_norm_vjp`, a ``custom_vjp``) and the Linen module :class:`GroupNorm` (parameters
``scale`` and ``bias``, torch's ``weight`` and ``bias``). :mod:`jax_ddpm.models.unet2d`
re-exports every name here. The module reads ``group_norm_vjp`` and ``group_norm`` from this
module's globals: a swap of either (``benchmarks.ablation``) is made here.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def stats_dtype(dtype) -> Any:
    """float32 for float32/bf16/fp16 activations, float64 for float64 ones."""
    return jnp.promote_types(dtype, jnp.float32)


def _per_group(per_channel: jnp.ndarray, groups: int, count: int) -> jnp.ndarray:
    """[B, C] sums per channel -> [B, 1, C]: each channel's group total divided by ``count``."""
    b, c = per_channel.shape
    g = per_channel.reshape(b, groups, c // groups).sum(-1) / count                 # [B, G]
    return jnp.repeat(g, c // groups, axis=1)[:, None, :]


def group_norm_stats(xs: jnp.ndarray, groups: int, eps: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(mean, 1 / sqrt(var + eps)) of each (image, group) of ``xs`` [B, N, C], as [B, 1, C].

    Two passes, the biased variance of ``x - mean`` (not E[x^2] - E[x]^2, which loses digits
    when |mean| >> std). Each sum is taken per channel over the N pixels first ([B, N, C] ->
    [B, C], channels contiguous), then over the channels of a group: the same sums as over
    the [N, C/G] block at once, in another order; on XLA:CPU faster than reducing a
    [B, N, G, C/G] view over its axes 1 and 3 (forward + autodiff gradient: 1.3x over a
    CIFAR-10 model's step; benchmarks/README.md, "unet2d gap").
    """
    count = xs.shape[1] * (xs.shape[2] // groups)
    mean = _per_group(jnp.sum(xs, axis=1), groups, count)
    centered = xs - mean
    var = _per_group(jnp.sum(centered * centered, axis=1), groups, count)
    return mean, jax.lax.rsqrt(var + eps)


def group_norm(xs: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, groups: int, eps: float) -> jnp.ndarray:
    """``(xs - mean) / sqrt(var + eps) * scale + bias`` per (image, group); ``xs`` [B, N, C]."""
    mean, rstd = group_norm_stats(xs, groups, eps)
    return (xs - mean) * rstd * scale + bias


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_vjp(xs: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, groups: int, eps: float) -> jnp.ndarray:
    """:func:`group_norm` with its gradient written out (a ``custom_vjp``), for training.

    With ``xhat = (x - mean) * rstd`` and ``g = dy * scale``, per (image, group) of n values:
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``, ``dscale = sum(dy * xhat)``,
    ``dbias = sum(dy)`` over images and pixels. The same derivative as autodiff of the
    forward (as ``layers.batch_norm_train``'s), in one reduction pass and one elementwise pass
    over x and dy instead of the chain autodiff leaves, which XLA:CPU ran ~2x slower
    (benchmarks/README.md, "unet2d gap"). Forward-mode differentiation (``jax.jvp``) is not
    available through it: the model uses it in training mode only.
    """
    return group_norm(xs, scale, bias, groups, eps)


def _group_norm_fwd(xs, scale, bias, groups, eps):
    mean, rstd = group_norm_stats(xs, groups, eps)
    return (xs - mean) * rstd * scale + bias, (xs, mean, rstd, scale)


def _group_norm_bwd(groups, eps, res, dy):
    xs, mean, rstd, scale = res
    count = xs.shape[1] * (xs.shape[2] // groups)
    xhat = (xs - mean) * rstd
    dbias_b = jnp.sum(dy, axis=1)                                                    # [B, C]
    dscale_b = jnp.sum(dy * xhat, axis=1)                                            # [B, C]
    mean_g = _per_group(dbias_b * scale, groups, count)                              # mean(g)
    mean_gx = _per_group(dscale_b * scale, groups, count)                            # mean(g * xhat)
    dx = rstd * (dy * scale - mean_g - xhat * mean_gx)
    return dx, jnp.sum(dscale_b, axis=0), jnp.sum(dbias_b, axis=0)


group_norm_vjp.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
    """``torch.nn.GroupNorm(num_groups, C, eps, affine=True)`` over NHWC (or [B, N, C]) input.

    Biased variance of ``x - mean`` (:func:`group_norm_stats`). Statistics in float32
    (float64 for float64 input); parameters ``scale`` (torch ``weight``) and ``bias``.
    ``custom_gradient``: differentiate through :func:`group_norm_vjp`'s closed form (the
    model passes ``train``); otherwise through the plain forward, so that ``jax.jvp`` works.
    """

    num_groups: int
    epsilon: float
    custom_gradient: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        sd = stats_dtype(x.dtype)
        xs = x.astype(sd).reshape(x.shape[0], -1, c)                                 # [B, N, C]
        fn = group_norm_vjp if self.custom_gradient else group_norm
        y = fn(xs, scale.astype(sd), bias.astype(sd), self.num_groups, self.epsilon)
        return y.reshape(x.shape).astype(x.dtype)


__all__ = ["GroupNorm", "group_norm", "group_norm_stats", "group_norm_vjp", "stats_dtype"]
