"""Time to a good sample: jax_ddpm against diffusers on the same trained UNet2DModel weights.

    python -m benchmarks.time_to_quality --workdir runs/unet2d [--num 1000] [--torch-compile on]
        [--out benchmarks/results/time-to-quality-unet2d]

The work folder is a trained ``--arch unet2d`` run. Its EMA weights go to a diffusers
``DDPMPipeline`` folder with ``jax-ddpm convert --to-diffusers`` (what a user does), and each
sampler configuration (``--grid``, default ddpm all T, ddim 50 / 25, dpmpp_2m 20 / 10) is
run on both sides:

- **jax_ddpm**: one ``jax-ddpm eval --workdir W`` process (``--num`` samples, the run's sampling
  settings), then in this process the compiled chain of a ``--chunk`` (64) image grid, once to
  compile and ``--repeats`` (3) times timed (``steps_to_quality.grid_seconds``).
- **diffusers** (``diffusers.UNet2DModel.from_pretrained`` of that folder, torch eager): the
  pipelines' loop (``benchmarks.diffusers_runner.scheduler_loop``) with the scheduler that
  matches the jax_ddpm sampler and the run's settings (:func:`diffusers_scheduler`) draws the
  ``--num`` samples in chunks of ``--chunk``; each full chunk is timed (the median is the
  time per chunk), the samples are written to an ``.npz`` and scored by ``jax-ddpm eval
  --samples``: the same metric, the same classifier, the same floor.
- ``--torch-compile on``: also ``torch.compile(dynamic=False)`` of the same model, timed on a
  chunk ``--repeats`` times after the call that compiles it (its samples are not scored: it
  computes the eager model's function).

The two sides draw different noise (JAX's and torch's generators), so equal quality means
equal within the metric's seed noise (docs/quality.md: 1-3% of the FID at N = 1000).
"Time to a good sample" is, for each framework, the fastest configuration whose FID is at most
``--bar`` (2.0) times the real-vs-real floor, as seconds per ``--chunk`` samples (compile
apart). Writes OUT.json (every number as measured), OUT.md and OUT.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# the option mapping the parity suite checks against jax_ddpm's chains (its diffusers sampler rows)
from parity_tests.references.diffusers_samplers import DEFAULT_SPACING, VARIANCE_TYPES

from .steps_to_quality import _parse_grid, grid_seconds, run_one

DEFAULT_GRID = (("ddpm", None), ("ddim", 50), ("ddim", 25), ("dpmpp_2m", 20), ("dpmpp_2m", 10))
JAX, EAGER, COMPILED = "jax_ddpm", "diffusers", "diffusers+compile"
# the scheduler_config.json keys every scheduler takes from the exported folder
COMMON_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas", "prediction_type")


class UsageError(Exception):
    """A work folder or option this benchmark cannot take (printed in one line, exit 2)."""


def diffusers_scheduler(sampler: str, folder_config: dict, opts: dict):
    """(scheduler, step kwargs): diffusers' scheduler for jax_ddpm's ``sampler`` with the library
    options ``opts`` (``app.sample.sampler_options``: the run's variance and clipping, the
    sampler's own options), the schedule and prediction type from the exported folder's
    ``scheduler_config.json``; mapped as ``parity_tests.references.diffusers_samplers`` maps
    them (checked there against jax_ddpm's chains)."""
    import diffusers

    common = {k: folder_config[k] for k in COMMON_KEYS if k in folder_config}
    common.update(timestep_spacing=opts.get("timestep_spacing", DEFAULT_SPACING[sampler]),
                  steps_offset=opts.get("steps_offset", 0))
    clip = bool(opts.get("clip_denoised", False))
    if sampler == "ddpm":
        return diffusers.DDPMScheduler(**common, clip_sample=clip,
                                       variance_type=VARIANCE_TYPES[opts.get("variance", "beta_tilde")]), {}
    if sampler == "ddim":
        return (diffusers.DDIMScheduler(**common, clip_sample=clip, set_alpha_to_one=True),
                {"eta": opts.get("eta", 0.0), "use_clipped_model_output": clip})
    if sampler == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(
            **common, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
            lower_order_final=opts.get("lower_order_final", True),
            final_sigmas_type=opts.get("final_sigmas_type", "zero"),
            thresholding=clip, sample_max_value=1.0), {}  # threshold s clamped to [1, 1]: plain clipping
    raise UsageError(f"--grid: diffusers has no scheduler matching jax_ddpm's {sampler!r} (ddpm, ddim, dpmpp_2m)")


def diffusers_chain(net, sched, step_kwargs: dict, x_T, num_steps: int, generator):
    """The pipelines' loop (``set_timesteps``, then ``model(x, t).sample`` and
    ``scheduler.step``) under ``torch.no_grad()``; the result clamped to [-1, 1], NCHW."""
    import torch

    sched.set_timesteps(num_steps)
    x = x_T
    with torch.no_grad():
        for t in sched.timesteps:
            out = net(x, t).sample
            x = sched.step(out, t, x, generator=generator, **step_kwargs).prev_sample
    return x.clamp(-1, 1)


def diffusers_samples(net, sampler: str, folder_config: dict, opts: dict, num_steps: int, num: int, chunk: int,
                      shape: tuple[int, int, int], seed: int):
    """(samples float32 [num, H, W, C], seconds of each full chunk after the first, the first's):
    ``num`` samples, ``chunk`` at a time, each chunk a fresh scheduler (multistep solvers keep
    state) and x_T from one torch generator seeded by ``seed``. The first chunk is the warm-up
    (torch's first calls at a shape are slower), kept apart."""
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(seed)
    h, w, c = shape
    out, times, first = [], [], None
    while sum(len(o) for o in out) < num:
        b = min(chunk, num - sum(len(o) for o in out))
        sched, kw = diffusers_scheduler(sampler, folder_config, opts)
        x_T = torch.randn(b, c, h, w, generator=gen)
        t0 = time.perf_counter()
        x = diffusers_chain(net, sched, kw, x_T, num_steps, gen)
        if first is None:
            first = time.perf_counter() - t0
        elif b == chunk:
            times.append(time.perf_counter() - t0)
        out.append(x.permute(0, 2, 3, 1).numpy().astype(np.float32))
    return np.concatenate(out), times, first


def compiled_seconds(compiled, sampler: str, folder_config: dict, opts: dict, num_steps: int, chunk: int,
                     shape: tuple[int, int, int], repeats: int, seed: int) -> tuple[float, list[float]]:
    """(first call s, timed calls s) of the chain with ``compiled``, one ``torch.compile(net,
    dynamic=False)`` shared by all configurations (the first call of the first one compiles)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    h, w, c = shape

    def once() -> float:
        sched, kw = diffusers_scheduler(sampler, folder_config, opts)
        x_T = torch.randn(chunk, c, h, w, generator=gen)
        t0 = time.perf_counter()
        diffusers_chain(compiled, sched, kw, x_T, num_steps, gen)
        return time.perf_counter() - t0

    first = once()
    return first, [once() for _ in range(repeats)]


def score_samples(samples, seed: int, tmp: str) -> dict:
    """``jax-ddpm eval --samples`` of the samples (an .npz in ``tmp``, as ``sample --out`` writes)."""
    import numpy as np

    from jax_ddpm.images import to_uint8

    path = os.path.join(tmp, "diffusers-samples.npz")
    out = os.path.join(tmp, "diffusers-eval.json")
    np.savez(path, samples=samples, images=to_uint8(samples))
    cmd = [sys.executable, "-m", "jax_ddpm.cli", "eval", "--samples", path, "--seed", str(seed), "--json", out]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:])} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    with open(out) as f:
        return json.load(f)


def export(workdir: str, dest: str) -> dict:
    """``jax-ddpm convert --workdir W --to-diffusers DEST``; returns the folder's scheduler config."""
    cmd = [sys.executable, "-m", "jax_ddpm.cli", "convert", "--workdir", workdir, "--to-diffusers", dest]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise UsageError(f"jax-ddpm convert --to-diffusers failed: {done.stderr.strip().splitlines()[-1:]}")
    with open(os.path.join(dest, "scheduler", "scheduler_config.json")) as f:
        return json.load(f)


def _metrics(r: dict) -> dict:
    keys = ("fid", "fid_floor", "fid_ratio", "confident", "real_confident", "coverage", "num_classes",
            "largest_class_share", "num_samples")
    return {k: r[k] for k in keys}


def measure(args) -> dict:
    from jax_ddpm.app import sample as app_sample
    from jax_ddpm.app.config import SampleConfig
    from jax_ddpm.app.factories import image_shape
    from jax_ddpm.app.workdir import load_run

    run = load_run(args.workdir, None)
    if run.config.model.arch != "unet2d":
        raise UsageError(f"--workdir {args.workdir}: holds --arch {run.config.model.arch}; diffusers has a model "
                         "only for --arch unet2d")
    T, prediction = run.config.diffusion.timesteps, run.config.diffusion.prediction
    shape = tuple(image_shape(run.config))
    import torch
    from diffusers import UNet2DModel

    rows = []
    with tempfile.TemporaryDirectory(prefix="time-to-quality-") as tmp:
        pipe = os.path.join(tmp, "pipeline")
        folder_config = export(args.workdir, pipe)
        net = UNet2DModel.from_pretrained(os.path.join(pipe, "unet"), low_cpu_mem_usage=False).eval()
        compiled = torch.compile(net, dynamic=False) if args.torch_compile == "on" else None
        for sampler, steps in args.grid:
            n = steps or T
            config = SampleConfig(workdir=args.workdir, out="unused.png", sampler=sampler, num_steps=steps)
            opts = app_sample.sampler_options(config, run.sampling, T, prediction)
            common = {"sampler": sampler, "num_steps": n, "options": {k: v for k, v in opts.items()
                                                                      if k != "num_steps"}}
            r = run_one(args.workdir, sampler, steps, args.num, args.seed)
            grid = grid_seconds(args.workdir, sampler, steps, args.chunk, args.repeats, args.seed)
            rows.append({**common, "impl": JAX, **_metrics(r), "chunk_s": [round(t, 4) for t in grid],
                         "eval": r})
            samples, times, first = diffusers_samples(net, sampler, folder_config, opts, n, args.num, args.chunk, shape,
                                               args.seed)
            d = score_samples(samples, args.seed, tmp)
            rows.append({**common, "impl": EAGER, **_metrics(d), "chunk_s": [round(t, 4) for t in times],
                         "first_chunk_s": round(first, 4), "eval": d})
            if args.torch_compile == "on":
                first, timed = compiled_seconds(compiled, sampler, folder_config, opts, n, args.chunk, shape,
                                                args.repeats, args.seed)
                rows.append({**common, "impl": COMPILED, "chunk_s": [round(t, 4) for t in timed],
                             "first_call_s": round(first, 2),
                             "note": "timed only: the same model compiled; quality as the eager row"})
            for row in rows[-3 if args.torch_compile == "on" else -2:]:
                q = f"FID {row['fid']:.2f} ({row['fid_ratio']:.2f}x), " if "fid" in row else ""
                print(f"{sampler} {n} {row['impl']}: {q}{_per_chunk(row):.2f} s per {args.chunk}", flush=True)
            with open(args.out + ".json", "w") as f:  # rewritten after every configuration
                json.dump(_report(args, run, rows, torch.__version__), f, indent=1)
    return _report(args, run, rows, torch.__version__)


def _report(args, run, rows, torch_version: str) -> dict:
    import diffusers
    import jax

    return {"note": args.note, "workdir": os.path.abspath(args.workdir), "checkpoint_step": run.step,
            "num": args.num, "chunk": args.chunk, "repeats": args.repeats, "seed": args.seed, "bar": args.bar,
            "versions": {"jax": jax.__version__, "torch": torch_version, "diffusers": diffusers.__version__},
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows}


def _per_chunk(row: dict) -> float:
    return statistics.median(row["chunk_s"])


def _quality_of(rows: list[dict], row: dict) -> dict | None:
    """The scored row of ``row``'s configuration: itself, or for the compiled row the eager one."""
    if "fid" in row:
        return row
    return next(r for r in rows if r["impl"] == EAGER and r["sampler"] == row["sampler"]
                and r["num_steps"] == row["num_steps"])


def fastest_good(rows: list[dict], bar: float) -> dict[str, dict | None]:
    """For each impl, the fastest row (median seconds per chunk) whose configuration scores at
    most ``bar`` times the floor; None where no configuration does."""
    out = {}
    for impl in dict.fromkeys(r["impl"] for r in rows):
        good = [r for r in rows if r["impl"] == impl and _quality_of(rows, r)["fid_ratio"] <= bar]
        out[impl] = min(good, key=_per_chunk) if good else None
    return out


def render_markdown(report: dict) -> str:
    rows, chunk = report["rows"], report["chunk"]
    first = next(r for r in rows if "fid" in r)
    lines = ["# Time to a good sample: jax_ddpm against diffusers, same weights", "",
             f"`python -m benchmarks.time_to_quality --workdir {report['workdir']} --num {report['num']}`"
             f" (checkpoint {report['checkpoint_step']}; jax {report['versions']['jax']}, torch "
             f"{report['versions']['torch']}, diffusers {report['versions']['diffusers']})", ""]
    if report["note"]:
        lines += [report["note"], ""]
    lines += [f"| sampler | network calls | framework | FID | FID / floor | confident (real) | classes | "
              f"s per {chunk} samples | vs diffusers eager |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = _quality_of(rows, r)
        eager = next(e for e in rows if e["impl"] == EAGER and e["sampler"] == r["sampler"]
                     and e["num_steps"] == r["num_steps"])
        mark = "" if q is r else " (eager's samples)"
        lines.append(f"| {r['sampler']} | {r['num_steps']} | {r['impl']} | {q['fid']:.2f}{mark} | "
                     f"{q['fid_ratio']:.2f}× | {q['confident']:.1%} ({q['real_confident']:.1%}) | "
                     f"{q['coverage']}/{q['num_classes']} | {_per_chunk(r):.2f} | "
                     f"{_per_chunk(eager) / _per_chunk(r):.2f}× |")
    best = fastest_good(rows, report["bar"])
    lines += ["", f"Time to a good sample (FID at most {report['bar']:g}× the floor, the fastest configuration "
              f"of each framework; seconds per {chunk} samples, compile apart):", ""]
    for impl, r in best.items():
        if r is None:
            lines.append(f"- {impl}: no configuration reaches {report['bar']:g}× the floor")
        else:
            q = _quality_of(rows, r)
            lines.append(f"- {impl}: {r['sampler']} {r['num_steps']} calls, {_per_chunk(r):.2f} s "
                         f"(FID {q['fid']:.2f} = {q['fid_ratio']:.2f}×)")
    if best.get(JAX) and best.get(EAGER):
        lines.append(f"- diffusers eager's time over jax_ddpm's: {_per_chunk(best[EAGER]) / _per_chunk(best[JAX]):.2f}× "
                     "(above 1: jax_ddpm is faster to a good sample)")
    if best.get(JAX) and best.get(COMPILED):
        lines.append(f"- diffusers + torch.compile's time over jax_ddpm's: "
                     f"{_per_chunk(best[COMPILED]) / _per_chunk(best[JAX]):.2f}×")
    lines += ["", f"Floor (real vs real, {first['num_samples']} images): {first['fid_floor']:.2f}. jax_ddpm's "
              f"seconds: the median of {report['repeats']} runs of the compiled {chunk}-image chain after the one "
              f"that compiled it; diffusers eager: the median over the full {chunk}-image chunks of its "
              f"{report['num']} samples after the first (warm-up); + torch.compile: the median of {report['repeats']} chains after the first "
              "(compiling) one. The two frameworks draw different noise (x_T and the ddpm steps' noise), so their "
              "FIDs differ by the metric's seed-to-seed spread, which near the floor is a sizeable share of the "
              "FID (benchmarks/README.md, 'Time to a good sample')."]
    return "\n".join(lines) + "\n"


def render_png(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    rows = report["rows"]
    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.add_subplot()
    for impl, marker in ((JAX, "o"), (EAGER, "s"), (COMPILED, "^")):
        mine = [r for r in rows if r["impl"] == impl]
        if not mine:
            continue
        ax.scatter([_per_chunk(r) for r in mine], [_quality_of(rows, r)["fid_ratio"] for r in mine], marker=marker,
                   label=impl)
        for r in mine:
            ax.annotate(f"{r['sampler']} {r['num_steps']}", (_per_chunk(r), _quality_of(rows, r)["fid_ratio"]),
                        textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.axhline(report["bar"], color="gray", linestyle="--", linewidth=1, label=f"{report['bar']:g}× floor")
    ax.set_xscale("log")
    ax.set_xlabel(f"seconds per {report['chunk']} samples (compile apart, log)")
    ax.set_ylabel("FID / real-vs-real floor")
    ax.set_title("time to a good sample: same UNet2DModel weights")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a trained --arch unet2d work folder")
    p.add_argument("--num", type=_positive, default=1000, help="samples scored per configuration (default 1000)")
    p.add_argument("--chunk", type=_positive, default=64, help="samples per timed chain (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=_parse_grid, default=DEFAULT_GRID,
                   help="sampler:steps,... (steps 'all' = T), default: " +
                        ",".join(f"{n}:{s or 'all'}" for n, s in DEFAULT_GRID))
    p.add_argument("--repeats", type=_positive, default=3, help="timed chains of jax_ddpm and torch.compile")
    p.add_argument("--torch-compile", choices=("on", "off"), default="off",
                   help="also time diffusers under torch.compile (default off: minutes of compiling per chain)")
    p.add_argument("--bar", type=float, default=2.0, help="a good sample: FID at most BAR times the floor")
    p.add_argument("--xla-flags", default="auto", help="as jax-ddpm sample's --xla-flags (default auto)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "time-to-quality-unet2d"),
                   help="OUT.json, OUT.md, OUT.png")
    p.add_argument("--note", default="", help="a line under the table's title (machine, load)")
    args = p.parse_args(argv)
    from jax_ddpm import xla_flags
    from jax_ddpm.app.checks import ConfigError
    from jax_ddpm.checkpoint import CheckpointError

    try:

        xla_flags.setup(args.xla_flags)
        from .diffusers_runner import missing

        why = missing()
        if why:
            raise UsageError(f"time_to_quality needs diffusers: {why}")
        if args.num < 2 * args.chunk:
            raise UsageError(f"--num {args.num}: must be at least twice --chunk {args.chunk} (diffusers' first "
                             "chunk is the warm-up, timed apart)")
        if not os.path.isdir(args.workdir):
            raise UsageError(f"--workdir {args.workdir}: no such folder")
        report = measure(args)
    except (UsageError, ConfigError, CheckpointError, xla_flags.XlaFlagsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(args.out + ".md", "w") as f:
        f.write(render_markdown(report))
    render_png(report, args.out + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
