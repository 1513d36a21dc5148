"""The suite can fail: a deliberately broken component turns its parity row red.

Each test monkeypatches one break (never committed) into jax_ddpm, into a reference's
adapter, or into the tolerance table, runs the same case the parity suite runs on a fresh
context (nothing compiled or built before the break is reused), and asserts that the row
fails with a measured error far above its tolerance -- or, for the tolerance table, that a
too-loose or missing entry is caught.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ddpm import convert, diffusion, samplers, schedules, training
from jax_ddpm.models import registry
from jax_ddpm.models import SinusoidalPositionEmbeddings, TorchBatchNorm, chapter_unet, unet2d
from parity_tests import jax_side, tolerances
from parity_tests.cases import CASES, find_case
from parity_tests.context import Context
from parity_tests.core import METRICS, Row, run_case
from parity_tests.inputs import SAMPLER_NET
from parity_tests.references import COMPONENTS, REFERENCES, oracle as oracle_ref

needs_diffusers = pytest.mark.skipif(bool(REFERENCES["diffusers"].unavailable()),
                                     reason=f"diffusers reference: {REFERENCES['diffusers'].unavailable()}")


def _run(ctx: Context, component: str) -> Row:
    return run_case(ctx, find_case(component))


def _fails(row: Row, factor: float = 100) -> None:
    assert not row.passed and row.measured > factor * row.tol, row.message()


# ----------------------------------------------------------------------------- jax_ddpm


def test_swapped_schedule_sqrt_fails(monkeypatch, fresh_ctx):
    real = schedules.schedule_arrays

    def swapped(betas):
        a = dict(real(betas))
        a["sqrt_alphas_cumprod"], a["sqrt_one_minus_alphas_cumprod"] = (a["sqrt_one_minus_alphas_cumprod"],
                                                                        a["sqrt_alphas_cumprod"])
        return a

    monkeypatch.setattr(schedules, "schedule_arrays", swapped)
    for component in ("schedule cosine T=100 vs oracle", "schedule cosine T=100 vs torch",
                      "q_sample cosine T=1000 t=random vs torch"):
        _fails(_run(fresh_ctx, component))


class BiasedVarBatchNorm(TorchBatchNorm):
    """TorchBatchNorm without torch's unbiased running variance (Flax's own rule)."""

    @nn.compact
    def __call__(self, x, train):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        count = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        if train:
            mean = jnp.mean(x, (0, 1, 2))
            var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
            if not self.is_initializing():
                ra_mean.value = 0.9 * ra_mean.value + 0.1 * mean
                ra_var.value = 0.9 * ra_var.value + 0.1 * var  # the break: biased
                count.value = count.value + 1
        else:
            mean, var = ra_mean.value, ra_var.value
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


def test_biased_running_variance_fails(monkeypatch, fresh_ctx):
    monkeypatch.setattr(chapter_unet, "TorchBatchNorm", BiasedVarBatchNorm)
    _fails(_run(fresh_ctx, "bn running stats 3 train fwd 1ch 16px b4 f8-64"))


class Float32ExpEmbedding(SinusoidalPositionEmbeddings):
    """The embedding before the fix: frequencies from XLA's float32 exp."""

    @nn.compact
    def __call__(self, time):
        half_dim = self.dim // 2
        emb = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -(np.log(10000) / (half_dim - 1)))
        emb = time.astype(jnp.float32)[:, None] * emb[None, :]
        return jnp.concatenate((jnp.sin(emb), jnp.cos(emb)), axis=-1)


def test_float32_exp_embedding_fails(monkeypatch, fresh_ctx):
    """The row that found the float32-exp frequencies: eagerly 1 ulp off torch's, times t = 999: 1.5e-5.

    (Under jit XLA constant-folds the exp and happened to agree; the row checks both.)
    """
    monkeypatch.setattr(jax_side, "JaxEmbedding", Float32ExpEmbedding)
    _fails(_run(fresh_ctx, "embedding dim=32 t<1000 vs torch"), 5)


def test_unflipped_conv_transpose_fails(monkeypatch, fresh_ctx):
    real = convert._from_torch

    def no_flip(a, layout):
        return np.ascontiguousarray(a.transpose(2, 3, 0, 1)) if layout == "conv_transpose" else real(a, layout)

    monkeypatch.setattr(convert, "_from_torch", no_flip)
    _fails(_run(fresh_ctx, "unet forward eval 1ch 16px b4 f8-64"))


def test_chapter_alpha_bar_in_step_fails(monkeypatch, fresh_ctx):
    """E2 put back: the step divides by sqrt(abar_t) instead of sqrt(alpha_t)."""
    real = diffusion.p_mean_variance

    def e2(schedule, eps, x_t, t, variance="beta_tilde", clip_denoised=False):
        mean, var = real(schedule, eps, x_t, t, variance, clip_denoised)
        fix = jnp.sqrt(diffusion._at(schedule.alphas, t, x_t) / diffusion._at(schedule.alphas_cumprod, t, x_t))
        return mean * fix, var

    monkeypatch.setattr(diffusion, "p_mean_variance", e2)
    _fails(_run(fresh_ctx, "reverse-step mean/var linear T=100 beta_tilde vs oracle"))


def test_cosine_lr_one_update_too_long_fails(monkeypatch, fresh_ctx):
    """The decay over N + 1 updates instead of N: every rate off by up to (pi / 2N) lr (3e-4 rel)."""
    real = training.learning_rate
    monkeypatch.setattr(training, "learning_rate", lambda lr, schedule="constant", decay_steps=0, end_factor=0.0:
                        real(lr, schedule, decay_steps + (schedule == "cosine"), end_factor))
    for component in ("lr cosine 4500 updates to 0x vs oracle", "lr cosine 4500 updates to 0.1x vs torch",
                      "lr cosine 4500 updates to 0.1x, then held vs oracle"):
        _fails(_run(fresh_ctx, component))


def test_cosine_lr_not_held_after_the_decay_fails(monkeypatch, fresh_ctx):
    """Rising again after N updates (torch's CosineAnnealingLR does): the oracle's hold row fails."""

    def periodic(lr, schedule="constant", decay_steps=0, end_factor=0.0):
        return lambda i: lr * (end_factor + (1 - end_factor) * 0.5 * (1 + jnp.cos(jnp.pi * i / decay_steps)))

    monkeypatch.setattr(training, "learning_rate", periodic)
    _fails(_run(fresh_ctx, "lr cosine 4500 updates to 0.1x, then held vs oracle"))


@pytest.mark.slow
def test_adam_ignoring_its_lr_schedule_fails(monkeypatch, fresh_ctx):
    """make_optimizer that drops the schedule (a constant lr): the scheduled Adam row fails."""
    real = training.make_optimizer
    monkeypatch.setattr(training, "make_optimizer", lambda lr=1e-3, grad_clip=None, **schedule: real(lr, grad_clip))
    _fails(_run(fresh_ctx, f"adam 10 steps, cosine lr to 0.1x, torch's grads -> optax: params {SAMPLER_NET.label}"))


@pytest.mark.slow
def test_adam_with_wrong_lr_fails(monkeypatch, fresh_ctx):
    """lr 10% high: every element beyond 1e-5 (the fraction row) and the optimiser-alone row."""
    real = training.make_optimizer
    monkeypatch.setattr(training, "make_optimizer", lambda lr=1e-3, grad_clip=None, **schedule:
                        real(1.1 * lr, grad_clip, **schedule))
    net = SAMPLER_NET.label
    for component in (f"adam 10 steps, each from torch's state: params {net}",
                      f"adam 10 steps, torch's grads -> optax: params {net}"):
        row = _run(fresh_ctx, component)
        assert not row.passed, row.message()


def test_output_just_beyond_its_tolerance_fails(monkeypatch, fresh_ctx):
    """A jax_ddpm output off by 3x its tolerance fails, by 0.3x passes: the row applies the table's value."""
    case = find_case("unet forward train 1ch 16px b4 f8-64")
    tol = case.tolerance(fresh_ctx.device)
    real = jax_side.fns

    def scaled(factor: float):
        def fns(ctx, net):
            f = real(ctx, net)

            def fwd_train(v, x, t):
                eps, mutated = f.fwd_train(v, x, t)
                return eps * (1 + factor * tol), mutated

            return SimpleNamespace(**{**vars(f), "fwd_train": fwd_train})

        return fns

    for factor, passes in ((3.0, False), (0.3, True)):
        monkeypatch.setattr(jax_side, "fns", scaled(factor))
        row = run_case(fresh_ctx, case)
        assert row.passed is passes and row.tol == tol, row.message()


# ----------------------------------------------------------------------------- jax_ddpm's unet2d vs diffusers
# (measured factor, row error / tolerance: in the test's docstring)
HEADS_EVAL = "unet2d forward eval heads 1ch 12px b4 vs diffusers"


@needs_diffusers
def test_unet2d_groupnorm_eps_fails(monkeypatch, fresh_ctx):
    """Every GroupNorm with the other eps (1e-5 -> 1e-6): a 5e-5 rel effect, red in float64 by
    2.6e3x, in float32 only 6.3x (diffusers.md: 'loose tolerances miss it'): why float64 rows exist."""
    real = unet2d.GroupNorm
    monkeypatch.setattr(unet2d, "GroupNorm", lambda groups, eps, **kw: real(groups, 1e-6 if eps == 1e-5 else 1e-5,
                                                                             **kw))
    _fails(_run(fresh_ctx, "unet2d forward eval heads 1ch 12px b4 float64 vs diffusers"), 300)


class LeftTopPadDownsample(unet2d.Downsample2D):
    """downsample_padding 0 padding left and top instead of right and bottom."""

    @nn.compact
    def __call__(self, x):
        pad = ((1, 0), (1, 0)) if self.padding == 0 else ((self.padding, self.padding),) * 2
        c = x.shape[-1]
        return unet2d._conv(c, 3, c * 9, stride=2, padding=pad, dtype=self.dtype, conv_impl=self.conv_impl,
                            name="conv")(x)


@needs_diffusers
def test_unet2d_downsample_padding_side_fails(monkeypatch, fresh_ctx):
    """Measured 5.5e4x (rel 0.55; cifar10-arch/8: 4.6e4x)."""
    monkeypatch.setattr(unet2d, "Downsample2D", LeftTopPadDownsample)
    _fails(_run(fresh_ctx, "unet2d forward eval odd-groups 3ch 24px b2 vs diffusers"), 1000)


def _attention_with(split):
    """AttentionBlock whose q/k/v/output heads are ``split(t [B, N, C], heads, d) -> [B, N, heads, d]``."""

    class Attention(unet2d.AttentionBlock):
        @nn.compact
        def __call__(self, x):
            b, h, w, c = x.shape
            d = self.head_dim or c
            heads = c // d
            hs = unet2d.GroupNorm(self.groups, self.eps, name="group_norm")(x.reshape(b, h * w, c))
            q, k, v = (split(unet2d._dense(c, c, dtype=self.dtype, name=n)(hs), heads, d)
                       for n in ("to_q", "to_k", "to_v"))
            probs = nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]), axis=-1)
            o = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, h * w, c)
            return unet2d._dense(c, c, dtype=self.dtype, name="to_out_0")(o).reshape(b, h, w, c) + x

    return Attention


@needs_diffusers
@pytest.mark.parametrize("split, factor", [
    # channel j*heads + h instead of h*d + j: the heads' channels interleaved (measured 3.4e4x)
    (lambda t, heads, d: t.reshape(*t.shape[:2], d, heads).swapaxes(-1, -2), 1000),
    # one head over all channels, attention_head_dim ignored (measured 1.2e4x)
    (lambda t, heads, d: t[:, :, None, :], 1000)], ids=["wrong_axis", "one_head"])
def test_unet2d_attention_head_split_fails(monkeypatch, fresh_ctx, split, factor):
    monkeypatch.setattr(unet2d, "AttentionBlock", _attention_with(split))
    _fails(_run(fresh_ctx, HEADS_EVAL), factor)


@needs_diffusers
def test_unet2d_attention_mutant_harness_is_faithful(monkeypatch, fresh_ctx):
    """The mutants' AttentionBlock with the right split passes (0.11x): what fails above is the split."""
    right = _attention_with(lambda t, heads, d: t.reshape(*t.shape[:2], heads, d))
    monkeypatch.setattr(unet2d, "AttentionBlock", right)
    row = _run(fresh_ctx, HEADS_EVAL)
    assert row.passed, row.message()


@needs_diffusers
def test_unet2d_ignoring_flip_sin_to_cos_fails(monkeypatch, fresh_ctx):
    """cat(sin, cos) although the config says flip_sin_to_cos: measured 2.1e4x."""
    real = unet2d.timestep_embedding
    monkeypatch.setattr(unet2d, "timestep_embedding", lambda t, dim, flip, shift: real(t, dim, False, shift))
    _fails(_run(fresh_ctx, HEADS_EVAL), 1000)


# ----------------------------------------------------------------------------- the references' adapters


def test_torch_adapter_wrong_schedule_buffer_fails(monkeypatch, fresh_ctx):
    """The torch_ref adapter handing over alphas_cumprod_prev as alphas_cumprod: only the 'vs torch' row fails."""
    adapter = REFERENCES["torch"]
    real = adapter.schedule
    monkeypatch.setattr(adapter, "schedule", lambda ctx, kind, timesteps: (
        lambda s: {**s, "alphas_cumprod": s["alphas_cumprod_prev"]})(real(ctx, kind, timesteps)))
    _fails(_run(fresh_ctx, "schedule linear T=100 vs torch"))
    row = _run(fresh_ctx, "schedule linear T=100 vs oracle")
    assert row.passed, row.message()


def test_torch_adapter_shifted_timestep_fails(monkeypatch, fresh_ctx):
    """The torch_ref adapter's forward feeding t + 1 to the U-Net."""
    adapter = REFERENCES["torch"]
    real = adapter.forward
    monkeypatch.setattr(adapter, "forward", lambda ctx, model, x, t, train: real(ctx, model, x, np.asarray(t) + 1,
                                                                                  train))
    _fails(_run(fresh_ctx, "unet forward eval 1ch 16px b4 f8-64"))


@pytest.mark.slow
def test_torch_adapter_chain_without_clip_fails(monkeypatch, fresh_ctx):
    """The torch_ref adapter's chain dropping clip_denoised."""
    adapter = REFERENCES["torch"]
    real = adapter.sample
    monkeypatch.setattr(adapter, "sample", lambda ctx, model, sampler, kind, T, x_T, noise, variance, clip: real(
        ctx, model, sampler, kind, T, x_T, noise, variance, False))
    row = _run(fresh_ctx, "chain 100 steps ddpm beta_tilde clip cosine: x0")
    assert not row.passed, row.message()


def test_torch_ref_reading_every_model_as_eps_fails(monkeypatch, fresh_ctx):
    """torch_ref's X1 undone: an x0 or v output taken for eps (the chapter's only type), so the
    rows that read the U-Net as x0 or v fail while the eps chain holds."""
    import torch_ref.sampling as torch_sampling

    real = torch_sampling.predict_x0
    monkeypatch.setattr(torch_sampling, "predict_x0", lambda d, out, x, t, prediction="eps": real(d, out, x, t))
    for component in ("chain 100 steps ddpm beta_tilde clip cosine read as x0: x0",
                      "chain 100 steps ddpm beta_tilde clip cosine read as v: trajectory"):
        _fails(_run(fresh_ctx, component))
    row = _run(fresh_ctx, "chain 100 steps ddpm beta_tilde clip cosine: x0")
    assert row.passed, row.message()


def test_oracle_adapter_exact_argument_for_float32_fails(monkeypatch, fresh_ctx):
    """The oracle adapter evaluating the 'embedding' row at the exact argument: 'vs oracle' fails, 'vs exact' holds."""
    real = oracle_ref.sinusoidal_embedding
    monkeypatch.setattr(oracle_ref, "sinusoidal_embedding", lambda t, dim, float32_argument=False: real(t, dim))
    _fails(_run(fresh_ctx, "embedding dim=32 t<1000 vs oracle"), 10)
    row = _run(fresh_ctx, "embedding dim=32 t<1000 vs exact (fp32 argument)")
    assert row.passed, row.message()


def test_oracle_adapter_ignoring_clip_fails(monkeypatch, fresh_ctx):
    """The oracle adapter's reverse step dropping clip_denoised: the clip row fails, the unclipped one holds."""
    adapter = REFERENCES["oracle"]
    real = adapter.p_mean_variance
    monkeypatch.setattr(adapter, "p_mean_variance", lambda ctx, kind, T, eps, x_t, t, variance, clip: real(
        ctx, kind, T, eps, x_t, t, variance, False))
    _fails(_run(fresh_ctx, "reverse-step mean/var cosine T=100 beta_tilde clip vs oracle"))
    row = _run(fresh_ctx, "reverse-step mean/var cosine T=100 beta_tilde vs oracle")
    assert row.passed, row.message()


def _silently_dropped() -> list[str]:
    return [c.component for c in CASES if not c.supported() and not c.unavailable()]


def test_no_case_is_dropped_by_its_reference(monkeypatch, fresh_ctx):
    """Every listed case runs; an adapter that stops supporting a component is caught, and its row fails."""
    assert _silently_dropped() == []
    monkeypatch.setattr(type(REFERENCES["torch"]), "components", REFERENCES["torch"].components - {"forward"})
    dropped = _silently_dropped()
    assert dropped and all(c.startswith("unet forward") for c in dropped), dropped
    row = _run(fresh_ctx, dropped[0])
    assert not row.passed and "does not support 'forward'" in row.note, row.message()


# ----------------------------------------------------------------------------- the registries


def test_architecture_weight_table_with_swapped_statistics_fails(monkeypatch, fresh_ctx):
    """The registry's weight table is what moves weights: one whose up2 BatchNorm maps torch's
    running_mean onto flax's var (and back) still loads, and the eval-mode forward row goes red."""
    arch = registry.get_arch("chapter")
    real = arch.weight_table

    def swapped(config=None):
        rows = []
        for name, path, layout in real(config):
            if name == "up2.bnorm.running_mean":
                path = path[:-1] + ("var",)
            elif name == "up2.bnorm.running_var":
                path = path[:-1] + ("mean",)
            rows.append((name, path, layout))
        return rows

    monkeypatch.setitem(registry.ARCHITECTURES, "chapter", dataclasses.replace(arch, weight_table=swapped))
    row = _run(fresh_ctx, "unet forward eval 1ch 16px b4 f8-64")
    # a negative running mean read as a variance gives NaN: red either way
    assert not row.passed and not row.measured <= 10 * row.tol, row.message()
    row = _run(fresh_ctx, "unet forward train 1ch 16px b4 f8-64")  # training mode never reads them
    assert row.passed, row.message()


def test_sampler_registry_entry_with_the_wrong_variance_fails(monkeypatch, fresh_ctx):
    """The name 'ddpm' resolves through the sampler registry: an entry that ignores ``variance``
    (always beta) turns the beta_tilde chain's trajectory red (its x0 is clamped at +-1 either way)."""
    real = samplers.get_sampler("ddpm")

    def beta_only(eps_fn, schedule, x_T, noise, variance="beta_tilde", clip_denoised=False):
        return real(eps_fn, schedule, x_T, noise, variance="beta", clip_denoised=clip_denoised)

    monkeypatch.setitem(samplers._SAMPLERS, "ddpm", beta_only)
    _fails(_run(fresh_ctx, "chain 100 steps ddpm beta_tilde cosine: trajectory"), factor=2)  # measured 4.3x


# ----------------------------------------------------------------------------- the tolerance table

# The loosest tolerance any row may have, per metric: beyond these a row stops being a
# parity check (a 1% error in a chain or a step is a bug, not float noise).
CAPS = {"abs": 1e-2, "rel": 1e-2, "frac": 1e-2}
# Closed forms are elementwise fp32 on both devices: their tolerance is a few ulps, not more.
CLOSED_FORM_CAP = 2e-4


def _too_loose(table: dict) -> list[str]:
    """Every case's tolerance on every device, against its cap; names what is missing or too loose."""
    problems = []
    for case in CASES:
        for device in tolerances.TOL_DEVICES:
            key = (case.key, case.reference, case.dtype, device)
            if key not in table:
                problems.append(f"{case.component}: no tolerance {key}")
                continue
            cap = CLOSED_FORM_CAP if case.group in ("schedule", "q_sample", "embedding", "posterior") else \
                CAPS[case.metric]
            if not 0 <= table[key] <= cap:
                problems.append(f"{case.component}: {key} = {table[key]} beyond {cap}")
    return problems


def test_every_case_has_a_sane_tolerance_for_its_reference():
    assert _too_loose(tolerances.TOLERANCES) == []
    for case in CASES:
        assert case.key in COMPONENTS and case.metric in METRICS, case.component
        assert case.tol["cuda"] >= case.tol["cpu"], case.component  # CUDA is never held tighter than the CPU
    used = {(c.key, c.reference, c.dtype, d) for c in CASES for d in tolerances.TOL_DEVICES}
    assert set(tolerances.TOLERANCES) == used  # no entry without a case


def test_a_too_loose_or_missing_tolerance_is_caught():
    for key in (("forward", "torch", "float32", "cpu"), ("forward", "diffusers", "float64", "cpu")):
        loose = {**tolerances.TOLERANCES, key: 0.5}
        assert [p.split(":")[0] for p in _too_loose(loose)] == [
            c.component for c in CASES if (c.key, c.reference, c.dtype) == key[:3]], key
    missing = {k: v for k, v in tolerances.TOLERANCES.items() if k[1] != "oracle"}
    assert len(_too_loose(missing)) == 2 * sum(c.reference == "oracle" for c in CASES)
    with pytest.raises(KeyError, match="no tolerance for component 'forward' vs reference 'oracle'"):
        tolerances.tolerance("forward", "oracle", "float32", "cpu")
