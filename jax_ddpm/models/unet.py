"""The chapter's U-Net (torch_ref.model.UNet, E1 wiring) as a Flax Linen module, NHWC.

Module names equal torch_ref's attribute paths (``down1.conv1``, ``up2.bnorm``, ...), so
``jax_ddpm.convert`` maps weights with a table. The model knows nothing about diffusion.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from .layers import TorchBatchNorm, conv, torch_bias_init, torch_kernel_init


class SinusoidalPositionEmbeddings(nn.Module):
    """[B] timesteps -> [B, dim]: ``cat(sin(t * f), cos(t * f))``, f_k = 10000^(-k/(dim/2 - 1))."""

    dim: int

    @nn.compact
    def __call__(self, time: jnp.ndarray) -> jnp.ndarray:
        half_dim = self.dim // 2
        embeddings = np.log(10000) / (half_dim - 1)
        # The frequencies are constants: the chapter's float32 exponent, exponentiated in
        # float64 and rounded once (P1), as torch's exp rounds them. XLA's float32 exp
        # (eager, or wherever it is not constant-folded) is 1 ulp off for some k, and
        # sin(t * f) amplifies that by t: 1.5e-5 from torch_ref at t = 999 (parity_tests).
        exponent = np.arange(half_dim, dtype=np.float32) * np.float32(-embeddings)  # [D/2]
        emb = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
        emb = time.astype(jnp.float32)[:, None] * emb[None, :]
        return jnp.concatenate((jnp.sin(emb), jnp.cos(emb)), axis=-1)


class Block(nn.Module):
    """conv3x3 -> ReLU -> BN, + ReLU(Linear(t_emb)), conv3x3 -> ReLU -> BN (the same BN, E5), resample."""

    in_ch: int
    out_ch: int
    time_emb_dim: int
    up: bool = False
    dtype: Any = jnp.float32
    conv_impl: str = "auto"  # see UNet.conv_impl

    @nn.compact
    def __call__(self, x: jnp.ndarray, t: jnp.ndarray, train: bool) -> jnp.ndarray:
        in_ch = 2 * self.in_ch if self.up else self.in_ch
        bnorm = TorchBatchNorm(name="bnorm")  # one module, applied twice (E5)
        conv1 = conv(self.out_ch, 3, in_ch * 9, dtype=self.dtype, conv_impl=self.conv_impl, name="conv1")
        h = bnorm(nn.relu(conv1(x)), train)
        time_emb = nn.relu(nn.Dense(self.out_ch, dtype=self.dtype, param_dtype=jnp.float32,
                                    kernel_init=torch_kernel_init(self.time_emb_dim),
                                    bias_init=torch_bias_init(self.time_emb_dim), name="time_mlp")(t))
        h = h + time_emb[:, None, None, :]  # [B, 1, 1, C]
        conv2 = conv(self.out_ch, 3, self.out_ch * 9, dtype=self.dtype, conv_impl=self.conv_impl, name="conv2")
        h = bnorm(nn.relu(conv2(h)), train)
        if self.up:
            # torch's ConvTranspose2d(k=4, s=2, p=1) is a conv of the 2x-dilated input padded
            # by k-1-p = 2, with the kernel flipped (the flip happens in convert.py).
            transform = conv(self.out_ch, 4, self.out_ch * 16, padding=2, input_dilation=2,
                             dtype=self.dtype, conv_impl=self.conv_impl, name="transform")
        else:
            # custom_gradients in training only: BatchNorm's custom_vjp already rules out jax.jvp there
            transform = conv(self.out_ch, 4, self.out_ch * 16, stride=2, padding=1, dtype=self.dtype,
                             conv_impl=self.conv_impl, custom_gradients=train, name="transform")
        return transform(h)


class UNet(nn.Module):
    """Time-conditioned U-Net predicting the noise eps. Input and output [B, H, W, C].

    H and W must be divisible by 8 (three 2x downsamplings). ``dtype`` is the compute
    dtype; parameters and BatchNorm statistics are float32. ``conv_impl`` chooses how the
    convolutions are written, not what they compute: ``'xla'`` (XLA's convolutions as
    they are), ``'decomposed'`` (strided and transposed convolutions as stride-1 ones,
    :mod:`jax_ddpm.models.convolutions`; ~2x faster train steps on XLA:CPU; in training mode
    the strided ones take a ``custom_vjp``, so ``jax.jvp`` works in evaluation mode only, as
    with BatchNorm) or ``'auto'`` (decomposed on the CPU backend, xla elsewhere). Parameters
    are identical for all three.
    """

    img_channels: int
    time_emb_dim: int = 32
    features: Sequence[int] = (64, 128, 256, 512)
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, t: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        f0, f1, f2, f3 = self.features
        _, h, w, c = x.shape
        if h % 8 or w % 8:
            raise ValueError(f"image height and width must be divisible by 8, got {h}x{w}")
        if c != self.img_channels:
            raise ValueError(f"expected {self.img_channels} channels, got {c}")
        x = x.astype(self.dtype)
        temb = SinusoidalPositionEmbeddings(self.time_emb_dim, name="time_mlp")(t).astype(self.dtype)
        cv = dict(dtype=self.dtype, conv_impl=self.conv_impl)
        blk = dict(time_emb_dim=self.time_emb_dim, **cv)
        x1 = conv(f0, 3, c * 9, name="inc", **cv)(x)                               # [B, H,   W,   f0]
        x2 = Block(f0, f1, name="down1", **blk)(x1, temb, train)                    # [B, H/2, W/2, f1]
        x3 = Block(f1, f2, name="down2", **blk)(x2, temb, train)                    # [B, H/4, W/4, f2]
        x4 = Block(f2, f3, name="down3", **blk)(x3, temb, train)                    # [B, H/8, W/8, f3]
        y = Block(f3, f2, up=True, name="up1", **blk)(jnp.concatenate([x4, x4], -1), temb, train)  # H/4, f2
        y = Block(f2, f1, up=True, name="up2", **blk)(jnp.concatenate([y, x3], -1), temb, train)   # H/2, f1
        y = Block(f1, f0, up=True, name="up3", **blk)(jnp.concatenate([y, x2], -1), temb, train) + x1  # H, f0
        out = conv(c, 3, f0 * 9, name="outc", **cv)(y)                             # [B, H, W, C]
        return out.astype(jnp.float32)
