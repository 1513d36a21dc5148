"""Every parity check, shared by ``pytest parity_tests`` and ``jax-ddpm parity``.

The same inputs go through torch_ref (the reference), jax_ddpm and, where a closed form
exists, the float64 NumPy oracle (``parity_tests/oracle.py``). Each check is a function
``check_*(ctx, **params) -> Measure``; ``CASES`` lists every (check, params, tolerance)
and ``run_case(ctx, case) -> Row`` turns a measurement into a row (component, max abs
error, max rel error, tolerance, passed). The pytest files parameterise over ``CASES``
and assert ``row.passed``; ``main`` prints them as a table.

Error definitions (``a`` = jax_ddpm, ``b`` = the reference: torch_ref or the oracle):

- ``abs``: ``max |a - b|`` over every element.
- ``rel`` (relative to output scale): ``max |a - b| / max |b|``, one number per array.
- ``elementwise rel`` (schedules only): ``max |a - b| / |b|`` over the elements (0/0 = 0).
- ``per tensor`` (gradients, parameters, BatchNorm statistics): the ``rel`` above for each
  tensor separately, then the maximum over tensors; the note names the worst tensor.
  A row's ``rel`` column is its own definition (see the case's ``metric``); its ``abs``
  column is always the plain ``max |a - b|``.
- ``frac`` (Adam parameters only): the fraction of elements beyond 1e-5 rel; every such
  element must be explained by gradient noise through Adam's sensitivity (see ``TOL``).
- Chains: ``x0`` rows compare the clamped output (abs); ``trajectory`` rows compare the
  state every step feeds the U-Net, ``rel`` to that step's scale, worst step.

Tolerances are per device (``TOL``, with the measured values and the reasons written
next to them); ``--device`` / ``--parity-device`` picks the column.

Precision: fp32 everywhere; torch with TF32 off (matmul and cuDNN), JAX with
``jax.default_matmul_precision('highest')``. On ``--device cuda`` torch runs on 'cuda' and
JAX on its GPU backend; ``cpu`` pins both to the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import zlib
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import oracle

try:  # the parity suite needs torch; jax_ddpm itself never imports it
    import torch
except ImportError as _e:  # pragma: no cover - exercised only without the extra
    torch = None
    _TORCH_IMPORT_ERROR = str(_e)
else:
    _TORCH_IMPORT_ERROR = ""

import jax
import jax.numpy as jnp

from jax_ddpm import convert, diffusion, sampling, schedules, training
from jax_ddpm.models import SinusoidalPositionEmbeddings as JaxEmbedding
from jax_ddpm.models import UNet as JaxUNet

DEVICES = ("auto", "cpu", "cuda")
SMALL = (8, 16, 32, 64)        # feature widths for most cases
CHAPTER = (64, 128, 256, 512)  # the chapter's widths, used once by default


# ----------------------------------------------------------------------------- rows


@dataclasses.dataclass(frozen=True)
class Measure:
    """What a check measured. ``ok`` is False when an exact condition failed (e.g. counts)."""

    abs_err: float
    rel_err: float
    note: str = ""
    ok: bool = True
    frac: float = math.nan  # for metric 'frac': the fraction of elements beyond the goal


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the parity table."""

    component: str
    abs_err: float
    rel_err: float
    tol: float
    metric: str  # what the tolerance applies to: 'abs', 'rel' or 'frac' (see the note)
    passed: bool
    note: str = ""
    seconds: float = 0.0
    measured: float = math.nan  # the value compared with tol

    def message(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"{self.component}: {verdict}: max abs {_fmt(self.abs_err)}, max rel {_fmt(self.rel_err)}; "
                f"{self.metric} {_fmt(self.measured)} vs tol {_fmt(self.tol)}" + (f" ({self.note})" if self.note else ""))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Case:
    """A check with its parameters and its tolerance per device."""

    group: str
    component: str
    fn: Callable[..., Measure]
    params: tuple
    metric: str
    tol: Mapping[str, float]
    slow: bool = False

    @property
    def id(self) -> str:
        return self.component.replace(" ", "_")


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return "0" if x == 0 else f"{x:.2e}"


def run_case(ctx: "Context", case: Case) -> Row:
    """Runs one case on ``ctx``'s device. A check that raises gives a failed row naming the error."""
    t0 = time.perf_counter()
    tol = case.tol[ctx.device]
    try:
        with ctx.scope():
            m = case.fn(ctx, **dict(case.params))
    except Exception as e:  # noqa: BLE001 - a crash is a failed row, reported, not a traceback
        return Row(case.component, float("nan"), float("nan"), tol, case.metric, False,
                   f"{type(e).__name__}: {e}".splitlines()[0][:300], time.perf_counter() - t0)
    measured = {"abs": m.abs_err, "rel": m.rel_err, "frac": m.frac}[case.metric]
    passed = bool(m.ok and np.isfinite(measured) and measured <= tol)
    return Row(case.component, float(m.abs_err), float(m.rel_err), tol, case.metric, passed, m.note,
               time.perf_counter() - t0, float(measured))


# ----------------------------------------------------------------------------- metrics


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def abs_rel(a, b) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|) -- relative to the reference's scale."""
    a, b = _f64(a), _f64(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return err, (err / scale if scale else (0.0 if err == 0 else math.inf))


def elementwise_rel(a, b) -> float:
    """max |a - b| / |b| over the elements; 0/0 counts as 0, x/0 as inf."""
    a, b = _f64(a), _f64(b)
    diff = np.abs(a - b)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.abs(b))
    return float(np.max(rel)) if rel.size else 0.0


def per_tensor(a: Mapping[str, Any], b: Mapping[str, Any], names: Sequence[str]) -> Measure:
    """Max over tensors of ``abs_rel``; the note names the tensor with the worst rel error."""
    worst_abs, worst_rel, worst_name = 0.0, 0.0, ""
    for name in names:
        e_abs, e_rel = abs_rel(a[name], b[name])
        worst_abs = max(worst_abs, e_abs)
        if e_rel >= worst_rel:
            worst_rel, worst_name = e_rel, name
    return Measure(worst_abs, worst_rel, f"{len(names)} tensors, worst {worst_name}")


# ----------------------------------------------------------------------------- device


class DeviceUnavailable(ValueError):
    """The requested device cannot run both frameworks."""


def _jax_gpus() -> list:
    try:
        return list(jax.devices("gpu"))
    except RuntimeError:
        return []


def cuda_unavailable_reason() -> str | None:
    """None when torch and JAX both see a CUDA GPU, else why not (one line)."""
    if torch is None or not torch.cuda.is_available():
        return "torch sees no CUDA device (torch.cuda.is_available() is False)"
    if not _jax_gpus():
        return f"JAX has no GPU backend (jax.devices() = {[d.platform for d in jax.devices()]}); install jax[cuda12]"
    return None


def resolve_device(requested: str) -> str:
    """'auto' -> 'cuda' when both frameworks see a GPU, else 'cpu'. Raises DeviceUnavailable."""
    if requested not in DEVICES:
        raise DeviceUnavailable(f"--device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "auto":
        return "cpu" if cuda_unavailable_reason() else "cuda"
    if requested == "cuda":
        reason = cuda_unavailable_reason()
        if reason:
            raise DeviceUnavailable(f"--device cuda: {reason}")
    return requested


def set_fp32_precision() -> None:
    """TF32 off in torch (matmul and cuDNN convolutions); the JAX side uses ``Context.scope``.

    Only the two flags (not also ``fp32_precision`` / ``set_float32_matmul_precision``):
    torch >= 2.9 refuses to mix its legacy and new precision APIs in one process.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@contextlib.contextmanager
def _highest_matmul_precision():
    """``jax.default_matmul_precision('highest')``, or the same config set and restored if that alias is gone."""
    if hasattr(jax, "default_matmul_precision"):
        with jax.default_matmul_precision("highest"):
            yield
        return
    before = jax.config.jax_default_matmul_precision  # pragma: no cover - a newer jax
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        yield
    finally:
        jax.config.update("jax_default_matmul_precision", before)


@dataclasses.dataclass
class Context:
    """The device both frameworks run on, and a cache of built models and compiled functions."""

    device: str
    torch_device: Any
    jax_device: Any
    cache: dict = dataclasses.field(default_factory=dict)

    @contextlib.contextmanager
    def scope(self):
        """JAX on ``jax_device`` with full-precision matmuls/convolutions; torch on one CPU thread.

        One torch thread: these are tiny ops, and OpenMP threads spinning on a shared CPU
        made the torch side 10x slower (a 100-step chain: 6 s -> 0.5 s).
        """
        threads = torch.get_num_threads()
        if self.device == "cpu":
            torch.set_num_threads(1)
        try:
            with jax.default_device(self.jax_device), _highest_matmul_precision():
                yield
        finally:
            torch.set_num_threads(threads)

    def memo(self, key, build: Callable[[], Any]):
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]


def make_context(device: str = "auto") -> Context:
    """Builds the context for ``device`` in DEVICES. Raises DeviceUnavailable."""
    if torch is None:
        raise DeviceUnavailable(f"the parity suite needs torch ({_TORCH_IMPORT_ERROR}); pip install 'jax-ddpm[torch]'")
    device = resolve_device(device)
    set_fp32_precision()
    if device == "cuda":
        return Context("cuda", torch.device("cuda"), _jax_gpus()[0])
    return Context("cpu", torch.device("cpu"), jax.devices("cpu")[0])


# ----------------------------------------------------------------------------- shared inputs


@dataclasses.dataclass(frozen=True)
class Net:
    """A U-Net configuration and the batch fed to it."""

    img_channels: int
    size: int
    batch: int
    features: tuple = SMALL
    time_emb_dim: int = 32

    @property
    def label(self) -> str:
        width = "chapter width" if tuple(self.features) == CHAPTER else f"f{self.features[0]}-{self.features[-1]}"
        return f"{self.img_channels}ch {self.size}px b{self.batch} {width}"


def _rng(*key) -> np.random.Generator:
    """A NumPy generator seeded from the case's parameters (same inputs on every run)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _normal(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _to_torch(ctx: Context, x: np.ndarray, nchw: bool = False):
    """A torch copy with torch's default (contiguous NCHW) strides.

    NumPy keeps odd strides on size-1 axes: a transposed [B, H, W, 1] array looks
    channels_last to torch, oneDNN then keeps the whole U-Net channels_last, and torch's
    CPU BatchNorm2d for channels_last is much less accurate (1.2e-4 vs 5e-7 at 64x64).
    """
    x = np.asarray(x)
    if nchw:
        x = x.transpose(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]
    return torch.from_numpy(np.array(x)).clone(memory_format=torch.contiguous_format).to(ctx.torch_device)


def _to_np(x, nhwc: bool = False) -> np.ndarray:
    """A copy (``tensor.numpy()`` aliases torch memory that later forwards mutate)."""
    a = x.detach().cpu().numpy().copy() if torch is not None and isinstance(x, torch.Tensor) else np.array(x)
    return a.transpose(0, 2, 3, 1) if nhwc else a  # [B, C, H, W] -> [B, H, W, C]


def _timesteps(rng: np.random.Generator, batch: int, timesteps: int) -> np.ndarray:
    """Random t in [0, T) with the extremes included: t[0] = T - 1, t[-1] = 0."""
    t = rng.integers(0, timesteps, batch)
    t[0], t[-1] = timesteps - 1, 0
    return t.astype(np.int64)


def torch_unet(ctx: Context, net: Net, seed: int = 0):
    """torch_ref.UNet with torch's default init from ``seed`` (the global RNG is left untouched)."""
    from torch_ref.model import UNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet(net.img_channels, net.time_emb_dim, list(net.features))
    return model.to(ctx.torch_device)


def torch_state(model) -> dict[str, np.ndarray]:
    return {k: _to_np(v) for k, v in model.state_dict().items()}


def jax_variables(state_dict: Mapping[str, np.ndarray]) -> dict:
    """torch names -> Flax variables (jnp arrays on the current default device)."""
    return jax.tree_util.tree_map(jnp.asarray, convert.from_torch_state_dict(state_dict))


def to_torch_names(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return convert.to_torch_state_dict(jax.tree_util.tree_map(np.asarray, variables))


def jax_fns(ctx: Context, net: Net) -> SimpleNamespace:
    """The Flax UNet and its compiled functions, built once per context and architecture."""

    def build():
        model = JaxUNet(net.img_channels, net.time_emb_dim, tuple(net.features))

        def loss(params, batch_stats, schedule, x0, t, noise):
            return training.loss_fn(params, batch_stats, model.apply, schedule, x0, t, noise)

        return SimpleNamespace(
            model=model,
            fwd_train=jax.jit(lambda v, x, t: model.apply(v, x, t, train=True, mutable=["batch_stats"])),
            fwd_eval=jax.jit(lambda v, x, t: model.apply(v, x, t, train=False)),
            loss_and_grad=jax.jit(jax.value_and_grad(loss, has_aux=True)),
            train_step=jax.jit(training.train_step_with_noise),
        )

    return ctx.memo(("jax_fns", net.img_channels, tuple(net.features), net.time_emb_dim), build)


def torch_diffusion(ctx: Context, timesteps: int, kind: str):
    from torch_ref.diffusion import DiffusionProcess

    return ctx.memo(("torch_diffusion", timesteps, kind),
                    lambda: DiffusionProcess(timesteps, kind).to(ctx.torch_device))


def jax_schedule(ctx: Context, timesteps: int, kind: str) -> schedules.DiffusionSchedule:
    return ctx.memo(("jax_schedule", timesteps, kind), lambda: schedules.make_schedule(timesteps, kind))


def _digits(size: int, n: int, seed: int) -> np.ndarray:
    """n scikit-learn digits resized to ``size``, in [-1, 1], NHWC float32 [n, size, size, 1]."""
    from torch_ref.data import digits_tensor

    x = digits_tensor(size)  # [N, 1, S, S]
    idx = np.random.default_rng(seed).choice(x.shape[0], n, replace=False)
    return _to_np(x[idx], nhwc=True)


# ----------------------------------------------------------------------------- checks: closed forms


def check_schedule(ctx: Context, kind: str, timesteps: int, ref: str) -> Measure:
    """Every DiffusionSchedule array (float32) vs torch_ref's buffers or the float64 oracle."""
    ours = jax_schedule(ctx, timesteps, kind)
    if ref == "torch":
        buffers = torch_diffusion(ctx, timesteps, kind)
        theirs = {f.name: _to_np(getattr(buffers, f.name)) for f in dataclasses.fields(ours)}
    else:
        theirs = oracle.schedule(kind, timesteps)
    worst_abs, worst_rel, worst = 0.0, 0.0, ""
    for f in dataclasses.fields(ours):
        a, b = np.asarray(getattr(ours, f.name)), theirs[f.name]
        if a.dtype != np.float32 or a.shape != (timesteps,):
            return Measure(math.nan, math.nan, f"{f.name}: {a.dtype}{a.shape}", ok=False)
        worst_abs = max(worst_abs, abs_rel(a, b)[0])
        rel = elementwise_rel(a, b)
        if rel >= worst_rel:
            worst_rel, worst = rel, f.name
    n = len(dataclasses.fields(ours))
    return Measure(worst_abs, worst_rel, f"{n} arrays, worst {worst}" if worst_rel else f"{n} arrays, all bit-equal")


def check_q_sample(ctx: Context, kind: str, timesteps: int, at: str, ref: str) -> Measure:
    """x_t for t = 0, T-1 or random t, same x0 and noise, vs torch_ref or the oracle."""
    rng = _rng("q_sample", kind, timesteps, at)
    shape = (8, 16, 16, 3)
    x0 = rng.uniform(-1, 1, shape).astype(np.float32)
    noise = _normal(rng, shape)
    t = {"0": np.zeros(8, np.int64), "T-1": np.full(8, timesteps - 1, np.int64),
         "random": rng.integers(0, timesteps, 8)}[at]
    f = ctx.memo("jit_q_sample", lambda: jax.jit(diffusion.q_sample))
    ours = np.asarray(f(jax_schedule(ctx, timesteps, kind), jnp.asarray(x0), jnp.asarray(t, jnp.int32),
                        jnp.asarray(noise)))
    if ref == "torch":
        x_t, _ = torch_diffusion(ctx, timesteps, kind)(_to_torch(ctx, x0, True), _to_torch(ctx, t),
                                                       _to_torch(ctx, noise, True))
        theirs = _to_np(x_t, nhwc=True)
    else:
        theirs = oracle.q_sample(oracle.schedule(kind, timesteps), x0, t, noise)
    return Measure(*abs_rel(ours, theirs), f"|x_t| <= {np.abs(theirs).max():.2f}")


def check_embedding(ctx: Context, dim: int, timesteps: int, ref: str) -> Measure:
    """SinusoidalPositionEmbeddings for every t in [0, T), jitted and eager, vs torch_ref or the oracle.

    ``ref='oracle'`` evaluates sin/cos in float64 at the argument a float32 program forms;
    ``ref='exact'`` uses the float64 argument, and so measures the float32 rounding of
    ``t * f_k`` that torch_ref shares (up to ~t * 2^-24 * (2 + 2/e)).
    """
    t = np.arange(timesteps)
    f = ctx.memo(("jit_embedding", dim), lambda: jax.jit(lambda t: JaxEmbedding(dim).apply({}, t)))
    jitted = np.asarray(f(jnp.asarray(t, jnp.int32)))
    eager = np.asarray(JaxEmbedding(dim).apply({}, jnp.asarray(t, jnp.int32)))  # XLA may constant-fold under jit
    if ref == "torch":
        from torch_ref.model import SinusoidalPositionEmbeddings

        theirs = _to_np(SinusoidalPositionEmbeddings(dim)(_to_torch(ctx, t)))
    else:
        theirs = oracle.sinusoidal_embedding(t, dim, float32_argument=(ref == "oracle"))
    (j_abs, j_rel), (e_abs, e_rel) = abs_rel(jitted, theirs), abs_rel(eager, theirs)
    return Measure(max(j_abs, e_abs), max(j_rel, e_rel), f"jit {_fmt(j_abs)}, eager {_fmt(e_abs)}")


def check_posterior_step(ctx: Context, kind: str, timesteps: int, variance: str, clip: bool) -> Measure:
    """p_mean_variance (mean and variance of the reverse step) vs the float64 oracle, every t at once."""
    rng = _rng("posterior", kind, timesteps, variance, clip)
    t = np.arange(timesteps)
    x_t = _normal(rng, (timesteps, 8, 8, 1))
    eps = _normal(rng, (timesteps, 8, 8, 1))
    f = ctx.memo(("jit_p_mean_variance", variance, clip), lambda: jax.jit(
        lambda s, e, x, t: diffusion.p_mean_variance(s, e, x, t, variance, clip)))
    mean, var = f(jax_schedule(ctx, timesteps, kind), jnp.asarray(eps), jnp.asarray(x_t), jnp.asarray(t, jnp.int32))
    o_mean, o_var = oracle.p_mean_variance(oracle.schedule(kind, timesteps), eps, x_t, t, variance, clip)
    m_abs, m_rel = abs_rel(mean, o_mean)
    v_abs, v_rel = abs_rel(np.asarray(var).reshape(-1), o_var.reshape(-1))
    return Measure(max(m_abs, v_abs), max(m_rel, v_rel), f"mean rel {_fmt(m_rel)}, var rel {_fmt(v_rel)}, "
                                                            f"|mean| <= {np.abs(o_mean).max():.1f}")


# ----------------------------------------------------------------------------- checks: network


def _randomise_bn_stats(model, rng: np.random.Generator) -> None:
    """Non-trivial running statistics, so eval mode is not the identity normalisation."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.from_numpy(0.2 * _normal(rng, buf.shape)))
            elif name.endswith("running_var"):
                buf.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, buf.shape).astype(np.float32)))


def check_forward(ctx: Context, net: Net, mode: str) -> Measure:
    """U-Net output, train or eval mode, same converted weights and inputs; rel to output scale."""
    rng = _rng("forward", net, mode)
    x = _normal(rng, (net.batch, net.size, net.size, net.img_channels))
    t = _timesteps(rng, net.batch, 1000)
    model = torch_unet(ctx, net, seed=1)
    if mode == "eval":
        _randomise_bn_stats(model, rng)
    variables = jax_variables(torch_state(model))  # before the torch forward mutates BN buffers
    fns = jax_fns(ctx, net)
    model.train(mode == "train")
    with torch.no_grad():
        theirs = _to_np(model(_to_torch(ctx, x, True), _to_torch(ctx, t)), nhwc=True)
    if mode == "train":
        ours, _ = fns.fwd_train(variables, jnp.asarray(x), jnp.asarray(t, jnp.int32))
    else:
        ours = fns.fwd_eval(variables, jnp.asarray(x), jnp.asarray(t, jnp.int32))
    return Measure(*abs_rel(ours, theirs), f"max |out| {np.abs(theirs).max():.2f}")


def _bn_names(state: Mapping[str, np.ndarray]) -> list[str]:
    return sorted(k for k in state if k.endswith(("running_mean", "running_var")))


def _counts_equal(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    names = [k for k in b if k.endswith("num_batches_tracked")]
    return all(int(a[k]) == int(b[k]) for k in names)


def check_bn_stats(ctx: Context, net: Net, forwards: int = 3) -> Measure:
    """Running mean/var and num_batches_tracked after ``forwards`` train-mode forwards (E5: 2 updates each)."""
    rng = _rng("bn", net, forwards)
    model = torch_unet(ctx, net, seed=2).train()
    variables = jax_variables(torch_state(model))
    fns = jax_fns(ctx, net)
    for _ in range(forwards):
        x = _normal(rng, (net.batch, net.size, net.size, net.img_channels))
        t = _timesteps(rng, net.batch, 1000)
        with torch.no_grad():
            model(_to_torch(ctx, x, True), _to_torch(ctx, t))
        _, mutated = fns.fwd_train(variables, jnp.asarray(x), jnp.asarray(t, jnp.int32))
        variables = {"params": variables["params"], "batch_stats": mutated["batch_stats"]}
    theirs, ours = torch_state(model), to_torch_names(variables)
    m = per_tensor(ours, theirs, _bn_names(theirs))
    counts_ok = _counts_equal(ours, theirs)
    count = int(theirs["down1.bnorm.num_batches_tracked"])
    return dataclasses.replace(m, ok=counts_ok, note=f"{m.note}; num_batches_tracked {count} "
                                                     f"{'equal' if counts_ok else 'DIFFER'}")


def _loss_and_grads(ctx: Context, net: Net, kind: str, timesteps: int):
    """(torch loss, torch grads, jax loss, jax grads in torch names) on one batch, cached."""

    def build():
        from torch_ref.training import loss_fn

        rng = _rng("loss", net, kind, timesteps)
        x0 = rng.uniform(-1, 1, (net.batch, net.size, net.size, net.img_channels)).astype(np.float32)
        noise = _normal(rng, x0.shape)
        t = _timesteps(rng, net.batch, timesteps)
        model = torch_unet(ctx, net, seed=3).train()
        variables = jax_variables(torch_state(model))
        loss = loss_fn(model, torch_diffusion(ctx, timesteps, kind), _to_torch(ctx, x0, True), _to_torch(ctx, t),
                       _to_torch(ctx, noise, True))
        model.zero_grad()
        loss.backward()
        torch_grads = {k: _to_np(p.grad) for k, p in model.named_parameters()}
        fns = jax_fns(ctx, net)
        (jloss, _), grads = fns.loss_and_grad(variables["params"], variables["batch_stats"],
                                              jax_schedule(ctx, timesteps, kind), jnp.asarray(x0),
                                              jnp.asarray(t, jnp.int32), jnp.asarray(noise))
        # grads have the params' tree, so convert's table (incl. the conv-transpose flip) applies
        jax_grads = to_torch_names({"params": grads, "batch_stats": variables["batch_stats"]})
        return float(loss.item()), torch_grads, float(jloss), jax_grads

    return ctx.memo(("loss_and_grads", net, kind, timesteps), build)


def check_loss(ctx: Context, net: Net, kind: str, timesteps: int) -> Measure:
    """eps-MSE loss on the same x0, t and noise; rel = |a - b| / |b|."""
    tl, _, jl, _ = _loss_and_grads(ctx, net, kind, timesteps)
    return Measure(abs(jl - tl), abs(jl - tl) / abs(tl), f"loss {tl:.5f}")


def check_grads(ctx: Context, net: Net, kind: str, timesteps: int) -> Measure:
    """d loss / d parameter for every parameter, per tensor rel (max over tensors)."""
    _, tg, _, jg = _loss_and_grads(ctx, net, kind, timesteps)
    return per_tensor(jg, tg, sorted(tg))


ADAM_GOAL = 1e-5        # per tensor rel, the goal for parameters after Adam steps
ADAM_GRAD_REL = 1e-4    # gradient noise allowed per tensor (the grads tolerance), relative to max |grad|


def _train_state(fns: SimpleNamespace, variables: Mapping[str, Any], tx, schedule) -> training.TrainState:
    """A TrainState holding the given (converted) variables instead of a fresh init."""
    return training.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                               batch_stats=variables["batch_stats"], opt_state=jax.jit(tx.init)(variables["params"]),
                               ema_params=None, schedule=schedule, apply_fn=fns.model.apply, tx=tx)


def _state_from_torch(model, opt, template: training.TrainState) -> training.TrainState:
    """torch's parameters, BN buffers and Adam moments (exp_avg, exp_avg_sq, step) as a JAX TrainState.

    ``template`` gives the static fields and, before torch's first step, the zero moments.
    """
    import optax

    buffers = torch_state(model)
    variables = jax_variables(buffers)
    names = {id(p): k for k, p in model.named_parameters()}
    moments = {"mu": {}, "nu": {}}
    count = 0
    for p, st in opt.state.items():
        if "exp_avg" in st:
            moments["mu"][names[id(p)]] = _to_np(st["exp_avg"])
            moments["nu"][names[id(p)]] = _to_np(st["exp_avg_sq"])
            count = int(st["step"])
    opt_state = template.opt_state  # the initial (zero) moments before the first step
    if count:
        opt_state = tuple(s._replace(count=jnp.asarray(count, jnp.int32),
                                     mu=jax_variables({**buffers, **moments["mu"]})["params"],
                                     nu=jax_variables({**buffers, **moments["nu"]})["params"])
                          if isinstance(s, optax.ScaleByAdamState) else s for s in opt_state)
    return template.replace(step=jnp.asarray(count, jnp.int32), params=variables["params"],
                            batch_stats=variables["batch_stats"], opt_state=opt_state)


def _train_run(ctx: Context, net: Net, optimizer: str, steps: int, kind: str, timesteps: int, lr: float):
    """``steps`` training steps in both frameworks on the same batches, t and noise.

    torch: ``torch_ref.training.train_step`` with ``torch.optim.{Adam,SGD}(lr)``; JAX:
    ``jax_ddpm.training.train_step_with_noise`` with ``make_optimizer(lr)`` (Adam) or
    ``optax.sgd(lr)``, run two ways: free-running from the same initial state, and (Adam)
    each step started from torch's current state -- parameters, BN buffers and Adam moments
    -- so that one step's disagreement is measured without the earlier steps' feeding back.
    """

    def build():
        import optax
        from torch_ref.training import make_optimizer, train_step

        rng = _rng("train", net, optimizer, steps, kind, timesteps, lr)
        model = torch_unet(ctx, net, seed=4).train()
        variables = jax_variables(torch_state(model))
        if optimizer == "adam":
            opt, tx = make_optimizer(model, lr), training.make_optimizer(lr)
        else:
            opt, tx = torch.optim.SGD(model.parameters(), lr=lr), optax.sgd(lr)
        fns = jax_fns(ctx, net)
        state = _train_state(fns, variables, tx, jax_schedule(ctx, timesteps, kind))
        data = (_digits(net.size, net.batch * steps, seed=0) if net.img_channels == 1 else
                rng.uniform(-1, 1, (net.batch * steps, net.size, net.size, net.img_channels)).astype(np.float32))
        run = SimpleNamespace(init=torch_state(model), param_names=[k for k, _ in model.named_parameters()],
                              torch_losses=[], torch_states=[], torch_grads=[], torch_sqrt_vhat=[],
                              free_losses=[], free_states=[], forced_losses=[], forced_states=[])
        for i in range(steps):
            x0 = data[i * net.batch:(i + 1) * net.batch]
            t = rng.integers(0, timesteps, net.batch)
            noise = _normal(rng, x0.shape)
            args = (jnp.asarray(x0), jnp.asarray(t, jnp.int32), jnp.asarray(noise))
            if optimizer == "adam":
                forced, metrics = fns.train_step(_state_from_torch(model, opt, state), *args)
                run.forced_losses.append(float(metrics["loss"]))
                run.forced_states.append(to_torch_names(forced.variables))
            loss = train_step(model, torch_diffusion(ctx, timesteps, kind), opt, _to_torch(ctx, x0, True),
                              _to_torch(ctx, t), _to_torch(ctx, noise, True))
            state, metrics = fns.train_step(state, *args)
            run.torch_losses.append(float(loss.item()))
            run.torch_states.append(torch_state(model))
            run.torch_grads.append({k: _to_np(p.grad) for k, p in model.named_parameters()})  # this step's grads
            if optimizer == "adam":  # Adam's denominator sqrt(v_hat) after this step
                b2 = opt.param_groups[0]["betas"][1]
                run.torch_sqrt_vhat.append({k: np.sqrt(_to_np(opt.state[p]["exp_avg_sq"]) /
                                                       (1 - b2 ** int(opt.state[p]["step"])))
                                            for k, p in model.named_parameters()})
            run.free_losses.append(float(metrics["loss"]))
            run.free_states.append(to_torch_names(state.variables))
        return run

    return ctx.memo(("train_run", net, optimizer, steps, kind, timesteps, lr), build)


def _worst_over_steps(measures: Sequence[Measure], metric: str = "rel") -> Measure:
    i = int(np.argmax([m.rel_err if metric == "rel" else m.abs_err for m in measures]))
    return dataclasses.replace(measures[i], abs_err=max(m.abs_err for m in measures),
                               rel_err=max(m.rel_err for m in measures), note=f"{measures[i].note} at step {i + 1}")


def _step_measures(run: SimpleNamespace, part: str, mode: str, lr: float) -> Measure:
    """Worst step of ``part`` ('loss', 'params', 'update', 'batch_stats') for 'free' or 'forced' JAX runs."""
    losses, states = getattr(run, f"{mode}_losses"), getattr(run, f"{mode}_states")
    if part == "loss":
        errs = [abs(j - t) for t, j in zip(run.torch_losses, losses)]
        rels = [e / abs(t) for e, t in zip(errs, run.torch_losses)]
        i = int(np.argmax(rels))
        return Measure(max(errs), rels[i], f"worst step {i + 1}")
    pairs = list(zip(run.torch_states, states))
    if part == "batch_stats":
        counts_ok = all(_counts_equal(j, t) for t, j in pairs)
        return dataclasses.replace(_worst_over_steps([per_tensor(j, t, _bn_names(t)) for t, j in pairs]),
                                   ok=counts_ok)
    names = run.param_names
    if part == "update":
        return _worst_over_steps([per_tensor({k: j[k] - run.init[k] for k in names},
                                             {k: t[k] - run.init[k] for k in names}, names) for t, j in pairs])
    ms = []
    for i, (t, j) in enumerate(pairs):
        before = run.init if i == 0 else run.torch_states[i - 1]
        m = per_tensor(j, t, names)
        total = beyond = unexplained = 0
        for k in names:
            diff = np.abs(j[k].astype(np.float64) - t[k])
            mask = diff > ADAM_GOAL * np.abs(t[k]).max()
            total, beyond = total + mask.size, beyond + int(mask.sum())
            if mask.any():  # Adam's sensitivity: |d update / d g| <= 2 lr / (sqrt(v_hat) + eps)
                noise = ADAM_GRAD_REL * np.abs(run.torch_grads[i][k]).max()
                bound = (np.minimum(2 * lr * noise / (run.torch_sqrt_vhat[i][k] + 1e-8), 2 * lr)
                         + ADAM_GOAL * np.abs(t[k] - before[k]))
                unexplained += int(np.sum(mask & (diff > bound)))
        ms.append(dataclasses.replace(
            m, frac=beyond / total, ok=unexplained == 0,
            note=f"{m.note}; {beyond} of {total} elements beyond {ADAM_GOAL:g} rel, "
                 f"{unexplained} not explained by {_fmt(ADAM_GRAD_REL)}-rel gradient noise"))
    worst = int(np.argmax([x.frac for x in ms]))
    return dataclasses.replace(ms[worst], abs_err=max(x.abs_err for x in ms), rel_err=max(x.rel_err for x in ms),
                               ok=all(x.ok for x in ms), note=f"{ms[worst].note} at step {worst + 1}")


def check_train_steps(ctx: Context, net: Net, part: str, optimizer: str = "adam", mode: str = "forced",
                      steps: int = 10, kind: str = "cosine", timesteps: int = 100, lr: float = 1e-3) -> Measure:
    """Per-step parity of a training run, worst step. ``part``:

    - ``loss``: |a - b| / |b| of each step's loss;
    - ``params``: every parameter after each step (per tensor rel; abs per element);
    - ``update``: the accumulated update ``p_i - p_0``, per tensor rel to the update's scale;
    - ``batch_stats``: running statistics per tensor rel, num_batches_tracked exact.

    ``mode='forced'`` (Adam): every JAX step starts from torch's state before that step;
    the note adds the free-running value (JAX's own state carried through all steps).
    """
    run = _train_run(ctx, net, optimizer, steps, kind, timesteps, lr)
    m = _step_measures(run, part, mode, lr)
    if mode == "forced":
        free = _step_measures(run, part, "free", lr)
        m = dataclasses.replace(m, note=f"{m.note}; free-running: abs {_fmt(free.abs_err)}, rel {_fmt(free.rel_err)}")
    return m


def check_adam_same_grads(ctx: Context, net: Net, steps: int = 10, kind: str = "cosine", timesteps: int = 100,
                          lr: float = 1e-3) -> Measure:
    """The optimiser alone: torch's gradients of each step fed to ``make_optimizer(lr)``, params per tensor."""
    import optax

    run = _train_run(ctx, net, "adam", steps, kind, timesteps, lr)
    tx = training.make_optimizer(lr)
    params = jax_variables(run.init)["params"]
    opt_state = jax.jit(tx.init)(params)
    update = ctx.memo(("adam_update", lr), lambda: jax.jit(
        lambda g, s, p: (lambda u, s2: (optax.apply_updates(p, u), s2))(*tx.update(g, s, p))))
    ms = []
    for torch_state_i, grads in zip(run.torch_states, run.torch_grads):
        g = jax_variables({**torch_state_i, **grads})["params"]  # buffers only fill the table; params-shaped tree
        params, opt_state = update(g, opt_state, params)
        ours = to_torch_names({"params": params, "batch_stats": jax_variables(torch_state_i)["batch_stats"]})
        ms.append(per_tensor(ours, torch_state_i, run.param_names))
    return _worst_over_steps(ms)


# ----------------------------------------------------------------------------- checks: sampling


SAMPLER_NET = Net(1, 16, 4)
SAMPLER_TRAIN_STEPS = 20


def _sampler_model(ctx: Context, net: Net, trained: bool):
    """(torch model in eval mode, jax fns, eval variables): briefly trained on digits, or random init."""

    def build():
        from torch_ref.training import make_optimizer, train_step

        model = torch_unet(ctx, net, seed=5)
        if trained:  # a few Adam steps on real digits (cosine, T = 100, as the chapter trains)
            diff = torch_diffusion(ctx, 100, "cosine")
            opt = make_optimizer(model, 1e-3)
            data = _digits(net.size, 256, seed=1)
            rng = _rng("sampler_train", net)
            for _ in range(SAMPLER_TRAIN_STEPS):
                x0 = data[rng.choice(len(data), 16, replace=False)]
                train_step(model, diff, opt, _to_torch(ctx, x0, True), _to_torch(ctx, rng.integers(0, 100, 16)),
                           _to_torch(ctx, _normal(rng, x0.shape), True))
        model.eval()
        return model, jax_fns(ctx, net), jax_variables(torch_state(model))

    return ctx.memo(("sampler_model", net, trained), build)


def check_sampler_step(ctx: Context, step: int, variance: str, clip: bool, kind: str = "cosine",
                       timesteps: int = 100) -> Measure:
    """One reverse step x_i -> x_{i-1}: torch_ref.p_sample vs UNet(eval) + jax_ddpm p_mean_variance + sigma z."""
    from torch_ref.sampling import p_sample

    net = SAMPLER_NET
    model, fns, variables = _sampler_model(ctx, net, trained=True)
    rng = _rng("sampler_step", step, variance, clip, kind, timesteps)
    shape = (net.batch, net.size, net.size, net.img_channels)
    if step == timesteps - 1:
        x = _normal(rng, shape)
    else:  # a noised digit, as the chain would see it at this step
        x = oracle.q_sample(oracle.schedule(kind, timesteps), _digits(net.size, net.batch, seed=2),
                            np.full(net.batch, step), _normal(rng, shape)).astype(np.float32)
    z = _normal(rng, shape)
    theirs = _to_np(p_sample(model, torch_diffusion(ctx, timesteps, kind), _to_torch(ctx, x, True), step,
                             _to_torch(ctx, z, True), variance, clip), nhwc=True)

    def jax_step(v, s, x, t, z):
        mean, var = diffusion.p_mean_variance(s, fns.model.apply(v, x, t, train=False), x, t, variance, clip)
        return mean + jnp.where(t[:, None, None, None] > 0, jnp.sqrt(var), 0.0) * z

    f = ctx.memo(("jit_sampler_step", net, variance, clip), lambda: jax.jit(jax_step))
    ours = f(variables, jax_schedule(ctx, timesteps, kind), jnp.asarray(x), jnp.full((net.batch,), step, jnp.int32),
             jnp.asarray(z))
    return Measure(*abs_rel(ours, theirs), f"max |x| {np.abs(theirs).max():.1f}")


def _chain_run(ctx: Context, sampler: str, variance: str, clip: bool, kind: str, timesteps: int, trained: bool,
               net: Net):
    """One chain in both frameworks from the same x_T and pre-drawn noise [T, B, H, W, C].

    Runs the library's own samplers (torch_ref.sample / chapter_sample; jax_ddpm's
    ddpm_sample / chapter_sample jitted as make_sample_fn does) and records the state
    every step feeds the U-Net (a forward pre-hook in torch, ``jax.debug.callback`` in the
    JAX eps_fn): the unclamped trajectory x_{T-1} .. x_0, not hidden by the final clamp.
    """

    def build():
        from torch_ref.sampling import chapter_sample, sample

        model, fns, variables = _sampler_model(ctx, net, trained)
        rng = _rng("chain", sampler, variance, clip, kind, timesteps, trained, net)
        shape = (net.batch, net.size, net.size, net.img_channels)
        x_T = _normal(rng, shape)
        noise = _normal(rng, (timesteps,) + shape)  # row i is added at step i
        noise_t = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 1, 4, 2, 3))).to(ctx.torch_device)
        diff = torch_diffusion(ctx, timesteps, kind)
        torch_traj: dict[int, np.ndarray] = {}
        hook = model.register_forward_pre_hook(
            lambda m, args: torch_traj.__setitem__(int(args[1][0]), _to_np(args[0], nhwc=True)))
        try:
            if sampler == "chapter":
                theirs = chapter_sample(model, diff, _to_torch(ctx, x_T, True), noise_t)
            else:
                theirs = sample(model, diff, _to_torch(ctx, x_T, True), noise_t, variance, clip)
        finally:
            hook.remove()
        jax_traj: dict[int, np.ndarray] = {}

        def record(x, t):
            jax_traj[int(np.asarray(t)[0])] = np.asarray(x)

        def build_fn():
            opts = {} if sampler == "chapter" else {"variance": variance, "clip_denoised": clip}
            fn = sampling.get_sampler(sampler)

            def eps_fn_of(v):
                def eps_fn(x, t):
                    jax.debug.callback(record, x, t)
                    return fns.model.apply(v, x, t, train=False)
                return eps_fn

            return jax.jit(lambda v, s, x, n: fn(eps_fn_of(v), s, x, n, **opts))

        f = build_fn()  # not memoised: the callback writes into this run's dict
        ours = np.asarray(f(variables, jax_schedule(ctx, timesteps, kind), jnp.asarray(x_T), jnp.asarray(noise)))
        jax.effects_barrier()
        return SimpleNamespace(ours=ours, theirs=_to_np(theirs, nhwc=True), torch_traj=torch_traj, jax_traj=jax_traj)

    return ctx.memo(("chain", sampler, variance, clip, kind, timesteps, trained, net), build)


def check_chain(ctx: Context, part: str, sampler: str, variance: str = "beta_tilde", clip: bool = False,
                kind: str = "cosine", timesteps: int = 100, trained: bool = True, net: Net = SAMPLER_NET) -> Measure:
    """A whole chain: ``part='x0'`` the clamped output; ``'trajectory'`` every step's state, rel to its scale."""
    run = _chain_run(ctx, sampler, variance, clip, kind, timesteps, trained, net)
    model_note = "trained" if trained else "random-init"
    if part == "x0":
        at_edge = float(np.mean(np.abs(run.theirs) >= 1.0))
        return Measure(*abs_rel(run.ours, run.theirs), f"{model_note} model; {100 * at_edge:.1f}% of pixels "
                                                       f"clamped at +-1")
    steps = sorted(run.torch_traj)
    if steps != list(range(timesteps)) or sorted(run.jax_traj) != steps:
        return Measure(math.nan, math.nan, f"recorded {len(run.torch_traj)} torch / {len(run.jax_traj)} jax steps",
                       ok=False)
    errs = {i: abs_rel(run.jax_traj[i], run.torch_traj[i]) for i in steps}
    worst = max(steps, key=lambda i: errs[i][1])
    scale = max(float(np.abs(run.torch_traj[i]).max()) for i in steps)
    return Measure(max(e[0] for e in errs.values()), errs[worst][1],
                   f"{model_note} model; worst at step {worst}; max |x_t| {scale:.2g}")


# ----------------------------------------------------------------------------- checks: weights


def check_round_trip(ctx: Context, net: Net) -> Measure:
    """torch state_dict -> Flax variables -> torch names: bit-exact, same dtypes, loads strictly."""
    rng = _rng("round_trip", net)
    model = torch_unet(ctx, net, seed=6).train()
    with torch.no_grad():  # non-trivial BN buffers and counts
        model(_to_torch(ctx, _normal(rng, (2, net.size, net.size, net.img_channels)), True), _to_torch(ctx, [3, 7]))
    sd = torch_state(model)
    back = convert.to_torch_state_dict(convert.from_torch_state_dict(sd))
    problems = sorted(set(sd) ^ set(back))
    problems += [k for k in sd if k in back and (sd[k].dtype != back[k].dtype or not np.array_equal(sd[k], back[k]))]
    fresh = torch_unet(ctx, net, seed=7)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    err = max(float(np.max(np.abs(sd[k].astype(np.float64) - back[k].astype(np.float64))))
              for k in sd if k in back)
    return Measure(err, 0.0 if err == 0 else math.inf, f"{len(sd)} tensors" + (
        f"; differ: {', '.join(problems[:3])}" if problems else ", bit-exact, load_state_dict(strict) ok"),
                   ok=not problems)


# ----------------------------------------------------------------------------- the case list

# Tolerances: {device: tol}, tol applies to ``metric``. The measured values (CPU, this
# repository's latest runs in parity_tests/results/, *-r2) are in the comments. CUDA tolerances are
# looser where cuDNN/cuBLAS and XLA:GPU pick different algorithms and reduction orders
# (Winograd/implicit-GEMM convolutions, split-K, tree and atomic reductions for the
# BatchNorm statistics and the weight gradients) -- still fp32 with TF32 off, so the loss
# of agreement is a few ulps per reduction, amplified by BatchNorm's 1/std on small batches
# and by the chain's 1/sqrt(alpha_t). Elementwise closed forms (schedules computed on the
# host, q_sample, the embedding) keep the CPU tolerances: IEEE fp32 on both devices (an
# FMA contraction changes at most one rounding; CUDA's sinf/cosf are within 2 ulp).

TOL = {
    # schedules: float64 -> float32 once, so <= 2^-24 = 6.0e-8 elementwise vs the oracle;
    # measured 5.9e-8 vs oracle, 0 vs torch.
    "schedule": {"cpu": 1e-7, "cuda": 1e-7},
    # q_sample: |x_t| <= 5, three fp32 roundings: measured <= 2.9e-7 (oracle), 2.4e-7 (torch).
    "q_sample": {"cpu": 1e-6, "cuda": 1e-6},
    # embedding vs torch / vs the fp32-argument oracle: measured 6.0e-8 / 3.2e-8.
    "embedding": {"cpu": 1e-6, "cuda": 1e-6},
    # vs exact math: the argument t*f_k rounds in fp32 (torch_ref too): <= T*2^-24*(2+2/e)
    # = 1.63e-4 at T = 1000; measured 3.0e-5. Not a jax_ddpm error: torch_ref shows the same.
    "embedding_exact": {"cpu": 1.7e-4, "cuda": 1.7e-4},
    # reverse-step mean and variance vs the float64 oracle, rel to scale; measured <= 1.1e-7.
    "posterior": {"cpu": 1e-6, "cuda": 1e-6},
    "forward": {"cpu": 1e-5, "cuda": 1e-4},      # rel to output scale; measured <= 1.7e-6 (train), 3.7e-7 (eval)
    "bn_stats": {"cpu": 1e-6, "cuda": 1e-5},     # per tensor rel; measured <= 8.1e-7 (worst: up1 running_mean)
    "loss": {"cpu": 1e-6, "cuda": 1e-5},         # |a-b|/|b|; measured <= 4.8e-7
    # per tensor rel; measured <= 8.6e-6 (chapter width; 7.8e-6 before the strided convolutions'
    # custom gradients, parity_tests/results/2026-11-30-cpu-full.* against ...-29-cpu-full-r2.*)
    "grads": {"cpu": 1e-4, "cuda": 1e-3},
    # Adam(1e-3), 10 steps. The 1e-5 goal holds for the optimiser alone (torch's gradients
    # fed to optax): measured 8.4e-6, of which 6.4e-6 is optax's own rounding -- its moment
    # update uses (1 - b2) in float64 while the bias correction 1 - b2**t is float32, and
    # float32(0.999) is 1.3e-8 off, i.e. 1.3e-5 relative to 1 - b2; nu_hat is 1.3e-5 high and
    # every update 6.4e-6 small (torch does both in float64). Tolerance 2e-5: the per-update
    # bound, with room for updates of opposite sign.
    "adam_same_grads": {"cpu": 2e-5, "cuda": 2e-5},
    # Adam's parameters after each step started from torch's state: the 1e-5 rel goal holds
    # for all but a few elements, and cannot hold for those in fp32. Adam maps a gradient
    # component g to about lr*g/(|g|+eps), eps = 1e-8: a component that is ~0 in exact
    # arithmetic carries 1e-9..1e-8 of float noise that differs between two correct programs
    # (the gradients agree to 1e-5 of each tensor's scale, see the grads rows), and its update
    # then differs by up to 2 lr |dg|/(|dg|+eps) -- measured 4e-4 (0.4 lr). So the metric is
    # 'frac': the fraction of elements beyond 1e-5 rel (per tensor scale); and every one of
    # them must have |torch grad| <= 1e-6 = 100 eps, else the row fails. Measured 1.2e-4
    # (30 of 247113 elements, step 1). A wrong lr, b1, b2 or bias correction moves nearly
    # every element. Free-running, the shifted elements feed back: params 2e-3 abs, losses
    # 5e-4 rel at step 10 (in the notes); SGD, without this amplification, stays tight.
    "adam_step_params": {"cpu": 1e-3, "cuda": 1e-2},
    # SGD(0.1), 10 steps free-running (the control): the accumulated update p_i - p_0 per
    # tensor rel; loss |a-b|/|b|. Measured 1.8e-4 / 3.1e-7.
    "sgd_update": {"cpu": 5e-4, "cuda": 5e-3},
    "sgd_loss": {"cpu": 1e-5, "cuda": 1e-4},
    # one reverse step, abs (goal 1e-3): measured <= 1.9e-5 (|x| up to 70 at i = 99, cosine's
    # beta = 0.999 makes 1/sqrt(alpha) = 31.6).
    "sampler": {"cpu": 1e-3, "cuda": 1e-3},
    # whole chain, clamped x_0, abs (goal 1e-3): measured 2.1e-4 (ddpm: the barely trained
    # model lets the cosine chain grow to |x| ~ 3e3; 1e-7 of that lands in the few pixels
    # that end inside +-1), 8.1e-7 (clip_denoised), 1.2e-6 (linear: 46% clamped), 0
    # (chapter_sample: all clamped). CUDA
    # 1e-2: its 10x looser forward scales that directly.
    "chain_x0": {"cpu": 1e-3, "cuda": 1e-2},
    # whole chain, every step's state rel to its scale: the chain is not chaotic, the
    # relative error stays ~1e-6 while |x_t| grows (to 3e3 for the barely trained model,
    # 1e33 for chapter_sample, E2); measured <= 2.1e-6 (1000 steps; 100 steps: <= 8.2e-7).
    "chain_trajectory": {"cpu": 1e-5, "cuda": 1e-4},
    "round_trip": {"cpu": 0.0, "cuda": 0.0},     # exact
}


def _case(group: str, component: str, fn: Callable[..., Measure], metric: str, tol_key: str | None = None,
          slow: bool = False, **params) -> Case:
    return Case(group, component, fn, tuple(params.items()), metric, TOL[tol_key or group], slow)


def _build_cases() -> list[Case]:
    cases: list[Case] = []
    for kind in schedules.SCHEDULES:
        for T in (10, 100, 1000):
            for ref in ("oracle", "torch"):
                cases.append(_case("schedule", f"schedule {kind} T={T} vs {ref}", check_schedule, "rel",
                                   kind=kind, timesteps=T, ref=ref))
    for kind in schedules.SCHEDULES:
        for at in ("0", "T-1", "random"):
            for ref in ("oracle", "torch"):
                cases.append(_case("q_sample", f"q_sample {kind} T=1000 t={at} vs {ref}", check_q_sample, "abs",
                                   kind=kind, timesteps=1000, at=at, ref=ref))
    for ref in ("torch", "oracle"):
        cases.append(_case("embedding", f"embedding dim=32 t<1000 vs {ref}", check_embedding, "abs",
                           dim=32, timesteps=1000, ref=ref))
    cases.append(_case("embedding", "embedding dim=32 t<1000 vs exact (fp32 argument)", check_embedding, "abs",
                       "embedding_exact", dim=32, timesteps=1000, ref="exact"))
    for kind in schedules.SCHEDULES:
        for variance, clip in (("beta_tilde", False), ("beta", False), ("beta_tilde", True)):
            cases.append(_case("posterior", f"reverse-step mean/var {kind} T=100 {variance}"
                                            f"{' clip' if clip else ''} vs oracle", check_posterior_step, "rel",
                               kind=kind, timesteps=100, variance=variance, clip=clip))

    for net in (Net(1, 16, 4), Net(3, 32, 2), Net(1, 64, 2)):
        for mode in ("train", "eval"):
            cases.append(_case("forward", f"unet forward {mode} {net.label}", check_forward, "rel",
                               slow=(net.size == 64 and mode == "eval"), net=net, mode=mode))
    full = Net(3, 32, 2, CHAPTER)
    cases.append(_case("forward", f"unet forward train {full.label}", check_forward, "rel", net=full, mode="train"))
    cases.append(_case("forward", f"unet forward eval {full.label}", check_forward, "rel", slow=True,
                       net=full, mode="eval"))
    cases.append(_case("forward", "unet forward train 3ch 64px b2 chapter width", check_forward, "rel", slow=True,
                       net=Net(3, 64, 2, CHAPTER), mode="train"))
    for net in (Net(3, 32, 2), Net(1, 16, 4)):
        cases.append(_case("bn_stats", f"bn running stats 3 train fwd {net.label}", check_bn_stats, "rel", net=net))
    cases.append(_case("bn_stats", f"bn running stats 3 train fwd {full.label}", check_bn_stats, "rel", slow=True,
                       net=full))

    for net, kind, T, slow in ((Net(3, 16, 4), "linear", 1000, False), (Net(1, 32, 2), "cosine", 100, True)):
        cases.append(_case("loss", f"loss {kind} T={T} {net.label}", check_loss, "rel", slow=slow,
                           net=net, kind=kind, timesteps=T))
        cases.append(_case("grads", f"grad every param {kind} T={T} {net.label}", check_grads, "rel", slow=slow,
                           net=net, kind=kind, timesteps=T))
    cases.append(_case("grads", f"grad every param linear T=1000 {full.label}", check_grads, "rel", slow=True,
                       net=full, kind="linear", timesteps=1000))

    adam_net = SAMPLER_NET
    for part, metric, tol_key in (("loss", "rel", "loss"), ("params", "frac", "adam_step_params"),
                                  ("batch_stats", "rel", "bn_stats")):
        cases.append(_case("train", f"adam 10 steps, each from torch's state: {part} {adam_net.label}",
                           check_train_steps, metric, tol_key, net=adam_net, part=part))
    cases.append(_case("train", f"adam 10 steps, torch's grads -> optax: params {adam_net.label}",
                       check_adam_same_grads, "rel", "adam_same_grads", net=adam_net))
    cases.append(_case("train", f"sgd(0.1) 10 steps free-running: update {adam_net.label}", check_train_steps,
                       "rel", "sgd_update", slow=True, net=adam_net, part="update", optimizer="sgd", mode="free", lr=0.1))
    cases.append(_case("train", f"sgd(0.1) 10 steps free-running: loss {adam_net.label}", check_train_steps,
                       "rel", "sgd_loss", slow=True, net=adam_net, part="loss", optimizer="sgd", mode="free", lr=0.1))

    for step in (99, 50, 0):
        cases.append(_case("sampler", f"ddpm step i={step} beta_tilde", check_sampler_step, "abs",
                           step=step, variance="beta_tilde", clip=False))
    cases.append(_case("sampler", "ddpm step i=99 beta", check_sampler_step, "abs", slow=True, step=99,
                       variance="beta",
                       clip=False))
    cases.append(_case("sampler", "ddpm step i=50 beta_tilde clip", check_sampler_step, "abs", step=50,
                       variance="beta_tilde", clip=True))
    chains = [("ddpm", "beta_tilde", False, "cosine", 100, True, False),
              ("ddpm", "beta", False, "cosine", 100, True, True),
              ("ddpm", "beta_tilde", True, "cosine", 100, True, False),
              ("chapter", "beta_tilde", False, "cosine", 100, True, False),
              ("ddpm", "beta_tilde", False, "linear", 100, True, False),  # stays within |x| ~ 5: x_0 not all clamped
              ("ddpm", "beta_tilde", False, "cosine", 100, False, True),
              ("ddpm", "beta_tilde", False, "linear", 1000, True, True)]
    for sampler, variance, clip, kind, T, trained, slow in chains:
        label = "chapter_sample" if sampler == "chapter" else f"ddpm {variance}{' clip' if clip else ''}"
        label = f"chain {T} steps {label} {kind}{'' if trained else ' random-init'}"
        for part, metric in (("x0", "abs"), ("trajectory", "rel")):
            cases.append(_case("sampler", f"{label}: {part}", check_chain, metric, f"chain_{part}", slow=slow,
                               part=part, sampler=sampler, variance=variance, clip=clip, kind=kind, timesteps=T,
                               trained=trained))

    for net in (Net(1, 16, 2), Net(3, 32, 2, CHAPTER)):
        cases.append(_case("round_trip", f"weights torch->flax->torch {net.label}", check_round_trip, "abs", net=net))
    return cases


CASES: list[Case] = _build_cases()
GROUPS = tuple(dict.fromkeys(c.group for c in CASES))


def cases(group: str | None = None, full: bool = True, only: str | None = None) -> list[Case]:
    """The cases of ``group`` (all when None); without ``full`` the slow ones are left out."""
    return [c for c in CASES if (group is None or c.group == group) and (full or not c.slow)
            and (only is None or only in c.component)]


def find_case(component: str) -> Case:
    """The case named ``component`` exactly."""
    for c in CASES:
        if c.component == component:
            return c
    raise KeyError(component)


def pytest_params(*groups: str) -> list:
    """``CASES`` of ``groups`` as ``pytest.param``s with ids; slow cases get ``@pytest.mark.slow``."""
    import pytest

    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else [])
            for g in groups for c in cases(g)]


# ----------------------------------------------------------------------------- report


def versions() -> dict[str, str]:
    import flax
    import jaxlib
    import optax

    out = {"python": platform.python_version(), "platform": platform.platform(), "numpy": np.__version__,
           "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
           "torch": torch.__version__ if torch is not None else "missing"}
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out["git_commit"] = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = "unknown"
    return out


def device_names(ctx: Context) -> dict[str, str]:
    torch_name = torch.cuda.get_device_name(0) if ctx.device == "cuda" else platform.processor() or "cpu"
    return {"torch": f"{ctx.torch_device} ({torch_name})", "jax": f"{ctx.jax_device.platform}:{ctx.jax_device.id} "
                                                                  f"({ctx.jax_device.device_kind})"}


def render_markdown(meta: Mapping[str, Any], rows: Sequence[Row]) -> str:
    """The printed table: a header with date, device and versions, then one row per check."""
    v = meta["versions"]
    failed = [r for r in rows if not r.passed]
    lines = [f"# Parity: jax_ddpm vs torch_ref (and float64 oracle) on {meta['device']}", "",
             f"- date: {meta['date']}",
             f"- devices: torch {meta['devices']['torch']}, jax {meta['devices']['jax']}",
             "- versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "jax", "jaxlib", "flax", "optax", "torch",
                                                                "numpy")),
             f"- platform: {v['platform']}; git {v.get('git_commit', 'unknown')}",
             f"- precision: fp32; torch TF32 off; jax default_matmul_precision=highest; "
             f"{'full' if meta['full'] else 'default'} set, {len(rows)} checks in {meta['wall_s']:.0f} s",
             f"- result: {len(rows) - len(failed)}/{len(rows)} passed", "",
             "rel = max|a-b| / max|b| (per tensor, worst tensor, for grads/params/BN stats); schedules: "
             "max elementwise |a-b|/|b|. tol applies to the column named after it.", "",
             "| component | max abs err | max rel err | tol | pass | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.component} | {_fmt(r.abs_err)} | {_fmt(r.rel_err)} | {_fmt(r.tol)} ({r.metric}) | "
                     f"{'yes' if r.passed else '**NO**'} | {r.note} |")
    return "\n".join(lines) + "\n"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump; main() turns it into exit 2
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jax-ddpm parity", description="Run every parity check (torch_ref vs jax_ddpm vs float64 "
                                                    "oracle) on one device and print the table. Exit 1 if any fails.")
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda}",
                   help="where both frameworks run (default auto: cuda when torch and JAX both see a GPU)")
    p.add_argument("--json", metavar="FILE", help="also write the rows and versions to FILE (must not exist)")
    p.add_argument("--full", action="store_true", help="include the slow checks (pytest -m slow)")
    p.add_argument("--only", metavar="TEXT", help="run only checks whose component contains TEXT")
    return p


def _check_json_path(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path):
        raise _UsageError(f"--json {path}: file exists; refusing to overwrite it")
    if not os.path.isdir(parent):
        raise _UsageError(f"--json {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise _UsageError(f"--json {path}: folder {parent} is not writable")


def main(argv: Sequence[str] | None = None) -> int:
    """``jax-ddpm parity [--device cpu|cuda] [--json FILE] [--full] [--only TEXT]`` -> 0, 1 (a check failed) or 2."""
    prog = "jax-ddpm parity"
    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.device not in DEVICES:
            raise _UsageError(f"--device must be one of {', '.join(DEVICES)}, got {args.device!r}")
        if args.json:
            _check_json_path(args.json)
        selected = cases(full=args.full, only=args.only)
        if not selected:
            raise _UsageError(f"--only {args.only!r} matches no check")
        ctx = make_context(args.device)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (_UsageError, DeviceUnavailable) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = []
    for i, case in enumerate(selected, 1):
        row = run_case(ctx, case)
        rows.append(row)
        print(f"[{i}/{len(selected)}] {'ok  ' if row.passed else 'FAIL'} {row.component} ({row.seconds:.1f} s)",
              file=sys.stderr, flush=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": ctx.device, "devices": device_names(ctx), "versions": versions(), "full": bool(args.full),
            "only": args.only, "wall_s": time.perf_counter() - t0}
    print(render_markdown(meta, rows), end="")
    if args.json:
        payload = dict(meta, passed=all(r.passed for r in rows), rows=[r.as_dict() for r in rows])
        tmp = f"{args.json}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1, allow_nan=True)
            f.write("\n")
        os.replace(tmp, args.json)
    return 0 if all(r.passed for r in rows) else 1
