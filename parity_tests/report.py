"""Backward-compatible names for code written before the suite became a package.

``from parity_tests import report`` keeps working (``report.run_case``, ``report.CASES``,
``report.pytest_params``, ``report.make_context``, ``report.main``, ...); new code imports
from the modules themselves:

- ``core``: Measure, Row, Case, run_case and the metrics;
- ``context``: the device (Context, make_context, DeviceUnavailable, ...);
- ``references``: one adapter per reference (``REFERENCES``);
- ``checks``: the checks, one per component;
- ``tolerances``: the table keyed by (component, reference, dtype, device);
- ``cases``: the case list; ``render``: the Markdown table; ``cli``: ``main``.

``TOL`` is now ``tolerances.TOLERANCES`` (keyed by the 4-tuple, not by group). These are
re-exports: to monkeypatch what a check uses, patch the defining module (e.g.
``jax_side.JaxEmbedding``), not this one.
"""
from __future__ import annotations

from . import jax_side
from .cases import CASES, GROUPS, cases, find_case, pytest_params
from .checks.closed_forms import check_embedding, check_posterior_step, check_q_sample, check_schedule
from .checks.convert import check_round_trip
from .checks.forward import check_bn_stats, check_forward
from .checks.sampling import check_chain, check_sampler_step
from .checks.training import check_adam_same_grads, check_grads, check_loss, check_train_steps
from .cli import main
from .context import (DEVICES, Context, DeviceUnavailable, cuda_unavailable_reason, make_context, resolve_device,
                      set_fp32_precision)
from .core import Case, Measure, Row, abs_rel, elementwise_rel, fmt, per_tensor, run_case
from .inputs import CHAPTER, SAMPLER_NET, SAMPLER_TRAIN_STEPS, SMALL, Net
from .jax_side import JaxEmbedding
from .references import REFERENCES
from .render import device_names, render_markdown, versions
from .tolerances import ADAM_GOAL, ADAM_GRAD_REL, TOLERANCES, tolerance

TOL = TOLERANCES
jax_fns = jax_side.fns
jax_schedule = jax_side.schedule

__all__ = ["ADAM_GOAL", "ADAM_GRAD_REL", "CASES", "CHAPTER", "Case", "Context", "DEVICES", "DeviceUnavailable",
           "GROUPS", "JaxEmbedding", "Measure", "Net", "REFERENCES", "Row", "SAMPLER_NET", "SAMPLER_TRAIN_STEPS",
           "SMALL", "TOL", "TOLERANCES", "abs_rel", "cases", "check_adam_same_grads", "check_bn_stats", "check_chain",
           "check_embedding", "check_forward", "check_grads", "check_loss", "check_posterior_step", "check_q_sample",
           "check_round_trip", "check_sampler_step", "check_schedule", "check_train_steps", "cuda_unavailable_reason",
           "device_names", "elementwise_rel", "find_case", "fmt", "jax_fns", "jax_schedule", "main", "make_context",
           "per_tensor", "pytest_params", "render_markdown", "resolve_device", "run_case", "set_fp32_precision",
           "tolerance", "versions"]
