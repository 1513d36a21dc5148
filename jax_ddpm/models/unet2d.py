"""diffusers' ``UNet2DModel`` (Ho et al.'s DDPM U-Net) as a Flax Linen module, NHWC, and its
registry entry ``ARCH`` (arch ``unet2d``).

The configuration is :class:`UNet2DConfig`, whose fields are diffusers 0.42.1's
``UNet2DModel.__init__`` arguments with their names, meanings and defaults, so a diffusers
``config.json`` maps onto it key for key (``jax_ddpm.diffusers_io``). What this port does not
implement is refused in ``__post_init__`` with :class:`~jax_ddpm.models.arch.ArchConfigError`
naming the field and the value; nothing is approximated.

Module names are diffusers' attribute paths with ``.`` before an index written ``_``
(``down_blocks.0.resnets.1.conv1`` -> ``down_blocks_0/resnets_1/conv1``; the attention's
``to_out.0`` -> ``to_out_0``), so :func:`weight_table` is a table. The forward pass follows
diffusers' code (``models/unets/unet_2d.py``, ``unet_2d_blocks.py``, ``resnet.py``,
``attention_processor.py``, ``embeddings.py``) op for op; the details that matter numerically
are in ``/work/shared/reference/diffusers.md`` and in the docstrings below. The model knows
nothing about diffusion.
"""
from __future__ import annotations

import json
import math
from functools import partial
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .arch import ArchConfigError, Architecture, WeightRow
from .convolutions import decomposed_conv, resolve_conv_impl
from .layers import torch_bias_init, torch_kernel_init

# the config lives in unet2d_config; its public names are re-exported here
from .unet2d_config import (ACT_FNS, CONFIG_FIELDS, DOWN_BLOCK_TYPES, METADATA_KEY, MID_BLOCK_TYPES,  # noqa: F401
                            UP_BLOCK_TYPES, UNet2DConfig, channel_plan, config_from_dict)


# ----------------------------------------------------------------------------- layers
def _conv(features: int, kernel: int, fan_in: int, *, stride: int = 1, padding=((1, 1), (1, 1)),
          dtype: Any, conv_impl: str, name: str) -> nn.Conv:
    """torch's ``Conv2d`` (default init, explicit padding) in NHWC."""
    conv_fn = decomposed_conv if resolve_conv_impl(conv_impl) == "decomposed" else None
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                   param_dtype=jnp.float32, kernel_init=torch_kernel_init(fan_in), bias_init=torch_bias_init(fan_in),
                   conv_general_dilated=conv_fn, name=name)


def _dense(features: int, fan_in: int, *, dtype: Any, name: str) -> nn.Dense:
    """torch's ``Linear`` (default init)."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=torch_kernel_init(fan_in),
                    bias_init=torch_bias_init(fan_in), name=name)


def _stats_dtype(dtype) -> Any:
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
        sd = _stats_dtype(x.dtype)
        xs = x.astype(sd).reshape(x.shape[0], -1, c)                                 # [B, N, C]
        fn = group_norm_vjp if self.custom_gradient else group_norm
        y = fn(xs, scale.astype(sd), bias.astype(sd), self.num_groups, self.epsilon)
        return y.reshape(x.shape).astype(x.dtype)


def timestep_frequencies(dim: int, freq_shift: float, max_period: float = 10000.0) -> np.ndarray:
    """diffusers' ``exp(-ln(max_period) * arange(dim // 2) / (dim // 2 - freq_shift))``, float32 [dim // 2].

    A constant: the exponent formed in float32 exactly as torch forms it (``-ln(10000)``
    rounded to float32, times the float32 ``arange``, divided by the float32 ``half - shift``:
    bit-identical to torch's), then its exp correctly rounded (float64 exp, rounded once).
    torch's float32 exp is not correctly rounded everywhere (platform-dependent vector code):
    measured on the development CPU, 1 ulp off this table in 932 of 89,698 entries over dims
    4..598 and shifts 0, 1, never more; the tiny configs of the tests agree exactly, but e.g.
    dim 64 with shift 0 has one such entry (k = 3, f = 0.42), which moves sin(t f) by up to
    t ulp(f) = 3e-5 at t = 999: float32 parity is unaffected (1.2e-6), float64 parity drops
    to 7e-7 at large t. XLA's float32 exp is worse (diffusers.md), hence the constant.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - freq_shift)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_embedding(t: jnp.ndarray, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jnp.ndarray:
    """diffusers' ``get_timestep_embedding``: [B] -> [B, dim] float32, ``cat(sin, cos)``
    (``cat(cos, sin)`` with ``flip_sin_to_cos``), a zero column appended for odd ``dim``.

    Always float32, as diffusers (the caller casts to the compute dtype).
    """
    freqs = jnp.asarray(timestep_frequencies(dim, freq_shift))
    arg = t.astype(jnp.float32)[:, None] * freqs[None, :]                  # [B, dim // 2]
    parts = (jnp.cos(arg), jnp.sin(arg)) if flip_sin_to_cos else (jnp.sin(arg), jnp.cos(arg))
    emb = jnp.concatenate(parts, axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers' ``TimestepEmbedding``)."""

    in_dim: int
    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, emb: jnp.ndarray) -> jnp.ndarray:
        h = nn.silu(_dense(self.dim, self.in_dim, dtype=self.dtype, name="linear_1")(emb))
        return _dense(self.dim, self.dim, dtype=self.dtype, name="linear_2")(h)


class ResnetBlock2D(nn.Module):
    """``GN -> SiLU -> conv1; + time_emb_proj(SiLU(temb)); GN -> SiLU -> dropout -> conv2``,
    a 1x1 ``conv_shortcut`` iff C_in != C_out, ``(x + h) / output_scale_factor``."""

    out_channels: int
    groups: int
    eps: float
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, temb: jnp.ndarray, train: bool) -> jnp.ndarray:
        c_in, c_out = x.shape[-1], self.out_channels
        cv = dict(dtype=self.dtype, conv_impl=self.conv_impl)
        h = nn.silu(GroupNorm(self.groups, self.eps, custom_gradient=train, name="norm1")(x))
        h = _conv(c_out, 3, c_in * 9, name="conv1", **cv)(h)                   # [B, H, W, C_out]
        temb = _dense(c_out, temb.shape[-1], dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
        h = h + temb[:, None, None, :]
        h = nn.silu(GroupNorm(self.groups, self.eps, custom_gradient=train, name="norm2")(h))
        # init needs no dropout key (dropout does not change the parameters' shapes)
        h = nn.Dropout(self.dropout, deterministic=not train or self.is_initializing())(h)
        h = _conv(c_out, 3, c_out * 9, name="conv2", **cv)(h)
        if c_in != c_out:
            x = _conv(c_out, 1, c_in, padding=((0, 0), (0, 0)), name="conv_shortcut", **cv)(x)
        return (x + h) / jnp.asarray(self.output_scale_factor, h.dtype)


class AttentionBlock(nn.Module):
    """diffusers' ``Attention(_from_deprecated_attn_block=True)`` over the H*W tokens (row-major):
    ``GN -> to_q/to_k/to_v (bias) -> softmax(q k^T / sqrt(head_dim)) v per head -> to_out.0``,
    ``+ x``, ``/ rescale_output_factor``. Softmax in float32 (float64 for float64 input)."""

    head_dim: int | None  # None: one head
    groups: int
    eps: float
    rescale_output_factor: float = 1.0
    dtype: Any = jnp.float32
    custom_gradient: bool = False  # GroupNorm's closed-form gradient (the model passes train)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, h, w, c = x.shape
        d = self.head_dim or c
        heads = c // d
        tokens = x.reshape(b, h * w, c)                                        # [B, N, C]
        hs = GroupNorm(self.groups, self.eps, custom_gradient=self.custom_gradient, name="group_norm")(tokens)
        q, k, v = (_dense(heads * d, c, dtype=self.dtype, name=n)(hs).reshape(b, h * w, heads, d)
                   for n in ("to_q", "to_k", "to_v"))                          # [B, N, heads, d]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * jnp.asarray(1 / math.sqrt(d), q.dtype)
        probs = nn.softmax(scores.astype(_stats_dtype(q.dtype)), axis=-1).astype(v.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, h * w, heads * d)
        o = _dense(c, heads * d, dtype=self.dtype, name="to_out_0")(o).reshape(b, h, w, c)
        return (o + x) / jnp.asarray(self.rescale_output_factor, o.dtype)


class Downsample2D(nn.Module):
    """3x3 stride-2 ``conv``; ``padding`` 0 pads right and bottom by one (TF SAME), 1 pads all sides."""

    padding: int
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding, self.padding),) * 2
        return _conv(c, 3, c * 9, stride=2, padding=pad, dtype=self.dtype, conv_impl=self.conv_impl,
                     name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest 2x (each pixel repeated) then a 3x3 ``conv``."""

    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)                    # [B, 2H, 2W, C]
        return _conv(c, 3, c * 9, dtype=self.dtype, conv_impl=self.conv_impl, name="conv")(x)


class DownBlock2D(nn.Module):
    """``DownBlock2D`` / ``AttnDownBlock2D`` (``attention``): ``resnets_j`` [+ ``attentions_j``],
    then ``downsamplers_0`` unless it is the last block. Returns (h, the states pushed as skips)."""

    out_channels: int
    num_layers: int
    attention: bool
    add_downsample: bool
    resnet: Mapping[str, Any]
    attn: Mapping[str, Any]
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, h: jnp.ndarray, temb: jnp.ndarray, train: bool):
        skips = []
        for j in range(self.num_layers):
            h = ResnetBlock2D(self.out_channels, name=f"resnets_{j}", **self.resnet)(h, temb, train)
            if self.attention:
                h = AttentionBlock(name=f"attentions_{j}", custom_gradient=train, **self.attn)(h)
            skips.append(h)
        if self.add_downsample:
            h = Downsample2D(self.downsample_padding, dtype=self.resnet["dtype"], conv_impl=self.resnet["conv_impl"],
                             name="downsamplers_0")(h)                          # [B, H/2, W/2, C]
            skips.append(h)
        return h, skips


class UpBlock2D(nn.Module):
    """``UpBlock2D`` / ``AttnUpBlock2D``: per layer ``cat([h, skip])`` (the skip popped from the
    end), ``resnets_j`` [+ ``attentions_j``]; then ``upsamplers_0`` unless it is the last block."""

    out_channels: int
    num_layers: int
    attention: bool
    add_upsample: bool
    resnet: Mapping[str, Any]
    attn: Mapping[str, Any]

    @nn.compact
    def __call__(self, h: jnp.ndarray, skips: Sequence[jnp.ndarray], temb: jnp.ndarray, train: bool):
        skips = list(skips)
        for j in range(self.num_layers):
            h = jnp.concatenate([h, skips.pop()], axis=-1)                     # [B, h, w, C + C_skip]
            h = ResnetBlock2D(self.out_channels, name=f"resnets_{j}", **self.resnet)(h, temb, train)
            if self.attention:
                h = AttentionBlock(name=f"attentions_{j}", custom_gradient=train, **self.attn)(h)
        if self.add_upsample:
            h = Upsample2D(dtype=self.resnet["dtype"], conv_impl=self.resnet["conv_impl"],
                           name="upsamplers_0")(h)                             # [B, 2h, 2w, C]
        return h


class UNetMidBlock2D(nn.Module):
    """``resnets_0 [-> attentions_0] -> resnets_1``, all with ``output_scale_factor``
    (the config's ``mid_block_scale_factor``)."""

    channels: int
    add_attention: bool
    output_scale_factor: float
    resnet: Mapping[str, Any]
    attn: Mapping[str, Any]

    @nn.compact
    def __call__(self, h: jnp.ndarray, temb: jnp.ndarray, train: bool) -> jnp.ndarray:
        s = self.output_scale_factor
        h = ResnetBlock2D(self.channels, output_scale_factor=s, name="resnets_0", **self.resnet)(h, temb, train)
        if self.add_attention:
            h = AttentionBlock(rescale_output_factor=s, name="attentions_0", custom_gradient=train,
                               **self.attn)(h)
        return ResnetBlock2D(self.channels, output_scale_factor=s, name="resnets_1", **self.resnet)(h, temb, train)


class UNet2DModel(nn.Module):
    """diffusers' ``UNet2DModel`` (positional time embedding, no class labels). Input and output
    [B, H, W, C]; ``t`` [B] (integer or real timesteps).

    The fields are :class:`UNet2DConfig`'s (unpacked by :func:`build`). H and W must be
    divisible by ``2 ** (len(block_out_channels) - 1)``. ``dtype`` is the compute dtype;
    parameters are float32, GroupNorm statistics and the attention softmax float32 (float64
    for a float64 model), the time embedding's sinusoids float32 whatever the dtype (as
    diffusers) and the output float32 (float64 for a float64 model). ``conv_impl`` chooses how convolutions are written
    (:func:`~jax_ddpm.models.convolutions.resolve_conv_impl`: ``'decomposed'`` rewrites
    stride-1 convolutions on maps no larger than the kernel as im2col; the 3x3 stride-2
    downsampling convolution stays XLA's), not what they compute; parameters are the same.
    ``train=True`` with ``dropout > 0`` needs ``rngs={'dropout': key}`` (``init`` does not).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    mid_block: bool = True
    add_attention: bool = True
    attention_head_dim: int | None = None
    norm_num_groups: int = 8
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    dropout: float = 0.0
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    time_embed_dim: int | None = None  # None: 4 * block_out_channels[0]
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, t: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        boc = tuple(self.block_out_channels)
        n = len(boc)
        multiple = 2 ** (n - 1)
        b, hgt, wid, c = x.shape
        if hgt % multiple or wid % multiple:
            raise ValueError(f"image height and width must be divisible by {multiple}, got {hgt}x{wid}")
        if c != self.in_channels:
            raise ValueError(f"expected {self.in_channels} channels, got {c}")
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        cv = dict(dtype=self.dtype, conv_impl=self.conv_impl)
        res = dict(groups=self.norm_num_groups, eps=self.norm_eps, dropout=self.dropout, **cv)
        att = dict(head_dim=self.attention_head_dim, groups=self.norm_num_groups, eps=self.norm_eps,
                   dtype=self.dtype)

        x = x.astype(self.dtype)
        if self.center_input_sample:
            x = 2 * x - 1.0
        temb = timestep_embedding(t, boc[0], self.flip_sin_to_cos, self.freq_shift).astype(self.dtype)
        temb = TimestepEmbedding(boc[0], self.time_embed_dim or 4 * boc[0], dtype=self.dtype,
                                 name="time_embedding")(temb)                  # [B, D_t]

        h = _conv(boc[0], 3, c * 9, name="conv_in", **cv)(x)                   # [B, H, W, C0]
        skips = [h]
        for i, kind in enumerate(self.down_block_types):
            h, pushed = DownBlock2D(boc[i], self.layers_per_block, kind == "AttnDownBlock2D", i < n - 1, res, att,
                                    self.downsample_padding, name=f"down_blocks_{i}")(h, temb, train)
            skips += pushed
        if self.mid_block:
            groups = self.attn_norm_num_groups or self.norm_num_groups
            h = UNetMidBlock2D(boc[-1], self.add_attention, self.mid_block_scale_factor, res,
                               dict(att, groups=groups), name="mid_block")(h, temb, train)
        for i, kind in enumerate(self.up_block_types):
            k = self.layers_per_block + 1
            h = UpBlock2D(boc[n - 1 - i], k, kind == "AttnUpBlock2D", i < n - 1, res, att,
                          name=f"up_blocks_{i}")(h, skips[-k:], temb, train)
            skips = skips[:-k]

        h = nn.silu(GroupNorm(self.norm_num_groups, self.norm_eps, custom_gradient=train, name="conv_norm_out")(h))
        out = _conv(self.out_channels, 3, boc[0] * 9, name="conv_out", **cv)(h)  # [B, H, W, C_out]
        return out.astype(_stats_dtype(self.dtype))  # float32 (float64 for a float64 model)


# ----------------------------------------------------------------------------- registry entry
def build(config: UNet2DConfig, *, dtype: Any = jnp.float32, conv_impl: str = "auto") -> UNet2DModel:
    """The module for ``config`` (its fields unpacked; the ones that do not enter the forward
    pass, ``sample_size`` and ``num_train_timesteps``, left behind)."""
    return UNet2DModel(
        in_channels=config.in_channels, out_channels=config.out_channels,
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        down_block_types=config.down_block_types, up_block_types=config.up_block_types,
        mid_block=config.mid_block_type is not None, add_attention=config.add_attention,
        attention_head_dim=config.attention_head_dim, norm_num_groups=config.norm_num_groups,
        attn_norm_num_groups=config.attn_norm_num_groups, norm_eps=config.norm_eps, dropout=config.dropout,
        flip_sin_to_cos=bool(config.flip_sin_to_cos), freq_shift=config.freq_shift,
        downsample_padding=config.downsample_padding, mid_block_scale_factor=config.mid_block_scale_factor,
        center_input_sample=bool(config.center_input_sample), time_embed_dim=config.time_embed_dim,
        dtype=dtype, conv_impl=conv_impl)


def _module_rows(torch_prefix: str, flax_path: tuple[str, ...], kind: str) -> list[WeightRow]:
    p = ("params",) + flax_path
    if kind == "conv":
        return [(f"{torch_prefix}.weight", p + ("kernel",), "conv"), (f"{torch_prefix}.bias", p + ("bias",), "same")]
    if kind == "dense":
        return [(f"{torch_prefix}.weight", p + ("kernel",), "dense"), (f"{torch_prefix}.bias", p + ("bias",), "same")]
    if kind == "norm":
        return [(f"{torch_prefix}.weight", p + ("scale",), "same"), (f"{torch_prefix}.bias", p + ("bias",), "same")]
    raise AssertionError(kind)


def _flax_path(torch_prefix: str) -> tuple[str, ...]:
    """``down_blocks.0.resnets.1.conv1`` -> ``('down_blocks_0', 'resnets_1', 'conv1')``."""
    parts, out = torch_prefix.split("."), []
    for part in parts:
        if part.isdigit():
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _rows(torch_prefix: str, kind: str) -> list[WeightRow]:
    return _module_rows(torch_prefix, _flax_path(torch_prefix), kind)


def weight_table(config: UNet2DConfig) -> list[WeightRow]:
    """Rows (torch_name, flax_path, layout) for every tensor of ``config``'s model, named as
    diffusers 0.42.1's ``UNet2DModel.state_dict()`` (attention: ``to_q/to_k/to_v/to_out.0``)."""
    plan = channel_plan(config)
    rows = _rows("conv_in", "conv") + _rows("time_embedding.linear_1", "dense") + \
        _rows("time_embedding.linear_2", "dense")
    for where, c_in, c_out in plan["resnets"]:
        rows += _rows(f"{where}.norm1", "norm") + _rows(f"{where}.conv1", "conv") + \
            _rows(f"{where}.time_emb_proj", "dense") + _rows(f"{where}.norm2", "norm") + _rows(f"{where}.conv2", "conv")
        if c_in != c_out:
            rows += _rows(f"{where}.conv_shortcut", "conv")
    for where, _ in plan["attention"]:
        rows += _rows(f"{where}.group_norm", "norm")
        rows += [r for n in ("to_q", "to_k", "to_v", "to_out.0") for r in _rows(f"{where}.{n}", "dense")]
    n = len(config.block_out_channels)
    for i in range(n - 1):
        rows += _rows(f"down_blocks.{i}.downsamplers.0.conv", "conv")
        rows += _rows(f"up_blocks.{i}.upsamplers.0.conv", "conv")
    rows += _rows("conv_norm_out", "norm") + _rows("conv_out", "conv")
    return rows


def size_multiple(config: UNet2DConfig) -> int:
    """``2 ** (number of downsamplings)`` = ``2 ** (len(block_out_channels) - 1)``."""
    return 2 ** (len(config.block_out_channels) - 1)


def to_metadata(config: UNet2DConfig) -> dict[str, str]:
    """``{'arch': 'unet2d', 'unet2d_config': <the config as one JSON object>}``."""
    return {"arch": "unet2d", METADATA_KEY: json.dumps(config.to_dict(), sort_keys=True)}


def from_metadata(meta: Mapping[str, str]) -> UNet2DConfig:
    """Inverse of :func:`to_metadata`. Raises ValueError (ArchConfigError naming a field)."""
    if METADATA_KEY not in meta:
        raise ValueError(f"metadata lacks {METADATA_KEY}")
    try:
        d = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"metadata {METADATA_KEY} is not JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"metadata {METADATA_KEY} is not a JSON object")
    return config_from_dict(d)


def default_config(channels: int = 1) -> UNet2DConfig:
    """A digits-sized model (1.11 M parameters): 3 levels (32, 64, 64), one resnet per
    level, attention at the lowest resolution (4x4 for 16x16 images) and in the mid block,
    head_dim 16, 8 groups, sample_size 16; everything else diffusers' defaults."""
    return UNet2DConfig(sample_size=16, in_channels=channels, out_channels=channels,
                        block_out_channels=(32, 64, 64), layers_per_block=1,
                        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                        attention_head_dim=16, norm_num_groups=8)


def config_from_fields(channels: int, arch_config: str = "") -> UNet2DConfig:
    """The config of ``ModelConfig.arch_config``: the config as one JSON object (the format of
    :func:`to_metadata`'s ``unet2d_config``), or ``""`` (work folders written before the field)
    for the digits-sized :func:`default_config`. Its ``in_channels`` and ``out_channels`` must
    be ``channels``.

    Raises:
      ValueError: not a JSON object; ArchConfigError: a refused value or other channels.
    """
    if not arch_config:
        return default_config(channels)
    config = from_metadata({METADATA_KEY: arch_config})
    for name in ("in_channels", "out_channels"):
        if getattr(config, name) != channels:
            raise ArchConfigError(name, f"must equal the image channels ({channels}), got {getattr(config, name)}")
    return config


ARCH = Architecture(
    name="unet2d", config_cls=UNet2DConfig, build=build, weight_table=weight_table, has_batch_stats=False,
    size_multiple=size_multiple, config_from_fields=config_from_fields, fields=("arch_config",),
    to_metadata=to_metadata, from_metadata=from_metadata,
    description="diffusers' UNet2DModel (GroupNorm, attention; Ho et al.'s DDPM U-Net)")

__all__ = ["ARCH", "AttentionBlock", "CONFIG_FIELDS", "DownBlock2D", "Downsample2D", "GroupNorm", "ResnetBlock2D",
           "group_norm", "group_norm_stats", "group_norm_vjp",
           "TimestepEmbedding", "UNet2DConfig", "UNet2DModel", "UNetMidBlock2D", "UpBlock2D", "Upsample2D",
           "build", "channel_plan", "config_from_dict", "config_from_fields", "default_config", "from_metadata",
           "size_multiple", "timestep_embedding", "timestep_frequencies", "to_metadata", "weight_table"]
