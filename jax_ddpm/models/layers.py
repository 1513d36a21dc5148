"""Layers with PyTorch semantics: torch's default initialisation and torch's BatchNorm2d."""
from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .convolutions import decomposed_conv, resolve_conv_impl


def torch_kernel_init(fan_in: int):
    """torch's default for Conv/Linear weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    (kaiming_uniform_ with a=sqrt(5), as in ``nn.Conv2d.reset_parameters``.)
    """
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


torch_bias_init = torch_kernel_init  # torch draws the bias from the same interval


def conv(features: int, kernel: int, fan_in: int, *, stride: int = 1, padding: int = 1, input_dilation: int = 1,
         dtype: Any = jnp.float32, conv_impl: str = "xla", custom_gradients: bool = False, name: str) -> nn.Conv:
    """An NHWC conv with torch's symmetric padding and default initialisation.

    ``conv_impl``: ``'xla'`` (``lax.conv_general_dilated`` as is), ``'decomposed'`` (the same
    sums as stride-1 convolutions, :mod:`jax_ddpm.models.convolutions`) or ``'auto'``
    (decomposed on CPU). ``custom_gradients`` (decomposed only): allow formulations with a
    ``custom_vjp`` (faster gradients, no ``jax.jvp``). The parameters are the same either way.
    """
    impl = resolve_conv_impl(conv_impl)
    conv_fn = None
    if impl == "decomposed":
        conv_fn = partial(decomposed_conv, custom_gradients=True) if custom_gradients else decomposed_conv
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                   input_dilation=(input_dilation, input_dilation), dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=torch_kernel_init(fan_in), bias_init=torch_bias_init(fan_in), name=name,
                   conv_general_dilated=conv_fn)


class TorchBatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d`` over the channel axis of NHWC input, with torch's semantics.

    Training mode normalises with the biased batch variance and updates
    ``mean <- (1 - momentum) * mean + momentum * batch_mean`` and
    ``var <- (1 - momentum) * var + momentum * unbiased_batch_var`` (Flax's BatchNorm uses
    ``momentum`` the other way round and the biased variance). ``num_batches_tracked``
    counts updates, as torch's buffer does. Statistics are always float32.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        count = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        x32 = x.astype(jnp.float32)
        if train:
            y, mean, var = batch_norm_train(x32, scale, bias, self.epsilon)
            n = x.size // c
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
                count.value = count.value + 1
        else:
            y = (x32 - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon) * scale + bias
        return y.astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, epsilon: float):
    """Training-mode batch norm over every axis but the last: ``(y, mean, var)``.

    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` with the batch mean and the biased
    batch variance (two passes, as torch). Its gradient is the closed-form one (``custom_vjp``):
    with ``xhat = (x - mean) * rstd``, ``dx = scale * rstd * (dy - mean(dy) - xhat * mean(dy * xhat))``
    plus the terms of any cotangent of ``mean`` and ``var``. The same derivative as autodiff of
    the forward, in one reduction pass and one elementwise pass over ``x`` instead of the chain
    autodiff leaves, which XLA:CPU ran 2-4x slower (benchmarks/README.md, "CPU gap"). Forward-mode
    differentiation (``jax.jvp``) is not available through a ``custom_vjp``.
    """
    return _batch_norm_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_stats(x, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.mean(jnp.square(x - mean), axes)  # biased, used to normalise
    return mean, var, jax.lax.rsqrt(var + epsilon)


def _batch_norm_fwd(x, scale, bias, epsilon):
    mean, var, rstd = _batch_norm_stats(x, epsilon)
    y = (x - mean) * rstd * scale + bias
    return (y, mean, var), (x, mean, rstd, scale)


def _batch_norm_bwd(epsilon, res, cts):
    x, mean, rstd, scale = res
    dy, dmean, dvar = cts
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    centered = x - mean
    xhat = centered * rstd
    dbias = jnp.sum(dy, axes)
    dscale = jnp.sum(dy * xhat, axes)
    dx = (scale * rstd / n) * (n * dy - dbias - xhat * dscale)
    # cotangents of the returned statistics (zero in training, where they only feed the
    # running averages): d mean/dx = 1/n; d var/dx = 2 (x - mean) / n (the mean's own
    # dependence on x cancels in the sum of the centred values).
    dx = dx + dmean / n + dvar * (2.0 / n) * centered
    return dx, dscale, dbias


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)
