"""Run the chapter's training loop (20.3.3) for a few steps on real images.

    python -m torch_ref.train --steps 50 --out runs/torch_ref

Hyper-parameters follow the chapter (Adam lr 1e-3, batch 8, T=100, cosine schedule,
time_emb_dim 32, features [64, 128, 256, 512]); the data are scikit-learn's bundled
digits instead of torch.randn (E7), and sampling happens once, after training, in eval
mode, with the corrected sampler (E2-E4).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from .data import digits_tensor
from .diffusion import DiffusionProcess
from .model import UNet
from .sampling import sample
from .training import make_optimizer, train_step
from .weights import save_unet


def save_grid(x, path):
    """x: [N, C, H, W] in [-1, 1] -> one PNG row."""
    from PIL import Image

    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    img = np.concatenate(list(img.transpose(0, 2, 3, 1)), axis=1)
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m torch_ref.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50, help="training steps (default 50)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (chapter: 8)")
    p.add_argument("--image-size", type=int, default=32, help="digits are resized to this (multiple of 8)")
    p.add_argument("--timesteps", type=int, default=100, help="T (chapter: 100)")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="cosine")
    p.add_argument("--features", default="64,128,256,512", help="U-Net widths, 4 comma-separated ints")
    p.add_argument("--time-emb-dim", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--out", default="runs/torch_ref", help="folder for samples.png and model.safetensors")
    a = p.parse_args(argv)
    if a.image_size % 8 or a.image_size <= 0:
        p.error("--image-size must be a positive multiple of 8")

    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    data = digits_tensor(a.image_size)
    diffusion = DiffusionProcess(a.timesteps, a.schedule)
    model = UNet(1, a.time_emb_dim, [int(f) for f in a.features.split(",")])
    opt = make_optimizer(model, a.lr)
    t0 = time.perf_counter()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(data), (a.batch_size,), generator=gen)
        loss = train_step(model, diffusion, opt, data[idx], generator=gen)
        if step % 10 == 0 or step == a.steps:
            print(f"step {step}/{a.steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.1f}s)")
    os.makedirs(a.out, exist_ok=True)
    x_T = torch.randn((a.num_samples, 1, a.image_size, a.image_size), generator=gen)
    x0 = sample(model, diffusion, x_T, generator=gen)
    save_grid(x0, os.path.join(a.out, "samples.png"))
    save_unet(os.path.join(a.out, "model.safetensors"), model, a.timesteps, a.schedule, a.time_emb_dim)
    print(f"wrote {a.out}/samples.png and {a.out}/model.safetensors")


if __name__ == "__main__":
    main()
