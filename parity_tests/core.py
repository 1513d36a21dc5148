"""The parity suite's core: what a check measures (``Measure``), one table row (``Row``), a
case (``Case``: a check, its parameters, its reference and tolerance key), ``run_case``, and
the error metrics every check uses.

Error definitions (``a`` = jax_ddpm, ``b`` = the reference):

- ``abs``: ``max |a - b|`` over every element.
- ``rel`` (relative to output scale): ``max |a - b| / max |b|``, one number per array.
- ``elementwise rel`` (schedules only): ``max |a - b| / |b|`` over the elements (0/0 = 0).
- ``per tensor`` (gradients, parameters, BatchNorm statistics): the ``rel`` above for each
  tensor separately, then the maximum over tensors; the note names the worst tensor.
  A row's ``rel`` column is its own definition (see the case's ``metric``); its ``abs``
  column is always the plain ``max |a - b|``.
- ``frac`` (Adam parameters only): the fraction of elements beyond 1e-5 rel; every such
  element must be explained by gradient noise through Adam's sensitivity
  (``parity_tests/tolerances.py``).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from .references import get_reference
from .tolerances import TOL_DEVICES, tolerance

if TYPE_CHECKING:  # pragma: no cover
    from .context import Context

METRICS = ("abs", "rel", "frac")


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
    skipped: bool = False  # the reference cannot run here (not installed): neither passed nor failed

    def message(self) -> str:
        verdict = "skipped" if self.skipped else "ok" if self.passed else "FAILED"
        return (f"{self.component}: {verdict}: max abs {fmt(self.abs_err)}, max rel {fmt(self.rel_err)}; "
                f"{self.metric} {fmt(self.measured)} vs tol {fmt(self.tol)}" + (f" ({self.note})" if self.note else ""))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Case:
    """A check run against one reference, with its parameters.

    Attributes:
      group: the pytest file's group ('schedule', 'forward', 'train', ...).
      component: the row's name, unique over the suite.
      fn: ``fn(ctx, ref, **params) -> Measure``; ``ref`` is the reference's adapter.
      params: the keyword arguments, as ``((name, value), ...)``.
      metric: what the tolerance applies to: 'abs', 'rel' or 'frac'.
      key: the component in the tolerance table (``tolerances.tolerance``), and what
        ``Reference.supports`` is asked: 'schedule', 'forward', 'chain_x0', ...
      reference: the name in ``references.REFERENCES`` ('oracle', 'torch').
      dtype: the compute dtype of jax_ddpm's side.
      slow: deselected by default (``pytest -m slow``, ``--full``).
    """

    group: str
    component: str
    fn: Callable[..., Measure]
    params: tuple
    metric: str
    key: str
    reference: str
    dtype: str = "float32"
    slow: bool = False

    @property
    def id(self) -> str:
        return self.component.replace(" ", "_")

    def tolerance(self, device: str) -> float:
        """The tolerance on ``device``; KeyError (naming the combination) if the table has none."""
        return tolerance(self.key, self.reference, self.dtype, device)

    @property
    def tol(self) -> dict[str, float]:
        """``{device: tolerance}`` for every device of the table."""
        return {d: self.tolerance(d) for d in TOL_DEVICES}

    def supported(self) -> bool:
        """Whether the case's reference can compute its component (False too when it is unavailable)."""
        return get_reference(self.reference).supports(self.key)

    def unavailable(self) -> str | None:
        """Why the case's reference cannot run here (one line), or None."""
        return get_reference(self.reference).unavailable()


def fmt(x: float) -> str:
    """A number for the table: 3 significant digits, '0' for zero, 'nan' for NaN/None."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return "0" if x == 0 else f"{x:.2e}"


def run_case(ctx: "Context", case: Case) -> Row:
    """Runs one case on ``ctx``'s device. A check that raises gives a failed row naming the error.

    A case whose reference does not support its component is a failed row too (``cases()``
    and ``pytest_params()`` leave such cases out or skip them; running one is a mistake). A
    case whose reference is unavailable here (diffusers not installed) is a skipped row,
    naming why. The case's dtype is the JAX side's (float64: x64 enabled, ``Context.scope``).
    """
    t0 = time.perf_counter()
    tol = case.tolerance(ctx.device)
    ref = get_reference(case.reference)
    why = ref.unavailable()
    if why:
        return Row(case.component, float("nan"), float("nan"), tol, case.metric, False, why, skipped=True)
    if not ref.supports(case.key):
        return Row(case.component, float("nan"), float("nan"), tol, case.metric, False,
                   f"reference {ref.name!r} does not support {case.key!r}")
    try:
        with ctx.scope(case.dtype):
            m = case.fn(ctx, ref, **dict(case.params))
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


def worst_over_steps(measures: Sequence[Measure], metric: str = "rel") -> Measure:
    """The step with the largest ``metric`` error, with abs/rel maximised over all steps."""
    i = int(np.argmax([m.rel_err if metric == "rel" else m.abs_err for m in measures]))
    return dataclasses.replace(measures[i], abs_err=max(m.abs_err for m in measures),
                               rel_err=max(m.rel_err for m in measures), note=f"{measures[i].note} at step {i + 1}")


__all__ = ["Case", "METRICS", "Measure", "Row", "abs_rel", "elementwise_rel", "fmt", "per_tensor", "run_case",
           "worst_over_steps"]
