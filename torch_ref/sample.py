"""Sample from safetensors weights with the reference sampler (eval mode, E2-E4 fixed).

    python -m torch_ref.sample --weights model.safetensors --num 16 --out samples.png --seed 0
    python -m torch_ref.sample --weights model.safetensors --out x.npz --noise noise.npz

The weights file is what ``torch_ref.weights.save_unet`` or ``jax-ddpm convert --out``
writes (the schedule comes from its metadata, and so does what the network outputs: its
``prediction``, eps, x0 or v; a file without it holds an eps model; the chapter loop reads eps only). ``--noise`` replaces every random draw:
an .npz with ``x_T`` [N, H, W, C] and ``noises`` [T, N, H, W, C] (float32, NHWC like
image files; ``noises[i]`` is added at step ``i``) -- the file ``jax-ddpm sample --noise``
reads, so both frameworks can be fed the same numbers. Outputs are NHWC too: a PNG grid,
or an .npz with ``samples`` float32 [N, H, W, C] in [-1, 1] and ``images`` uint8.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch

from .diffusion import DiffusionProcess
from .sampling import PREDICTIONS, chapter_sample, chapter_step, p_sample, sample
from .weights import load_unet


@torch.no_grad()
def sample_with_batch_stats(model, diffusion, x_T, noises=None, sampler="ddpm", clip_denoised=True, generator=None,
                            prediction="eps"):
    """The same chains with BatchNorm normalising by the sample batch's statistics.

    The model runs in training mode with every BatchNorm's momentum set to 0, so the
    running statistics stay as loaded (E5: one BatchNorm serves two convolutions, and its
    running statistics blend both; see ``jax-ddpm sample --help``).
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0
    model.train()
    x = x_T
    for i in range(diffusion.timesteps - 1, -1, -1):
        z = None if noises is None else noises[i]
        if sampler == "ddpm":
            x = p_sample(model, diffusion, x, i, z, "beta_tilde", clip_denoised, generator, prediction)
        else:
            x = chapter_step(model, diffusion, x, i, z, generator)
    model.eval()
    return x.clamp(-1, 1)


def read_noise(path, timesteps, channels):
    """(x_T, noises) as float32 NCHW tensors from an NHWC .npz (see module docstring)."""
    with np.load(path, allow_pickle=False) as f:
        x_T = np.asarray(f["x_T"], np.float32)  # [N, H, W, C]
        noises = np.asarray(f["noises"], np.float32)  # [T, N, H, W, C]
    if x_T.ndim != 4 or x_T.shape[-1] != channels:
        raise ValueError(f"x_T has shape {x_T.shape}, expected [N, H, W, {channels}]")
    if noises.shape != (timesteps,) + x_T.shape:
        raise ValueError(f"noises has shape {noises.shape}, expected {(timesteps,) + x_T.shape}")
    return (torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()),
            torch.from_numpy(noises.transpose(0, 1, 4, 2, 3).copy()))


def save_outputs(x, path):
    """x: [N, C, H, W] in [-1, 1] -> a square PNG grid or an NHWC .npz."""
    from PIL import Image

    samples = x.clamp(-1, 1).permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)  # [N, H, W, C]
    images = np.clip(np.round((samples + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if path.lower().endswith(".npz"):
        np.savez(path, samples=samples, images=images)
        return
    n, h, w, c = images.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 128, np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = im
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m torch_ref.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="safetensors file with the UNet and its metadata")
    p.add_argument("--out", required=True, help="FILE.png (grid) or FILE.npz (arrays, NHWC)")
    p.add_argument("--num", type=int, default=16, help="number of images (ignored with --noise; default 16)")
    p.add_argument("--seed", type=int, default=0, help="seeds a torch.Generator for x_T and the noises (default 0)")
    p.add_argument("--noise", default=None, help="pre-drawn x_T and noises (.npz, NHWC) instead of --seed")
    p.add_argument("--image-size", type=int, default=None,
                   help="image size (default: the file's image_size metadata, else 16)")
    p.add_argument("--sampler", choices=["ddpm", "chapter"], default="ddpm",
                   help="ddpm: corrected ancestral sampler; chapter: the printed loop (E2, E3) (default ddpm)")
    p.add_argument("--no-clip-denoised", dest="clip_denoised", action="store_false",
                   help="do not clip the predicted x0 to [-1, 1] at each ddpm step")
    p.add_argument("--bn-stats", choices=["batch", "running"], default="batch",
                   help="BatchNorm statistics: the sample batch's, or the running ones (eval mode); as in "
                        "jax-ddpm sample (default batch)")
    a = p.parse_args(argv)
    if not a.out.lower().endswith((".png", ".npz")):
        p.error(f"--out {a.out}: must end in .png or .npz")

    try:
        model, meta = load_unet(a.weights)
    except (OSError, ValueError) as e:  # a missing file, another architecture, bad metadata
        p.error(f"--weights {' '.join(str(e).split())}")
    diffusion = DiffusionProcess(int(meta["timesteps"]), meta["schedule"])
    prediction = meta.get("prediction", "eps")  # X1: files written before prediction types hold eps models
    if prediction not in PREDICTIONS:
        p.error(f"--weights {a.weights}: bad metadata (prediction must be one of {', '.join(PREDICTIONS)}, "
                f"got {prediction!r})")
    if a.sampler == "chapter" and prediction != "eps":
        p.error(f"--sampler chapter: the chapter's printed loop reads a noise (eps) model; --weights {a.weights} "
                f"holds a {prediction} model (use --sampler ddpm)")
    channels = int(meta["img_channels"])
    if a.noise is not None:
        try:
            x_T, noises = read_noise(a.noise, diffusion.timesteps, channels)
        except (OSError, KeyError, ValueError) as e:
            p.error(f"--noise {a.noise}: {e}")
        generator = None
    else:
        size = a.image_size or int(meta.get("image_size", 16))
        generator = torch.Generator().manual_seed(a.seed)
        x_T = torch.randn((a.num, channels, size, size), generator=generator)
        noises = None
    if a.bn_stats == "batch":
        x0 = sample_with_batch_stats(model, diffusion, x_T, noises, a.sampler, a.clip_denoised, generator, prediction)
    elif a.sampler == "ddpm":
        x0 = sample(model, diffusion, x_T, noises, variance="beta_tilde", clip_denoised=a.clip_denoised,
                    generator=generator, prediction=prediction)
    else:
        x0 = chapter_sample(model, diffusion, x_T, noises, generator=generator)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    save_outputs(x0, a.out)
    print(f"wrote {x0.shape[0]} samples to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
