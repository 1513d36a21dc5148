"""safetensors I/O for the reference UNet (never pickles).

The file holds the UNet's state_dict under its own names, and its metadata holds the
model and schedule settings as strings: img_channels, time_emb_dim, features
(comma-separated), timesteps, schedule. ``jax_ddpm.convert`` writes and reads the same,
plus ``arch`` (``chapter``; another architecture is refused here), ``image_size``, ``step`` and
``prediction`` (what the network outputs: eps, x0 or v; ``torch_ref.sample`` reads it, X1).
"""
from __future__ import annotations

from safetensors.torch import load_file, save_file
from safetensors import safe_open

from .model import UNet


def save_unet(path, model, timesteps, schedule, time_emb_dim):
    features = [model.down1.conv1.in_channels, model.down1.conv1.out_channels,
                model.down2.conv1.out_channels, model.down3.conv1.out_channels]
    meta = {
        "img_channels": str(model.inc.in_channels),
        "time_emb_dim": str(time_emb_dim),
        "features": ",".join(map(str, features)),
        "timesteps": str(timesteps),
        "schedule": schedule,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)


def load_unet(path):
    """Returns (model in eval mode, metadata dict)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    arch = meta.get("arch", "chapter")  # jax_ddpm writes arch; files without it are the chapter's
    if arch != "chapter":
        raise ValueError(f"{path}: holds arch {arch!r}; torch_ref has only the chapter's U-Net")
    missing = [k for k in ("img_channels", "time_emb_dim", "features", "timesteps", "schedule") if k not in meta]
    if missing:
        raise ValueError(f"{path}: metadata lacks {', '.join(missing)}")
    model = UNet(int(meta["img_channels"]), int(meta["time_emb_dim"]), [int(f) for f in meta["features"].split(",")])
    model.load_state_dict(load_file(str(path)), strict=True)
    model.eval()
    return model, meta
