"""PNG sample grids, the loss-curve plot and atomic file writes (host side, NumPy only)."""
from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import numpy as np


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp_path)`` and renames the result onto ``path``: readers never see half a file.

    The temporary name keeps ``path``'s suffix (writers that pick a format by suffix still work).
    """
    folder, name = os.path.split(os.path.abspath(path))
    root, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{root}.tmp-{os.getpid()}{ext}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255] (rounded, clipped)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images_uint8: np.ndarray, ncols: int | None = None, pad: int = 1, pad_value: int = 128,
              min_width: int = 256) -> np.ndarray:
    """[N, H, W, C] uint8 -> one [rows*(H+pad)+pad, ...] image, upscaled (nearest) to ~``min_width`` px.

    Returns [Hg, Wg] for one channel, [Hg, Wg, 3] for three.
    """
    n, h, w, c = images_uint8.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    scale = max(1, int(math.ceil(min_width / (ncols * (w + pad) + pad))))
    hs, ws = h * scale, w * scale
    grid = np.full((nrows * (hs + pad) + pad, ncols * (ws + pad) + pad, c), pad_value, np.uint8)
    for i, im in enumerate(images_uint8):
        r, col = divmod(i, ncols)
        big = im.repeat(scale, axis=0).repeat(scale, axis=1)  # [hs, ws, C]
        y, x = pad + r * (hs + pad), pad + col * (ws + pad)
        grid[y:y + hs, x:x + ws] = big
    return grid[..., 0] if c == 1 else grid


def save_grid(path: str, images: np.ndarray, ncols: int | None = None) -> None:
    """Writes ``images`` ([N, H, W, C] in [-1, 1]) as one PNG grid, atomically."""
    from PIL import Image

    grid = make_grid(to_uint8(images), ncols)
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))


def save_loss_plot(path: str, steps: Sequence[int], losses: Sequence[float], title: str = "training loss") -> None:
    """Loss against step (log scale) as a PNG, atomically. Uses matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot(list(steps), list(losses), lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (eps MSE)")
    if len(losses) and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


__all__ = ["atomic_write", "make_grid", "save_grid", "save_loss_plot", "to_uint8"]
