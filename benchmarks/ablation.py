"""Ablations of the JAX train step: each kept CPU-gap change undone, one at a time.

    python -m benchmarks.ablation [--size probe] [--batch 32] [--reps 8]

Times, interleaved in one process on the same weights and batch: ``jax`` (the train step as
jax_ddpm ships it), ``jax/bn-autodiff`` (the same step with BatchNorm's forward differentiated
by JAX's autodiff instead of ``layers.batch_norm_train``'s closed-form ``custom_vjp``),
``jax/strided-s2d`` (the same step with every 4x4 stride-2 convolution in the space-to-depth
form, as before ``convolutions._strided_4x4``) and ``torch`` (torch_ref eager). Prints one
Markdown table (median ms, speed ratios with the quartiles of the per-round ratios);
nothing is written to disk. XLA_FLAGS is used as the caller set it (the benchmark's
default is ``jax_ddpm.xla_flags.CPU_XLA_FLAGS``).
"""
from __future__ import annotations

import os
import sys

import numpy as np

from .measure import helper_parser, paired_ratio, parse_helper_args, time_interleaved


def main(argv=None) -> int:
    p = helper_parser("ablation", __doc__, size="probe", batch=32, reps=8)
    args = parse_helper_args(p, argv, ("batch", "reps"))

    from jax_ddpm.models import convolutions, layers

    from . import cases

    def autodiff_batch_norm(x, scale, bias, epsilon):
        mean, var, rstd = layers._batch_norm_stats(x, epsilon)
        return (x - mean) * rstd * scale + bias, mean, var

    size = cases.SIZES[args.size]
    base = cases.torch_model(size, "cpu")
    variables = cases.jax_variables(base)
    runners = {"jax": cases.jax_train_runner(variables, size, args.batch, "float32", "auto")}
    # The step is traced and compiled inside jax_train_runner, so each swap only affects its row.
    for name, module, attr, value in (("jax/bn-autodiff", layers, "batch_norm_train", autodiff_batch_norm),
                                      ("jax/strided-s2d", convolutions, "STRIDED_NATIVE_MIN", 10 ** 9)):
        shipped = getattr(module, attr)
        try:
            setattr(module, attr, value)
            runners[name] = cases.jax_train_runner(variables, size, args.batch, "float32", "auto")
        finally:
            setattr(module, attr, shipped)
    runners["torch"] = cases.torch_train_runner(base, size, args.batch, "cpu", "float32", compiled=False)
    for name, r in runners.items():
        if r.error:
            print(f"python -m benchmarks.ablation: error: {name}: {r.error}", file=sys.stderr)
            return 1
        r.run()  # warm-up (the JAX runners are compiled and called once already)
    times = time_interleaved({k: r.run for k, r in runners.items()}, args.reps)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    print(f"# Train step ablations: {size.name} ({size.image_size}x{size.image_size}x{size.channels}, "
          f"features {','.join(map(str, size.features))}), batch {args.batch}, fp32, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, median of {args.reps}, load {os.getloadavg()[0]:.1f}\n")
    refs = [name for name in runners if name != "jax"]
    print("| train step | median ms | " + " | ".join(f"vs {ref}" for ref in refs) + " |")
    print("|---|---:|" + "---:|" * len(refs))
    for name in runners:
        cells = []
        for ref in refs:
            if ref == name:
                cells.append("")
                continue
            r = paired_ratio(times[ref], times[name])  # reference time / row time: a speed ratio
            cells.append(f"{med[ref] / med[name]:.2f}x [{r['q25']:.2f}-{r['q75']:.2f}]")
        print(f"| {name} | {med[name]:.1f} | " + " | ".join(cells) + " |")
    print("\nRatios are speed ratios (median time of the reference / median time of the row; > 1: the "
          "row is faster), [quartiles of the per-round ratios].")
    return 0


if __name__ == "__main__":
    sys.exit(main())
