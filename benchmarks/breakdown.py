"""Where a train step's time goes: forward, forward + backward, and the whole step, per framework.

    python -m benchmarks.breakdown [--size probe] [--batch 32] [--reps 5] [--jax-conv-impl auto]
    python -m benchmarks.breakdown --size unet2d-cifar10 --batch 8     # jax_ddpm vs diffusers

Times, interleaved in one process on the same weights and batch (train mode, fixed t and noise):

* ``forward``: the U-Net's train-mode forward pass and the loss (JAX: jitted ``loss_fn``;
  torch: ``loss_fn`` under ``torch.no_grad()``);
* ``forward+backward``: the loss and its gradient (JAX: jitted ``value_and_grad``; torch:
  ``loss.backward()``);
* ``step``: the whole train step with Adam (JAX: jitted, donated ``train_step_with_noise``;
  torch: ``torch_ref.training.train_step``; for the unet2d sizes diffusers' UNet2DModel with
  the same eps-MSE loss and torch Adam, ``benchmarks.diffusers_runner``).

backward = (forward+backward) - forward and optimizer = step - (forward+backward) are
differences of medians, printed as such. XLA_FLAGS is used as the caller set it (compare
``XLA_FLAGS=`` with the benchmark's default, ``jax_ddpm.xla_flags.CPU_XLA_FLAGS``).
Prints one Markdown table; nothing is written to disk.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from .measure import helper_parser, parse_helper_args, time_interleaved


def _torch_phases(size, base, x0, t, noise):
    """(forward, forward+backward, step) callables of the torch reference: torch_ref's U-Net
    and train step for the chapter's sizes; diffusers' UNet2DModel, add_noise, eps-MSE and
    torch Adam for the unet2d sizes (``benchmarks.diffusers_runner``)."""
    import torch

    if size.arch == "unet2d":
        import torch.nn.functional as F

        from . import diffusers_runner

        model, sched, opt, _, _ = diffusers_runner._train_parts(base, size, x0.shape[0], "cpu", 0)

        def loss():
            return F.mse_loss(model(sched.add_noise(x0, noise, t), t).sample, noise)

        def step():
            diffusers_runner.eps_mse_step(model, sched, opt, x0, t, noise, "float32", "cpu")
    else:
        from torch_ref.diffusion import DiffusionProcess
        from torch_ref.training import loss_fn as torch_loss_fn
        from torch_ref.training import make_optimizer, train_step

        model = base.train()
        diffusion = DiffusionProcess(size.timesteps)
        opt = make_optimizer(model, lr=1e-3)

        def loss():
            return torch_loss_fn(model, diffusion, x0, t, noise)

        def step():
            train_step(model, diffusion, opt, x0, t=t, noise=noise)

    def forward():
        with torch.no_grad():
            loss()

    def backward():
        model.zero_grad(set_to_none=True)
        loss().backward()

    return forward, backward, step


def main(argv=None) -> int:
    from .cases import SIZES

    p = helper_parser("breakdown", __doc__, size="probe", batch=32, reps=5, sizes=tuple(SIZES))
    p.add_argument("--jax-conv-impl", default="auto", choices=("auto", "xla", "decomposed"))
    args = parse_helper_args(p, argv, ("batch", "reps"))

    import jax
    import jax.numpy as jnp
    import torch

    from jax_ddpm import training
    from jax_ddpm.schedules import make_schedule

    from . import cases
    from .suite import reference_side

    size = cases.SIZES[args.size]
    b = args.batch
    side = reference_side(size, "cpu")
    if side.missing:
        print(f"python -m benchmarks.breakdown: error: {side.missing}", file=sys.stderr)
        return 1
    base, variables, _ = side.build(b)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, size.channels, size.image_size, size.image_size, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, size.timesteps, (b,), generator=gen)
    t_forward, t_backward, t_step = _torch_phases(size, base, x0, t, noise)

    # jax (NHWC)
    jm = cases.jax_model(size, "float32", args.jax_conv_impl)
    schedule = make_schedule(size.timesteps, "linear")
    jx0 = jnp.asarray(x0.permute(0, 2, 3, 1).numpy())
    jnoise = jnp.asarray(noise.permute(0, 2, 3, 1).numpy())
    jt = jnp.asarray(t.numpy().astype(np.int32))
    params, stats = variables["params"], variables.get("batch_stats")
    loss = jax.jit(lambda p, s: training.loss_fn(p, s, jm.apply, schedule, jx0, jt, jnoise)[0])
    grad = jax.jit(jax.value_and_grad(lambda p, s: training.loss_fn(p, s, jm.apply, schedule, jx0, jt, jnoise)[0]))
    state = cases.jax_train_state(variables, size, "float32", args.jax_conv_impl)
    step = jax.jit(training.train_step_with_noise, donate_argnums=0)
    box = [state]

    def j_forward():
        loss(params, stats).block_until_ready()

    def j_backward():
        jax.block_until_ready(grad(params, stats))

    def j_step():
        box[0], _ = step(box[0], jx0, jt, jnoise)
        jax.block_until_ready(box[0])

    runners = {"jax forward": j_forward, "torch forward": t_forward, "jax forward+backward": j_backward,
               "torch forward+backward": t_backward, "jax step": j_step, "torch step": t_step}
    for r in runners.values():  # compile + warm up
        r()
        r()
    cpu: dict = {}
    times = time_interleaved(runners, args.reps, cpu)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    cpu_med = {k: float(np.median(v)) * 1e3 for k, v in cpu.items()}
    print(f"# train-step breakdown: {size.name} ({size.image_size}x{size.image_size}x{size.channels}, "
          f"features {','.join(map(str, size.features))}), batch {b}, fp32, jax conv_impl {args.jax_conv_impl}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, median of {args.reps}, load {os.getloadavg()[0]:.1f}\n")
    print("| phase | jax ms | torch ms | torch/jax (speed ratio) | jax CPU-ms | torch CPU-ms |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = [("forward", "forward", None), ("forward+backward", "forward+backward", None),
            ("step", "step", None), ("backward (difference)", "forward+backward", "forward"),
            ("optimizer + rest (difference)", "step", "forward+backward")]
    for label, a, sub in rows:
        j = med[f"jax {a}"] - (med[f"jax {sub}"] if sub else 0)
        tt = med[f"torch {a}"] - (med[f"torch {sub}"] if sub else 0)
        jc = cpu_med[f"jax {a}"] - (cpu_med[f"jax {sub}"] if sub else 0)
        tc = cpu_med[f"torch {a}"] - (cpu_med[f"torch {sub}"] if sub else 0)
        print(f"| {label} | {j:.1f} | {tt:.1f} | {tt / j:.2f}x | {jc:.1f} | {tc:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
