"""Every convolution of the train step alone, JAX against torch, and the whole step next to them.

    python -m benchmarks.conv_layers [--size probe] [--batch 32] [--reps 5]

For each convolution of one train step (torch_ref's U-Net at the size and batch, recorded
with forward hooks: the same list ``benchmarks.gemm_bound`` uses), times forward + input
gradient + weight gradient (no input gradient for the first convolution, whose input is the
data; no bias), fp32, on random data of the layer's shapes, interleaved in one process:

* ``jax``: the convolution as jax_ddpm's model computes it in training (``conv_impl='auto'``:
  on the CPU backend :func:`jax_ddpm.models.convolutions.decomposed_conv` with
  ``custom_gradients=True``), jitted forward and ``jax.vjp``;
* ``jax/xla``: ``lax.conv_general_dilated`` as is (transposed convolutions as the convolution
  of the 2x-dilated input, as flax's ``nn.Conv`` writes them);
* ``torch``: ``F.conv2d`` / ``F.conv_transpose2d`` eager with autograd.

Then the two whole train steps (``benchmarks.cases``' runners: jax_ddpm's jitted step with the
state donated, torch_ref eager with Adam) on the same size and batch. The sum of a framework's
convolution rows against its step shows how much of the step is convolution work and how
much is the rest (BatchNorm, activations, concatenations, loss, optimizer, the layout copies
XLA inserts around its convolutions, and the ops' interference): step minus sum, a
difference of medians. Prints one Markdown table; writes nothing. XLA_FLAGS is used as the
caller set it (the benchmark's default is ``jax_ddpm.xla_flags.CPU_XLA_FLAGS``).
"""
from __future__ import annotations

import os
import sys
from functools import partial

import numpy as np

from .measure import helper_parser, parse_helper_args, provenance, time_interleaved

IMPLS = ("jax", "jax/xla", "torch")


def layer_fns(mod, in_shape, out_shape, grad_input: bool, seed: int = 0) -> dict:
    """Zero-argument blocking callables, one per ``IMPLS``, computing the forward pass and the
    gradients of ``<conv(x, w), dy>`` for one recorded convolution, on the same random data.

    Each returns its results (JAX: ``(y, grads)``; torch: ``(y, grads)``; grads = (dx, dw) or
    (dw,)), NHWC/HWIO for JAX and NCHW/OIHW for torch, so tests can compare them.
    """
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F
    from jax import lax

    from jax_ddpm.models.convolutions import decomposed_conv, resolve_conv_impl

    transposed = isinstance(mod, torch.nn.ConvTranspose2d)
    k, s, p = mod.kernel_size[0], mod.stride[0], mod.padding[0]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(in_shape, dtype=np.float32)
    w = (rng.standard_normal(tuple(mod.weight.shape), dtype=np.float32)
         / np.float32(np.sqrt(np.prod(mod.weight.shape[1:]))))
    dy = rng.standard_normal(out_shape, dtype=np.float32)

    tx = torch.from_numpy(x).requires_grad_(grad_input)
    tw = torch.from_numpy(w).requires_grad_(True)
    tdy = torch.from_numpy(dy)
    wrt = (tx, tw) if grad_input else (tw,)

    def torch_fn():
        y = (F.conv_transpose2d(tx, tw, stride=s, padding=p) if transposed
             else F.conv2d(tx, tw, stride=s, padding=p))
        return y, torch.autograd.grad(y, wrt, tdy)

    # JAX: NHWC / HWIO. ConvTranspose2d's weight is [Cin, Cout, k, k]: a convolution of the
    # s-dilated input padded by k - 1 - p with the flipped kernel (as jax_ddpm.convert maps it).
    jx = jnp.asarray(x.transpose(0, 2, 3, 1))
    jdy = jnp.asarray(dy.transpose(0, 2, 3, 1))
    if transposed:
        jw = jnp.asarray(w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))
        args = dict(window_strides=(1, 1), padding=((k - 1 - p,) * 2,) * 2, lhs_dilation=(s, s))
    else:
        jw = jnp.asarray(w.transpose(2, 3, 1, 0))
        args = dict(window_strides=(s, s), padding=((p, p),) * 2)
    nhwc = ("NHWC", "HWIO", "NHWC")
    argnums = (0, 1) if grad_input else (1,)

    def jax_fn(conv):
        def value_and_grads(a, b):
            y, vjp = jax.vjp(lambda a, b: conv(a, b, dimension_numbers=nhwc, **args), a, b)
            grads = vjp(jdy)
            return y, tuple(grads[i] for i in argnums)

        f = jax.jit(value_and_grads)
        return lambda: jax.block_until_ready(f(jx, jw))

    # as the U-Net calls it in training (custom_gradients: the strided convolutions' custom_vjp)
    auto = (partial(decomposed_conv, custom_gradients=True) if resolve_conv_impl("auto") == "decomposed"
            else lax.conv_general_dilated)
    return {"jax": jax_fn(auto), "jax/xla": jax_fn(lax.conv_general_dilated), "torch": torch_fn}


def main(argv=None) -> int:
    p = helper_parser("conv_layers", __doc__, size="probe", batch=32, reps=5)
    args = parse_helper_args(p, argv, ("batch", "reps"))

    import torch

    from . import cases
    from .gemm_bound import conv_records

    size = cases.SIZES[args.size]
    rows = []
    for i, (mod, in_shape, out_shape) in enumerate(conv_records(size, args.batch)):
        fns = layer_fns(mod, in_shape, out_shape, grad_input=i > 0, seed=i)
        for f in fns.values():  # compile / warm up
            f()
        times = time_interleaved(fns, args.reps)
        kind = "transposed" if isinstance(mod, torch.nn.ConvTranspose2d) else f"k{mod.kernel_size[0]} s{mod.stride[0]}"
        rows.append((f"{i:2d} {kind} {in_shape[1]}->{out_shape[1]} {in_shape[2]}x{in_shape[3]}",
                     {k: float(np.median(v)) * 1e3 for k, v in times.items()}))

    base = cases.torch_model(size, "cpu")
    steps = {"jax": cases.jax_train_runner(cases.jax_variables(base), size, args.batch, "float32", "auto"),
             "torch": cases.torch_train_runner(base, size, args.batch, "cpu", "float32", compiled=False)}
    for name, r in steps.items():
        if r.error:
            print(f"python -m benchmarks.conv_layers: error: {name} train step: {r.error}", file=sys.stderr)
            return 1
        r.run()
    step_ms = {k: float(np.median(v)) * 1e3
               for k, v in time_interleaved({k: r.run for k, r in steps.items()}, args.reps).items()}

    print(f"# Convolutions alone vs the train step: {size.name} ({size.image_size}x{size.image_size}x"
          f"{size.channels}, features {','.join(map(str, size.features))}), batch {args.batch}, fp32, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, median of {args.reps}, load {os.getloadavg()[0]:.1f}\n")
    print(f"{provenance()}\n")
    print("| convolution (fwd + grads) | jax ms | jax/xla ms | torch ms | torch / jax |")
    print("|---|---:|---:|---:|---:|")
    total = dict.fromkeys(IMPLS, 0.0)
    for label, med in rows:
        for k in IMPLS:
            total[k] += med[k]
        print(f"| {label} | {med['jax']:.1f} | {med['jax/xla']:.1f} | {med['torch']:.1f} | "
              f"{med['torch'] / med['jax']:.2f}x |")
    print(f"| **all {len(rows)} convolutions** | {total['jax']:.0f} | {total['jax/xla']:.0f} | "
          f"{total['torch']:.0f} | {total['torch'] / total['jax']:.2f}x |")
    print(f"| **train step** | {step_ms['jax']:.0f} | | {step_ms['torch']:.0f} | "
          f"{step_ms['torch'] / step_ms['jax']:.2f}x |")
    print(f"| step - convolutions | {step_ms['jax'] - total['jax']:.0f} | | "
          f"{step_ms['torch'] - total['torch']:.0f} | |")
    print("\ntorch / jax: speed ratio (> 1: JAX is faster). The step rows are jax_ddpm's train step "
          "(conv_impl='auto') and torch_ref eager; 'step - convolutions' is a difference of medians.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
