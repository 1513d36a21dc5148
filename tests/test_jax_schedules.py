"""jax_ddpm.schedules against the float64 NumPy oracle (parity_tests/oracle.py)."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jax_ddpm import schedules
from parity_tests import oracle
from parity_tests.variants import VARIANT_IDS, VARIANTS

KINDS = ("linear", "cosine")
FIELDS = [f.name for f in dataclasses.fields(schedules.DiffusionSchedule)]


def _elementwise_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = np.abs(a - b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.max(np.where(diff == 0, 0.0, diff / np.abs(b))))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("timesteps", [2, 10, 100, 1000])
def test_make_schedule_matches_float64_oracle(kind, timesteps):
    s = schedules.make_schedule(timesteps, kind)
    ref = oracle.schedule(kind, timesteps)
    assert s.timesteps == timesteps
    for name in FIELDS:
        a = np.asarray(getattr(s, name))
        assert a.dtype == np.float32 and a.shape == (timesteps,), name
        # float64 computed, stored once as float32: <= 2^-24 = 6e-8 relative (measured 5.96e-8)
        assert _elementwise_rel(a, ref[name]) <= 1e-7, name


@pytest.mark.parametrize("kind", KINDS)
def test_schedule_arrays_float64_match_oracle(kind):
    betas = schedules.linear_beta_schedule(1000) if kind == "linear" else schedules.cosine_beta_schedule(1000)
    assert betas.dtype == np.float64
    got, ref = schedules.schedule_arrays(betas), oracle.schedule(kind, 1000)
    for name in FIELDS:
        # two float64 evaluations of the same closed form, associated differently: the cosine
        # beta = 1 - abar_{t+1}/abar_t cancels at beta ~ 4e-5, amplifying 1 ulp by 2.5e4:
        # measured 2.0e-12
        assert _elementwise_rel(got[name], ref[name]) <= 1e-10, name


@pytest.mark.parametrize("kind", KINDS)
def test_schedule_shape_properties(kind):
    s = jax.tree_util.tree_map(np.asarray, schedules.make_schedule(1000, kind))
    assert np.all(s.betas > 0) and np.all(s.betas <= 0.999)
    assert np.all(np.diff(s.alphas_cumprod) < 0) and s.alphas_cumprod_prev[0] == 1.0
    assert s.posterior_variance[0] == 0.0 and np.isfinite(s.posterior_log_variance_clipped).all()


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_schedule_is_a_pytree_through_jit(variant):
    s = schedules.make_schedule(10, "cosine")
    assert len(jax.tree_util.tree_leaves(s)) == len(FIELDS)
    out = variant(lambda sched: sched.replace(betas=sched.betas * 2))(s)
    np.testing.assert_array_equal(np.asarray(out.betas), 2 * np.asarray(s.betas))
    np.testing.assert_array_equal(np.asarray(out.alphas), np.asarray(s.alphas))


@pytest.mark.parametrize("timesteps", [0, 1, -1, True, 1.5, "10", None])
def test_make_schedule_rejects_bad_timesteps(timesteps):
    """T = 1 too: one step has no posterior (the clipped log variance repeats entry 1)."""
    with pytest.raises(ValueError, match="timesteps must be an integer >= 2"):
        schedules.make_schedule(timesteps, "linear")


@pytest.mark.parametrize("kind", ["quadratic", "Linear", ""])
def test_make_schedule_rejects_unknown_kind(kind):
    with pytest.raises(ValueError, match="schedule must be one of"):
        schedules.make_schedule(10, kind)
