"""Smoke tests of the benchmark harness's unet2d rows (jax_ddpm vs diffusers): the sizes, the
same train step and chains on both sides, FLOPs, skipped rows, rendering, CLI errors, and the
GroupNorm ablation and per-op variants computing the same maths.

Split off tests/test_benchmarks.py (the harness itself), whose fake results it reuses. Tests
that need torch and diffusers skip without them.
"""
import pytest

from benchmarks import __main__ as bench_cli
from benchmarks import cases, output, suite
from test_benchmarks import _fake_results, _sleeper


# ----------------------------------------------------------------------------- unet2d rows (jax_ddpm vs diffusers)
# A unet2d small enough to compile in a second or two: two levels, attention at 4x4 and in the
# mid block, one head, google/ddpm-*'s settings (eps 1e-6, padding 0, sin first, shift 1).
TINY_UNET2D = cases.ModelSize(
    "unet2d-tiny", 8, 3, (8, 16), 20, "test", arch="unet2d",
    arch_config_json=cases._unet2d_json(sample_size=8, in_channels=3, out_channels=3, block_out_channels=[8, 16],
                                        layers_per_block=1, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                                        up_block_types=["AttnUpBlock2D", "UpBlock2D"], attention_head_dim=None,
                                        norm_num_groups=4, norm_eps=1e-6, downsample_padding=0,
                                        flip_sin_to_cos=False, freq_shift=1))


def _needs_diffusers():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from benchmarks import diffusers_runner

    return diffusers_runner


def test_unet2d_sizes_are_the_documented_architectures():
    """unet2d-cifar10 is google/ddpm-cifar10-32's architecture (35,746,307 parameters, counted
    from the Flax module's shapes); unet2d-digits is the registry's default unet2d config."""
    import math

    from jax_ddpm.diffusers_io import expected_torch_shapes
    from jax_ddpm.models import unet2d

    cifar = cases.SIZES["unet2d-cifar10"].arch_config()
    assert sum(math.prod(s) for s in expected_torch_shapes(cifar).values()) == 35_746_307
    assert (cifar.block_out_channels, cifar.layers_per_block, cifar.norm_eps, cifar.downsample_padding,
            cifar.flip_sin_to_cos, cifar.freq_shift, cifar.attention_head_dim) == ((128, 256, 256, 256), 2, 1e-6, 0,
                                                                                  False, 1, None)
    assert cifar.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    assert cases.SIZES["unet2d-digits"].arch_config() == unet2d.default_config(1)
    # every size has batches on every device and mode, every unet2d size a sampling plan
    for key, table in cases.BATCHES.items():
        assert set(table) == set(cases.SIZES), key
    for key, plans in cases.SAMPLE_PLANS.items():
        assert set(plans) == {n for n, s in cases.SIZES.items() if s.arch == "unet2d"}, key
    assert any(cases.SIZES[s].arch == "unet2d" for s in cases.QUICK_SIZES)  # --quick has a unet2d row


@pytest.mark.slow  # ~10-20 s on 2 cores: a diffusers step and a jitted JAX gradient
def test_unet2d_train_step_is_the_same_on_both_sides():
    """The diffusers step (UNet2DModel, add_noise, eps-MSE) and jax_ddpm's loss, on the weights
    read back through save_pretrained -> load_diffusers, with the same t and noise: the same loss
    and the same gradients (float32 rounding apart). A wrong schedule, loss or weight mapping is
    off by orders of magnitude more than the bound."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jax_ddpm import convert, training
    from jax_ddpm.models import unet2d

    dr = _needs_diffusers()
    base = dr.model(TINY_UNET2D, "cpu")
    variables = dr.jax_variables(base)
    net, sched, opt, gen, x0 = dr._train_parts(base, TINY_UNET2D, 4, "cpu", seed=1)
    t = torch.tensor([0, 5, 11, 19])
    noise = torch.randn(x0.shape, generator=gen)
    loss_t = float(dr.eps_mse_step(net, sched, opt, x0, t, noise, "float32", "cpu").detach())
    grads_t = convert.from_torch_state_dict({k: p.grad.numpy() for k, p in net.named_parameters()},
                                            table=unet2d.weight_table(TINY_UNET2D.arch_config()))["params"]

    state = cases.jax_train_state(variables, TINY_UNET2D, "float32", "auto")
    nhwc = lambda a: jnp.asarray(a.numpy().transpose(0, 2, 3, 1))  # noqa: E731
    loss_j, grads_j = jax.jit(jax.value_and_grad(lambda p: training.loss_fn(
        p, None, state.apply_fn, state.schedule, nhwc(x0), jnp.asarray(t.numpy(), jnp.int32), nhwc(noise))[0]))(
        state.params)
    assert float(loss_j) == pytest.approx(loss_t, rel=1e-5)
    worst = 0.0
    for gj, gt in zip(jax.tree_util.tree_leaves(grads_j), jax.tree_util.tree_leaves(grads_t)):
        # floor 1e-5: to_k's bias has a zero gradient (softmax ignores a shift), float noise on both sides
        err = float(np.max(np.abs(np.asarray(gj) - gt)) / max(np.max(np.abs(gt)), 1e-5))
        worst = max(worst, err)
    assert worst < 1e-4, worst


@pytest.mark.slow  # ~4-8 s each on 2 cores: a compiled chain per sampler
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_unet2d_sampling_rows_run_the_same_chain(sampler):
    """diffusers' scheduler loop (the diffusers sampling rows) and jax_ddpm's compiled chain
    (the jax rows) from the same x_T, same model: the same deterministic chain's result."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jax_ddpm import samplers
    from jax_ddpm.sampling import make_sample_fn
    from jax_ddpm.schedules import make_schedule

    if sampler not in getattr(samplers, "SAMPLERS", ()):
        pytest.skip(f"{sampler} not registered in jax_ddpm.samplers")
    dr = _needs_diffusers()
    base = dr.model(TINY_UNET2D, "cpu").eval()
    variables = dr.jax_variables(base)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = dr.scheduler_loop(base, dr.scheduler(sampler, TINY_UNET2D.timesteps), x_T, 5,
                            torch.Generator().manual_seed(0)).numpy().transpose(0, 2, 3, 1)
    model = cases.jax_model(TINY_UNET2D, "float32", "auto")
    ours = make_sample_fn(model, sampler, num_steps=5)(variables, make_schedule(TINY_UNET2D.timesteps, "linear"),
                                                       jnp.asarray(x_T.numpy().transpose(0, 2, 3, 1)),
                                                       jax.random.PRNGKey(0))
    err = float(np.max(np.abs(np.asarray(ours) - ref)))
    assert 0 < np.max(np.abs(ref)) and err < 1e-4, err


def test_unet2d_flops_add_the_attention_products():
    """torch's FlopCounterMode misses scaled_dot_product_attention on CPU; counted_flops adds
    4 N^2 C per attention call: the tiny model has 4 attentions over 16 tokens of 16 channels."""
    dr = _needs_diffusers()
    base = dr.model(TINY_UNET2D, "cpu")
    fl = dr.counted_flops(base, TINY_UNET2D, 2, "cpu")
    attn = 4 * (4 * 16 ** 2 * 16)
    assert fl["attention_core_forward_per_image"] == attn and fl["attention_added"]
    from torch.utils.flop_counter import FlopCounterMode
    import torch

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        base.eval()(torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long))
    assert fl["forward_per_image"] == counter.get_total_flops() + attn


def test_unet2d_chains_skip_unregistered_samplers_with_a_reason():
    """A sampler name jax_ddpm does not register (yet) becomes a skipped row naming why, on the
    JAX side and on diffusers' (which also skips samplers it has no scheduler for); the
    Markdown says 'skipped: ...' and the run goes on. No model is compiled."""
    from benchmarks import diffusers_runner

    cfg = suite.SuiteConfig(samplers=(("ddim", 7), ("no_such_sampler", None)))
    chains = suite.sample_chains(cfg, TINY_UNET2D, (1, 8))
    assert chains == [("ddim", 7, 20, (1, 8)), ("no_such_sampler", 20, 20, (1, 8))]
    assert suite.sample_chains(suite.SuiteConfig(quick=True), cases.SIZES["unet2d-digits"]) == [("ddim", 10, 200, (1,))]
    assert suite.sample_chains(suite.SuiteConfig(), cases.SIZES["unet2d-cifar10"], (1, 8)) == [
        ("ddpm", 50, 1000, (1,)), ("ddim", 50, 1000, (1,)), ("dpmpp_2m", 20, 1000, (1, 8))]
    assert suite.sample_chains(suite.SuiteConfig(), cases.SIZES["digits"], (1, 64)) == [("ddpm", 200, 200, (1, 64))]

    jax_row = cases.jax_sample_runner({}, TINY_UNET2D, 1, 20, "float32", "auto", sampler="no_such_sampler")
    assert "'no_such_sampler' is not registered in jax_ddpm.samplers" in jax_row.skipped
    ref_row = diffusers_runner.sample_runner(None, TINY_UNET2D, "chapter", 20, 1, "cpu", "float32", False)
    assert "diffusers has no scheduler matching jax_ddpm's 'chapter'" in ref_row.skipped
    rows = suite._group_rows("sample", TINY_UNET2D, 1, "float32", [jax_row, ref_row], reps=2, warmup=0,
                             flops_per_call=None, peaks={}, extra={"timesteps": 20, "sampler": "no_such_sampler"},
                             log=lambda s: None)
    assert [r["skipped"] for r in rows] == [jax_row.skipped, ref_row.skipped]
    assert all(r["error"] is None and "timing" not in r for r in rows)
    results = _fake_results(None)
    results["rows"] += rows
    results["skipped"] = ["sample unet2d-tiny no_such_sampler jax: not registered"]
    md = output.markdown(results)
    assert f"| unet2d-tiny, no_such_sampler 20 steps | 1 | jax | skipped: {jax_row.skipped} |" in md
    assert "- skipped: sample unet2d-tiny no_such_sampler jax: not registered" in md


def test_unet2d_rows_without_diffusers_are_skipped_with_the_reason(monkeypatch):
    """diffusers absent (as on the GPU machine unless a wheel is carried): the size still gets
    JAX weights (jax_ddpm's own init) and its diffusers rows are skipped, naming the fix."""
    from benchmarks import diffusers_runner

    monkeypatch.setattr(diffusers_runner, "_find_spec", lambda name: None if name == "diffusers" else object())
    side = suite.reference_side(TINY_UNET2D, "cpu")
    assert side.missing == "diffusers not installed (carry a diffusers wheel: benchmarks/README.md, 'GPU')"
    base, variables, flops = side.build(2)
    assert base is None and flops == {"train_step": None, "forward_per_image": None}
    assert set(variables) == {"params"} and "conv_in" in variables["params"]
    for r in (side.train_runner(base, 2, "float32", compiled=False),
              side.sample_runner(base, "ddim", 5, 20, 1, "float32", compiled=True)):
        assert r.skipped == side.missing and r.run is None
    assert [r.impl for r in (side._skipped(False), side._skipped(True))] == ["diffusers", "diffusers+compile"]


def test_unet2d_rows_render_against_diffusers(tmp_path):
    """Rows of a unet2d size take their ratios against diffusers (eager and compiled) and the
    sampling rows get a time-per-64-samples line; the chart groups chains by sampler."""
    size = cases.ModelSize("unet2d-fake", 8, 1, (4, 4), 10, "test", arch="unet2d")
    runners = [cases.Runner("jax", _sleeper(0.02), {"lower_s": 0.1, "compile_s": 0.2, "first_call_s": 0.01}),
               cases.Runner("diffusers", _sleeper(0.04), {"first_call_s": 0.02}),
               cases.Runner("diffusers+compile", _sleeper(0.03), {"first_call_s": 3.0, "compiled": True})]
    results = _fake_results(tmp_path)
    results["sizes"] = {"unet2d-fake": {"image_size": 8, "channels": 1, "features": [4, 4], "timesteps": 10,
                                        "state": {"num_params": 10}, "train_batch": 2, "reference": "diffusers",
                                        "counted_flops": {"train_step": None, "forward_per_image": None}}}
    for sampler in ("ddim", "dpmpp_2m"):
        results["rows"] += suite._group_rows("sample", size, 4, "float32", runners, reps=3, warmup=0,
                                             flops_per_call=None, peaks={},
                                             extra={"timesteps": 5, "sampler": sampler}, log=lambda s: None)
    jax_row = results["rows"][3]
    assert set(jax_row["vs"]) == {"diffusers", "diffusers+compile"}
    assert 1.3 < jax_row["vs"]["diffusers"]["speed_ratio_median"] < 4  # 2 (sleeps: wake-up latency moves it)
    md = output.markdown(results)
    assert md.startswith("# jax_ddpm vs diffusers benchmark, cpu")
    line = next(ln for ln in md.splitlines() if ln.startswith("| unet2d-fake, ddim 5 steps | 4 | jax |"))
    assert f"{jax_row['vs']['diffusers']['speed_ratio_median']:.2f}x" in line
    assert "| 3.0 (1st call) |" in next(ln for ln in md.splitlines()
                                        if ln.startswith("| unet2d-fake, ddim 5 steps | 4 | diffusers+compile |"))
    dpm_row = results["rows"][6]
    assert (dpm_row["sampler"], dpm_row["impl"]) == ("dpmpp_2m", "jax")
    per64 = 64 / dpm_row["images_per_s"]
    assert f"| unet2d-fake, dpmpp_2m 5 steps | jax | 4 | {per64:.2f} | not measured (random weights) |" in md
    png = tmp_path / "u.png"
    output.chart(results, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "unet2d-digits", "--samplers", "ddim:0"], "--samplers steps must be a positive integer, got '0'"),
    (["--sizes", "unet2d-digits", "--samplers", "ddim:500"],
     "--samplers ddim:500 (unet2d-digits, T = 200): more steps than the schedule's T"),
    (["--sizes", "unet2d-digits", "--samplers", "ddim,ddim:5"], "--samplers lists a sampler twice: 'ddim,ddim:5'"),
    (["--sizes", "unet2d-digits", "--samplers", "dd-im"], "--samplers must be a comma list of SAMPLER[:STEPS], "
                                                          "got 'dd-im'"),
    (["--sizes", "unet2d-digits", "--sample-timesteps", "300"],
     "--samplers ddpm:300 (unet2d-digits, T = 200): more steps than the schedule's T"),
])
def test_unet2d_bad_sampler_options_exit_2_with_one_line(argv, message, tmp_path, capsys):
    assert bench_cli.main(argv + ["--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"jax-ddpm bench: error: {message}"]


def test_gn_ablation_rows_compute_the_same_gradients():
    """benchmarks.ablation's unet2d rows swap GroupNorm's gradient formulation only: the shipped
    closed form (unet2d.group_norm_vjp), autodiff of the forward, and the first grouped forward
    give the same values and gradients (float64: the maths, not the rounding, is compared)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.ablation import _grouped_group_norm, _swaps
    from jax_ddpm.models import unet2d

    # each swap lands where GroupNorm reads the function from (its own module's globals)
    for _, module, attr, _ in _swaps(cases.SIZES["unet2d-digits"]):
        assert module.__name__ == unet2d.GroupNorm.__module__ and getattr(module, attr) is unet2d.group_norm_vjp

    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        xs = jnp.asarray(rng.standard_normal((2, 12, 8)) * 3 + 1)
        scale, bias = jnp.asarray(rng.standard_normal(8)), jnp.asarray(rng.standard_normal(8))
        dy = jnp.asarray(rng.standard_normal((2, 12, 8)))
        outs = []
        for fn in (unet2d.group_norm_vjp, unet2d.group_norm, _grouped_group_norm):
            f = jax.jit(lambda x, s, b, g, fn=fn: (lambda y, vjp: [y, *vjp(g)])(
                *jax.vjp(lambda x, s, b: fn(x, s, b, 4, 1e-6), x, s, b)))
            outs.append(f(xs, scale, bias, dy))
        for other in outs[1:]:
            for a, b in zip(outs[0], other):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
        assert float(jnp.max(jnp.abs(outs[0][1]))) > 0.1  # a non-trivial input gradient was compared


@pytest.mark.slow  # ~10-15 s on 2 cores: about 40 small jitted functions
def test_unet2d_ops_variants_compute_the_same_maths_as_diffusers():
    """benchmarks.unet2d_ops times each recorded op (GroupNorm, attention, upsampling, the strided
    3x3 convolution, the resnets' convolutions) in torch and in every JAX variant: their outputs
    and gradients must agree, or the table would compare different work."""
    import numpy as np

    from benchmarks.unet2d_ops import KINDS, VARIANTS, op_fns, op_records

    dr = _needs_diffusers()
    base = dr.model(TINY_UNET2D, "cpu")
    variables = dr.jax_variables(base)
    records = op_records(base, 2)
    assert {r["kind"] for r in records} == set(KINDS)
    assert {r["silu"] for r in records if r["kind"] == "groupnorm"} == {True}  # attention's own GN is inside it
    seen = set()
    for i, rec in enumerate(records):
        if rec["kind"] == "conv3x3" and rec["module"].kernel_size[0] == 1 and "conv1x1" in seen:
            continue  # one 1x1 and one 3x3 convolution are enough
        seen.add("conv1x1" if rec["kind"] == "conv3x3" and rec["module"].kernel_size[0] == 1 else rec["kind"])
        fns = op_fns(rec, variables, seed=i)
        assert set(fns) == {"torch"} | set(VARIANTS[rec["kind"]])
        ty, tdx, tdp = fns["torch"]()
        ref_y, ref_dx = ty.detach().numpy().transpose(0, 2, 3, 1), tdx.numpy().transpose(0, 2, 3, 1)
        ref_dp = sorted(float(np.abs(g).sum()) for g in tdp)  # layout-free check of the parameter gradients
        for name in VARIANTS[rec["kind"]]:
            y, dx, dp = fns[name]()
            for got, ref in ((y, ref_y), (dx, ref_dx)):
                err = float(np.max(np.abs(np.asarray(got) - ref)) / np.max(np.abs(ref)))
                assert err < 1e-5, (rec["name"], name, err)
            import jax

            ours = sorted(float(np.abs(np.asarray(g)).sum()) for g in jax.tree_util.tree_leaves(dp))
            # atol: to_k's bias has a zero gradient (softmax ignores a shift), float noise on both sides
            np.testing.assert_allclose(ours, ref_dp, rtol=1e-4, atol=1e-5 * max(ref_dp),
                                       err_msg=f"{rec['name']} {name}")
