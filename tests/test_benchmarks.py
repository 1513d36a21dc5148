"""Smoke tests of the benchmark harness (benchmarks/): FLOP counters, timing, rows, outputs, CLI errors.

No U-Net is compiled here (that alone takes 15-35 s on 2 cores); the full path runs with
``python -m benchmarks --quick``. Each test can fail: the FLOP counts are checked against
2*m*n*k, the speed ratio against runners of known relative cost, the files against the
schema the README documents. The unet2d rows (jax_ddpm vs diffusers) are in
tests/test_benchmarks_unet2d.py.
"""
import json
import time

import pytest

from benchmarks import __main__ as bench_cli
from benchmarks import cases, measure, output, suite


def test_xla_cost_counts_matmul_flops():
    import jax
    import jax.numpy as jnp

    m, k, n = 48, 64, 80
    compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert measure.xla_cost(compiled)["flops"] == 2 * m * n * k
    mem = measure.xla_memory(compiled)
    assert mem["argument_bytes"] == 4 * (m * k + k * n)
    assert mem["output_bytes"] == 4 * m * n


def test_torch_counter_counts_matmul_flops():
    import torch

    m, k, n = 48, 64, 80
    a, b = torch.ones(m, k), torch.ones(k, n)
    assert measure.torch_flops(lambda: a @ b) == 2 * m * n * k


def test_summarize_and_paired_ratio():
    s = measure.summarize([3.0, 1.0, 2.0, 4.0])
    assert (s["n"], s["median_s"], s["min_s"], s["max_s"]) == (4, 2.5, 1.0, 4.0)
    assert s["iqr_rel"] == pytest.approx((3.25 - 1.75) / 2.5)
    r = measure.paired_ratio([2.0, 4.0, 6.0], [1.0, 1.0, 2.0])
    assert r["median"] == 3.0
    with pytest.raises(ValueError):
        measure.summarize([])


def test_time_interleaved_rotates_order():
    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    cpu = {}
    times = measure.time_interleaved(runners, reps=3, cpu_times=cpu)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {k: len(v) for k, v in cpu.items()} == {"a": 3, "b": 3, "c": 3}


def _sleeper(seconds: float):
    return lambda: time.sleep(seconds)  # sleeps, not busy loops: robust to a CPU shared with other jobs


def _fake_results(tmp_path):
    size = cases.ModelSize("fake", 8, 1, (4, 4, 4, 4), 10, "test")
    runners = [cases.Runner("jax", _sleeper(0.03), {"lower_s": 0.1, "compile_s": 0.2, "first_call_s": 0.01,
                                                      "memory": {"temp_bytes": 1024, "argument_bytes": 2048}}),
               cases.Runner("torch", _sleeper(0.09), {"first_call_s": 0.02, "notes": ["a note"]}),
               cases.Runner("torch.compile", error="RuntimeError: no compiler")]
    peaks = {"float32": {"n": 64, "gflops": 100.0, "by_framework": {"jax": {"best_gflops": 100.0,
                                                                             "median_gflops": 90.0}}}}
    rows = suite._group_rows("train", size, 16, "float32", runners, reps=5, warmup=1, flops_per_call=2e8,
                             peaks=peaks, extra={}, log=lambda s: None)
    return {"config": {"dtype": "float32", "quick": True, "jax_conv_impls": ["auto"], "torch_compile": True},
            "environment": {"device": "cpu", "date_utc": "2026-01-01T00:00:00Z", "cpu": "test cpu", "cpu_count": 2,
                            "platform": "test", "python": "3", "versions": {"jax": "0"}, "env": {},
                            "git_commit": None, "loadavg_start": [1.0], "loadavg_end": [1.0], "wall_s": 1.0},
            "peaks": peaks, "sizes": {}, "rows": rows, "errors": ["train fake b=16 torch.compile: no compiler"]}


def test_rows_ratios_and_outputs(tmp_path):
    results = _fake_results(tmp_path)
    jax_row, torch_row, compiled_row = results["rows"]
    # jax's call takes a third of torch's: speed ratio 3 (wake-up latency pulls it down a little)
    ratio = jax_row["vs"]["torch"]["speed_ratio_median"]
    assert 2.2 < ratio < 3.3, ratio
    assert jax_row["images_per_s"] == pytest.approx(16 / jax_row["timing"]["median_s"])
    assert jax_row["gflops_per_s"] == pytest.approx(2e8 / jax_row["timing"]["median_s"] / 1e9)
    assert jax_row["peak_fraction"]["float32"] == pytest.approx(jax_row["gflops_per_s"] / 100.0)
    assert "torch.compile" not in jax_row["vs"] and "vs" not in compiled_row
    assert compiled_row["error"] == "RuntimeError: no compiler" and torch_row["error"] is None
    assert jax_row["timing"]["n"] == 5 and set(jax_row["timing"]) >= {"median_s", "min_s", "q25_s", "q75_s",
                                                                        "iqr_rel", "times_s"}
    assert jax_row["cores_busy"] < 0.5  # sleeping costs no CPU

    path = tmp_path / "r.json"
    output.write_json(path, results)
    loaded = json.loads(path.read_text())
    assert loaded["rows"][0]["vs"]["torch"]["speed_ratio_median"] == pytest.approx(ratio)
    md = output.markdown(loaded)
    assert "| fake | 16 | jax |" in md and "| fake | 16 | torch.compile | error: RuntimeError: no compiler |" in md
    assert f"{ratio:.2f}x" in md and "a note" in md
    png = tmp_path / "r.png"
    output.chart(loaded, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_cli_rewrites_markdown_and_png(tmp_path, capsys):
    path = tmp_path / "bench-cpu-x.json"
    output.write_json(path, _fake_results(tmp_path))
    assert bench_cli.main(["--render", str(path)]) == 0
    assert (tmp_path / "bench-cpu-x.md").read_text().startswith("# jax_ddpm vs torch_ref benchmark, cpu")
    assert (tmp_path / "bench-cpu-x.png").stat().st_size > 1000


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "digits,huge"], "--sizes must be a comma list of digits, chapter, probe, unet2d-digits, "
                                 "unet2d-cifar10, got 'digits,huge'"),
    (["--reps", "0"], "--reps must be a positive integer, got '0'"),
    (["--dtype", "float16"], "--dtype must be a comma list of float32, bfloat16, got 'float16'"),
    (["--train-batch", "8"], "--train-batch needs one value per size (digits, chapter, unet2d-digits, "
                             "unet2d-cifar10), "
                             "got '8'"),
    (["--device", "tpu"], "--device must be cpu, cuda or auto, got 'tpu'"),
    (["--torch-compile", "maybe"], "--torch-compile must be on, off or auto, got 'maybe'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    assert bench_cli.main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"jax-ddpm bench: error: {message}"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_out_must_be_a_folder(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    assert bench_cli.main(["--out", str(f), "--sizes", "digits"]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert f.read_text() == "keep me"


def test_render_missing_file(tmp_path, capsys):
    assert bench_cli.main(["--render", str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("batch", [2, 3])
def test_gemm_bound_shapes_match_torch_flop_counter(batch):
    """benchmarks.gemm_bound's matrix-product shapes (from forward hooks and the im2col /
    sub-pixel formulas) carry exactly the convolution FLOPs torch's FlopCounterMode counts for
    a train step (forward, input and weight gradients; no input gradient for the first conv)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.gemm_bound import conv_gemm_shapes
    from torch_ref.diffusion import DiffusionProcess
    from torch_ref.training import loss_fn

    size = cases.ModelSize("tiny", 8, 3, (4, 8, 8, 16), 10, "test")
    shapes = conv_gemm_shapes(size, batch)
    ours = sum(2 * m * k * n for _, m, k, n in shapes)

    torch.manual_seed(0)
    model = cases.torch_model(size, "cpu").train()
    x0 = torch.zeros(batch, 3, 8, 8)
    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(model, DiffusionProcess(10), x0, torch.zeros(batch, dtype=torch.long), torch.zeros_like(x0)).backward()
    conv_ops = {k: v for k, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(k)}
    assert conv_ops, counter.get_flop_counts()["Global"]
    assert ours == sum(conv_ops.values())
    labels = [s[0] for s in shapes]
    assert sum(lbl.endswith(" dx") for lbl in labels) == sum(lbl.endswith(" dw") for lbl in labels) - 1


@pytest.mark.slow  # 5-16 s
def test_conv_layers_times_the_same_math_in_jax_and_torch():
    """benchmarks.conv_layers times, per recorded convolution, JAX (jax_ddpm's formulation and
    XLA's own) and torch on the same data: their outputs and gradients must agree, or the
    table would compare different work. Covers the 3x3, the strided 4x4 and the transposed
    convolutions, and the first one (no input gradient)."""
    import numpy as np
    import torch

    from benchmarks.conv_layers import IMPLS, layer_fns
    from benchmarks.gemm_bound import conv_records

    size = cases.ModelSize("tiny", 8, 3, (4, 8, 8, 16), 10, "test")
    records = conv_records(size, 2)
    kinds = {(type(m).__name__, m.kernel_size[0], m.stride[0]) for m, _, _ in records}
    assert kinds == {("Conv2d", 3, 1), ("Conv2d", 4, 2), ("ConvTranspose2d", 4, 2)}
    worst = 0.0
    for i, (mod, in_shape, out_shape) in enumerate(records):
        fns = layer_fns(mod, in_shape, out_shape, grad_input=i > 0, seed=i)
        assert set(fns) == set(IMPLS)
        ty, tgrads = fns["torch"]()
        ref = [ty.detach().numpy().transpose(0, 2, 3, 1)]
        if i > 0:
            ref.append(tgrads[0].numpy().transpose(0, 2, 3, 1))
        tw = tgrads[-1].numpy()
        if isinstance(mod, torch.nn.ConvTranspose2d):   # [Cin, Cout, k, k] -> flipped HWIO
            ref.append(tw[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))
        else:                                            # [Cout, Cin, k, k] -> HWIO
            ref.append(tw.transpose(2, 3, 1, 0))
        for impl in ("jax", "jax/xla"):
            y, grads = fns[impl]()
            got = [np.asarray(y)] + [np.asarray(g) for g in grads]
            assert [g.shape for g in got] == [r.shape for r in ref], (i, impl)
            for g, r in zip(got, ref):
                err = float(np.max(np.abs(g - r)) / np.max(np.abs(r)))
                worst = max(worst, err)
                assert err < 1e-5, (i, impl, err)
    assert worst > 0.0  # float32 sums in different orders: not bit-identical, so compared at all


@pytest.mark.parametrize("module,argv,message", [
    ("ablation", ["--batch", "0"], "--batch and --reps must be positive"),
    ("breakdown", ["--reps", "0"], "--batch and --reps must be positive"),
    ("conv_layers", ["--batch", "-1"], "--batch and --reps must be positive"),
    ("gemm_bound", ["--peak-n", "0"], "--batch, --reps and --peak-n must be positive"),
    ("strided_parts", ["--reps", "0"], "--reps must be positive"),
    ("unet2d_ops", ["--batch", "0"], "--batch and --reps must be positive"),
    ("unet2d_ops", ["--kinds", "groupnorm,conv5x5"], "--kinds must be a comma list of groupnorm, attention, "
                                                     "upsample, downsample, conv3x3, got 'groupnorm,conv5x5'"),
    ("ablation", ["--size", "huge"], "argument --size: invalid choice: 'huge'"),
    ("conv_layers", ["--size", "huge"], "argument --size: invalid choice: 'huge'"),
])
def test_helper_scripts_reject_bad_options(module, argv, message, capsys):
    """The helper scripts share one command line (measure.helper_parser / parse_helper_args):
    bad values stop them with a usage error (exit 2) naming the option, before any work."""
    import importlib

    main = importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"python -m benchmarks.{module}: error: {message}" in err
