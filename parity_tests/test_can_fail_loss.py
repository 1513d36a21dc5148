"""The suite can fail: the min-SNR loss weighting's mutants (see test_can_fail.py for the rest).

Each breaks one piece of ``jax_ddpm.diffusion.min_snr_weights`` / ``prediction_loss`` (or
torch_ref's), patched where it is looked up, and the row the parity suite runs goes red on a
fresh context. Measured factors (row error / tolerance) in the docstrings.
"""
from __future__ import annotations

import jax.numpy as jnp

from jax_ddpm import diffusion
from parity_tests.test_can_fail import _fails, _run

ROW = "min-SNR 5 weights {} cosine T=200 vs {}"
LOSS_ROW = "min-SNR 5 loss of given outputs {} cosine T=200 vs {}"


def test_weights_not_normalised_fails(monkeypatch, fresh_ctx):
    """min(SNR, gamma) without the division by its mean over t (diffusers' scripts' form): every
    prediction's row red vs the oracle (measured 1.7e5x eps, 9.9e5x x0, 6.7e5x v)."""
    def unnormalised(s, g, p="eps"):
        snr = jnp.square(s.sqrt_alphas_cumprod / s.sqrt_one_minus_alphas_cumprod)
        return jnp.minimum(snr, g) / {"x0": 1.0, "eps": snr, "v": snr + 1}[p]

    monkeypatch.setattr(diffusion, "min_snr_weights", unnormalised)
    for prediction in ("eps", "x0", "v"):
        _fails(_run(fresh_ctx, ROW.format(prediction, "oracle")))


def test_eps_weights_as_x0_fails(monkeypatch, fresh_ctx):
    """The eps weights without the division by SNR (the x0 form): red vs the oracle and torch_ref
    (1.6e9x each)."""
    real = diffusion.min_snr_weights
    monkeypatch.setattr(diffusion, "min_snr_weights", lambda s, g, p="eps": real(s, g, "x0" if p == "eps" else p))
    for ref in ("oracle", "torch"):
        _fails(_run(fresh_ctx, ROW.format("eps", ref)))


def test_v_weights_over_snr_fails(monkeypatch, fresh_ctx):
    """The v weights divided by SNR instead of SNR + 1 (the eps form): red vs the oracle (6.5e12x)."""
    real = diffusion.min_snr_weights
    monkeypatch.setattr(diffusion, "min_snr_weights", lambda s, g, p="eps": real(s, g, "eps" if p == "v" else p))
    _fails(_run(fresh_ctx, ROW.format("v", "oracle")))


def test_weights_one_t_late_fails(monkeypatch, fresh_ctx):
    """The weight of t + 1 at t (SNR off by one step): red vs the oracle (1.0e6x)."""
    real = diffusion.min_snr_weights

    def late(s, g, p="eps"):
        w = real(s, g, p)
        return jnp.concatenate([w[1:], w[-1:]])

    monkeypatch.setattr(diffusion, "min_snr_weights", late)
    _fails(_run(fresh_ctx, ROW.format("x0", "oracle")))


def test_loss_ignoring_its_weights_fails(monkeypatch, fresh_ctx):
    """prediction_loss that drops snr_gamma (the unweighted MSE): the given-outputs rows red (1.9e4x x0,
    9.7e4x eps)."""
    real = diffusion.prediction_loss
    monkeypatch.setattr(diffusion, "prediction_loss",
                        lambda o, s, x, t, n, prediction="eps", snr_gamma=0.0: real(o, s, x, t, n, prediction))
    for prediction in ("x0", "eps"):
        _fails(_run(fresh_ctx, LOSS_ROW.format(prediction, "oracle")))


def test_torch_ref_loss_ignoring_its_weights_fails(monkeypatch, fresh_ctx):
    """torch_ref's loss_fn that drops snr_gamma: its row red (8.1e4x)."""
    from torch_ref import training as torch_training

    real = torch_training.loss_fn
    monkeypatch.setattr(torch_training, "loss_fn", lambda m, d, x, t, n, snr_gamma=0.0: real(m, d, x, t, n))
    _fails(_run(fresh_ctx, LOSS_ROW.format("eps", "torch")))
