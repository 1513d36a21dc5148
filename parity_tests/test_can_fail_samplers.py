"""The suite can fail: the samplers' mutants (see test_can_fail.py for the rest).

Mutants of jax_ddpm.samplers / parameterization; each is patched where it is looked up (the
sampler modules import their helpers by name) and the same chain case the parity suite runs
goes red on a fresh context. Measured factors (row error / tolerance) in the docstrings.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jax_ddpm import parameterization
from jax_ddpm import samplers as samplers_pkg
from jax_ddpm.samplers import ddim as ddim_module, dpmpp_2m as dpmpp_module, grids as grids_module
from parity_tests.references import REFERENCES
from parity_tests.test_can_fail import _fails, _run

DDIM_ROW = "chain ddim linear T=100 n=13 timestep_spacing=linspace eps vs oracle"
DDPM_ROW = "chain ddpm linear T=100 n=13 eps vs oracle"


def test_sampler_wrong_abar_prev_fails(monkeypatch, fresh_ctx):
    """abar_prev taken one grid point too far (the point below the next one): ddim and respaced
    ddpm go red (measured 2.0e5x and 1.6e5x)."""
    real = grids_module.grid_abar

    def skipping(schedule, grid):
        abar, om, abar_prev, om_prev = real(schedule, grid)
        return (abar, om, jnp.concatenate([jnp.ones((1,), abar.dtype), abar_prev[:-1]]),
                jnp.concatenate([jnp.zeros((1,), om.dtype), om_prev[:-1]]))

    monkeypatch.setattr(grids_module, "grid_abar", skipping)
    monkeypatch.setattr(ddim_module, "grid_abar", skipping)
    for component in (DDIM_ROW, DDPM_ROW):
        _fails(_run(fresh_ctx, component), 1000)


def test_sampler_v_sign_flip_fails(monkeypatch, fresh_ctx):
    """v read as sigma x0 - alpha eps (the sign flipped): the v rows go red, float32 and float64
    (measured 3.8e5x, 4.0e5x, 5.0e12x in float64); an eps row stays green."""
    real_x0, real_eps = parameterization.to_x0, parameterization.to_eps

    def to_x0(x_t, out, alpha, sigma, prediction="eps"):
        return real_x0(x_t, -out if prediction == "v" else out, alpha, sigma, prediction)

    def to_eps(x_t, out, alpha, sigma, prediction="eps"):
        return real_eps(x_t, -out if prediction == "v" else out, alpha, sigma, prediction)

    for module in (parameterization, ddim_module, dpmpp_module):
        monkeypatch.setattr(module, "to_x0", to_x0)
    for module in (parameterization, ddim_module):
        monkeypatch.setattr(module, "to_eps", to_eps)
    for component in ("chain ddim linear T=100 n=10 eta=0.5 steps_offset=1 clip_denoised=True v vs oracle",
                      "chain ddpm cosine T=100 n=13 variance=beta clip_denoised=True v vs oracle",
                      "chain dpmpp_2m cosine T=100 n=13 timestep_spacing=leading v float64 vs oracle"):
        _fails(_run(fresh_ctx, component), 1000)
    row = _run(fresh_ctx, DDIM_ROW)
    assert row.passed, row.message()


def test_sampler_first_order_where_second_is_due_fails(monkeypatch, fresh_ctx):
    """DPM-Solver++ taking every step first order (DDIM) where Algorithm 2 is second order:
    red vs the oracle (measured 1.4e4x) and, where diffusers is installed, vs its 2M (1.7e3x)."""
    monkeypatch.setattr(dpmpp_module, "second_order_steps", lambda n, *a, **k: np.zeros(n, bool))
    _fails(_run(fresh_ctx, "chain dpmpp_2m linear T=100 n=13 eps vs oracle"), 100)
    if not REFERENCES["diffusers"].unavailable():
        _fails(_run(fresh_ctx, "chain dpmpp_2m linear T=100 n=13 eps vs diffusers"), 10)


def test_sampler_dpmpp_clip_ignored_fails(monkeypatch, fresh_ctx):
    """DPM-Solver++ with clip_denoised that does not clip its data predictions: red vs the oracle
    and, where diffusers is installed, vs its thresholding (measured 4.0e4x and 5.0e3x); an
    unclipped row stays green."""
    real = dpmpp_module.dpmpp_2m_sample

    def unclipped(*args, clip_denoised=False, **kwargs):
        return real(*args, **kwargs)

    monkeypatch.setattr(dpmpp_module, "dpmpp_2m_sample", unclipped)
    monkeypatch.setitem(samplers_pkg._SAMPLERS, "dpmpp_2m", unclipped)
    _fails(_run(fresh_ctx, "chain dpmpp_2m linear T=100 n=20 clip_denoised=True eps vs oracle"), 1000)
    if not REFERENCES["diffusers"].unavailable():
        _fails(_run(fresh_ctx, "chain dpmpp_2m linear T=100 n=20 clip_denoised=True eps vs diffusers"), 100)
    row = _run(fresh_ctx, "chain dpmpp_2m linear T=100 n=13 eps vs oracle")
    assert row.passed, row.message()


def test_sampler_grid_mismatch_is_caught(monkeypatch, fresh_ctx):
    """A grid off by one timestep (leading spacing starting at 1): the row fails on the timesteps
    alone, before any tolerance."""
    real = grids_module.timestep_grid
    monkeypatch.setattr(ddim_module, "timestep_grid", lambda T_, n=None, spacing="leading", offset=0: real(
        T_, n, spacing, offset) + (spacing == "linspace"))
    row = _run(fresh_ctx, DDIM_ROW)
    assert not row.passed and "timesteps differ" in row.note, row.message()
