"""The unet2d train step op by op: GroupNorm, attention, upsampling, the strided 3x3 convolution
and the 3x3 convolutions, each alone in JAX (jax_ddpm's formulation and candidate rewrites with
the same maths) against the diffusers module in torch eager, interleaved.

    python -m benchmarks.unet2d_ops [--size unet2d-cifar10] [--batch 8] [--reps 5] [--kinds groupnorm,attention]

The modules of one train step are recorded from diffusers' ``UNet2DModel`` of the size with
forward hooks (module, input shape); each distinct (kind, shape) is timed once, forward + the
gradients of ``<op(x), dy>`` with respect to the input and the op's parameters, fp32, on the
size's weights (the same on both sides, read back with ``jax_ddpm.load_diffusers``), and
weighted by how often the step runs it. Kinds:

* ``groupnorm``: ``GroupNorm`` (followed by SiLU where the model does: resnets' norm1/norm2,
  conv_norm_out; not the attentions' group_norm);
* ``attention``: the whole attention block (its GroupNorm, q/k/v, softmax, out, residual);
* ``upsample``: ``Upsample2D`` (nearest 2x + 3x3 convolution);
* ``downsample``: ``Downsample2D`` (3x3 stride-2 convolution, padding 0 = pad right/bottom);
* ``conv3x3``: the resnets' 3x3 convolutions (conv1, conv2) and 1x1 shortcuts.

JAX variants (:data:`VARIANTS`): ``jax`` is always the shipped module
(``jax_ddpm.models.unet2d``); the others are rewrites this script tries, with the same maths
(equal in exact arithmetic; tests/test_benchmarks.py checks every variant against torch).
Prints one Markdown table (median ms per call, the sum over the step's calls, torch / variant
speed ratios); writes nothing. XLA_FLAGS is used as the caller set it (the benchmark's default
is ``jax_ddpm.xla_flags.CPU_XLA_FLAGS``).
"""
from __future__ import annotations

import math
import os
import sys
from typing import Callable

import numpy as np

from .measure import parse_helper_args, provenance, time_interleaved

KINDS = ("groupnorm", "attention", "upsample", "downsample", "conv3x3")
_WITH_SILU = ("norm1", "norm2", "conv_norm_out")


# ----------------------------------------------------------------------------- recording
def op_records(base_model, batch: int, kinds=KINDS) -> list[dict]:
    """Distinct ops of one forward pass of a diffusers UNet2DModel at ``batch``:
    ``[{'kind', 'name' (first module), 'count', 'in_shape' (torch layout), 'silu', 'module'}]``."""
    import torch
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, Upsample2D

    model = base_model.eval()
    seen: dict[tuple, dict] = {}
    handles = []

    def kind_of(name, mod):
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, torch.nn.GroupNorm) and ".attentions." not in name:
            return "groupnorm"
        if isinstance(mod, Attention):
            return "attention"
        if isinstance(mod, Upsample2D):
            return "upsample"
        if isinstance(mod, Downsample2D):
            return "downsample"
        if isinstance(mod, torch.nn.Conv2d) and ".resnets." in name and leaf in ("conv1", "conv2", "conv_shortcut"):
            return "conv3x3"
        return None

    def hook_for(name, kind):
        def hook(mod, args, out):
            shape = tuple(args[0].shape)
            key = (kind, shape, getattr(mod, "num_groups", None),
                   tuple(getattr(mod, "kernel_size", ())), name.rsplit(".", 1)[-1] in _WITH_SILU)
            if key in seen:
                seen[key]["count"] += 1
            else:
                seen[key] = {"kind": kind, "name": name, "count": 1, "in_shape": shape,
                             "silu": name.rsplit(".", 1)[-1] in _WITH_SILU, "module": mod}
        return hook

    for name, mod in model.named_modules():
        kind = kind_of(name, mod)
        if kind in kinds:
            handles.append(mod.register_forward_hook(hook_for(name, kind)))
    try:
        cfg = model.config
        x = torch.zeros(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        with torch.no_grad():
            model(x, torch.zeros(batch, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    return list(seen.values())


def _subtree(variables: dict, torch_name: str) -> dict:
    from jax_ddpm.models.unet2d import _flax_path

    node = variables["params"]
    for k in _flax_path(torch_name):
        node = node[k]
    return node


# ----------------------------------------------------------------------------- JAX formulations
def _gn_shipped(rec, cfg):
    from jax_ddpm.models.unet2d import GroupNorm

    m = GroupNorm(rec["module"].num_groups, rec["module"].eps, custom_gradient=True)  # as in training
    return lambda p, x: m.apply({"params": p}, x)


def _gn_autodiff(rec, cfg):
    """The shipped forward (:func:`~jax_ddpm.models.unet2d.group_norm`) differentiated by autodiff."""
    from jax_ddpm.models.unet2d import GroupNorm

    m = GroupNorm(rec["module"].num_groups, rec["module"].eps, custom_gradient=False)
    return lambda p, x: m.apply({"params": p}, x)


def _gn_grouped(rec, cfg):
    """GroupNorm as first written: a [B, N, G, C/G] view reduced over axes 1 and 3, autodiff."""
    import jax.numpy as jnp

    groups, eps = rec["module"].num_groups, rec["module"].eps

    def f(p, x):
        c = x.shape[-1]
        g = x.reshape(x.shape[0], -1, groups, c // groups)
        mean = jnp.mean(g, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
        return ((g - mean) * (1 / jnp.sqrt(var + eps))).reshape(x.shape) * p["scale"] + p["bias"]

    return f


def _attn_shipped(rec, cfg):
    from jax_ddpm.models.unet2d import AttentionBlock

    mod = rec["module"]
    m = AttentionBlock(head_dim=mod.inner_dim // mod.heads if mod.heads > 1 else None,
                       groups=mod.group_norm.num_groups, eps=mod.group_norm.eps,
                       rescale_output_factor=mod.rescale_output_factor, custom_gradient=True)
    return lambda p, x: m.apply({"params": p}, x)


def _attn_fused_qkv(rec, cfg):
    """One [C, 3C] matrix product for q, k and v (the three kernels concatenated), one head axis."""
    import jax
    import jax.numpy as jnp

    from jax_ddpm.models.unet2d import GroupNorm

    mod = rec["module"]
    heads = mod.heads
    gn = GroupNorm(mod.group_norm.num_groups, mod.group_norm.eps, custom_gradient=True)
    s = mod.rescale_output_factor

    def f(p, x):
        b, h, w, c = x.shape
        d = c // heads
        tokens = x.reshape(b, h * w, c)
        hs = gn.apply({"params": p["group_norm"]}, tokens)
        kern = jnp.concatenate([p[n]["kernel"] for n in ("to_q", "to_k", "to_v")], axis=1)
        bias = jnp.concatenate([p[n]["bias"] for n in ("to_q", "to_k", "to_v")])
        qkv = (hs @ kern + bias).reshape(b, h * w, 3, heads, d)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (1 / math.sqrt(d))
        probs = jax.nn.softmax(scores, axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, h * w, c)
        o = (o @ p["to_out_0"]["kernel"] + p["to_out_0"]["bias"]).reshape(b, h, w, c)
        return (o + x) / s

    return f


def _attn_dpa(rec, cfg):
    """``jax.nn.dot_product_attention`` (XLA implementation) for the softmax(q k^T / sqrt(d)) v part."""
    import jax

    from jax_ddpm.models.unet2d import GroupNorm

    mod = rec["module"]
    heads = mod.heads
    gn = GroupNorm(mod.group_norm.num_groups, mod.group_norm.eps, custom_gradient=True)
    s = mod.rescale_output_factor

    def f(p, x):
        b, h, w, c = x.shape
        d = c // heads
        hs = gn.apply({"params": p["group_norm"]}, x.reshape(b, h * w, c))
        q, k, v = ((hs @ p[n]["kernel"] + p[n]["bias"]).reshape(b, h * w, heads, d) for n in ("to_q", "to_k", "to_v"))
        o = jax.nn.dot_product_attention(q, k, v, implementation="xla").reshape(b, h * w, c)
        o = (o @ p["to_out_0"]["kernel"] + p["to_out_0"]["bias"]).reshape(b, h, w, c)
        return (o + x) / s

    return f


def _up_shipped(rec, cfg):
    from jax_ddpm.models.unet2d import Upsample2D

    m = Upsample2D()
    return lambda p, x: m.apply({"params": p}, x)


def _up_broadcast(rec, cfg):
    """Nearest 2x as one broadcast + reshape ([B, H, 1, W, 1, C] -> [B, 2H, 2W, C]) instead of two repeats."""
    import jax.numpy as jnp
    from jax import lax

    def f(p, x):
        b, h, w, c = x.shape
        up = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        y = lax.conv_general_dilated(up, p["conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + p["conv"]["bias"]

    return f


def _down_shipped(rec, cfg):
    from jax_ddpm.models.unet2d import Downsample2D

    m = Downsample2D(padding=rec["module"].padding)
    return lambda p, x: m.apply({"params": p}, x)


def strided_3x3_input_grad(dy, kernel, padding):
    """The input gradient of ``conv(x, K, stride 2, padding)`` for a 3x3 K and even H, W, as the
    four sub-pixel phases: input row ``2m + a`` gets ``sum_u K[u]^T dy[m + (a + p_top - u) / 2]``
    over the taps u with ``a + p_top - u`` even (likewise for columns), a stride-1 convolution of
    dy per phase; the phases interleaved. No multiply by the zeros XLA's dilated form inserts."""
    import jax.numpy as jnp
    from jax import lax

    b, ho, wo, _ = dy.shape
    kt = kernel.transpose(0, 1, 3, 2)                                   # [3, 3, O, C]: dy's channels in
    (pt, _), (pl, _) = padding

    def phase_taps(a, p0):
        taps = [(u, (a + p0 - u) // 2) for u in range(3) if (a + p0 - u) % 2 == 0]
        lo, hi = min(o for _, o in taps), max(o for _, o in taps)
        return taps, lo, hi

    rows = []
    for a in (0, 1):
        taps_r, lo_r, hi_r = phase_taps(a, pt)
        cols = []
        for c in (0, 1):
            taps_c, lo_c, hi_c = phase_taps(c, pl)
            k = jnp.zeros((hi_r - lo_r + 1, hi_c - lo_c + 1) + kt.shape[2:], kt.dtype)
            for u, o in taps_r:
                for v, q in taps_c:
                    k = k.at[o - lo_r, q - lo_c].set(kt[u, v])
            cols.append(lax.conv_general_dilated(dy, k, (1, 1), ((-lo_r, hi_r), (-lo_c, hi_c)),
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC")))
        rows.append(jnp.stack(cols, axis=3))                            # [B, Ho, Wo, 2(c), C]
    dx = jnp.stack(rows, axis=2)                                        # [B, Ho, 2(a), Wo, 2(c), C]
    return dx.reshape(b, 2 * ho, 2 * wo, dx.shape[-1])


def _down_subpixel(rec, cfg):
    """XLA's strided convolution forward and weight gradient; the input gradient as the four
    sub-pixel phases of the 3x3 kernel (:func:`strided_3x3_input_grad`), a ``custom_vjp``."""
    import jax
    from jax import lax

    pad = rec["module"].padding
    padding = ((0, 1), (0, 1)) if pad == 0 else ((pad, pad), (pad, pad))
    conv = lambda x, k: lax.conv_general_dilated(x, k, (2, 2), padding,  # noqa: E731
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))

    @jax.custom_vjp
    def strided(x, k):
        return conv(x, k)

    def fwd(x, k):
        return conv(x, k), (x, k)

    def bwd(res, g):
        x, k = res
        return strided_3x3_input_grad(g, k, padding), jax.vjp(lambda k: conv(x, k), k)[1](g)[0]

    strided.defvjp(fwd, bwd)
    return lambda p, x: strided(x, p["conv"]["kernel"]) + p["conv"]["bias"]


def _conv_shipped(rec, cfg):
    from jax_ddpm.models.unet2d import _conv

    mod = rec["module"]
    k = mod.kernel_size[0]
    m = _conv(mod.out_channels, k, mod.in_channels * k * k, padding=((k // 2, k // 2),) * 2,
              dtype=np.float32, conv_impl="auto", name=None)
    return lambda p, x: m.apply({"params": p}, x)


# kind -> {variant name: builder(record, config) -> f(params, x_nhwc)}
VARIANTS: dict[str, dict[str, Callable]] = {
    "groupnorm": {"jax": _gn_shipped, "jax/autodiff": _gn_autodiff, "jax/grouped": _gn_grouped},
    "attention": {"jax": _attn_shipped, "jax/fused-qkv": _attn_fused_qkv, "jax/dpa": _attn_dpa},
    "upsample": {"jax": _up_shipped, "jax/broadcast": _up_broadcast},
    "downsample": {"jax": _down_shipped, "jax/subpixel-grad": _down_subpixel},
    "conv3x3": {"jax": _conv_shipped},
}


# ----------------------------------------------------------------------------- one op, all ways
def op_fns(rec: dict, variables: dict, seed: int = 0) -> dict[str, Callable[[], tuple]]:
    """Zero-argument blocking callables for one recorded op: ``torch`` (the diffusers module,
    eager autograd) and every available JAX variant, each computing the output and the
    gradients of ``<op(x), dy>`` w.r.t. the input and the parameters, on the same data.

    Returns results as (y, dx, {param name: grad}) with JAX in NHWC / flax layouts and torch in
    NCHW / torch layouts (tests compare them)."""
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    mod = rec["module"]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(rec["in_shape"], dtype=np.float32)
    tx = torch.from_numpy(x).requires_grad_(True)
    params = [p for p in mod.parameters()]
    with torch.no_grad():
        ty_shape = (F.silu(mod(tx)) if rec["silu"] else mod(tx)).shape
    dy = rng.standard_normal(tuple(ty_shape), dtype=np.float32)
    tdy = torch.from_numpy(dy)

    def torch_fn():
        y = mod(tx)
        if rec["silu"]:
            y = F.silu(y)
        grads = torch.autograd.grad(y, [tx] + params, tdy)
        return y, grads[0], grads[1:]

    jp = jax.tree_util.tree_map(jnp.asarray, _subtree(variables, rec["name"]))
    jx, jdy = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(dy.transpose(0, 2, 3, 1))
    fns: dict[str, Callable[[], tuple]] = {"torch": torch_fn}
    for name, builder in VARIANTS[rec["kind"]].items():
        f = builder(rec, None)
        if rec["silu"]:
            f = (lambda g: (lambda p, x: jax.nn.silu(g(p, x))))(f)

        def value_and_grads(p, x, dy, f=f):  # dy an argument: a constant would be folded into the program
            y, vjp = jax.vjp(f, p, x)
            dp, dx = vjp(dy)
            return y, dx, dp

        jf = jax.jit(value_and_grads)
        fns[name] = (lambda jf=jf: jax.block_until_ready(jf(jp, jx, jdy)))
    return fns


def _label(rec: dict) -> str:
    b, c, h, w = rec["in_shape"]
    mod, kind = rec["module"], rec["kind"]
    extra = (f" G={mod.num_groups}" + (" +SiLU" if rec["silu"] else "") if kind == "groupnorm"
             else f" heads={mod.heads}" if kind == "attention"
             else f" k{mod.kernel_size[0]} ->{mod.out_channels}" if kind == "conv3x3" else "")
    return f"{kind} {c}ch {h}x{w}{extra}"


def main(argv=None) -> int:
    from .measure import helper_parser

    p = helper_parser("unet2d_ops", __doc__, batch=8, reps=5)
    p.add_argument("--size", default="unet2d-cifar10", choices=("unet2d-digits", "unet2d-cifar10"))
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)}")
    args = parse_helper_args(p, argv, ("batch", "reps"))
    kinds = tuple(k.strip() for k in args.kinds.split(","))
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        p.error(f"--kinds must be a comma list of {', '.join(KINDS)}, got {args.kinds!r}")

    from . import cases, diffusers_runner

    why = diffusers_runner.missing()
    if why:
        print(f"python -m benchmarks.unet2d_ops: error: {why}", file=sys.stderr)
        return 1
    size = cases.SIZES[args.size]
    base = diffusers_runner.model(size, "cpu")
    variables = diffusers_runner.jax_variables(base)
    lines, totals, cpu_totals = [], {}, {}
    for i, rec in enumerate(op_records(base, args.batch, kinds)):
        fns = op_fns(rec, variables, seed=i)
        for f in fns.values():  # compile / warm up
            f()
        cpu: dict = {}
        med = {k: float(np.median(v)) * 1e3 for k, v in time_interleaved(fns, args.reps, cpu).items()}
        lines.append((rec, med))
        for k, v in med.items():
            totals.setdefault(rec["kind"], {}).setdefault(k, 0.0)
            totals[rec["kind"]][k] += v * rec["count"]
            cpu_totals.setdefault(rec["kind"], {}).setdefault(k, 0.0)
            cpu_totals[rec["kind"]][k] += float(np.median(cpu[k])) * 1e3 * rec["count"]
    print(f"# unet2d ops alone (forward + input and parameter gradients): {size.name}, batch {args.batch}, fp32, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, median of {args.reps}, load {os.getloadavg()[0]:.1f}\n")
    print(f"{provenance()}\n")
    for kind in kinds:
        rows = [(rec, med) for rec, med in lines if rec["kind"] == kind]
        if not rows:
            continue
        names = ["torch"] + sorted({k for _, med in rows for k in med if k != "torch"}, key=lambda n: (n != "jax", n))
        print("| op | calls/step | " + " | ".join(f"{n} ms" for n in names) + " | " +
              " | ".join(f"torch / {n}" for n in names[1:]) + " |")
        print("|---|---:|" + "---:|" * (2 * len(names) - 1))
        for rec, med in rows + [({"kind": kind, "count": "", "total": True}, totals[kind]),
                                ({"kind": kind, "count": "", "cpu": True}, cpu_totals[kind])]:
            label = (f"**{kind}, all calls of a step**" if rec.get("total") else
                     f"{kind}, all calls, CPU-ms (all threads)" if rec.get("cpu") else _label(rec))
            cells = [f"{med[n]:.2f}" if n in med else "" for n in names]
            ratios = [f"{med['torch'] / med[n]:.2f}x" if n in med else "" for n in names[1:]]
            print(f"| {label} | {rec['count']} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
        print()
    print("\ntorch / X: speed ratio (> 1: X is faster than diffusers in torch eager). Per-call medians; the "
          "'all calls' rows weight each by its calls per train step.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
