"""Ablations of the JAX train step: each kept CPU-gap change undone, one at a time.

    python -m benchmarks.ablation [--size probe] [--batch 32] [--reps 8]
    python -m benchmarks.ablation --size unet2d-cifar10 --batch 8 --reps 8

Times, interleaved in one process on the same weights and batch, ``jax`` (the train step as
jax_ddpm ships it), the same step with one change undone per row, and the torch reference
eager. The chapter's sizes: ``jax/bn-autodiff`` (BatchNorm's forward differentiated by JAX's
autodiff instead of ``layers.batch_norm_train``'s closed-form ``custom_vjp``),
``jax/strided-s2d`` (every 4x4 stride-2 convolution in the space-to-depth form, as before
``convolutions._strided_4x4``) and ``torch`` (torch_ref eager). The unet2d sizes:
``jax/gn-autodiff`` (GroupNorm's forward, ``group_norm.group_norm``, differentiated by autodiff
instead of ``group_norm.group_norm_vjp``'s closed form), ``jax/gn-grouped`` (GroupNorm as first
written: a [B, N, G, C/G] view reduced over two axes, autodiff) and ``diffusers`` (diffusers'
UNet2DModel eager, ``benchmarks.diffusers_runner``). Prints one Markdown table (median ms,
speed ratios with the quartiles of the per-round ratios, and the median process CPU time per
call, which a shared machine disturbs less); nothing is written to disk. XLA_FLAGS is used as
the caller set it (the benchmark's default is ``jax_ddpm.xla_flags.CPU_XLA_FLAGS``).
"""
from __future__ import annotations

import os
import sys

import numpy as np

from .measure import helper_parser, paired_ratio, parse_helper_args, time_interleaved


def _grouped_group_norm(xs, scale, bias, groups, eps):
    """GroupNorm as first written in unet2d.py: stats of a [B, N, G, C/G] view over axes 1 and 3."""
    import jax.numpy as jnp

    b, n, c = xs.shape
    g = xs.reshape(b, n, groups, c // groups)
    mean = jnp.mean(g, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
    return ((g - mean) * (1 / jnp.sqrt(var + eps))).reshape(xs.shape) * scale + bias


def _swaps(size):
    """(row name, module, attribute, replacement) per ablation of ``size``'s architecture; the
    module is the one whose globals the swapped function is read from (``GroupNorm``'s own)."""
    from jax_ddpm.models import convolutions, group_norm, layers

    if size.arch == "unet2d":
        return (("jax/gn-autodiff", group_norm, "group_norm_vjp", group_norm.group_norm),
                ("jax/gn-grouped", group_norm, "group_norm_vjp", _grouped_group_norm))

    def autodiff_batch_norm(x, scale, bias, epsilon):
        mean, var, rstd = layers._batch_norm_stats(x, epsilon)
        return (x - mean) * rstd * scale + bias, mean, var

    return (("jax/bn-autodiff", layers, "batch_norm_train", autodiff_batch_norm),
            ("jax/strided-s2d", convolutions, "STRIDED_NATIVE_MIN", 10 ** 9))


def main(argv=None) -> int:
    from .cases import SIZES

    p = helper_parser("ablation", __doc__, size="probe", batch=32, reps=8, sizes=tuple(SIZES))
    args = parse_helper_args(p, argv, ("batch", "reps"))

    from . import cases
    from .suite import reference_side

    size = cases.SIZES[args.size]
    side = reference_side(size, "cpu")
    if side.missing:
        print(f"python -m benchmarks.ablation: error: {side.missing}", file=sys.stderr)
        return 1
    base, variables, _ = side.build(args.batch)
    runners = {"jax": cases.jax_train_runner(variables, size, args.batch, "float32", "auto")}
    # The step is traced and compiled inside jax_train_runner, so each swap only affects its row.
    for name, module, attr, value in _swaps(size):
        shipped = getattr(module, attr)
        try:
            setattr(module, attr, value)
            runners[name] = cases.jax_train_runner(variables, size, args.batch, "float32", "auto")
        finally:
            setattr(module, attr, shipped)
    ref = side.train_runner(base, args.batch, "float32", compiled=False)
    runners[ref.impl] = ref
    for name, r in runners.items():
        if r.error:
            print(f"python -m benchmarks.ablation: error: {name}: {r.error}", file=sys.stderr)
            return 1
        r.run()  # warm-up (the JAX runners are compiled and called once already)
    cpu: dict = {}
    times = time_interleaved({k: r.run for k, r in runners.items()}, args.reps, cpu)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    print(f"# Train step ablations: {size.name} ({size.image_size}x{size.image_size}x{size.channels}, "
          f"features {','.join(map(str, size.features))}), batch {args.batch}, fp32, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, median of {args.reps}, load {os.getloadavg()[0]:.1f}\n")
    refs = [name for name in runners if name != "jax"]
    print("| train step | median ms | CPU-s/call | " + " | ".join(f"vs {ref}" for ref in refs) + " |")
    print("|---|---:|---:|" + "---:|" * len(refs))
    for name in runners:
        cells = []
        for ref in refs:
            if ref == name:
                cells.append("")
                continue
            r = paired_ratio(times[ref], times[name])  # reference time / row time: a speed ratio
            cells.append(f"{med[ref] / med[name]:.2f}x [{r['q25']:.2f}-{r['q75']:.2f}]")
        print(f"| {name} | {med[name]:.1f} | {np.median(cpu[name]):.2f} | " + " | ".join(cells) + " |")
    print("\nRatios are speed ratios (median time of the reference / median time of the row; > 1: the "
          "row is faster), [quartiles of the per-round ratios].")
    return 0


if __name__ == "__main__":
    sys.exit(main())
