"""PNG sample grids, the loss and quality plots and atomic file writes (host side, NumPy only)."""
from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import numpy as np

GRID_STEP_KEY = "jax-ddpm:step"  # PNG text chunk of a grid: the checkpoint step it was sampled from
PLOT_STEPS_KEY = "jax-ddpm:steps"  # PNG text chunk of quality.png: the steps it plots


def current_umask() -> int:
    """The process's umask (read from /proc where possible; else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets: 0o666 less the umask (what ``open(path, 'w')`` gives)."""
    return 0o666 & ~current_umask()


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp_path)`` and renames the result onto ``path``: readers never see half a file.

    The temporary name keeps ``path``'s suffix (writers that pick a format by suffix still work);
    the file gets the mode ``open`` would give it (0o666 less the umask), whatever mode the
    writer created it with (safetensors writes 0o600). A failure leaves no temporary file.
    """
    folder, name = os.path.split(os.path.abspath(path))
    root, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{root}.tmp-{os.getpid()}{ext}")
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255] (rounded, clipped)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


MIN_IMAGE_PX = 64  # grids enlarge each image (nearest neighbour) to at least this many pixels: 16x16 -> 4x


def grid_scale(h: int, w: int, ncols: int, pad: int = 1, min_width: int = 256, min_image_px: int = MIN_IMAGE_PX) -> int:
    """The integer nearest-neighbour factor of :func:`make_grid`: the smallest that makes the
    grid at least ``min_width`` px wide and each image at least ``min_image_px`` px on its
    longer side (``min_image_px=0``: the width rule alone, as before)."""
    by_width = math.ceil(min_width / (ncols * (w + pad) + pad))
    by_image = math.ceil(min_image_px / max(h, w, 1))
    return max(1, int(by_width), int(by_image))


def make_grid(images_uint8: np.ndarray, ncols: int | None = None, pad: int = 1, pad_value: int = 128,
              min_width: int = 256, scale: int | None = None, min_image_px: int = MIN_IMAGE_PX) -> np.ndarray:
    """[N, H, W, C] uint8 -> one [rows*(H*scale+pad)+pad, ...] image, each image enlarged
    (nearest neighbour) by ``scale`` (default: :func:`grid_scale`; 1 = raw pixels).

    Returns [Hg, Wg] for one channel, [Hg, Wg, 3] for three.
    """
    n, h, w, c = images_uint8.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    if scale is None:
        scale = grid_scale(h, w, ncols, pad, min_width, min_image_px)
    elif int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    scale = int(scale)
    hs, ws = h * scale, w * scale
    grid = np.full((nrows * (hs + pad) + pad, ncols * (ws + pad) + pad, c), pad_value, np.uint8)
    for i, im in enumerate(images_uint8):
        r, col = divmod(i, ncols)
        big = im.repeat(scale, axis=0).repeat(scale, axis=1)  # [hs, ws, C]
        y, x = pad + r * (hs + pad), pad + col * (ws + pad)
        grid[y:y + hs, x:x + ws] = big
    return grid[..., 0] if c == 1 else grid


def save_grid(path: str, images: np.ndarray, ncols: int | None = None, scale: int | None = None,
              step: int | None = None) -> None:
    """Writes ``images`` ([N, H, W, C] in [-1, 1]) as one PNG grid, atomically, enlarged by
    ``scale`` (default: :func:`grid_scale`, each image at least ``MIN_IMAGE_PX`` px). ``step``:
    the checkpoint step the samples come from, kept in the PNG (text chunk ``GRID_STEP_KEY``,
    read back by :func:`grid_step`)."""
    from PIL import Image, PngImagePlugin

    grid = make_grid(to_uint8(images), ncols, scale=scale)
    info = None
    if step is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(GRID_STEP_KEY, str(int(step)))
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG", pnginfo=info))


def grid_step(path: str) -> int | None:
    """The step :func:`save_grid` recorded in the PNG at ``path``; None if it has none (grids
    written before the record existed), is unreadable or is missing."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}) or {}
            return int(text[GRID_STEP_KEY]) if GRID_STEP_KEY in text else None
    except (OSError, ValueError, SyntaxError):
        return None


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


def save_quality_plot(path: str, rows: Sequence[dict], title: str = "sample quality during training") -> None:
    """Quality rows (``train --eval-every``: ``step``, ``fid``, ``fid_floor``, ``confident``,
    ``real_confident``, ``num_samples``) as a PNG, atomically: FID against step (log scale) with
    the real-vs-real floor as a dashed line (horizontal while N is the same), and below it the
    confident share with the real images' share. The steps plotted are kept in the PNG (text
    chunk ``PLOT_STEPS_KEY``, comma-separated; read back by :func:`plot_steps`)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    rows = sorted(rows, key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(6, 5), dpi=100)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    fid, floor = [r["fid"] for r in rows], [r["fid_floor"] for r in rows]
    sizes = sorted({r["num_samples"] for r in rows})
    top.plot(steps, fid, "o-", lw=1.2, ms=3, label="FID (EMA samples)")
    if len(set(floor)) == 1:
        top.axhline(floor[0], color="gray", ls="--", lw=1.0, label=f"real-vs-real floor {floor[0]:.2f}")
    else:  # N changed on a resume: each point's own floor
        top.plot(steps, floor, "--", color="gray", lw=1.0, marker=".", label="real-vs-real floor (per N)")
    if min(fid + floor) > 0:
        top.set_yscale("log")
    top.set_ylabel("FID (classifier features)")
    top.set_title(f"{title} (N = {', '.join(map(str, sizes))})")
    bottom.plot(steps, [r["confident"] for r in rows], "o-", lw=1.2, ms=3, color="C1", label="confident share")
    real = [r["real_confident"] for r in rows if r.get("real_confident") is not None]
    if real:
        bottom.axhline(real[-1], color="gray", ls="--", lw=1.0, label=f"real held-out {real[-1]:.1%}")
    bottom.set_ylim(0, 1.02)
    bottom.set_ylabel("confident share")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()

    record = {PLOT_STEPS_KEY: ",".join(map(str, steps))}  # a PNG text chunk
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", metadata=record))


def plot_steps(path: str) -> list[int] | None:
    """The steps :func:`save_quality_plot` recorded in the PNG at ``path`` (None if it has none)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = (getattr(im, "text", {}) or {}).get(PLOT_STEPS_KEY)
    except (OSError, ValueError, SyntaxError):
        return None
    return None if text is None else [int(s) for s in text.split(",") if s]


__all__ = ["GRID_STEP_KEY", "MIN_IMAGE_PX", "PLOT_STEPS_KEY", "atomic_write", "current_umask", "file_mode", "grid_scale",
           "grid_step", "make_grid", "plot_steps", "save_grid", "save_loss_plot", "save_quality_plot", "to_uint8"]
