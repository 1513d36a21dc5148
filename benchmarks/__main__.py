"""``python -m benchmarks`` / ``jax-ddpm bench``: jax_ddpm against torch_ref and diffusers on this machine.

    python -m benchmarks --quick                 # a smoke run under 2 minutes (no torch.compile)
    python -m benchmarks                         # full run: every size, train + sampling, torch.compile
    python -m benchmarks --sizes unet2d-digits,unet2d-cifar10   # jax_ddpm vs diffusers only
    python -m benchmarks --device cuda --out DIR
    python -m benchmarks --render FILE.json      # Markdown + PNG again from a (partial) JSON

Writes ``bench-<device>-<UTC time>[-quick][-TAG].{json,md,png}`` under ``--out``
(default ``benchmarks/results``); never overwrites a file. See benchmarks/README.md.

Environment set here, before torch and JAX start (recorded in the JSON):
``OMP_WAIT_POLICY=PASSIVE`` on CPU unless set (``--omp-wait-policy``): with the default
spinning policy, torch's two OpenMP threads ran 5-10x slower whenever the shared 2-core
machine had other work, which measures the neighbours, not torch; ``XLA_PYTHON_CLIENT_PREALLOCATE=false``
on CUDA, so that JAX and torch share the GPU; ``--xla-flags`` appended to ``XLA_FLAGS``
(default on CPU: ``jax_ddpm.xla_flags.CPU_XLA_FLAGS``, if this jaxlib knows the flag: XLA:CPU
(jaxlib 0.10) sends convolutions to YNNPACK by default, whose weight-gradient convolutions ran
~5x slower than Eigen's here; benchmarks/README.md, "CPU gap").
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Sequence

from jax_ddpm import xla_flags
from jax_ddpm.models.convolutions import CONV_IMPLS
from jax_ddpm.parallel import DTYPES

from .cases import DEFAULT_SIZES, QUICK_SIZES, SIZES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results"
SIZE_NAMES = tuple(SIZES)
TASKS = ("train", "sample")


class UsageError(Exception):
    """Bad command-line input: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jax-ddpm bench",
                description="Benchmark jax_ddpm against torch_ref and diffusers (train step, sampling).")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when torch and JAX both see one)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (created if missing)")
    p.add_argument("--quick", action="store_true",
                   help="small batches, few reps, 10-step chains, no torch.compile, no memory probe")
    p.add_argument("--sizes", help=f"comma list of {', '.join(SIZE_NAMES)} (default {','.join(DEFAULT_SIZES)}; "
                                   f"--quick: {','.join(QUICK_SIZES)})")
    p.add_argument("--tasks", default="train,sample", help="comma list of train, sample")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (jax compute dtype / torch autocast)")
    p.add_argument("--torch-compile", default="auto", help="on, off, or auto (on unless --quick)")
    p.add_argument("--jax-conv-impl", default="auto",
                   help="comma list of auto, xla, decomposed: one JAX row each (UNet.conv_impl)")
    p.add_argument("--train-batch", help="train batch per size, comma list (default: by device, see README)")
    p.add_argument("--sample-batch", help="large sampling batch per size, comma list (batch 1 is always run)")
    p.add_argument("--reps", type=str, help="timed train steps per implementation (default 7; quick 3)")
    p.add_argument("--sample-reps", type=str, help="timed chains per implementation (default 3; quick 2)")
    p.add_argument("--sample-timesteps", type=str,
                   help="T of the chapter sizes' chains (default: the size's T; quick 10); for unet2d sizes the "
                        "step count of every --samplers chain given without one")
    p.add_argument("--samplers",
                   help="unet2d sizes' chains: comma list of SAMPLER[:STEPS], SAMPLER a jax_ddpm.samplers name "
                        "(one not registered is skipped with the reason); default per size and device, "
                        "benchmarks/sizes.py SAMPLE_PLANS")
    p.add_argument("--xla-flags", default="auto",
                   help="appended to XLA_FLAGS (checked in a subprocess first); 'auto': on CPU, "
                        f"{xla_flags.CPU_XLA_FLAGS} where this jaxlib accepts it; 'none': nothing")
    p.add_argument("--omp-wait-policy", default="passive", help="passive, active or unset (CPU torch threads)")
    p.add_argument("--no-memory-probe", action="store_true", help="skip torch's fresh-process RSS probe on CPU")
    p.add_argument("--tag", default="", help="appended to the file names")
    p.add_argument("--render", metavar="JSON", help="only write the Markdown and PNG of an existing results JSON")
    return p


def _choices(opt: str, text: str, allowed: Sequence[str]) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in items if s not in allowed]
    if not items or bad:
        raise UsageError(f"{opt} must be a comma list of {', '.join(allowed)}, got {text!r}")
    if len(set(items)) != len(items):
        raise UsageError(f"{opt} lists a value twice: {text!r}")
    return items


def _positive(opt: str, text: str | None, default: int) -> int:
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{opt} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise UsageError(f"{opt} must be a positive integer, got {text!r}")
    return value


def _per_size(opt: str, text: str | None, sizes: Sequence[str]) -> tuple[int, ...] | None:
    if text is None:
        return None
    values = tuple(_positive(opt, v.strip(), 1) for v in text.split(","))
    if len(values) != len(sizes):
        raise UsageError(f"{opt} needs one value per size ({', '.join(sizes)}), got {text!r}")
    return values


def _samplers(text: str | None) -> tuple[tuple[str, int | None], ...] | None:
    """``--samplers ddpm:100,ddim`` -> ``(('ddpm', 100), ('ddim', None))``."""
    if text is None:
        return None
    out = []
    for item in (s.strip() for s in text.split(",")):
        name, _, steps = item.partition(":")
        if not name or not (name.replace("_", "").isalnum()):
            raise UsageError(f"--samplers must be a comma list of SAMPLER[:STEPS], got {text!r}")
        out.append((name, _positive("--samplers steps", steps, 1) if steps else None))
    if len({n for n, _ in out}) != len(out):
        raise UsageError(f"--samplers lists a sampler twice: {text!r}")
    return tuple(out)


def _check_samplers(samplers, sizes: Sequence[str], sample_t: int | None, quick: bool) -> None:
    """Step counts the user gave (``--samplers NAME:STEPS``, or ``--sample-timesteps`` for the
    unet2d chains) that a size cannot run: more steps than its T, or settings a registered
    jax_ddpm sampler refuses; one line, exit 2. Names not registered are not an error here:
    their rows are skipped with the reason."""
    from jax_ddpm import samplers as registry

    from .cases import SAMPLE_PLANS

    check = getattr(registry, "check_options", None)
    for size in (SIZES[s] for s in sizes if SIZES[s].arch == "unet2d"):
        wanted = samplers or tuple((n, None) for n, _, _ in SAMPLE_PLANS[("cpu", quick)].get(size.name, ()))
        for name, steps in wanted:
            n = steps or sample_t
            if n is None:
                continue
            where = f"{name}:{n} ({size.name}, T = {size.timesteps})"
            if n > size.timesteps:
                raise UsageError(f"--samplers {where}: more steps than the schedule's T")
            if check is not None and name in getattr(registry, "SAMPLERS", ()):
                try:
                    check(name, size.timesteps, num_steps=n)
                except ValueError as exc:
                    raise UsageError(f"--samplers {where}: {exc}") from None


def _setup_environment(args, device_hint: str) -> None:
    """Environment variables that must be set before torch / JAX start."""
    policy = args.omp_wait_policy.lower()
    if policy not in ("passive", "active", "unset"):
        raise UsageError(f"--omp-wait-policy must be passive, active or unset, got {args.omp_wait_policy!r}")
    if device_hint != "cuda" and policy != "unset" and "OMP_WAIT_POLICY" not in os.environ:
        if "torch" in sys.modules:
            print("warning: torch is already imported; --omp-wait-policy cannot take effect", file=sys.stderr)
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    if device_hint != "cpu":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    elif not xla_flags.jax_started():
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # --device cpu on a GPU machine: JAX on the CPU too
    try:
        note = xla_flags.setup(args.xla_flags, cpu=device_hint != "cuda")
    except xla_flags.XlaFlagsError as exc:
        raise UsageError(f"--xla-flags: {exc}") from None
    if note:
        print(f"note: {note}", file=sys.stderr)


def _resolve_device(requested: str) -> str:
    import jax
    import torch

    def jax_has_gpu() -> bool:
        try:
            return len(jax.devices("gpu")) > 0
        except RuntimeError:
            return False

    has_cuda = torch.cuda.is_available() and jax_has_gpu()
    if requested == "auto":
        return "cuda" if has_cuda else "cpu"
    if requested == "cuda" and not has_cuda:
        raise UsageError("--device cuda: no CUDA device visible to both torch and JAX "
                         f"(torch: {torch.cuda.is_available()}, jax: {jax_has_gpu()})")
    return requested


def _out_dir(text: str) -> Path:
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {text}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {text}: cannot create it ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out {text}: not writable")
    return out


def _render(path_text: str) -> int:
    from . import output
    from .suite import load_results

    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"--render {path_text}: no such file")
    try:
        results = load_results(path)
        md = output.markdown(results)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--render {path_text}: not a benchmark results file ({type(exc).__name__}: {exc})") from None
    md_path, png_path = path.with_suffix(".md"), path.with_suffix(".png")
    md_path.write_text(md)
    output.chart(results, png_path)
    print(f"wrote {md_path} and {png_path}")
    return 0


def _run(args) -> int:
    if args.render:
        return _render(args.render)
    requested = args.device.lower()
    if requested not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or auto, got {args.device!r}")
    sizes = _choices("--sizes", args.sizes, SIZE_NAMES) if args.sizes else (QUICK_SIZES if args.quick
                                                                            else DEFAULT_SIZES)
    tasks = _choices("--tasks", args.tasks, TASKS)
    (dtype,) = _choices("--dtype", args.dtype, DTYPES)
    conv_impls = _choices("--jax-conv-impl", args.jax_conv_impl, CONV_IMPLS)
    tc = args.torch_compile.lower()
    if tc not in ("auto", "on", "off"):
        raise UsageError(f"--torch-compile must be on, off or auto, got {args.torch_compile!r}")
    train_batches = _per_size("--train-batch", args.train_batch, sizes)
    sample_batches = _per_size("--sample-batch", args.sample_batch, sizes)
    reps = _positive("--reps", args.reps, 3 if args.quick else 7)
    sample_reps = _positive("--sample-reps", args.sample_reps, 2 if args.quick else 3)
    sample_t = _positive("--sample-timesteps", args.sample_timesteps, 0) if args.sample_timesteps else None
    if sample_t is not None and sample_t < 2:
        raise UsageError(f"--sample-timesteps must be >= 2, got {args.sample_timesteps!r}")
    samplers = _samplers(args.samplers)
    _check_samplers(samplers, sizes, sample_t, args.quick)
    if args.tag and not all(c.isalnum() or c in "-_." for c in args.tag):
        raise UsageError(f"--tag must be letters, digits, '-', '_' or '.', got {args.tag!r}")
    out = _out_dir(args.out)
    _setup_environment(args, requested)
    device = _resolve_device(requested)

    from . import output
    from .suite import SuiteConfig, run_suite

    cfg = SuiteConfig(device=device, sizes=sizes, dtype=dtype, quick=args.quick, tasks=tasks,
                      torch_compile=(tc == "on") or (tc == "auto" and not args.quick), jax_conv_impls=conv_impls,
                      train_batches=train_batches, sample_batches=sample_batches, train_reps=reps,
                      train_warmup=1 if args.quick else 2, sample_reps=sample_reps, sample_timesteps=sample_t,
                      samplers=samplers,
                      peak_n=(8192 if device == "cuda" else (1024 if args.quick else 2048)),
                      peak_reps=3 if args.quick else 5, memory_probe=not (args.no_memory_probe or args.quick))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = f"bench-{device}-{stamp}" + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    json_path, md_path, png_path = (out / f"{base}.{ext}" for ext in ("json", "md", "png"))
    for p in (json_path, md_path, png_path):
        if p.exists():
            raise UsageError(f"{p} exists; not overwriting it (use --tag)")
    print(f"benchmark on {device}: sizes {', '.join(sizes)}; tasks {', '.join(tasks)}; writing {json_path}", flush=True)
    results = run_suite(cfg, save=lambda r: output.write_json(json_path, r), log=lambda s: print(s, flush=True))
    md_path.write_text(output.markdown(results))
    output.chart(results, png_path)
    print(f"wrote {json_path}, {md_path.name}, {png_path.name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks`` and ``jax-ddpm bench``. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
        return _run(args)
    except UsageError as exc:
        print(f"jax-ddpm bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jax-ddpm bench: interrupted; the JSON holds the groups finished so far", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
