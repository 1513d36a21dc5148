"""The benchmark run: peaks, then per model size a train group and sampling groups.

Within a group every implementation runs the same model (same weights), batch and dtype;
their calls are interleaved round by round (``measure.time_interleaved``), so every
JAX/torch ratio comes from the same minutes of the same run. The JSON is rewritten after
each group, so a run that is stopped keeps what it measured.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import numpy as np

from . import cases
from .measure import Stopwatch, environment, measure_peaks, paired_ratio, summarize

REFERENCE_IMPLS = ("torch", "torch.compile", "diffusers", "diffusers+compile")


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """Everything a run needs; built and validated by ``benchmarks.__main__``."""

    device: str = "cpu"
    sizes: tuple[str, ...] = cases.DEFAULT_SIZES
    dtype: str = "float32"
    quick: bool = False
    tasks: tuple[str, ...] = ("train", "sample")
    torch_compile: bool = True
    jax_conv_impls: tuple[str, ...] = ("auto",)
    train_batches: tuple[int, ...] | None = None       # one per size; None: cases.BATCHES
    sample_batches: tuple[int, ...] | None = None      # the large sampling batch, one per size
    train_reps: int = 7
    train_warmup: int = 2
    sample_reps: int = 3
    sample_timesteps: int | None = None                # None: the size's T (quick: 10); unet2d: steps of each chain
    # unet2d sizes' chains: (sampler, steps or None); None: cases.SAMPLE_PLANS
    samplers: tuple[tuple[str, int | None], ...] | None = None
    peak_n: int = 2048
    peak_reps: int = 5
    memory_probe: bool = True                          # torch CPU: fresh-process RSS probe


def _group_rows(task: str, size: cases.ModelSize, batch: int, dtype: str, runners: list[cases.Runner],
                reps: int, warmup: int, flops_per_call: float | None, peaks: dict, extra: dict,
                log: Callable[[str], None]) -> list[dict]:
    """Warms up, times the runners interleaved and turns the times into rows."""
    from .measure import time_interleaved

    ok = {r.impl: r for r in runners if r.error is None and r.skipped is None}
    for r in ok.values():
        t0 = Stopwatch()
        for _ in range(warmup):
            r.run()
        r.info["warmup_s"] = t0()
    cpu: dict[str, list[float]] = {}
    times = time_interleaved({name: r.run for name, r in ok.items()}, reps, cpu) if ok else {}
    rows = []
    for r in runners:
        row = {"task": task, "size": size.name, "impl": r.impl, "batch": batch, "dtype": dtype, **extra,
               "error": r.error, **{k: v for k, v in r.info.items()}}
        if r.skipped is not None:
            row["skipped"] = r.skipped
            log(f"  {task:6s} {size.name:8s} b={batch:<4d} {r.impl:16s} skipped: {r.skipped}")
        elif r.error is None:
            timing = summarize(times[r.impl])
            row["timing"] = timing
            row["images_per_s"] = batch / timing["median_s"]
            row["images_per_s_best"] = batch / timing["min_s"]
            row["cpu_s_median"] = float(np.median(cpu[r.impl]))
            row["cores_busy"] = float(np.median(np.asarray(cpu[r.impl]) / np.asarray(times[r.impl])))
            if flops_per_call:
                row["flops_per_call"] = flops_per_call
                row["gflops_per_s"] = flops_per_call / timing["median_s"] / 1e9
                row["peak_fraction"] = {k: row["gflops_per_s"] / p["gflops"] for k, p in peaks.items()
                                        if "gflops" in p}
            row["vs"] = {}
            for ref in REFERENCE_IMPLS:
                if ref in times and ref != r.impl:
                    ref_t = summarize(times[ref])
                    row["vs"][ref] = {"speed_ratio_median": ref_t["median_s"] / timing["median_s"],
                                      "speed_ratio_best": ref_t["min_s"] / timing["min_s"],
                                      "speed_ratio_paired": paired_ratio(times[ref], times[r.impl]),
                                      "cpu_ratio_median": float(np.median(cpu[ref]) / np.median(cpu[r.impl]))}
            log(f"  {task:6s} {size.name:8s} b={batch:<4d} {r.impl:16s} {timing['median_s'] * 1e3:10.1f} ms "
                f"(iqr {timing['iqr_rel'] * 100:4.1f}%)  {row['images_per_s']:9.1f} img/s"
                + "".join(f"  x{v['speed_ratio_median']:.2f} vs {k}" for k, v in row["vs"].items()))
        else:
            log(f"  {task:6s} {size.name:8s} b={batch:<4d} {r.impl:16s} ERROR {r.error}")
        rows.append(row)
    return rows


def run_suite(cfg: SuiteConfig, save: Callable[[dict], None], log: Callable[[str], None] = print) -> dict:
    """Runs the whole benchmark; calls ``save(results)`` after every group. Returns the results."""
    import torch

    clock = Stopwatch()
    results: dict = {"config": dataclasses.asdict(cfg), "environment": environment(cfg.device), "peaks": {},
                     "sizes": {}, "rows": [], "errors": []}
    log(f"peaks: {cfg.peak_n}x{cfg.peak_n} matmuls, {cfg.peak_reps} reps per framework")
    results["peaks"] = measure_peaks(cfg.device, cfg.peak_n, cfg.peak_reps)
    for k, p in results["peaks"].items():
        log(f"  {k:9s} " + (f"{p['gflops']:9.1f} GFLOP/s" if "gflops" in p else f"ERROR {p['error']}"))
    save(results)
    roofline_peaks = _roofline_peaks(results["peaks"], cfg.device, cfg.dtype)
    for i, name in enumerate(cfg.sizes):
        size = cases.SIZES[name]
        train_b, sample_bs = cases.BATCHES[(cfg.device, cfg.quick)][name]
        if cfg.train_batches:
            train_b = cfg.train_batches[i]
        if cfg.sample_batches:
            sample_bs = (1, cfg.sample_batches[i])
        side = reference_side(size, cfg.device)
        base, variables, flops = side.build(train_b)
        chains = sample_chains(cfg, size, sample_bs)
        results["sizes"][name] = {**dataclasses.asdict(size), "train_batch": train_b, "sample_batches": list(sample_bs),
                                  "sample_timesteps": chains[0][2] if size.arch == "chapter" else size.timesteps,
                                  "sample_chains": [list(c) for c in chains], "counted_flops": flops,
                                  "reference": side.name, "state": cases.state_bytes(variables)}
        if side.missing:
            results["sizes"][name]["reference_missing"] = side.missing
        if "train" in cfg.tasks:
            log(f"[{clock():6.0f}s] {name}: train step, batch {train_b}")
            runners = [cases.jax_train_runner(variables, size, train_b, cfg.dtype, impl) for impl in cfg.jax_conv_impls]
            runners.append(side.train_runner(base, train_b, cfg.dtype, compiled=False))
            if cfg.torch_compile:
                runners.append(side.train_runner(base, train_b, cfg.dtype, compiled=True))
            if cfg.device == "cpu" and cfg.memory_probe and not side.missing:
                runners[len(cfg.jax_conv_impls)].info["memory"] = cases.torch_cpu_rss_probe(size, train_b, cfg.dtype)
            if flops.get("train_step") is None:  # no torch model to count with: XLA's count of the JAX step
                _flops_from_xla(flops, runners, train_b)
            results["rows"] += _group_rows("train", size, train_b, cfg.dtype, runners, cfg.train_reps,
                                           cfg.train_warmup, flops.get("train_step"), roofline_peaks, {}, log)
            save(results)
            del runners
        if "sample" in cfg.tasks:
            for sampler, steps, schedule_t, chain_bs in chains:
                for b in chain_bs:
                    log(f"[{clock():6.0f}s] {name}: sampling, {sampler} {steps} steps, batch {b}")
                    runners = [cases.jax_sample_runner(variables, size, b, schedule_t, cfg.dtype, impl,
                                                       sampler=sampler, num_steps=steps)
                               for impl in cfg.jax_conv_impls]
                    runners.append(side.sample_runner(base, sampler, steps, schedule_t, b, cfg.dtype, compiled=False))
                    if cfg.torch_compile:
                        runners.append(side.sample_runner(base, sampler, steps, schedule_t, b, cfg.dtype,
                                                          compiled=True))
                    fwd = flops.get("forward_per_image")
                    results["rows"] += _group_rows("sample", size, b, cfg.dtype, runners, cfg.sample_reps, 0,
                                                   fwd * b * steps if fwd else None, roofline_peaks,
                                                   {"timesteps": steps, "sampler": sampler,
                                                    "schedule_timesteps": schedule_t}, log)
                    save(results)
                    del runners
        del base, variables
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
    log("peaks again (the best of both measurements is the peak; the CPU is shared)")
    _merge_peaks(results["peaks"], measure_peaks(cfg.device, cfg.peak_n, cfg.peak_reps))
    roofline_peaks = _roofline_peaks(results["peaks"], cfg.device, cfg.dtype)
    for row in results["rows"]:
        if "gflops_per_s" in row:
            row["peak_fraction"] = {k: row["gflops_per_s"] / p["gflops"] for k, p in roofline_peaks.items()}
    results["environment"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["environment"]["wall_s"] = clock()
    results["errors"] = [f"{r['task']} {r['size']} b={r['batch']} {r['impl']}: {r['error']}"
                         for r in results["rows"] if r.get("error")]
    results["skipped"] = sorted({f"{r['task']} {r['size']}" + (f" {r['sampler']}" if "sampler" in r else "")
                                 + f" {r['impl']}: {r['skipped']}" for r in results["rows"] if r.get("skipped")})
    save(results)
    return results


def sample_chains(cfg: SuiteConfig, size: cases.ModelSize,
                  batches: tuple[int, ...] = (1,)) -> list[tuple[str, int, int, tuple[int, ...]]]:
    """The sampling chains of a size: ``(sampler, steps, schedule T, batches)``; ``batches``
    are the size's sampling batches (1 and the large one).

    The chapter's sizes: torch_ref's full DDPM chain, of ``--sample-timesteps`` (quick: 10)
    or the size's T steps, on a schedule of that many steps. unet2d sizes: the size's own T
    (``ModelSize.timesteps``) and the chains of ``--samplers`` (every one at every batch),
    else ``cases.SAMPLE_PLANS`` (with the batches it names); a chain without a step count
    takes ``--sample-timesteps`` or the plan's count for that sampler (else all T).
    """
    if size.arch != "unet2d":
        t = cfg.sample_timesteps or (min(size.timesteps, cases.QUICK_SAMPLE_TIMESTEPS) if cfg.quick
                                     else size.timesteps)
        return [("ddpm", t, t, tuple(batches))]
    plan = {name: (steps, bs) for name, steps, bs in cases.SAMPLE_PLANS[(cfg.device, cfg.quick)].get(size.name, ())}
    wanted = cfg.samplers if cfg.samplers else tuple((n, None) for n in plan)
    out = []
    for name, steps in wanted:
        steps = steps or cfg.sample_timesteps or plan.get(name, (None,))[0] or size.timesteps
        plan_bs = None if cfg.samplers else plan[name][1]
        bs = tuple(batches) if plan_bs is None else tuple(b for b in batches if b in plan_bs) or tuple(batches[:1])
        out.append((name, int(steps), size.timesteps, bs))  # more steps than T: refused by benchmarks.__main__
    return out


@dataclasses.dataclass
class ReferenceSide:
    """The torch implementation a size is compared with (torch_ref or diffusers), bound to a device."""

    name: str
    size: cases.ModelSize
    device: str
    missing: str | None = None   # why its rows cannot run here (diffusers not installed)

    def build(self, train_batch: int):
        """(torch model or None, the same weights as flax variables, counted FLOPs)."""
        if self.name == "torch_ref":
            base = cases.torch_model(self.size, self.device)
            return base, cases.jax_variables(base), cases.counted_flops(base, self.size, train_batch, self.device)
        from . import diffusers_runner

        if self.missing:  # JAX rows only, on jax_ddpm's own (torch-style) initialisation
            return None, _jax_init_variables(self.size), {"train_step": None, "forward_per_image": None}
        base = diffusers_runner.model(self.size, self.device)
        return (base, diffusers_runner.jax_variables(base),
                diffusers_runner.counted_flops(base, self.size, train_batch, self.device))

    def _skipped(self, compiled: bool) -> cases.Runner:
        eager, comp = cases.reference_impls(self.size)
        return cases.Runner(comp if compiled else eager, skipped=self.missing)

    def train_runner(self, base, batch: int, dtype: str, compiled: bool) -> cases.Runner:
        if self.missing:
            return self._skipped(compiled)
        if self.name == "torch_ref":
            return cases.torch_train_runner(base, self.size, batch, self.device, dtype, compiled=compiled)
        from . import diffusers_runner

        return diffusers_runner.train_runner(base, self.size, batch, self.device, dtype, compiled)

    def sample_runner(self, base, sampler: str, steps: int, schedule_t: int, batch: int, dtype: str,
                      compiled: bool) -> cases.Runner:
        if self.missing:
            return self._skipped(compiled)
        if self.name == "torch_ref":
            return cases.torch_sample_runner(base, self.size, batch, schedule_t, self.device, dtype, compiled)
        from . import diffusers_runner

        return diffusers_runner.sample_runner(base, self.size, sampler, steps, batch, self.device, dtype, compiled)


def reference_side(size: cases.ModelSize, device: str) -> ReferenceSide:
    if size.arch != "unet2d":
        return ReferenceSide("torch_ref", size, device)
    from . import diffusers_runner

    return ReferenceSide("diffusers", size, device, diffusers_runner.missing())


def _jax_init_variables(size: cases.ModelSize, seed: int = 0) -> dict:
    """Weights for a size without its reference: every tensor of the architecture's weight
    table (shapes from ``expected_torch_shapes``, no model run) drawn as torch's default init
    would scale it (kernels U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases 0, norm scales 1), then
    through ``jax_ddpm.convert`` as any torch state dict. Timing does not depend on the values;
    they only have to be ordinary floats. (A jitted ``model.init`` of even a tiny unet2d took
    30-50 s to compile here: one threefry per parameter.)"""
    import jax
    import jax.numpy as jnp

    from jax_ddpm.convert import from_torch_state_dict
    from jax_ddpm.diffusers_io import expected_torch_shapes
    from jax_ddpm.models.registry import get_arch

    config = size.arch_config()
    rng = np.random.default_rng(seed)
    sd = {}
    for name, shape in expected_torch_shapes(config).items():
        if name.endswith(".weight") and len(shape) > 1:
            bound = 1 / np.sqrt(np.prod(shape[1:]))
            sd[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
        else:
            sd[name] = (np.ones if name.endswith(".weight") else np.zeros)(shape, np.float32)
    variables = from_torch_state_dict(sd, table=get_arch(size.arch).weight_table(config))
    return jax.tree_util.tree_map(jnp.asarray, variables)


def _flops_from_xla(flops: dict, runners: list, batch: int) -> None:
    """Fills ``flops`` from XLA's cost analysis of the first JAX train step that compiled
    (forward per image taken as a third of the step per image)."""
    for r in runners:
        xla = r.info.get("xla", {}) if r.error is None and r.skipped is None else {}
        if xla.get("flops"):
            flops.update(train_step=xla["flops"], forward_per_image=xla["flops"] / 3 / batch,
                         source="XLA cost analysis of the JAX train step (no torch model to count); "
                                "forward = a third of it")
            return


def _merge_peaks(peaks: dict, again: dict) -> None:
    """Keeps the best rate per kind and framework of two peak measurements (in place)."""
    for kind, p in again.items():
        if "gflops" not in p:
            continue
        if "gflops" not in peaks.get(kind, {}):
            peaks[kind] = p
            continue
        old = peaks[kind]
        for fw, v in p["by_framework"].items():
            if "best_gflops" in v and v["best_gflops"] > old["by_framework"].get(fw, {}).get("best_gflops", 0):
                old["by_framework"][fw] = v
        old["gflops"] = max(old["gflops"], p["gflops"])
        old["measurements"] = old.get("measurements", 1) + 1


def _roofline_peaks(peaks: dict, device: str, dtype: str) -> dict:
    """The peaks a run of ``dtype`` is compared with: fp32 runs against strict fp32 (and, on
    CUDA, TF32, which both frameworks' fp32 convolutions use by default); bf16 against bf16."""
    names = ("float32", "tf32") if dtype == "float32" else ("bfloat16",)
    return {k: v for k, v in peaks.items() if k in names and "gflops" in v}


def summary_ratios(results: dict) -> list[dict]:
    """Per (task, size, batch): every JAX implementation's speed ratios and fraction of peak."""
    out = []
    for row in results.get("rows", []):
        if not row["impl"].startswith("jax") or row.get("error"):
            continue
        out.append({"task": row["task"], "size": row["size"], "batch": row["batch"], "impl": row["impl"],
                    **{f"vs_{k}": v["speed_ratio_median"] for k, v in row.get("vs", {}).items()},
                    **{f"peak_{k}": v for k, v in row.get("peak_fraction", {}).items()}})
    return out


def load_results(path: Path) -> dict:
    import json

    with open(path) as f:
        return json.load(f)


__all__ = ["SuiteConfig", "run_suite", "summary_ratios", "load_results"]
