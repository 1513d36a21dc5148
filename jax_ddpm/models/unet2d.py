"""diffusers' ``UNet2DModel`` (Ho et al.'s DDPM U-Net) as a Flax Linen module, NHWC, and its
registry entry ``ARCH`` (arch ``unet2d``).

The configuration is :class:`UNet2DConfig` (:mod:`jax_ddpm.models.unet2d_config`), whose
fields are diffusers 0.42.1's ``UNet2DModel.__init__`` arguments with their names, meanings
and defaults, so a diffusers ``config.json`` maps onto it key for key
(``jax_ddpm.diffusers_io``). What this port does not implement is refused in
``__post_init__`` with :class:`~jax_ddpm.models.arch.ArchConfigError` naming the field and the
value; nothing is approximated. GroupNorm is :mod:`jax_ddpm.models.group_norm`, the weight
table :mod:`jax_ddpm.models.unet2d_weights`; this module re-exports their names.

Module names are diffusers' attribute paths with ``.`` before an index written ``_``
(``down_blocks.0.resnets.1.conv1`` -> ``down_blocks_0/resnets_1/conv1``; the attention's
``to_out.0`` -> ``to_out_0``), so :func:`weight_table` is a table. The forward pass follows
diffusers' code (``models/unets/unet_2d.py``, ``unet_2d_blocks.py``, ``resnet.py``,
``attention_processor.py``, ``embeddings.py``) op for op; the details that matter numerically
are in ``/work/shared/reference/diffusers.md`` and in the docstrings below. The model knows
nothing about diffusion.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from .arch import ArchConfigError, Architecture, WeightRow  # noqa: F401 (ArchConfigError, WeightRow: re-exported)
from .convolutions import decomposed_conv, resolve_conv_impl
# GroupNorm lives in group_norm; the blocks below read it from this module's globals, so that a
# swap of ``unet2d.GroupNorm`` reaches every block (parity_tests/test_can_fail.py)
from .group_norm import GroupNorm, group_norm, group_norm_stats, group_norm_vjp
from .group_norm import stats_dtype as _stats_dtype
from .layers import torch_bias_init, torch_kernel_init

# the config, its metadata form and its defaults live in unet2d_config, the weight table in
# unet2d_weights; their public names are re-exported here
from .unet2d_config import (ACT_FNS, CONFIG_FIELDS, DOWN_BLOCK_TYPES, METADATA_KEY, MID_BLOCK_TYPES,  # noqa: F401
                            UP_BLOCK_TYPES, UNet2DConfig, channel_plan, config_from_dict, config_from_fields,
                            default_config, from_metadata, to_metadata)
from .unet2d_weights import _flax_path, weight_table  # noqa: F401 (_flax_path: benchmarks/unet2d_ops.py)


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


def size_multiple(config: UNet2DConfig) -> int:
    """``2 ** (number of downsamplings)`` = ``2 ** (len(block_out_channels) - 1)``."""
    return 2 ** (len(config.block_out_channels) - 1)


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
