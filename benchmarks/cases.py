"""How it is measured: one ``Runner`` per (framework, task) on the same weights. The model sizes
(what is measured) are ``benchmarks.sizes``, re-exported here.

A runner is a zero-argument callable doing one blocking unit of work (a train step, or a
whole T-step sampling chain) plus what was learned while building it (compile times, FLOPs,
memory). Builders never raise: a failure (torch.compile without a compiler, out of memory,
...) becomes a runner with ``error`` set, and the run goes on.

Both frameworks start from the same torch-initialised weights (converted with
``jax_ddpm.convert``; for the ``unet2d`` sizes a diffusers ``UNet2DModel`` read back with
``jax_ddpm.load_diffusers``, ``benchmarks.diffusers_runner``), draw their own t and noise on
the device inside the timed call, and use Adam(1e-3) with torch's defaults.

The reference a size is compared with follows its architecture: torch_ref (impls ``torch``,
``torch.compile``) for the chapter's U-Net, diffusers (``diffusers``, ``diffusers+compile``)
for ``unet2d`` (:func:`reference_impls`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

from .measure import REPO, _err, current_rss_bytes, peak_rss_bytes, torch_flops, xla_cost, xla_memory
# the sizes live in benchmarks.sizes; their names are re-exported here
from .sizes import (BATCHES, DEFAULT_SIZES, QUICK_SAMPLE_TIMESTEPS, QUICK_SIZES, SAMPLE_PLANS, SIZES,  # noqa: F401
                    ModelSize, _unet2d_json, reference_impls)


@dataclasses.dataclass
class Runner:
    """One implementation of one task, ready to time."""

    impl: str
    run: Callable[[], None] | None = None
    info: dict = dataclasses.field(default_factory=dict)   # first_call_s, compile_s, xla cost, memory, notes
    error: str | None = None
    skipped: str | None = None   # not run, and why (not an error: e.g. a sampler not registered yet)


def _sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


# ----------------------------------------------------------------------------- torch side
def torch_model(size: ModelSize, device: str, seed: int = 0):
    """torch_ref's UNet with torch's default initialisation from ``seed``, on ``device``."""
    import torch

    from torch_ref.model import UNet

    if size.arch != "chapter":
        raise ValueError(f"size {size.name}: no torch model for arch {size.arch!r} in the benchmark yet")
    torch.manual_seed(seed)
    return UNet(size.channels, size.time_emb_dim, list(size.features)).to(device)


def _autocast(device: str, dtype: str):
    import contextlib

    import torch

    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=getattr(torch, dtype))


def _compile_module_embedding_eager(model, notes: list[str]):
    """torch.compile with torch_ref's SinusoidalPositionEmbeddings left eager.

    Under dynamo, ``torch.arange(half_dim) * -np.float64(...)`` becomes float64 (eagerly it
    is float32), and the first conv then fails with 'Input type (double) and bias type
    (float) should be the same'. Leaving the (tiny) embedding eager keeps the math and
    compiles everything else.
    """
    import torch

    model.time_mlp.forward = torch.compiler.disable(model.time_mlp.forward)
    notes.append("time embedding left eager (torch.compiler.disable); see error_full_compile")
    return torch.compile(model)


def _first_call_compiled(model, call: Callable[[Any], None], info: dict):
    """``torch.compile(model)`` and the first call; on failure retries with the embedding eager."""
    import torch

    compiled = torch.compile(model)
    t0 = time.perf_counter()
    try:
        call(compiled)
    except Exception as exc:  # noqa: BLE001 - recorded; retried below
        info["error_full_compile"] = _err(exc)
        torch._dynamo.reset()
        compiled = _compile_module_embedding_eager(model, info["notes"])
        t0 = time.perf_counter()
        call(compiled)
    info["first_call_s"] = time.perf_counter() - t0
    return compiled


def _torch_runner(impl: str, model, call: Callable[[Any], None], compiled: bool, device: str) -> Runner:
    """Makes the first call of ``call(net)`` (compiling ``model`` first if asked), records its
    time and, on CUDA, one call's peak memory; returns the runner of ``call(net)``."""
    info: dict = {"notes": []}
    if compiled:
        net = _first_call_compiled(model, call, info)
    else:
        t0 = time.perf_counter()
        call(model)
        info["first_call_s"] = time.perf_counter() - t0
        net = model
    info["memory"] = _torch_cuda_step_memory(lambda: call(net)) if device == "cuda" else {}
    return Runner(impl, lambda: call(net), info)


def torch_train_runner(base_model, size: ModelSize, batch: int, device: str, dtype: str, compiled: bool,
                       seed: int = 1) -> Runner:
    """torch_ref.training.train_step (eager or with ``torch.compile(model)``) on a fixed batch."""
    impl = "torch.compile" if compiled else "torch"
    try:
        import torch

        from torch_ref.diffusion import DiffusionProcess
        from torch_ref.training import make_optimizer, train_step

        model = copy.deepcopy(base_model).train()
        diffusion = DiffusionProcess(size.timesteps).to(device)
        optimizer = make_optimizer(model, lr=1e-3)
        gen = torch.Generator(device=device).manual_seed(seed)
        x0 = torch.randn(batch, size.channels, size.image_size, size.image_size, generator=gen, device=device)
        sync = _sync(device)

        def step(net):
            t = torch.randint(0, size.timesteps, (batch,), generator=gen, device=device)
            noise = torch.randn(x0.shape, generator=gen, device=device)
            with _autocast(device, dtype):
                train_step(net, diffusion, optimizer, x0, t=t, noise=noise)
            sync()

        return _torch_runner(impl, model, step, compiled, device)
    except Exception as exc:  # noqa: BLE001
        return Runner(impl, error=_err(exc))


def torch_sample_runner(base_model, size: ModelSize, batch: int, timesteps: int, device: str, dtype: str,
                        compiled: bool, seed: int = 2) -> Runner:
    """torch_ref.sampling.sample: the Python loop over ``timesteps`` reverse steps, eval mode."""
    impl = "torch.compile" if compiled else "torch"
    try:
        import torch

        from torch_ref.diffusion import DiffusionProcess
        from torch_ref.sampling import sample

        model = copy.deepcopy(base_model).eval()
        diffusion = DiffusionProcess(timesteps).to(device)
        gen = torch.Generator(device=device).manual_seed(seed)
        x_T = torch.randn(batch, size.channels, size.image_size, size.image_size, generator=gen, device=device)
        sync = _sync(device)

        def chain(net):
            with _autocast(device, dtype):
                sample(net, diffusion, x_T, generator=gen)
            sync()

        return _torch_runner(impl, model, chain, compiled, device)
    except Exception as exc:  # noqa: BLE001
        return Runner(impl, error=_err(exc))


def _torch_cuda_step_memory(call: Callable[[], None]) -> dict:
    """Peak CUDA bytes allocated during one call, above what was allocated before it."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    return {"method": "torch.cuda.max_memory_allocated() - memory_allocated() before the call",
            "transient_peak_bytes": int(torch.cuda.max_memory_allocated() - before),
            "allocated_before_bytes": int(before)}


def counted_flops(base_model, size: ModelSize, batch: int, device: str) -> dict:
    """FLOPs of one train step (forward + backward) and of one eval forward, by torch's counter."""
    import torch

    from torch_ref.diffusion import DiffusionProcess
    from torch_ref.training import loss_fn

    model = copy.deepcopy(base_model)
    diffusion = DiffusionProcess(size.timesteps).to(device)
    x0 = torch.zeros(batch, size.channels, size.image_size, size.image_size, device=device)
    t = torch.zeros(batch, dtype=torch.long, device=device)

    def train_once():
        model.train()
        loss_fn(model, diffusion, x0, t, torch.zeros_like(x0)).backward()

    def forward_once(b: int):
        model.eval()
        with torch.no_grad():
            model(x0[:1].expand(b, -1, -1, -1).contiguous(), t[:1].expand(b))

    return {"train_step": torch_flops(train_once), "forward_per_image": torch_flops(lambda: forward_once(1))}


# ----------------------------------------------------------------------------- jax side
def jax_variables(base_model) -> dict:
    """The torch model's weights and BatchNorm buffers as flax variables (jax arrays; the chapter's table)."""
    import jax
    import jax.numpy as jnp

    from jax_ddpm.convert import from_torch_state_dict

    sd = {k: v.detach().cpu().numpy().copy() for k, v in base_model.state_dict().items()}
    return jax.tree_util.tree_map(jnp.asarray, from_torch_state_dict(sd))


def jax_model(size: ModelSize, dtype: str, conv_impl: str):
    """The JAX model of ``size``, built through the architecture registry."""
    import jax.numpy as jnp

    from jax_ddpm.models.registry import get_arch

    return get_arch(size.arch).build(size.arch_config(), dtype=getattr(jnp, dtype), conv_impl=conv_impl)


def jax_impl_name(conv_impl: str) -> str:
    """``'jax'`` for the default formulation, ``'jax/<conv_impl>'`` otherwise."""
    return "jax" if conv_impl == "auto" else f"jax/{conv_impl}"


def _lower_compile(fn, *args) -> tuple[Any, dict]:
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1}


def _jax_runner(impl: str, compiled, info: dict, conv_impl: str, run: Callable[[], None],
                memory_method: str) -> Runner:
    """Adds XLA's cost and memory analysis of ``compiled`` to ``info``, makes (and times) the
    first call of ``run``; returns its runner."""
    from jax_ddpm.models.convolutions import resolve_conv_impl

    info.update(xla=xla_cost(compiled), memory=dict(xla_memory(compiled), method=memory_method),
                conv_impl=resolve_conv_impl(conv_impl), notes=[])
    t0 = time.perf_counter()
    run()
    info["first_call_s"] = time.perf_counter() - t0
    return Runner(impl, run, info)


def jax_train_state(variables: dict, size: ModelSize, dtype: str, conv_impl: str):
    """A fresh ``TrainState`` (Adam(1e-3), no EMA, linear schedule) on copies of ``variables``,
    so that donating it leaves ``variables`` intact."""
    import jax
    import jax.numpy as jnp

    from jax_ddpm import training
    from jax_ddpm.schedules import make_schedule

    model = jax_model(size, dtype, conv_impl)
    tx = training.make_optimizer(1e-3)
    return training.train_state_from_variables(jax.tree_util.tree_map(jnp.copy, dict(variables)), model.apply, tx,
                                               make_schedule(size.timesteps, "linear"))


def jax_train_runner(variables: dict, size: ModelSize, batch: int, dtype: str, conv_impl: str,
                     seed: int = 1) -> Runner:
    """jax_ddpm.training.train_step, jitted with the state donated, on a fixed batch."""
    impl = jax_impl_name(conv_impl)
    try:
        import jax
        import jax.numpy as jnp

        from jax_ddpm import training

        state = jax_train_state(variables, size, dtype, conv_impl)
        key = jax.random.PRNGKey(seed)
        x0 = jax.random.normal(jax.random.fold_in(key, 10**6), (batch, size.image_size, size.image_size,
                                                                  size.channels), jnp.float32)
        step = jax.jit(training.train_step, donate_argnums=0)
        compiled, info = _lower_compile(step, state, x0, key)
        box = [state]

        def run():
            box[0], _ = compiled(box[0], x0, key)
            jax.block_until_ready(box[0])

        return _jax_runner(impl, compiled, info, conv_impl, run, "XLA buffer plan (memory_analysis): temp = "
                           "activations and scratch; arguments = state + batch")
    except Exception as exc:  # noqa: BLE001
        return Runner(impl, error=_err(exc))


def jax_sampler_missing(name: str) -> str | None:
    """Why jax_ddpm cannot run sampler ``name`` (not registered in ``jax_ddpm.samplers``), or None."""
    from jax_ddpm import samplers

    try:
        samplers.get_sampler(name)
    except ValueError as exc:
        return f"sampler {name!r} is not registered in jax_ddpm.samplers ({exc})"
    return None


def jax_sample_runner(variables: dict, size: ModelSize, batch: int, timesteps: int, dtype: str, conv_impl: str,
                      seed: int = 2, sampler: str = "ddpm", num_steps: int | None = None) -> Runner:
    """The whole chain as one compiled program (``make_sample_fn``: one lax.scan): sampler
    ``sampler`` (``jax_ddpm.samplers.get_sampler``) over ``num_steps`` steps (None: all
    ``timesteps``) of a ``timesteps``-step linear schedule. Skipped, with the reason, when the
    sampler is not registered."""
    impl = jax_impl_name(conv_impl)
    why = jax_sampler_missing(sampler)
    if why:
        return Runner(impl, skipped=why)
    try:
        import jax
        import jax.numpy as jnp

        from jax_ddpm.sampling import make_sample_fn
        from jax_ddpm.schedules import make_schedule

        model = jax_model(size, dtype, conv_impl)
        sample = make_sample_fn(model, sampler, num_steps=None if num_steps in (None, timesteps) else num_steps)
        schedule = make_schedule(timesteps, "linear")
        key = jax.random.PRNGKey(seed)
        x_T = jax.random.normal(key, (batch, size.image_size, size.image_size, size.channels), jnp.float32)
        compiled, info = _lower_compile(sample, variables, schedule, x_T, key)

        def run():
            compiled(variables, schedule, x_T, key).block_until_ready()

        return _jax_runner(impl, compiled, info, conv_impl, run, "XLA buffer plan (memory_analysis)")
    except Exception as exc:  # noqa: BLE001
        return Runner(impl, error=_err(exc))


# ----------------------------------------------------------------------------- CPU memory of torch
def torch_cpu_rss_probe(size: ModelSize, batch: int, dtype: str, timeout_s: float = 600) -> dict:
    """Runs two torch train steps in a fresh Python process; returns its RSS growth.

    ``rss_growth_bytes`` = peak RSS (``VmHWM``) minus RSS after building the model,
    optimizer and batch: gradients, Adam's moments (allocated at the first step),
    activations and temporaries, as the OS saw them.
    """
    cmd = [sys.executable, "-m", "benchmarks.cases", "rss-probe", json.dumps(
        {"size": size.name, "batch": batch, "dtype": dtype})]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=str(REPO),
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                 filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))))
    except subprocess.TimeoutExpired:
        return {"error": f"rss probe timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"rss probe failed (exit {out.returncode}): {tail[:300]}"}
    res = json.loads(lines[-1])
    res["method"] = "fresh process: peak RSS (VmHWM) - RSS after building model, optimizer, batch; 2 steps"
    return res


def _rss_probe_main(spec: dict) -> int:
    """Child side of :func:`torch_cpu_rss_probe`."""
    import torch

    from torch_ref.diffusion import DiffusionProcess
    from torch_ref.training import make_optimizer, train_step

    size, batch = SIZES[spec["size"]], int(spec["batch"])
    if size.arch == "unet2d":
        from . import diffusers_runner

        print(json.dumps(diffusers_runner.rss_probe_main(size, batch, spec["dtype"])))
        return 0
    model = torch_model(size, "cpu")
    diffusion = DiffusionProcess(size.timesteps)
    optimizer = make_optimizer(model, lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, size.channels, size.image_size, size.image_size, generator=gen)
    rss_built = current_rss_bytes()
    for _ in range(2):
        with _autocast("cpu", spec["dtype"]):
            train_step(model, diffusion, optimizer, x0, generator=gen)
    peak = peak_rss_bytes()
    print(json.dumps({"rss_built_bytes": rss_built, "peak_rss_bytes": peak, "rss_growth_bytes": peak - rss_built}))
    return 0


def state_bytes(variables: dict) -> dict:
    """Bytes of the parameters, of Adam's two moments and of the BatchNorm buffers (both frameworks)."""
    import jax

    p = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(variables["params"]))
    b = sum(int(np.prod(x.shape)) * x.dtype.itemsize
            for x in jax.tree_util.tree_leaves(variables.get("batch_stats") or {}))
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
    return {"num_params": n, "params_bytes": p, "adam_moments_bytes": 2 * p, "batch_stats_bytes": b}


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "rss-probe":
    sys.exit(_rss_probe_main(json.loads(sys.argv[2])))
