"""Data-parallel scaling of the jitted train step: images/s on 1, 2 and 4 devices, fp32 and bf16.

    python -m benchmarks.scaling                       # CPU: forced host devices 1, 2, 4
    python -m benchmarks.scaling --devices 1,2,4,8 --batch 64 --features 32,64,128,256

Each configuration runs in its own subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (the flag only works before JAX
starts), builds the mesh of ``jax_ddpm.parallel.make_mesh`` over those N devices and times
``make_sharded_train_step`` on one fixed global batch: compile separately, then ``--steps``
warm steps, each synced with ``block_until_ready``; images/s = global batch / median step
time. On a real multi-GPU machine pass ``--no-force`` to use the devices that exist (the
N-device rows then use the first N devices).

Forced host devices share the same CPU cores: on a CPU this measures partitioning overhead
(all-reduces, smaller per-device convolutions) against how much better N per-device
threads keep the cores busy than one program does, not added hardware. Results go to
``benchmarks/results/scaling-<UTC time>.{json,md}``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


# ----------------------------------------------------------------------------- child: one configuration
def _random_train_state(model, image_shape, tx, schedule, seed: int = 0):
    """TrainState with N(0, 0.05) parameters drawn by NumPy (timing does not depend on values;
    ``model.init`` would cost ~30 CPU-seconds of compilation per subprocess)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_ddpm.training import train_state_from_variables

    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1,) + image_shape), jnp.zeros((1,), jnp.int32),
                                                 train=True), jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32),
                                    shapes["params"])
    batch_stats = jax.tree_util.tree_map_with_path(
        lambda p, s: np.ones(s.shape, s.dtype) if p[-1].key == "var" else np.zeros(s.shape, s.dtype),
        shapes["batch_stats"])
    return train_state_from_variables({"params": params, "batch_stats": batch_stats}, model.apply, tx, schedule)


def run_child(num_devices: int, dtype: str, batch: int, image_size: int, features: tuple[int, ...],
              steps: int) -> dict:
    """Times the sharded train step on the first ``num_devices`` devices. Returns one row."""
    import jax
    import numpy as np

    from jax_ddpm import make_optimizer, make_schedule, parallel
    from jax_ddpm.models.registry import get_arch

    devices = jax.devices()[:num_devices]
    if len(devices) < num_devices:
        raise SystemExit(f"asked for {num_devices} devices, JAX sees {len(jax.devices())}")
    mesh = parallel.make_mesh(devices)
    sizes = parallel.batch_sizes(batch, mesh)
    image_shape = (image_size, image_size, 3)
    arch = get_arch("chapter")
    model = arch.build(arch.config_from_fields(3, features=tuple(features), time_emb_dim=32),
                       dtype=parallel.compute_dtype(dtype))
    state = parallel.shard_state(_random_train_state(model, image_shape, make_optimizer(1e-4), make_schedule(1000)),
                                 mesh)
    x = np.random.default_rng(1).uniform(-1, 1, (batch,) + image_shape).astype(np.float32)
    xb, key = parallel.make_global_batch(x, mesh), parallel.shard_state(jax.random.PRNGKey(0), mesh)
    step = parallel.make_sharded_train_step(mesh)

    t0 = time.perf_counter()
    compiled = step.jitted.lower(state, xb, key).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, xb, key)  # first run (allocation, warm-up)
    jax.block_until_ready(metrics)
    times = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, xb, key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    cores_used = (time.process_time() - cpu0) / (time.perf_counter() - wall0)  # process CPU time / wall time
    median = float(np.median(times))
    return {"devices": num_devices, "dtype": dtype, **sizes, "image_size": image_size, "features": list(features),
            "compile_s": compile_s, "step_s_median": median, "step_s_min": float(np.min(times)),
            "images_per_s": batch / median, "cores_used": cores_used, "steps": steps, "loss": float(metrics["loss"]),
            "platform": devices[0].platform, "device_kind": devices[0].device_kind}


# ----------------------------------------------------------------------------- parent
def _configs(devices: list[int], bf16_devices: list[int]) -> list[tuple[int, str]]:
    return [(n, "float32") for n in devices] + [(n, "bfloat16") for n in bf16_devices]


def _spawn(n: int, dtype: str, args) -> dict:
    env = dict(os.environ)
    if args.force:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
        env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--child", str(n), "--dtype", dtype, "--batch", str(args.batch),
           "--image-size", str(args.image_size), "--features", args.features, "--steps", str(args.steps)]
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode or not lines:
        raise SystemExit(f"scaling: child for {n} devices {dtype} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(lines[-1][4:])
    row["load_avg_1min"] = [load_before, os.getloadavg()[0]]
    return row


def to_markdown(meta: dict, rows: list[dict]) -> str:
    """The results table, speed-ups relative to the 1-device row of the same dtype."""
    base = {r["dtype"]: r["images_per_s"] for r in rows if r["devices"] == 1}
    fp32 = {r["devices"]: r["images_per_s"] for r in rows if r["dtype"] == "float32"}
    out = [f"# Data-parallel scaling of the train step ({meta['date']})", "",
           f"Model UNet features {tuple(meta['features'])}, {meta['image_size']}x{meta['image_size']}x3 images, "
           f"global batch {meta['batch']}, {meta['steps']} timed steps per run (median), compile timed apart; "
           f"each configuration run {meta.get('repeat', 1)} time(s), round robin, fastest run shown.",
           f"Machine: {meta['machine']}; jax {meta['jax']}; devices: {meta['device_note']}.", "",
           "| devices | dtype | global batch | per-device batch | images/s | vs 1 device | vs float32 | step ms (median) "
           "| images/s (best step) | cores busy | images per CPU-second | compile s | load avg before/after |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        speed = r["images_per_s"] / base[r["dtype"]] if r["dtype"] in base else float("nan")
        vs32 = r["images_per_s"] / fp32[r["devices"]] if r["devices"] in fp32 else float("nan")
        out.append(f"| {r['devices']} | {r['dtype']} | {r['global_batch']} | {r['per_device_batch']} | "
                   f"{r['images_per_s']:.1f} | {speed:.2f}x | {vs32:.2f}x | {1e3 * r['step_s_median']:.0f} | "
                   f"{r['global_batch'] / r['step_s_min']:.1f} | {r['cores_used']:.2f} | {r['images_per_s'] / r['cores_used']:.1f} | "
                   f"{r['compile_s']:.1f} | "
                   f"{r['load_avg_1min'][0]:.1f} / {r['load_avg_1min'][1]:.1f} |")
    out += ["", "images/s = global batch / median step time; the best-step column (global batch / fastest "
            "step) is the least disturbed by other load; images per CPU-second (images/s / cores busy) is the "
            "throughput per unit of CPU actually received, less sensitive to other load: partitioning overhead "
            "would lower it.", "", meta["note"], ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="1,2,4", help="float32 rows: device counts (default 1,2,4)")
    p.add_argument("--bf16-devices", default="1,4", help="bfloat16 rows: device counts (default 1,4; '' for none)")
    p.add_argument("--batch", type=int, default=32, help="global batch (divisible by every device count)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--features", default="16,32,64,128")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every configuration this many times, round robin; the table keeps each one's fastest run")
    p.add_argument("--no-force", dest="force", action="store_false",
                   help="use the real devices instead of forced CPU host devices")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    features = tuple(int(f) for f in args.features.split(","))
    if args.child:
        row = run_child(args.child, args.dtype, args.batch, args.image_size, features, args.steps)
        print("ROW " + json.dumps(row), flush=True)
        return 0

    def counts(s: str) -> list[int]:
        return [int(v) for v in s.split(",") if v.strip()]

    configs = _configs(counts(args.devices), counts(args.bf16_devices))
    bad = [n for n, _ in configs if args.batch % n]
    if bad:
        print(f"scaling: --batch {args.batch} is not divisible by device count(s) {sorted(set(bad))}", file=sys.stderr)
        return 2
    runs = []
    for round_ in range(args.repeat):
        for n, dtype in configs:
            r = dict(_spawn(n, dtype, args), round=round_)
            runs.append(r)
            print(f"{n} device(s) {dtype}: {r['images_per_s']:.1f} images/s (per-device batch {r['per_device_batch']}, "
                  f"{r['cores_used']:.2f} cores busy, compile {r['compile_s']:.1f} s)", flush=True)
    rows = [max((r for r in runs if (r["devices"], r["dtype"]) == c), key=lambda r: r["images_per_s"]) for c in configs]
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    meta = {"date": date, "batch": args.batch, "image_size": args.image_size, "features": list(features),
            "steps": args.steps, "repeat": args.repeat, "jax": importlib.metadata.version("jax"), "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "device_note": (f"forced CPU host devices (XLA_FLAGS=--xla_force_host_platform_device_count=N), "
                            f"all sharing the same {os.cpu_count()} cores") if args.force else rows[0]["device_kind"],
            "note": ("Forced host devices share the same CPU cores, so a speed-up here is not more hardware: "
                     "XLA:CPU runs each device's program on its own thread, and N small programs can keep the cores "
                     "busier than one (the 'cores busy' column: process CPU time / wall time over the timed steps). "
                     "The CPU was shared with other jobs while this ran (load averages in the table), so absolute "
                     "numbers are noisy; compare rows of one run.") if args.force else ""}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"scaling-{date}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "all_runs": runs}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(meta, rows))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
