"""Results to disk: JSON (rewritten atomically while the run goes), Markdown table, PNG chart."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


def write_json(path: Path, results: dict) -> None:
    """Writes ``results`` to ``path`` through a temporary file and a rename (never half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _fmt_bytes(n) -> str:
    if n is None:
        return ""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _memory_cell(row: dict) -> str:
    m = row.get("memory") or {}
    if "error" in m:
        return "n/a"
    if "temp_bytes" in m:
        return f"temp {_fmt_bytes(m['temp_bytes'])}, args {_fmt_bytes(m.get('argument_bytes'))}"
    if "transient_peak_bytes" in m:
        return f"+{_fmt_bytes(m['transient_peak_bytes'])} (CUDA peak)"
    if "rss_growth_bytes" in m:
        return f"+{_fmt_bytes(m['rss_growth_bytes'])} (RSS)"
    return ""


COMPILED_IMPLS = ("torch.compile", "diffusers+compile")


def refs_of(row: dict) -> tuple[str, str]:
    """(eager, compiled) reference impl names of a row: diffusers for the unet2d sizes, torch_ref else."""
    if row.get("size", "").startswith("unet2d") or "diffusers" in row.get("vs", {}) or \
            row.get("impl", "").startswith("diffusers"):
        return "diffusers", "diffusers+compile"
    return "torch", "torch.compile"


def _ratio_cell(row: dict, ref: str) -> str:
    v = row.get("vs", {}).get(ref)
    if not v:
        return ""
    p = v["speed_ratio_paired"]
    return f"{v['speed_ratio_median']:.2f}x [{p['q25']:.2f}-{p['q75']:.2f}]"


def _cpu_ratio_cell(row: dict) -> str:
    v = row.get("vs", {}).get(refs_of(row)[0], {})
    return f"{v['cpu_ratio_median']:.2f}x" if "cpu_ratio_median" in v else ""


def _cpu_cell(row: dict) -> str:
    if "cpu_s_median" not in row:
        return ""
    return f"{row['cpu_s_median']:.3g} ({row['cores_busy']:.2f})"


def _compile_cell(row: dict) -> str:
    if "compile_s" in row:
        return f"{row['lower_s'] + row['compile_s']:.1f} (+{row.get('first_call_s', 0):.1f})"
    if row["impl"] in COMPILED_IMPLS and "first_call_s" in row:
        return f"{row['first_call_s']:.1f} (1st call)"
    if "first_call_s" in row:
        return f"- ({row['first_call_s']:.1f})"
    return ""


def _peak_cell(row: dict) -> str:
    pf = row.get("peak_fraction") or {}
    return " / ".join(f"{v * 100:.0f}%" for v in pf.values())


def markdown(results: dict) -> str:
    """The run as Markdown: header (date, machine, versions), peaks, one table per task, errors."""
    env, cfg = results["environment"], results["config"]
    refs = sorted({s.get("reference", "torch_ref") for s in results.get("sizes", {}).values()} or {"torch_ref"},
                  key=("torch_ref", "diffusers").index)
    lines = [f"# jax_ddpm vs {' and '.join(refs)} benchmark, {env['device']}, {env['date_utc']}", ""]
    machine = env.get("gpu") or env.get("cpu")
    lines += [f"- machine: {machine}, {env.get('cpu_count')} CPU cores; {env.get('platform')}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
              + f", python {env['python']}; git {env.get('git_commit')}",
              "- env: " + ", ".join(f"{k}={v}" for k, v in env["env"].items() if v is not None),
              f"- dtype {cfg['dtype']}; quick={cfg['quick']}; jax conv_impl {', '.join(cfg['jax_conv_impls'])}; "
              f"torch.compile {'on' if cfg['torch_compile'] else 'off'}; wall {env.get('wall_s', float('nan')):.0f} s",
              f"- load average (1 min) at start {_load(env.get('loadavg_start'))}, "
              f"at end {_load(env.get('loadavg_end'))}",
              ""]
    lines += ["## Peaks (the roofline's denominator: best of the measurements at the start and end of this run)",
              "",
              "| kind | n | best GFLOP/s | jax best / median | torch best / median |", "|---|---|---|---|---|"]
    for k, p in results.get("peaks", {}).items():
        if "gflops" not in p:
            lines.append(f"| {k} | | error: {p.get('error')} | | |")
            continue
        cells = []
        for fw in ("jax", "torch"):
            v = p["by_framework"].get(fw, {})
            cells.append(f"{v['best_gflops']:.0f} / {v['median_gflops']:.0f}" if "best_gflops" in v
                         else f"error: {v.get('error', 'n/a')}")
        lines.append(f"| {k} | {p['n']} | {p['gflops']:.0f} | {cells[0]} | {cells[1]} |")
    lines.append("")
    lines += ["## Sizes", "", "| size | image | features | T | params | train GFLOP/step (counted) | "
              "forward GFLOP/image |", "|---|---|---|---|---|---|---|"]
    for name, s in results.get("sizes", {}).items():
        fl = s["counted_flops"]
        train_gf = f"{fl['train_step'] / 1e9:.2f} (batch {s['train_batch']})" if fl.get("train_step") else "n/a"
        fwd_gf = f"{fl['forward_per_image'] / 1e9:.3f}" if fl.get("forward_per_image") else "n/a"
        lines.append(f"| {name} | {s['image_size']}x{s['image_size']}x{s['channels']} | "
                     f"{','.join(map(str, s['features']))} | {s['timesteps']} | {s['state']['num_params']:,} | "
                     f"{train_gf} | {fwd_gf} |")
    lines.append("")
    if any(s.get("reference") == "diffusers" for s in results.get("sizes", {}).values()):
        lines += ["References: torch_ref's U-Net (`torch`, `torch.compile`) for the chapter's sizes; diffusers' "
                  "`UNet2DModel` with the same eps-MSE loss and torch Adam (`diffusers`, `diffusers+compile`) for "
                  "the unet2d sizes, on the same weights (read back with `jax_ddpm.load_diffusers`). "
                  "'vs eager' and 'vs compiled' compare with the reference of the row's size.", ""]
    header = ("| size | batch | impl | median ms | IQR | best ms | images/s | vs eager | vs compiled | "
              "vs eager, CPU-s | compile s (1st call) | GFLOP/s | % of peak | CPU-s/call (cores busy) | memory |")
    for task, title in (("train", "Train step (images/s = batch / median step time)"),
                        ("sample", "Sampling: a whole chain (images/s = batch / median chain time)")):
        rows = [r for r in results.get("rows", []) if r["task"] == task]
        if not rows:
            continue
        lines += [f"## {title}", "", header, "|" + "---|" * 15]
        for r in rows:
            size = r["size"] + _chain_label(r)
            if r.get("skipped"):
                lines.append(f"| {size} | {r['batch']} | {r['impl']} | skipped: {r['skipped']} |" + " |" * 11)
                continue
            if r.get("error"):
                lines.append(f"| {size} | {r['batch']} | {r['impl']} | error: {r['error']} |" + " |" * 11)
                continue
            t = r["timing"]
            eager, compiled = refs_of(r)
            lines.append(f"| {size} | {r['batch']} | {r['impl']} | {t['median_s'] * 1e3:.1f} | "
                         f"{t['iqr_rel'] * 100:.0f}% | {t['min_s'] * 1e3:.1f} | {r['images_per_s']:.1f} | "
                         f"{_ratio_cell(r, eager)} | {_ratio_cell(r, compiled)} | {_cpu_ratio_cell(r)} | "
                         f"{_compile_cell(r)} | {r.get('gflops_per_s', float('nan')):.1f} | {_peak_cell(r)} | "
                         f"{_cpu_cell(r)} | {_memory_cell(r)} |")
        lines.append("")
    lines += _time_to_samples(results)
    lines += ["Ratios are speed ratios (images/s of the row / images/s of the reference): median time "
              "of the reference over median time of the row, [quartiles of the per-round ratios]; "
              "'CPU-s' compares the process CPU seconds (all threads) per call instead, the work each "
              "call cost, which other jobs on a shared CPU disturb less than wall time. "
              "Peak fractions use the counted FLOPs (torch's FlopCounterMode: convolutions and "
              "matmuls, forward and backward) over the best matmul rate of the same run"
              + (" (fp32 / tf32)." if results['environment']['device'] == 'cuda' else " (fp32)."),
              "JAX memory: XLA's buffer plan (temp = activations and scratch; args = state + batch). "
              "torch memory on CPU: a fresh process's peak-RSS growth over two train steps; on CUDA: "
              "peak allocated during one call minus allocated before it.", ""]
    notes = sorted({f"{r['impl']}: {n}" for r in results.get("rows", []) for n in r.get("notes", [])})
    full = sorted({f"{r['impl']} {r['task']} {r['size']}: {r['error_full_compile']}"
                   for r in results.get("rows", []) if r.get("error_full_compile")})
    skipped = [f"skipped: {n}" for n in results.get("skipped", [])]
    flops_notes = [f"{name}: FLOPs from {s['counted_flops']['source']}" for name, s in results.get("sizes", {}).items()
                   if s.get("counted_flops", {}).get("source")]
    flops_notes += [f"{name}: FLOPs include the attention products (q k^T, p v) FlopCounterMode misses on CPU, "
                    f"{s['counted_flops']['attention_core_forward_per_image'] / 1e6:.1f} MFLOP per image forward"
                    for name, s in results.get("sizes", {}).items()
                    if s.get("counted_flops", {}).get("attention_added")]
    extra = notes + full + flops_notes + results.get("errors", []) + skipped
    if extra:
        lines += ["## Notes and errors", ""] + [f"- {n}" for n in extra] + [""]
    return "\n".join(lines)


def _chain_label(row: dict) -> str:
    """', T=100' for the chapter's chains; ', ddim 50 steps' for the unet2d chains."""
    if row.get("task") != "sample" or "timesteps" not in row:
        return ""
    if row.get("size", "").startswith("unet2d") and "sampler" in row:
        return f", {row['sampler']} {row['timesteps']} steps"
    return f", T={row['timesteps']}"


def _time_to_samples(results: dict) -> list[str]:
    """Wall seconds per 64 samples of every sampling row (64 / images per second), and the
    quality slot: the seam where "time to a good sample" joins a quality metric (not measured
    here: the weights are random; see benchmarks/README.md)."""
    rows = [r for r in results.get("rows", []) if r["task"] == "sample" and not r.get("error")
            and not r.get("skipped") and r.get("images_per_s")]
    if not rows:
        return []
    out = ["## Time to 64 samples (seconds of wall time, from the median chain; compile time apart)", "",
           "| size, chain | impl | batch | s per 64 samples | quality |", "|---|---|---|---|---|"]
    for r in rows:
        q = r.get("quality") or {}
        qcell = ", ".join(f"{k} {v:.3g}" for k, v in q.items() if isinstance(v, (int, float))) or \
            q.get("status", "not measured (random weights)")
        out.append(f"| {r['size']}{_chain_label(r)} | {r['impl']} | {r['batch']} | {64 / r['images_per_s']:.2f} | "
                   f"{qcell} |")
    return out + [""]


def _load(v) -> str:
    return "n/a" if not v else f"{v[0]:.1f}"


def chart(results: dict, path: Path) -> None:
    """Bar chart of images/s per implementation, one panel per task, log scale, PNG (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("train", "sample") if any(r["task"] == t for r in results.get("rows", []))]
    if not tasks:
        return
    impls = []
    for r in results["rows"]:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    def key_of(r):
        return (r["size"], r["batch"], r.get("timesteps"), r.get("sampler"))

    group_lists = {task: list(dict.fromkeys(key_of(r) for r in results["rows"] if r["task"] == task))
                   for task in tasks}
    widths = [max(6.5, 0.9 * len(group_lists[t]) * max(1, len(impls)) / 3) for t in tasks]
    fig, axes = plt.subplots(1, len(tasks), figsize=(sum(widths), 4.6), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes[0], tasks):
        groups = group_lists[task]
        width = 0.8 / max(len(impls), 1)
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for g, key in enumerate(groups):
                for r in results["rows"]:
                    if r["task"] == task and key_of(r) == key and r["impl"] == impl \
                            and not r.get("error") and not r.get("skipped"):
                        xs.append(g + (j - (len(impls) - 1) / 2) * width)
                        ys.append(r["images_per_s"])
            ax.bar(xs, ys, width, label=impl, color=colors[j % len(colors)])
            for x, y in zip(xs, ys):
                ax.text(x, y, f"{y:.3g}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{s}\nbatch {b}" + (f"\n{m} {t}" if m and s.startswith("unet2d") else
                                                  f", T={t}" if t else "") for s, b, t, m in groups], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("images / s (log)")
        ax.set_title({"train": "train step", "sample": "sampling (whole chain)"}[task])
        ax.legend(fontsize=8)
    env = results["environment"]
    refs = " and ".join(sorted({s.get("reference", "torch_ref") for s in results.get("sizes", {}).values()}
                               or {"torch_ref"}, key=("torch_ref", "diffusers").index))
    fig.suptitle(f"jax_ddpm vs {refs}, {env['device']} ({env.get('gpu') or env.get('cpu')}), "
                 f"{results['config']['dtype']}, {env['date_utc'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
