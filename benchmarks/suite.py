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

REFERENCE_IMPLS = ("torch", "torch.compile")


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
    sample_timesteps: int | None = None                # None: the size's T (quick: 20)
    peak_n: int = 2048
    peak_reps: int = 5
    memory_probe: bool = True                          # torch CPU: fresh-process RSS probe


def _group_rows(task: str, size: cases.ModelSize, batch: int, dtype: str, runners: list[cases.Runner],
                reps: int, warmup: int, flops_per_call: float | None, peaks: dict, extra: dict,
                log: Callable[[str], None]) -> list[dict]:
    """Warms up, times the runners interleaved and turns the times into rows."""
    from .measure import time_interleaved

    ok = {r.impl: r for r in runners if r.error is None}
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
        if r.error is None:
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
        timesteps = cfg.sample_timesteps or (min(size.timesteps, cases.QUICK_SAMPLE_TIMESTEPS) if cfg.quick
                                            else size.timesteps)
        base = cases.torch_model(size, cfg.device)
        variables = cases.jax_variables(base)
        flops = cases.counted_flops(base, size, train_b, cfg.device)
        results["sizes"][name] = {**dataclasses.asdict(size), "train_batch": train_b, "sample_batches": list(sample_bs),
                                  "sample_timesteps": timesteps, "counted_flops": flops,
                                  "state": cases.state_bytes(variables)}
        if "train" in cfg.tasks:
            log(f"[{clock():6.0f}s] {name}: train step, batch {train_b}")
            runners = [cases.jax_train_runner(variables, size, train_b, cfg.dtype, impl) for impl in cfg.jax_conv_impls]
            runners.append(cases.torch_train_runner(base, size, train_b, cfg.device, cfg.dtype, compiled=False))
            if cfg.torch_compile:
                runners.append(cases.torch_train_runner(base, size, train_b, cfg.device, cfg.dtype, compiled=True))
            if cfg.device == "cpu" and cfg.memory_probe:
                runners[len(cfg.jax_conv_impls)].info["memory"] = cases.torch_cpu_rss_probe(size, train_b, cfg.dtype)
            results["rows"] += _group_rows("train", size, train_b, cfg.dtype, runners, cfg.train_reps,
                                           cfg.train_warmup, flops["train_step"], roofline_peaks, {}, log)
            save(results)
            del runners
        if "sample" in cfg.tasks:
            for b in sample_bs:
                log(f"[{clock():6.0f}s] {name}: sampling, {timesteps} steps, batch {b}")
                runners = [cases.jax_sample_runner(variables, size, b, timesteps, cfg.dtype, impl)
                           for impl in cfg.jax_conv_impls]
                runners.append(cases.torch_sample_runner(base, size, b, timesteps, cfg.device, cfg.dtype, False))
                if cfg.torch_compile:
                    runners.append(cases.torch_sample_runner(base, size, b, timesteps, cfg.device, cfg.dtype, True))
                results["rows"] += _group_rows("sample", size, b, cfg.dtype, runners, cfg.sample_reps, 0,
                                               flops["forward_per_image"] * b * timesteps, roofline_peaks,
                                               {"timesteps": timesteps}, log)
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
    save(results)
    return results


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
