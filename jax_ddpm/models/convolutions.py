"""Stride-1 formulations of the U-Net's resampling convolutions (same sums, faster on XLA:CPU).

The chapter's U-Net has three kinds of convolution:

* 3x3 stride-1 convolutions (padding 1);
* the down-Blocks' ``Conv2d(k=4, s=2, p=1)``;
* the up-Blocks' ``ConvTranspose2d(k=4, s=2, p=1)``, which ``layers.conv`` writes as a
  4x4 convolution of the 2x-dilated input padded by 2 (kernel flipped by ``convert.py``).

XLA:CPU runs the last two badly: the dilated input makes 3/4 of the transposed
convolution's multiply-adds multiply zeros, and the backward pass of both (and of every
stride-2 conv) becomes a convolution with a dilated operand. On top of that, a 3x3
convolution over a 2x2 feature map (the bottom of a 16x16 U-Net) has a kernel larger than
its input, so XLA swaps the operands and falls back to a slow generic loop. Measured on
the 2-core CPU of this project, those few convolutions took more than half of a train step
(benchmarks/README.md has the numbers).

:func:`decomposed_conv` is a drop-in replacement for ``lax.conv_general_dilated`` (flax's
``nn.Conv(conv_general_dilated=...)``) that computes exactly the same sums of products, each
product once, as stride-1 convolutions and matrix products:

* ``stride 2, k = 2m``: space-to-depth. ``pad(x)`` is cut into 2x2 blocks stacked along
  channels, ``[B, H', W', C] -> [B, H'/2, W'/2, 4C]``; the kernel is cut the same way,
  ``[2m, 2m, C, O] -> [m, m, 4C, O]``; a VALID stride-1 ``m x m`` convolution of the two is
  the strided convolution, tap for tap.
* ``input dilation 2, k = 4, padding 2`` (the transposed convolution): sub-pixel phases.
  Output pixel ``(2i + a, 2j + b)`` only meets the kernel taps ``K[a::2, b::2]`` (2x2) over the
  input rows ``i - 1 + a, i + a`` and columns ``j - 1 + b, j + b``; each of the four phases is
  a stride-1 2x2 convolution with padding ``(1 - a, a) x (1 - b, b)``, and the four results are
  interleaved (depth-to-space). The zeros of the dilated input are never multiplied.
* ``stride 1`` on a feature map no larger than the kernel: ``im2col`` (the kernel-size shifted
  copies concatenated along channels) and one matrix product.
* with ``custom_gradients=True`` (the U-Net passes it in training mode only), ``stride 2,
  k = 4, padding 1`` (the down-Blocks' convolution) on maps of at least ``STRIDED_NATIVE_MIN``
  pixels a side: a ``jax.custom_vjp`` that takes the fastest formulation of each part, measured
  part by part on XLA:CPU (benchmarks/README.md, "CPU gap"): XLA's own strided convolution for
  the forward pass and for the weight gradient, and for the input gradient (a transposed
  convolution of the output gradient) the sub-pixel phases above, with the kernel flipped and
  its channel axes swapped. Smaller maps take the space-to-depth path, where XLA's strided
  convolution is slow. Forward-mode differentiation (``jax.jvp``) is not available through a
  ``custom_vjp``; in training mode BatchNorm's ``custom_vjp`` already rules it out, and in
  evaluation mode the U-Net keeps the space-to-depth form, through which ``jax.jvp`` works.

Summation order differs from XLA's own convolution, so results agree to float rounding
(parity_tests hold; tests/test_jax_convolutions.py compares the formulations), not bit for bit.
Anything else (other strides, dilations, layouts, grouped convolutions) goes to
``lax.conv_general_dilated`` unchanged.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "decomposed")
_NHWC = ("NHWC", "HWIO", "NHWC")
STRIDED_NATIVE_MIN = 8  # smallest map side for the custom-gradient 4x4 stride-2 convolution


def resolve_conv_impl(conv_impl: str) -> str:
    """``'auto'`` -> ``'decomposed'`` on the CPU backend, ``'xla'`` elsewhere (cuDNN has native
    transposed and strided convolutions; the decomposition was only measured to help XLA:CPU).

    Args:
      conv_impl: one of ``CONV_IMPLS``.
    Returns:
      ``'xla'`` or ``'decomposed'``.
    """
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    if conv_impl == "auto":
        return "decomposed" if jax.default_backend() == "cpu" else "xla"
    return conv_impl


def _conv_s1(x: jnp.ndarray, kernel: jnp.ndarray, padding: Sequence[tuple[int, int]], precision: Any) -> jnp.ndarray:
    """Stride-1 NHWC/HWIO convolution; im2col + one matrix product when the (padded-out)
    feature map is no larger than the kernel, where XLA:CPU would swap the operands."""
    b, h, w, c = x.shape
    kh, kw, _, o = kernel.shape
    if min(h, w) > max(kh, kw):
        return lax.conv_general_dilated(x, kernel, (1, 1), tuple(padding), dimension_numbers=_NHWC,
                                        precision=precision)
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho, wo = h + pt + pb - kh + 1, w + pl + pr - kw + 1
    patches = jnp.concatenate([xp[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)], axis=-1)
    # patches: [B, Ho, Wo, kh*kw*C], channel index (i, j, c) = the kernel's row-major order
    return jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(kh * kw * c, o), precision=precision)


def _strided_as_space_to_depth(x: jnp.ndarray, kernel: jnp.ndarray, padding: Sequence[tuple[int, int]],
                               precision: Any) -> jnp.ndarray:
    """``conv(x, K, stride 2, padding)`` for an even kernel as a VALID stride-1 conv of
    ``space_to_depth(pad(x))`` with the kernel cut into 2x2 blocks."""
    b, h, w, c = x.shape
    kh, kw, _, o = kernel.shape
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))       # [B, Hp, Wp, C]
    hp, wp = h + pt + pb, w + pl + pr
    s2d = xp.reshape(b, hp // 2, 2, wp // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp // 2, wp // 2, 4 * c)
    # kernel [kh, kw, C, O] = [kh/2, 2(dy), kw/2, 2(dx), C, O] -> [kh/2, kw/2, (dy, dx, C), O]
    k2 = kernel.reshape(kh // 2, 2, kw // 2, 2, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(kh // 2, kw // 2, 4 * c, o)
    return _conv_s1(s2d, k2, ((0, 0), (0, 0)), precision)     # [B, Hp/2 - kh/2 + 1, ..., O]


def _transposed_as_subpixel(x: jnp.ndarray, kernel: jnp.ndarray, precision: Any) -> jnp.ndarray:
    """``conv(dilate(x, 2), K, padding 2)`` for a 4x4 K (= ConvTranspose2d(k=4, s=2, p=1)) as
    four stride-1 2x2 convolutions, one per output phase, interleaved. [B, H, W, C] -> [B, 2H, 2W, O]."""
    b, h, w, _ = x.shape
    o = kernel.shape[-1]
    rows = []
    for a in (0, 1):
        phases = [_conv_s1(x, kernel[a::2, p::2], ((1 - a, a), (1 - p, p)), precision) for p in (0, 1)]
        rows.append(jnp.stack(phases, axis=3))                  # [B, H, W, 2(b), O]
    y = jnp.stack(rows, axis=2)                                 # [B, H, 2(a), W, 2(b), O]
    return y.reshape(b, 2 * h, 2 * w, o)


def _strided_4x4_input_grad(dy: jnp.ndarray, kernel: jnp.ndarray, precision: Any) -> jnp.ndarray:
    """The input gradient of ``conv(x, K, stride 2, padding 1)``, 4x4 K: ``ConvTranspose2d(k=4,
    s=2, p=1)`` of ``dy``, i.e. :func:`_transposed_as_subpixel` with K flipped and in/out swapped."""
    return _transposed_as_subpixel(dy, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), precision)


def _strided_4x4(x: jnp.ndarray, kernel: jnp.ndarray, precision: Any) -> jnp.ndarray:
    """``conv(x, K, stride 2, padding 1)`` for a 4x4 K: XLA's strided convolution forward and
    weight gradient; input gradient :func:`_strided_4x4_input_grad` (sub-pixel phases)."""
    conv = partial(lax.conv_general_dilated, window_strides=(2, 2), padding=((1, 1), (1, 1)),
                   dimension_numbers=_NHWC, precision=precision)

    @jax.custom_vjp
    def strided(x, kernel):
        return conv(x, kernel)

    def fwd(x, kernel):
        return conv(x, kernel), (x, kernel)

    def bwd(res, dy):
        x, kernel = res
        dkernel = jax.vjp(lambda k: conv(x, k), kernel)[1](dy)[0]
        return _strided_4x4_input_grad(dy, kernel, precision), dkernel

    strided.defvjp(fwd, bwd)
    return strided(x, kernel)


def decomposed_conv(lhs: jnp.ndarray, rhs: jnp.ndarray, window_strides: Sequence[int], padding: Any,
                    lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                    dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None,
                    custom_gradients: bool = False, **kwargs) -> jnp.ndarray:
    """``lax.conv_general_dilated`` with the cases above rewritten as stride-1 convolutions.

    Same signature as ``lax.conv_general_dilated`` (as flax's ``nn.Conv`` calls it), plus
    ``custom_gradients``: allow the ``custom_vjp`` formulation of the 4x4 stride-2 convolution
    (faster gradients on XLA:CPU, no ``jax.jvp``). Cases it does not rewrite are passed through
    unchanged.
    """
    def passthrough():
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision, **kwargs)

    if (lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1 or kwargs or isinstance(padding, str)
            or tuple(rhs_dilation or (1, 1)) != (1, 1)
            or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
        return passthrough()
    strides = tuple(window_strides)
    dilation = tuple(lhs_dilation or (1, 1))
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    kh, kw = rhs.shape[:2]
    _, h, w, _ = lhs.shape
    if strides == (1, 1) and dilation == (1, 1):
        return _conv_s1(lhs, rhs, padding, precision)
    if (custom_gradients and strides == (2, 2) and dilation == (1, 1) and (kh, kw) == (4, 4)
            and padding == ((1, 1), (1, 1))
            and h % 2 == 0 and w % 2 == 0 and min(h, w) >= STRIDED_NATIVE_MIN):
        return _strided_4x4(lhs, rhs, precision)
    if (strides == (2, 2) and dilation == (1, 1) and kh % 2 == 0 and kw % 2 == 0
            and (h + sum(padding[0])) % 2 == 0 and (w + sum(padding[1])) % 2 == 0):
        return _strided_as_space_to_depth(lhs, rhs, padding, precision)
    if strides == (1, 1) and dilation == (2, 2) and (kh, kw) == (4, 4) and padding == ((2, 2), (2, 2)):
        return _transposed_as_subpixel(lhs, rhs, precision)
    return passthrough()
