"""diffusers' side of the ``unet2d`` rows: ``UNet2DModel``, the same eps-MSE loss and Adam, scheduler loops.

What runs (diffusers 0.42.1 on the development machine; torch on ``device``):

- the model: ``diffusers.UNet2DModel(**config_to_diffusers(size.config))`` (the ``_``-keys
  dropped), torch's default init from a seed. The JAX side gets the same weights through
  the project's own reader: ``save_pretrained`` into a temporary folder, then
  ``jax_ddpm.load_diffusers`` (the unet2d weight table), :func:`jax_variables`.
- train step: ``opt.zero_grad(); F.mse_loss(model(add_noise(x0, eps, t), t).sample,
  eps).backward(); opt.step()`` with ``DDPMScheduler(T, linear 1e-4..0.02).add_noise`` and
  ``torch.optim.Adam(lr=1e-3)`` (torch's defaults, what ``jax_ddpm.training.make_optimizer``
  mirrors); ``t`` and ``eps`` drawn on the device inside the timed call, as JAX's step does.
  ``torch.compile(model, dynamic=False)`` for the compiled row (the loss and Adam stay eager, as for the
  torch_ref rows). bf16: the step under ``torch.autocast(device, bfloat16)``.
- sampling: the pipelines' loop, ``set_timesteps(n)``, then for each ``t`` ``model(x,
  t).sample`` and ``scheduler.step(...)`` under ``torch.no_grad()``, with the scheduler that
  matches a jax_ddpm sampler name (:data:`SCHEDULERS`: ``ddpm`` DDPMScheduler, ``ddim``
  DDIMScheduler, ``dpmpp_2m`` DPMSolverMultistepScheduler with dpmsolver++ / order 2 /
  midpoint), each with its own default spacing, as ``parity_tests.references.diffusers_samplers``
  configures them. The scheduler's step is part of the timed loop (it is what a diffusers
  user runs).

Everything imports torch and diffusers lazily. Without diffusers, :func:`missing` says why and
the suite records the diffusers rows as skipped with that reason.
"""
from __future__ import annotations

import copy
import importlib.util
import tempfile
import time
from typing import Any, Callable

from .cases import Runner, _autocast, _err, _sync, _torch_cuda_step_memory
from .measure import current_rss_bytes, peak_rss_bytes, torch_flops

EAGER, COMPILED = "diffusers", "diffusers+compile"
# jax_ddpm sampler name -> (diffusers scheduler class, its extra arguments)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddpm": ("DDPMScheduler", {"variance_type": "fixed_small", "clip_sample": False}),
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                 "solver_type": "midpoint"}),
}
CARRY_HINT = "carry a diffusers wheel: benchmarks/README.md, 'GPU'"


def _find_spec(name: str):
    """``importlib.util.find_spec`` (imports nothing); a test replaces it to play 'not installed'."""
    return importlib.util.find_spec(name)


def missing() -> str | None:
    """Why diffusers rows cannot run here (torch or diffusers not importable), or None."""
    absent = [n for n in ("torch", "diffusers") if _find_spec(n) is None]
    return f"{' and '.join(absent)} not installed ({CARRY_HINT})" if absent else None


def diffusers_config(config) -> dict:
    """``UNet2DModel.__init__`` arguments of a ``UNet2DConfig`` (``config_to_diffusers`` without ``_``-keys)."""
    from jax_ddpm.diffusers_io import config_to_diffusers

    return {k: v for k, v in config_to_diffusers(config).items() if not k.startswith("_")}


def model(size, device: str, seed: int = 0):
    """``diffusers.UNet2DModel`` of ``size.arch_config()``, torch's default init from ``seed``."""
    import torch
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = UNet2DModel(**diffusers_config(size.arch_config()))
    return net.to(device)


def jax_variables(base_model) -> dict:
    """The model's weights as flax variables, through a diffusers folder: ``save_pretrained``
    (safetensors) into a temporary folder, read back by ``jax_ddpm.load_diffusers``."""
    import jax
    import jax.numpy as jnp

    from jax_ddpm.diffusers_io import load_diffusers

    with tempfile.TemporaryDirectory(prefix="bench-unet2d-") as tmp:
        copy.deepcopy(base_model).to("cpu").save_pretrained(tmp, safe_serialization=True)
        _, variables, _ = load_diffusers(tmp, conv_impl="xla")
    return jax.tree_util.tree_map(jnp.asarray, variables)


def scheduler(name: str, timesteps: int):
    """The diffusers scheduler matching jax_ddpm's sampler ``name`` (linear 1e-4..0.02 betas)."""
    import diffusers

    cls, extra = SCHEDULERS[name]
    return getattr(diffusers, cls)(num_train_timesteps=timesteps, beta_schedule="linear", beta_start=1e-4,
                                   beta_end=0.02, **extra)


def _first_call_compiled(net, call: Callable[[Any], None], info: dict):
    import torch

    # dynamic=False as for the sampling chains: with the default (dynamic=None) torch 2.13's inductor
    # re-traced the cifar10 train step with symbolic sizes and failed ("cannot determine truth value
    # of Relational: 256*((s30//2))*((s91//2)) < 1"; bench-cpu-20261202-070951-unet2d)
    compiled = torch.compile(net, dynamic=False)
    t0 = time.perf_counter()
    call(compiled)
    info["first_call_s"] = time.perf_counter() - t0
    return compiled


def _runner(impl: str, net, call: Callable[[Any], None], compiled: bool, device: str) -> Runner:
    """First call (compiling first if asked), its time and on CUDA one call's peak memory."""
    info: dict = {"notes": [], "compiled": compiled}
    if compiled:
        target = _first_call_compiled(net, call, info)
    else:
        t0 = time.perf_counter()
        call(net)
        info["first_call_s"] = time.perf_counter() - t0
        target = net
    info["memory"] = _torch_cuda_step_memory(lambda: call(target)) if device == "cuda" else {}
    return Runner(impl, lambda: call(target), info)


def _train_parts(base_model, size, batch: int, device: str, seed: int):
    import torch

    net = copy.deepcopy(base_model).train()
    sched = scheduler("ddpm", size.timesteps)
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.randn(batch, size.channels, size.image_size, size.image_size, generator=gen, device=device)
    return net, sched, opt, gen, x0


def eps_mse_step(net, sched, opt, x0, t, noise, dtype: str, device: str) -> float:
    """One Adam step of the eps-MSE loss on ``add_noise(x0, noise, t)``; returns the loss."""
    import torch.nn.functional as F

    opt.zero_grad(set_to_none=True)
    with _autocast(device, dtype):
        pred = net(sched.add_noise(x0, noise, t), t).sample
    loss = F.mse_loss(pred.float(), noise)
    loss.backward()
    opt.step()
    return loss


def train_runner(base_model, size, batch: int, device: str, dtype: str, compiled: bool, seed: int = 1) -> Runner:
    """diffusers' UNet2DModel + eps-MSE + torch Adam, eager or ``torch.compile(model)``."""
    impl = COMPILED if compiled else EAGER
    try:
        import torch

        net, sched, opt, gen, x0 = _train_parts(base_model, size, batch, device, seed)
        sync = _sync(device)

        def step(target):
            t = torch.randint(0, size.timesteps, (batch,), generator=gen, device=device)
            noise = torch.randn(x0.shape, generator=gen, device=device)
            eps_mse_step(target, sched, opt, x0, t, noise, dtype, device)
            sync()

        return _runner(impl, net, step, compiled, device)
    except Exception as exc:  # noqa: BLE001 - recorded in the row
        return Runner(impl, error=_err(exc))


def scheduler_loop(net, sched, x_T, num_steps: int, generator, dtype: str = "float32", device: str = "cpu"):
    """The pipelines' loop: ``set_timesteps(num_steps)`` (which also resets a multistep
    solver's state), then ``x = sched.step(net(x, t).sample, t, x).prev_sample`` for each
    ``t``, under ``torch.no_grad()`` (and autocast for bf16); returns x clamped to [-1, 1]."""
    import torch

    sched.set_timesteps(num_steps, device=device)
    x = x_T
    with torch.no_grad(), _autocast(device, dtype):
        for t in sched.timesteps:
            eps = net(x, t).sample
            x = sched.step(eps.float(), t, x, generator=generator).prev_sample
    return x.clamp(-1, 1)


_COMPILED_EVAL: dict[int, tuple] = {}  # id(base model) -> (base model, its eval copy under torch.compile)


def compiled_eval_model(base_model):
    """One ``torch.compile(dynamic=False)`` eval copy of ``base_model``, shared by all its
    sampling chains (one graph per batch size; a new base model drops the previous one)."""
    import torch

    hit = _COMPILED_EVAL.get(id(base_model))
    if hit is None or hit[0] is not base_model:
        _COMPILED_EVAL.clear()
        hit = (base_model, torch.compile(copy.deepcopy(base_model).eval(), dynamic=False))
        _COMPILED_EVAL[id(base_model)] = hit
    return hit[1]


def sample_runner(base_model, size, sampler: str, num_steps: int, batch: int, device: str, dtype: str,
                  compiled: bool, seed: int = 2) -> Runner:
    """The scheduler loop of ``sampler`` (``num_steps`` steps) with the model, eval mode."""
    impl = COMPILED if compiled else EAGER
    if sampler not in SCHEDULERS:
        return Runner(impl, skipped=f"diffusers has no scheduler matching jax_ddpm's {sampler!r} "
                                    f"(known: {', '.join(SCHEDULERS)})")
    try:
        import torch

        net = copy.deepcopy(base_model).eval()
        sched = scheduler(sampler, size.timesteps)
        gen = torch.Generator(device=device).manual_seed(seed)
        x_T = torch.randn(batch, size.channels, size.image_size, size.image_size, generator=gen, device=device)
        sync = _sync(device)

        def chain(target):
            scheduler_loop(target, sched, x_T, num_steps, gen, dtype, device)
            sync()

        if not compiled:
            return _runner(impl, net, chain, False, device)
        target = compiled_eval_model(base_model)
        info: dict = {"notes": ["one torch.compile(dynamic=False) model shared by the size's sampling chains: "
                                "the first call of the first chain at a batch size includes compiling"],
                      "compiled": True}
        t0 = time.perf_counter()
        chain(target)
        info["first_call_s"] = time.perf_counter() - t0
        info["memory"] = _torch_cuda_step_memory(lambda: chain(target)) if device == "cuda" else {}
        return Runner(impl, lambda: chain(target), info)
    except Exception as exc:  # noqa: BLE001
        return Runner(impl, error=_err(exc))


def _attention_core_flops(net, run: Callable[[], None]) -> int:
    """FLOPs of the attentions' ``softmax(q k^T) v`` products (2 * 2 * B * N^2 * C per call),
    counted with forward hooks: torch's FlopCounterMode does not count
    ``scaled_dot_product_attention``'s CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``)."""
    from diffusers.models.attention_processor import Attention

    total = [0]

    def hook(module, args, out):
        x = args[0]
        b, c = x.shape[0], x.shape[1]
        n = x[0, 0].numel() if x.ndim == 4 else x.shape[1]
        if x.ndim == 3:
            c = x.shape[2]
        total[0] += 4 * b * n * n * c

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, Attention)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total[0]


def counted_flops(base_model, size, batch: int, device: str) -> dict:
    """FLOPs of one train step (forward + backward) and of one eval forward per image:
    torch's FlopCounterMode (convolutions, matmuls) plus the attention products it misses on
    CPU (:func:`_attention_core_flops`; 3x in a train step: forward, and two products back)."""
    import torch

    net = copy.deepcopy(base_model)
    sched = scheduler("ddpm", size.timesteps)
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)
    x0 = torch.zeros(batch, size.channels, size.image_size, size.image_size, device=device)
    t = torch.zeros(batch, dtype=torch.long, device=device)

    def train_once():
        net.train()
        torch.nn.functional.mse_loss(net(sched.add_noise(x0, x0, t), t).sample, x0).backward()

    def forward_once():
        net.eval()
        with torch.no_grad():
            net(x0[:1], t[:1])

    counted_train = torch_flops(train_once)
    counted_fwd = torch_flops(forward_once)
    attn_fwd = _attention_core_flops(net, forward_once)
    cpu_kernel = device == "cpu"  # on CUDA the counter has formulas for the flash / efficient kernels
    return {"train_step": counted_train + (3 * batch * attn_fwd if cpu_kernel else 0),
            "forward_per_image": counted_fwd + (attn_fwd if cpu_kernel else 0),
            "attention_core_forward_per_image": attn_fwd, "attention_added": cpu_kernel}


def rss_probe_main(size, batch: int, dtype: str) -> dict:
    """Child side of the CPU memory probe: two diffusers train steps in this fresh process."""
    import torch

    base = model(size, "cpu")
    net, sched, opt, gen, x0 = _train_parts(base, size, batch, "cpu", 1)
    del base
    rss_built = current_rss_bytes()
    for _ in range(2):
        t = torch.randint(0, size.timesteps, (batch,), generator=gen)
        eps_mse_step(net, sched, opt, x0, t, torch.randn(x0.shape, generator=gen), dtype, "cpu")
    peak = peak_rss_bytes()
    return {"rss_built_bytes": rss_built, "peak_rss_bytes": peak, "rss_growth_bytes": peak - rss_built}


__all__ = ["COMPILED", "EAGER", "SCHEDULERS", "counted_flops", "diffusers_config", "jax_variables", "missing",
           "model", "sample_runner", "scheduler", "train_runner"]
