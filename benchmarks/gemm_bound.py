"""How much of the matmul peak this model's convolutions could reach as plain matrix products.

    python -m benchmarks.gemm_bound [--size digits] [--batch 64] [--reps 5]

Every convolution of one train step (torch_ref's U-Net, recorded with forward hooks) is
written as the matrix products an im2col implementation would run, with the same shapes:

* forward: ``[B*Ho*Wo, k*k*Cin] @ [k*k*Cin, Cout]``;
* input gradient (not for the first convolution, whose input is the data): ``[B*Ho*Wo, Cout] @
  [Cout, k*k*Cin]``;
* weight gradient: ``[k*k*Cin, B*Ho*Wo] @ [B*Ho*Wo, Cout]``.

(The transposed convolutions count as the four 2x2 sub-pixel phases jax_ddpm computes:
``[B*H*W, 4*Cin] @ [4*Cin, Cout]`` four times; the Linear layers are left out, they are
~0.1 % of the FLOPs.) Each product is timed alone in torch and in JAX (fp32; best of
``--reps``) and the faster one is kept, next to a large square matmul measured the same way
(the peak). The products' FLOPs over the sum of their best times is the rate a convolution
written as matrix products could reach at best on this device, without building the patches,
without BatchNorm, activations or the optimizer: an upper bound for "% of peak" of any
implementation that lowers convolutions to GEMMs. Prints a Markdown table; writes nothing.
"""
from __future__ import annotations

import os
import sys
import time

from .measure import helper_parser, parse_helper_args


def conv_records(size, batch: int) -> list:
    """``(module, input shape, output shape)`` of every convolution of torch_ref's U-Net at
    ``size`` and ``batch``, in call order (forward hooks; NCHW shapes)."""
    import torch

    from . import cases

    model = cases.torch_model(size, "cpu").train()
    records = []

    def hook(mod, inputs, output):
        records.append((mod, tuple(inputs[0].shape), tuple(output.shape)))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    x = torch.zeros(batch, size.channels, size.image_size, size.image_size)
    with torch.no_grad():
        model(x, torch.zeros(batch, dtype=torch.long))
    for h in handles:
        h.remove()
    return records


def conv_gemm_shapes(size, batch: int) -> list[tuple[str, int, int, int]]:
    """``(label, m, k, n)`` of every GEMM one train step's convolutions amount to."""
    import torch

    shapes = []
    for i, (mod, (b, cin, hi, wi), (_, cout, ho, wo)) in enumerate(conv_records(size, batch)):
        kh, kw = mod.kernel_size
        if isinstance(mod, torch.nn.ConvTranspose2d):  # four 2x2 phases, each over the input grid
            m, k, reps = b * hi * wi, 4 * cin, 4
        else:
            m, k, reps = b * ho * wo, kh * kw * cin, 1
        label = f"{type(mod).__name__} {cin}->{cout} {hi}x{wi}"
        for _ in range(reps):
            shapes.append((f"{label} fwd", m, k, cout))
            if i > 0:
                shapes.append((f"{label} dx", m, cout, k))
            shapes.append((f"{label} dw", k, m, cout))
    return shapes


def _best_seconds(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = helper_parser("gemm_bound", __doc__, size="digits", batch=64, reps=5)
    p.add_argument("--peak-n", type=int, default=2048)
    args = parse_helper_args(p, argv, ("batch", "reps", "peak_n"))

    import jax
    import jax.numpy as jnp
    import torch

    from . import cases

    size = cases.SIZES[args.size]
    shapes = conv_gemm_shapes(size, args.batch)
    cache: dict = {}

    def best_gemm(m: int, k: int, n: int) -> tuple[float, str]:
        if (m, k, n) not in cache:
            a, b = torch.randn(m, k), torch.randn(k, n)
            t_torch = _best_seconds(lambda: torch.mm(a, b), args.reps)
            ja, jb = jnp.asarray(a.numpy()), jnp.asarray(b.numpy())
            f = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
            t_jax = _best_seconds(lambda: f(ja, jb).block_until_ready(), args.reps)
            cache[(m, k, n)] = (t_torch, "torch") if t_torch <= t_jax else (t_jax, "jax")
        return cache[(m, k, n)]

    peak_s, peak_fw = best_gemm(args.peak_n, args.peak_n, args.peak_n)
    peak = 2.0 * args.peak_n ** 3 / peak_s / 1e9
    total_flops = total_s = 0.0
    rows: dict[str, list[float]] = {}
    for label, m, k, n in shapes:
        s, _ = best_gemm(m, k, n)
        flops = 2.0 * m * k * n
        total_flops += flops
        total_s += s
        kind = label.rsplit(" ", 1)[1]
        acc = rows.setdefault(kind, [0.0, 0.0])
        acc[0] += flops
        acc[1] += s
    print(f"# Convolutions as matrix products: {size.name} ({size.image_size}x{size.image_size}x{size.channels}, "
          f"features {','.join(map(str, size.features))}), batch {args.batch}, fp32, best of {args.reps}, "
          f"load {os.getloadavg()[0]:.1f}\n")
    print(f"peak: {args.peak_n}^2 matmul {peak:.0f} GFLOP/s ({peak_fw})\n")
    print("| products | GFLOP | best ms (sum) | GFLOP/s | % of peak |")
    print("|---|---:|---:|---:|---:|")
    for kind, (flops, s) in rows.items():
        print(f"| {kind} | {flops / 1e9:.2f} | {s * 1e3:.1f} | {flops / s / 1e9:.0f} | {100 * flops / s / 1e9 / peak:.0f} % |")
    rate = total_flops / total_s / 1e9
    print(f"| all {len(shapes)} | {total_flops / 1e9:.2f} | {total_s * 1e3:.1f} | {rate:.0f} | {100 * rate / peak:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
