"""The U-Net's 4x4 stride-2 convolution, part by part: each formulation's forward pass, input
gradient and weight gradient timed alone, JAX against torch.

    python -m benchmarks.strided_parts [--reps 7]

At five of the U-Nets' shapes (batch, map side, channels), fp32, interleaved in one process
(median ms): ``s2d`` (space-to-depth, ``decomposed_conv`` without custom gradients), ``xla``
(``lax.conv_general_dilated`` with stride 2), ``sub-pixel`` (the input gradient as the
transposed convolution of the output gradient in sub-pixel phases:
``convolutions._strided_4x4_input_grad``, as the training-mode U-Net computes it) and
``torch`` (``F.conv2d`` and ``aten.convolution_backward``). Before timing, the space-to-depth
and sub-pixel input gradients are checked against XLA's (worst relative error printed). This
is the measurement behind ``_strided_4x4``'s choice of formulation per part. Prints one
Markdown table; writes nothing.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from .measure import helper_parser, parse_helper_args, provenance, time_interleaved

SHAPES = ((32, 32, 128), (8, 64, 128), (32, 16, 256), (32, 8, 512), (8, 16, 512))


def main(argv=None) -> int:
    p = helper_parser("strided_parts", __doc__, reps=7)
    args = parse_helper_args(p, argv, ("reps",))

    import jax
    import jax.numpy as jnp
    import torch
    from jax import lax

    from jax_ddpm.models.convolutions import _strided_4x4_input_grad, decomposed_conv


    conv_args = dict(window_strides=(2, 2), padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    print(f"# 4x4 stride-2 convolution, part by part (fp32, median ms of {args.reps}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, load {os.getloadavg()[0]:.1f})\n")
    print(f"{provenance()}\n")
    print("| batch, map, channels | forward: s2d / xla / torch | input grad: s2d / xla / sub-pixel / torch "
          "| weight grad: s2d / xla / torch | sub-pixel input grad err |")
    print("|---|---|---|---|---:|")
    for b, r, c in SHAPES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((b, c, r, r), dtype=np.float32)
        w = rng.standard_normal((c, c, 4, 4), dtype=np.float32) * np.float32(0.02)
        dy = rng.standard_normal((b, c, r // 2, r // 2), dtype=np.float32)
        jx, jw, jdy = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(w.transpose(2, 3, 1, 0)),
                       jnp.asarray(dy.transpose(0, 2, 3, 1)))
        fns, outs = {}, {}
        for name, conv in (("s2d", decomposed_conv), ("xla", lax.conv_general_dilated)):
            fwd = jax.jit(lambda x, w, conv=conv: conv(x, w, **conv_args))
            dx = jax.jit(lambda x, w, conv=conv: jax.vjp(lambda x: conv(x, w, **conv_args), x)[1](jdy)[0])
            dw = jax.jit(lambda x, w, conv=conv: jax.vjp(lambda w: conv(x, w, **conv_args), w)[1](jdy)[0])
            outs[name] = dx(jx, jw)
            fns[f"{name} fwd"] = lambda f=fwd: f(jx, jw).block_until_ready()
            fns[f"{name} dx"] = lambda f=dx: f(jx, jw).block_until_ready()
            fns[f"{name} dw"] = lambda f=dw: f(jx, jw).block_until_ready()
        sub = jax.jit(lambda w, dy: _strided_4x4_input_grad(dy, w, None))
        outs["sub-pixel"] = sub(jw, jdy)
        fns["sub-pixel dx"] = lambda: sub(jw, jdy).block_until_ready()
        tx, tw, tdy = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(dy)
        fns["torch fwd"] = lambda: torch.nn.functional.conv2d(tx, tw, stride=2, padding=1)
        for part, mask in (("dx", [True, False, False]), ("dw", [False, True, False])):
            fns[f"torch {part}"] = lambda mask=mask: torch.ops.aten.convolution_backward(
                tdy, tx, tw, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1, mask)
        ref = np.asarray(outs["xla"])
        err = max(float(np.max(np.abs(np.asarray(outs[k]) - ref)) / np.max(np.abs(ref))) for k in ("s2d", "sub-pixel"))
        for f in fns.values():
            f()
        med = {k: float(np.median(v)) * 1e3 for k, v in time_interleaved(fns, args.reps).items()}

        def cells(part, names):
            return " / ".join(f"{med[f'{n} {part}']:.1f}" for n in names)

        print(f"| {b}, {r}x{r}, {c} | {cells('fwd', ('s2d', 'xla', 'torch'))} | "
              f"{cells('dx', ('s2d', 'xla', 'sub-pixel', 'torch'))} | {cells('dw', ('s2d', 'xla', 'torch'))} | "
              f"{err:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
