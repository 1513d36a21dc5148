"""Steps to quality: each sampler at several step counts on one trained work folder, scored by `jax-ddpm eval`.

    python -m benchmarks.steps_to_quality --workdir runs/digits [--num 1000] [--out docs/steps-to-quality]

Every configuration is one `jax-ddpm eval` process (same seed: the same x_T; the same
classifier from the per-user cache), so its wall time holds what a user waits for: start-up,
loading, compiling the chain and sampling ``--num`` images (``wall_s.sampling`` in eval.json
is the sampling part alone, compile included). Then, in this process, each configuration
samples a ``--grid-num`` (64) image grid as ``jax-ddpm sample`` does, once to compile and
``--repeats`` (3) times timed: the median is the grid's wall time, compile excluded, and the
speed-up column is taken from it. Writes OUT.json (every eval.json and grid time, as
measured), OUT.md (the table) and OUT.png (FID ratio against the grid's wall time).
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

# (sampler, network calls); None = all T steps
DEFAULT_GRID = (("ddpm", None), ("ddpm", 50), ("ddpm", 20), ("ddim", 50), ("ddim", 25), ("ddim", 10),
                ("dpmpp_2m", 20), ("dpmpp_2m", 10))


def _parse_grid(text: str) -> tuple[tuple[str, int | None], ...]:
    out = []
    for item in text.split(","):
        name, _, steps = item.strip().partition(":")
        out.append((name, None if steps in ("", "all") else int(steps)))
    return tuple(out)


def run_one(workdir: str, sampler: str, steps: int | None, num: int, seed: int) -> dict:
    """One `jax-ddpm eval` in its own process; its eval.json plus the process's wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "eval.json")
        cmd = [sys.executable, "-m", "jax_ddpm.cli", "eval", "--workdir", workdir, "--sampler", sampler,
               "--num", str(num), "--seed", str(seed), "--json", out]
        if steps is not None:
            cmd += ["--num-steps", str(steps)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[2:])} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        result = json.load(open(out))
    result["process_wall_s"] = round(wall, 2)
    result["requested"] = {"sampler": sampler, "num_steps": steps}
    return result


def compiled_chain(workdir: str, sampler: str, steps: int | None, num: int = 64, seed: int = 0, x_T=None):
    """The program ``jax-ddpm sample --num num`` runs, as a function of nothing: the work
    folder's EMA weights, its clipping and variance, one chunk; with BatchNorm batch statistics
    one batched chain, else the per-image one; x_T drawn as ``sample`` draws it unless given.

    It takes draw_samples' one-chunk path (the same cached programs, ``_cached_sample_fn`` and
    ``_per_image``, the same x_T and noise keys) rather than calling draw_samples, whose memory
    estimate traces the model on every call (~1-2 s, more than a 20-step chain)."""
    import jax

    from jax_ddpm.app import sample as app_sample
    from jax_ddpm.app.config import SampleConfig
    from jax_ddpm.app.factories import image_shape
    from jax_ddpm.app.workdir import load_run
    from jax_ddpm.models.registry import get_arch

    run = load_run(workdir, None)
    config = SampleConfig(workdir=workdir, out="unused.png", num=num, seed=seed, sampler=sampler, num_steps=steps)
    prediction = run.config.diffusion.prediction
    options = app_sample.sampler_options(config, run.sampling, run.config.diffusion.timesteps, prediction)
    sample_fn = app_sample._cached_sample_fn(run.config.model, sampler, config.bn_stats,
                                             tuple(sorted(dict(options, prediction=prediction).items())))
    key = jax.random.key(seed)
    if x_T is None:
        x_T = jax.random.normal(jax.random.fold_in(key, 0), (num,) + tuple(image_shape(run.config)))
    variables, schedule = run.state.ema_variables, run.state.schedule
    if get_arch(run.config.model.arch).has_batch_stats and run.state.batch_stats is not None:
        def chain():
            return sample_fn(variables, schedule, x_T, jax.random.fold_in(key, 1))
    else:
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, 1), i))(jax.numpy.arange(len(x_T)))

        def chain():
            return app_sample._per_image(sample_fn)(variables, schedule, x_T, keys)
    return chain


def grid_seconds(workdir: str, sampler: str, steps: int | None, num: int = 64, repeats: int = 3,
                 seed: int = 0) -> list[float]:
    """Wall seconds of ``repeats`` runs of :func:`compiled_chain` on a ``num``-image grid, after
    one untimed run that compiles it. Loading, the memory estimate and the PNG are not timed."""
    import jax

    chain = compiled_chain(workdir, sampler, steps, num, seed)
    jax.block_until_ready(chain())  # compiles
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(chain())
        times.append(time.perf_counter() - t0)
    return times


def _grid_s(r: dict) -> float:
    return statistics.median(r["grid_s"])


def _calls(r: dict) -> int:
    return r["requested"]["num_steps"] or r["sampling"]["timesteps"]


def render_markdown(results: list[dict], header: str) -> str:
    base = next((r for r in results if r["requested"] == {"sampler": "ddpm", "num_steps": None}), results[0])
    lines = [header, "",
             f"| sampler | network calls | FID | FID / floor | confident (real) | classes | largest class | "
             f"{results[0]['num_samples']} images s | {results[0]['grid_num']}-image grid s | speed-up vs ddpm all T |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['requested']['sampler']} | {_calls(r)} | {r['fid']:.1f} | {r['fid_ratio']:.1f}× | "
                     f"{r['confident']:.1%} ({r['real_confident']:.1%}) | {r['coverage']}/{r['num_classes']} | "
                     f"{r['largest_class_share']:.1%} | {r['wall_s']['sampling']:.1f} | {_grid_s(r):.2f} | "
                     f"{_grid_s(base) / _grid_s(r):.1f}× |")
    floor = results[0]
    lines += ["", f"Floor (real vs real, {floor['num_samples']} images, {floor['fid_floor_draws']} draws): "
              f"{floor['fid_floor']:.2f} ± {floor['fid_floor_std']:.2f}. The {floor['num_samples']}-image seconds "
              "include compiling the chain (eval.json `wall_s.sampling`); the grid seconds are the median of "
              f"{len(floor['grid_s'])} draws of a {floor['grid_num']}-image grid after one that compiled it, and "
              "the speed-up is theirs."]
    return "\n".join(lines) + "\n"


def render_png(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.add_subplot()
    for name in dict.fromkeys(r["requested"]["sampler"] for r in results):
        rows = sorted((r for r in results if r["requested"]["sampler"] == name), key=_calls)
        ax.plot([_grid_s(r) for r in rows], [r["fid_ratio"] for r in rows], "o-", label=name)
        for r in rows:
            ax.annotate(str(_calls(r)), (_grid_s(r), r["fid_ratio"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"wall time of a {results[0]['grid_num']}-image grid (compiled), s (log)")
    ax.set_ylabel("FID / real-vs-real floor")
    ax.set_title("steps to quality (labels: network calls)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=_parse_grid, default=DEFAULT_GRID,
                   help="sampler:steps,... (steps 'all' = T), default: " +
                        ",".join(f"{n}:{s or 'all'}" for n, s in DEFAULT_GRID))
    p.add_argument("--out", default=os.path.join("docs", "steps-to-quality"), help="OUT.json, OUT.md, OUT.png")
    p.add_argument("--grid-num", type=int, default=64, help="images in the timed grid (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed draws of the grid per configuration (default 3)")
    p.add_argument("--note", default="", help="a line under the table's title (machine, load, how the run was made)")
    args = p.parse_args(argv)
    results = []
    for sampler, steps in args.grid:
        r = run_one(args.workdir, sampler, steps, args.num, args.seed)
        r["grid_num"] = args.grid_num
        r["grid_s"] = [round(t, 4) for t in grid_seconds(args.workdir, sampler, steps, args.grid_num, args.repeats,
                                                         args.seed)]
        print(f"{sampler} {steps or 'all'}: FID {r['fid']:.2f} ({r['fid_ratio']:.1f}x floor), "
              f"sampling {r['wall_s']['sampling']:.1f} s, {args.grid_num}-image grid {_grid_s(r):.2f} s", flush=True)
        results.append(r)
        with open(args.out + ".json", "w") as f:  # rewritten after every configuration
            json.dump({"note": args.note, "results": results}, f, indent=1)
    header = f"# Steps to quality\n\n`python -m benchmarks.steps_to_quality --workdir {args.workdir} --num {args.num}`"
    header += f"\n\n{args.note}" if args.note else ""
    with open(args.out + ".md", "w") as f:
        f.write(render_markdown(results, header))
    render_png(results, args.out + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
