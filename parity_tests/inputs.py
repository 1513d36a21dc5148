"""The inputs every check feeds both sides: U-Net configurations (``Net`` for the chapter's
U-Net, ``UNet2DNet`` for diffusers' UNet2DModel), seeded random arrays and real digits.
NumPy only (the digits come through torch_ref.data, imported lazily).

Seeds derive from ``repr`` of a check's parameters (``rng``), so the class names and
fields of ``Net`` and ``UNet2DNet`` are part of every input: renaming them changes the numbers.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np

SMALL = (8, 16, 32, 64)        # feature widths for most cases
CHAPTER = (64, 128, 256, 512)  # the chapter's widths, used once by default


@dataclasses.dataclass(frozen=True)
class Net:
    """A U-Net configuration and the batch fed to it."""

    img_channels: int
    size: int
    batch: int
    features: tuple = SMALL
    time_emb_dim: int = 32

    @property
    def label(self) -> str:
        width = "chapter width" if tuple(self.features) == CHAPTER else f"f{self.features[0]}-{self.features[-1]}"
        return f"{self.img_channels}ch {self.size}px b{self.batch} {width}"


@dataclasses.dataclass(frozen=True)
class UNet2DNet:
    """A ``unet2d`` configuration (diffusers' UNet2DModel), the batch fed to it and the dtype.

    ``settings`` are ``UNet2DConfig``'s keyword arguments, which are diffusers'
    ``UNet2DModel.__init__`` arguments with the same names (``((name, value), ...)``: hashable,
    and NumPy-only here). ``dtype`` is both sides' compute dtype ('float32' or 'float64': JAX
    with x64 enabled for the case, torch ``model.double()``).
    """

    name: str
    settings: tuple
    size: int
    batch: int
    dtype: str = "float32"

    arch = "unet2d"  # the registry name (jax_side); not a field

    @property
    def img_channels(self) -> int:
        return dict(self.settings).get("in_channels", 3)

    @property
    def label(self) -> str:
        return f"{self.name} {self.img_channels}ch {self.size}px b{self.batch}" + (
            "" if self.dtype == "float32" else f" {self.dtype}")


def np_dtype(net) -> type:
    """The NumPy dtype of ``net``'s inputs: float64 for a float64 ``UNet2DNet``, else float32."""
    return np.float64 if getattr(net, "dtype", "float32") == "float64" else np.float32


def cast(x: np.ndarray, net) -> np.ndarray:
    """``x`` in ``net``'s input dtype (the float32 draws unchanged for float32 nets)."""
    return x if np_dtype(net) == np.float32 else x.astype(np_dtype(net))


SAMPLER_NET = Net(1, 16, 4)   # the sampler and Adam cases' model
SAMPLER_TRAIN_STEPS = 20      # Adam steps on digits before the sampler cases (cosine, T = 100)


def rng(*key) -> np.random.Generator:
    """A NumPy generator seeded from the case's parameters (same inputs on every run)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def normal(gen: np.random.Generator, shape) -> np.ndarray:
    """Standard normal float32 of ``shape``."""
    return gen.standard_normal(shape).astype(np.float32)


def timesteps(gen: np.random.Generator, batch: int, timesteps: int) -> np.ndarray:
    """Random t in [0, T) with the extremes included: t[0] = T - 1, t[-1] = 0. int64 [batch]."""
    t = gen.integers(0, timesteps, batch)
    t[0], t[-1] = timesteps - 1, 0
    return t.astype(np.int64)


def digits(size: int, n: int, seed: int) -> np.ndarray:
    """n scikit-learn digits resized to ``size``, in [-1, 1], NHWC float32 [n, size, size, 1]."""
    from torch_ref.data import digits_tensor

    x = digits_tensor(size)  # [N, 1, S, S]
    idx = np.random.default_rng(seed).choice(x.shape[0], n, replace=False)
    return x[idx].detach().cpu().numpy().copy().transpose(0, 2, 3, 1)  # [n, S, S, 1]


__all__ = ["CHAPTER", "Net", "SAMPLER_NET", "SAMPLER_TRAIN_STEPS", "SMALL", "UNet2DNet", "cast", "digits", "normal",
           "np_dtype", "rng", "timesteps"]
