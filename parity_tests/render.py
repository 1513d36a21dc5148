"""The printed table (Markdown) and the header's facts: versions, device names."""
from __future__ import annotations

import os
import platform
import subprocess
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .core import Row, fmt

if TYPE_CHECKING:  # pragma: no cover
    from .context import Context


def versions() -> dict[str, str]:
    """python, platform, numpy, jax, jaxlib, flax, optax, torch and the git commit."""
    import flax
    import jax
    import jaxlib
    import numpy as np
    import optax

    try:
        import torch
    except ImportError:  # pragma: no cover - exercised only without the extra
        torch = None
    out = {"python": platform.python_version(), "platform": platform.platform(), "numpy": np.__version__,
           "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
           "torch": torch.__version__ if torch is not None else "missing"}
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out["git_commit"] = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = "unknown"
    return out


def device_names(ctx: "Context") -> dict[str, str]:
    """``{'torch': 'cpu (x86_64)', 'jax': 'cpu:0 (cpu)'}`` or the CUDA device names."""
    import torch

    torch_name = torch.cuda.get_device_name(0) if ctx.device == "cuda" else platform.processor() or "cpu"
    return {"torch": f"{ctx.torch_device} ({torch_name})", "jax": f"{ctx.jax_device.platform}:{ctx.jax_device.id} "
                                                                  f"({ctx.jax_device.device_kind})"}


def render_markdown(meta: Mapping[str, Any], rows: Sequence[Row]) -> str:
    """The printed table: a header with date, device and versions, then one row per check."""
    v = meta["versions"]
    failed = [r for r in rows if not r.passed and not r.skipped]
    skipped = [r for r in rows if r.skipped]
    lines = [f"# Parity: jax_ddpm vs torch_ref, diffusers (and float64 oracle) on {meta['device']}", "",
             f"- date: {meta['date']}",
             f"- devices: torch {meta['devices']['torch']}, jax {meta['devices']['jax']}",
             "- versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "jax", "jaxlib", "flax", "optax", "torch",
                                                                "numpy")),
             f"- platform: {v['platform']}; git {v.get('git_commit', 'unknown')}",
             f"- precision: fp32 (float64 where a row says so); torch TF32 off; jax default_matmul_precision=highest; "
             f"{'full' if meta['full'] else 'default'} set, {len(rows)} checks in {meta['wall_s']:.0f} s",
             f"- result: {len(rows) - len(failed) - len(skipped)}/{len(rows)} passed"
             + (f", {len(skipped)} skipped (reference not installed)" if skipped else ""), "",
             "rel = max|a-b| / max|b| (per tensor, worst tensor, for grads/params/BN stats); schedules: "
             "max elementwise |a-b|/|b|. tol applies to the column named after it.", "",
             "| component | max abs err | max rel err | tol | pass | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "skipped" if r.skipped else "yes" if r.passed else "**NO**"
        lines.append(f"| {r.component} | {fmt(r.abs_err)} | {fmt(r.rel_err)} | {fmt(r.tol)} ({r.metric}) | "
                     f"{verdict} | {r.note} |")
    return "\n".join(lines) + "\n"


__all__ = ["device_names", "render_markdown", "versions"]
