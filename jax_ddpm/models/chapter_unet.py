"""The chapter's U-Net (torch_ref.model.UNet, E1 wiring) as a Flax Linen module, NHWC,
and its registry entry ``ARCH`` (arch ``chapter``).

Module names equal torch_ref's attribute paths (``down1.conv1``, ``up2.bnorm``, ...), so
``jax_ddpm.convert`` maps weights with a table (:func:`weight_table`). The model knows
nothing about diffusion.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from .arch import ArchConfigError, Architecture, WeightRow
from .layers import TorchBatchNorm, conv, torch_bias_init, torch_kernel_init

DOWNSAMPLINGS = 3  # the U-Net halves H and W three times
SIZE_MULTIPLE = 2 ** DOWNSAMPLINGS


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
        # sin(t * f) amplifies that by t (measured against torch_ref by parity_tests).
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
    :mod:`jax_ddpm.models.convolutions`; faster train steps on XLA:CPU, measured in
    benchmarks/README.md; in training mode the strided ones take a ``custom_vjp``, so
    ``jax.jvp`` works in evaluation mode only, as with BatchNorm) or ``'auto'`` (decomposed on the CPU backend, xla elsewhere). Parameters
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
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ValueError(f"image height and width must be divisible by {SIZE_MULTIPLE}, got {h}x{w}")
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


# ----------------------------------------------------------------------------- registry entry
@dataclass(frozen=True)
class ChapterUNetConfig:
    """The chapter's U-Net: ``UNet(img_channels, time_emb_dim, features)`` (torch_ref's arguments)."""

    img_channels: int = 1
    time_emb_dim: int = 32
    features: tuple[int, ...] = (64, 128, 256, 512)

    def __post_init__(self):
        object.__setattr__(self, "features", tuple(self.features))
        if not isinstance(self.img_channels, (int, np.integer)) or self.img_channels < 1:
            raise ArchConfigError("img_channels", f"must be a positive integer, got {self.img_channels!r}")
        if not isinstance(self.time_emb_dim, (int, np.integer)) or self.time_emb_dim < 4 or self.time_emb_dim % 2:
            raise ArchConfigError("time_emb_dim", f"must be an even integer >= 4, got {self.time_emb_dim!r}")
        if len(self.features) != 4 or any(not isinstance(f, (int, np.integer)) or f < 1 for f in self.features):
            raise ArchConfigError("features", "the chapter's U-Net has four levels: 4 positive integers, got "
                                  + ",".join(map(str, self.features)))


BLOCKS = ("down1", "down2", "down3", "up1", "up2", "up3")
METADATA_KEYS = ("img_channels", "time_emb_dim", "features")


def weight_table(config: ChapterUNetConfig | None = None) -> list[WeightRow]:
    """Rows (torch_name, flax_path, layout) for every tensor of the UNet (the same for every config)."""
    rows: list[WeightRow] = []
    for conv_name in ("inc", "outc"):
        rows += [(f"{conv_name}.weight", ("params", conv_name, "kernel"), "conv"),
                 (f"{conv_name}.bias", ("params", conv_name, "bias"), "same")]
    for b in BLOCKS:
        rows += [(f"{b}.time_mlp.weight", ("params", b, "time_mlp", "kernel"), "dense"),
                 (f"{b}.time_mlp.bias", ("params", b, "time_mlp", "bias"), "same")]
        for c in ("conv1", "conv2", "transform"):
            layout = "conv_transpose" if (c == "transform" and b.startswith("up")) else "conv"
            rows += [(f"{b}.{c}.weight", ("params", b, c, "kernel"), layout),
                     (f"{b}.{c}.bias", ("params", b, c, "bias"), "same")]
        rows += [(f"{b}.bnorm.weight", ("params", b, "bnorm", "scale"), "same"),
                 (f"{b}.bnorm.bias", ("params", b, "bnorm", "bias"), "same"),
                 (f"{b}.bnorm.running_mean", ("batch_stats", b, "bnorm", "mean"), "same"),
                 (f"{b}.bnorm.running_var", ("batch_stats", b, "bnorm", "var"), "same"),
                 (f"{b}.bnorm.num_batches_tracked", ("batch_stats", b, "bnorm", "num_batches_tracked"), "count")]
    return rows


def build(config: ChapterUNetConfig, *, dtype: Any = jnp.float32, conv_impl: str = "auto") -> UNet:
    return UNet(img_channels=config.img_channels, time_emb_dim=config.time_emb_dim, features=config.features,
                dtype=dtype, conv_impl=conv_impl)


def to_metadata(config: ChapterUNetConfig) -> dict[str, str]:
    """torch_ref.weights' metadata keys (img_channels, time_emb_dim, features) and ``arch``."""
    return {"arch": "chapter", "img_channels": str(config.img_channels), "time_emb_dim": str(config.time_emb_dim),
            "features": ",".join(str(int(f)) for f in config.features)}


def from_metadata(meta: Mapping[str, str]) -> ChapterUNetConfig:
    """Inverse of :func:`to_metadata` (``arch`` may be absent: files written before the registry).

    Raises:
      ValueError: a key is missing or not a valid value (ArchConfigError names the field).
    """
    missing = [k for k in METADATA_KEYS if k not in meta]
    if missing:
        raise ValueError(f"metadata lacks {', '.join(missing)}")
    values = {}
    for key in ("img_channels", "time_emb_dim"):
        try:
            values[key] = int(meta[key])
        except ValueError:
            raise ValueError(f"metadata {key}={meta[key]!r} is not an integer") from None
    try:
        features = tuple(int(x) for x in str(meta["features"]).split(","))
    except ValueError:
        raise ValueError(f"metadata features={meta['features']!r} is not a comma-separated list of integers") from None
    return ChapterUNetConfig(features=features, **values)


def config_from_fields(channels: int, *, features: Sequence[int], time_emb_dim: int) -> ChapterUNetConfig:
    return ChapterUNetConfig(img_channels=channels, time_emb_dim=time_emb_dim, features=tuple(features))


ARCH = Architecture(
    name="chapter", config_cls=ChapterUNetConfig, build=build, weight_table=weight_table, has_batch_stats=True,
    size_multiple=lambda config: SIZE_MULTIPLE, config_from_fields=config_from_fields,
    fields=("features", "time_emb_dim"), to_metadata=to_metadata, from_metadata=from_metadata,
    description="the chapter's U-Net (BatchNorm, ConvTranspose upsampling; torch_ref.model.UNet)")
