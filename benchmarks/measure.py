"""Measuring tools: interleaved timing, matmul peaks, FLOP counts, memory, the machine.

Every function here is framework-agnostic or imports its framework lazily, so that
``benchmarks.__main__`` can set environment variables (``OMP_WAIT_POLICY``, ``XLA_FLAGS``)
before torch or JAX starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.metadata
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helper scripts

def helper_parser(module: str, doc: str, *, size: str | None = None, batch: int | None = None,
                  reps: int = 5, sizes: Sequence[str] = ("digits", "chapter", "probe")) -> argparse.ArgumentParser:
    """The command line the helper scripts (``python -m benchmarks.<module>``) share:
    ``--size`` (one of ``sizes``) and ``--batch`` (when given defaults) and ``--reps``."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=doc.splitlines()[0])
    if size is not None:
        p.add_argument("--size", default=size, choices=tuple(sizes))
    if batch is not None:
        p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--reps", type=int, default=reps)
    return p


def parse_helper_args(p: argparse.ArgumentParser, argv, positive: Sequence[str]) -> argparse.Namespace:
    """Parses, insists that the options named in ``positive`` are > 0 (a usage error, exit 2,
    otherwise), and sets ``OMP_WAIT_POLICY=PASSIVE`` unless set, before torch starts."""
    args = p.parse_args(argv)
    if any(getattr(args, name) < 1 for name in positive):
        flags = [f"--{name.replace('_', '-')}" for name in positive]
        listed = flags[0] if len(flags) == 1 else ", ".join(flags[:-1]) + " and " + flags[-1]
        p.error(f"{listed} must be positive")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return args


# ----------------------------------------------------------------------------- timing
def summarize(seconds: Sequence[float]) -> dict:
    """Median, min, max, quartiles and relative spread of a list of wall times (seconds).

    Returns:
      ``{'n', 'median_s', 'min_s', 'max_s', 'q25_s', 'q75_s', 'iqr_rel', 'times_s'}``;
      ``iqr_rel = (q75 - q25) / median`` is the noise figure quoted in the tables.
    """
    a = np.asarray(seconds, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no timings to summarize")
    med = float(np.median(a))
    q25, q75 = (float(v) for v in np.percentile(a, [25, 75]))
    return {"n": int(a.size), "median_s": med, "min_s": float(a.min()), "max_s": float(a.max()),
            "q25_s": q25, "q75_s": q75, "iqr_rel": (q75 - q25) / med if med > 0 else float("nan"),
            "times_s": [float(v) for v in a]}


def time_interleaved(runners: Mapping[str, Callable[[], None]], reps: int,
                     cpu_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Times every runner ``reps`` times, one of each per round, the order rotated each round.

    Interleaving makes load changes on a shared machine hit all runners alike, so ratios
    taken within a round (or of medians) are fairer than separate loops. Each runner must
    block until its work is done (``block_until_ready`` / ``torch.cuda.synchronize``).

    Args:
      runners: name -> blocking zero-argument callable.
      reps: rounds.
      cpu_times: if given, filled with the process CPU seconds (all threads) of each call:
        the work a call cost, which other jobs on a shared CPU disturb much less than wall time.
    Returns:
      ``{name: [wall seconds per call]}``.
    """
    names = list(runners)
    out: dict[str, list[float]] = {name: [] for name in names}
    if cpu_times is not None:
        cpu_times.update({name: [] for name in names})
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            runners[name]()
            t1, c1 = time.perf_counter(), time.process_time()
            out[name].append(t1 - t0)
            if cpu_times is not None:
                cpu_times[name].append(c1 - c0)
    return out


def paired_ratio(numer_times: Sequence[float], denom_times: Sequence[float]) -> dict:
    """Ratios ``numer[i] / denom[i]`` of times taken in the same round: median and quartiles."""
    r = np.asarray(numer_times, np.float64) / np.asarray(denom_times, np.float64)
    q25, q50, q75 = (float(v) for v in np.percentile(r, [25, 50, 75]))
    return {"median": q50, "q25": q25, "q75": q75}


# ----------------------------------------------------------------------------- peaks
def _matmul_runner(framework: str, device: str, dtype: str, n: int, precision: str) -> Callable[[], None]:
    """A callable doing one blocking ``[n, n] @ [n, n]`` product."""
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        dev = jax.devices("gpu" if device == "cuda" else "cpu")[0]
        key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
        a = jax.device_put(jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype), dev)
        b = jax.device_put(jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype), dev)
        prec = {"highest": jax.lax.Precision.HIGHEST, "default": None}[precision]
        mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=prec))
        mm(a, b).block_until_ready()
        return lambda: mm(a, b).block_until_ready()
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=getattr(torch, dtype))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        prev = torch.backends.cuda.matmul.allow_tf32 if device == "cuda" else None
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = precision == "default" and dtype == "float32"
        try:
            torch.matmul(a, b)
            sync()
        finally:
            if device == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = prev

    run()
    return run


def measure_peaks(device: str, n: int, reps: int) -> dict:
    """Matmul throughput of both frameworks, interleaved; the device peak is the best seen.

    Measures ``float32`` (strict: JAX ``Precision.HIGHEST``, torch without TF32),
    ``bfloat16`` and, on CUDA, ``tf32`` (JAX's default fp32 precision, torch with TF32).
    On CPU, bf16 is measured too: torch uses oneDNN (AMX where the CPU has it), XLA:CPU
    may not.

    Returns:
      ``{name: {'n', 'gflops': best over frameworks and reps, 'by_framework': {fw: {'best', 'median'}}}}``
      or ``{name: {'error': ...}}`` where a kind could not be measured.
    """
    kinds = [("float32", "float32", "highest"), ("bfloat16", "bfloat16", "default")]
    if device == "cuda":
        kinds.insert(1, ("tf32", "float32", "default"))
    flops = 2.0 * n ** 3
    peaks: dict = {}
    for name, dtype, precision in kinds:
        runners, errors = {}, {}
        for fw in ("jax", "torch"):
            try:
                runners[fw] = _matmul_runner(fw, device, dtype, n, precision)
            except Exception as exc:  # noqa: BLE001 - recorded, not fatal
                errors[fw] = _err(exc)
        if not runners:
            peaks[name] = {"error": "; ".join(f"{k}: {v}" for k, v in errors.items())}
            continue
        times = time_interleaved(runners, reps)
        by_fw = {fw: {"best_gflops": flops / min(t) / 1e9, "median_gflops": flops / float(np.median(t)) / 1e9}
                 for fw, t in times.items()}
        by_fw.update({fw: {"error": e} for fw, e in errors.items()})
        best = max(v["best_gflops"] for v in by_fw.values() if "best_gflops" in v)
        peaks[name] = {"n": n, "gflops": best, "by_framework": by_fw}
    return peaks


# ----------------------------------------------------------------------------- FLOPs
def xla_cost(compiled) -> dict:
    """FLOPs and bytes accessed from XLA's cost analysis of a compiled executable ({} if absent)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return {}
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    out = {}
    if ca and "flops" in ca:
        out["flops"] = float(ca["flops"])
    if ca and "bytes accessed" in ca:
        out["bytes_accessed"] = float(ca["bytes accessed"])
    return out


def torch_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
    convolutions, forward and backward: 2 per multiply-add; elementwise ops count 0)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- memory
def xla_memory(compiled) -> dict:
    """XLA's buffer plan for one executable: argument, output, alias (donated) and temp bytes."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return {}
    if ma is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    return {f.replace("_size_in_bytes", "_bytes"): int(getattr(ma, f)) for f in fields if hasattr(ma, f)}


def jax_device_peak_bytes() -> int | None:
    """``peak_bytes_in_use`` of the first JAX device (process lifetime; None where unsupported)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far: ``VmHWM`` of /proc/self/status.

    Not ``ru_maxrss``: Linux carries that across fork + exec, so a child started from a big
    parent reports the parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ----------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance() -> str:
    """One line for the header of the helper scripts' tables: commit, versions, CPU."""
    versions = ", ".join(f"{name} {_version(name)}" for name in ("jax", "jaxlib", "torch"))
    return f"commit {_git_commit()}; {versions}; {_cpu_model()}, {os.cpu_count()} cores"


def environment(device: str) -> dict:
    """Date, machine, versions and the environment variables that change timings."""
    import jax
    import torch

    env = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_backend": jax.default_backend(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "versions": {name: _version(name) for name in ("jax", "jaxlib", "flax", "optax", "torch", "numpy")},
        "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                               "XLA_PYTHON_CLIENT_PREALLOCATE", "CUDA_VISIBLE_DEVICES")},
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def _err(exc: BaseException) -> str:
    """One line: the exception's type, the first line of its message and, where torch wraps
    the real error (``got RuntimeError('...')``), that error's message."""
    import re

    text = str(exc).strip()
    lines = text.splitlines()
    out = f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"
    inner = re.search(r"got (\w+(?:Error|Exception))\('(.{1,300}?)'\)", text)
    if inner:
        out += f" ({inner.group(1)}: {inner.group(2)})"
    return out


@dataclasses.dataclass
class Stopwatch:
    """Wall time since construction, in seconds."""

    t0: float = dataclasses.field(default_factory=time.perf_counter)

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
