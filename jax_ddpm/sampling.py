"""Sampling a model: the denoiser from a model and its variables, and one jitted chain.

The samplers themselves live in :mod:`jax_ddpm.samplers` (one module each, one registry);
their names are re-exported here.
"""
from __future__ import annotations

from typing import Callable

import jax

from .parameterization import PREDICTIONS, check_prediction
from .samplers import (SAMPLERS, EpsFn, ModelFn, chapter_sample, check_options, ddim_sample, ddpm_sample,
                       dpmpp_2m_sample, get_sampler, is_key as _is_key)
from .samplers import scan_timesteps as _scan

# BatchNorm statistics while sampling: the sample batch's (the command's default) or the running ones
BN_STATS = ("batch", "running")


def model_eps_fn(model, variables) -> EpsFn:
    """The UNet in eval mode (running BatchNorm statistics) as an ``eps_fn`` (a ``model_fn``:
    its output is whatever the model predicts)."""
    return lambda x, t: model.apply(variables, x, t, train=False)


def model_eps_fn_batch_stats(model, variables) -> EpsFn:
    """The UNet normalising with the statistics of the batch being sampled, as an ``eps_fn``.

    BatchNorm runs in training mode over the whole sample batch (all images at the same
    ``t``); the running statistics are neither used nor changed. The chapter's U-Net applies
    one BatchNorm to two convolutions (erratum E5), so its running statistics are a blend of
    two layers' and eval mode normalises both layers wrongly; batch statistics avoid that,
    but each image then depends on the rest of the batch (use batches of 16 or more).
    """

    def eps_fn(x, t):
        eps, _ = model.apply(variables, x, t, train=True, mutable=["batch_stats"])
        return eps

    return eps_fn


def make_sample_fn(model, sampler: str = "ddpm", bn_stats: str = "running", *, prediction: str = "eps",
                   num_steps: int | None = None, **options) -> Callable:
    """Returns ``sample(variables, schedule, x_T, noise) -> x_0``, jitted as one program.

    ``sampler`` is a name in ``SAMPLERS``; ``prediction`` (eps, x0 or v: what the model
    outputs), ``num_steps`` (None: all T) and ``options`` go to it (see
    :mod:`jax_ddpm.samplers`); ``noise`` is a key or ``[num_steps, *x_T.shape]``. The defaults
    are the T-step ddpm chain of an eps model, the program this function always built. A
    bad option raises ValueError when ``sample`` is first called (it needs the schedule's T;
    :func:`jax_ddpm.samplers.check_options` checks beforehand).

    ``bn_stats``: ``'running'`` (eval mode, :func:`model_eps_fn`) or ``'batch'``
    (:func:`model_eps_fn_batch_stats`). A model without BatchNorm (variables without
    ``batch_stats``) always samples in eval mode: ``bn_stats`` does not apply to it, and its
    dropout stays off.
    """
    fn = get_sampler(sampler)
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
    check_prediction(prediction)
    make_eps_fn = model_eps_fn if bn_stats == "running" else model_eps_fn_batch_stats
    settings = dict(options)
    if prediction != "eps":
        settings["prediction"] = prediction
    if num_steps is not None:
        settings["num_steps"] = num_steps

    @jax.jit
    def sample(variables, schedule, x_T, noise):
        eps_fn_of = make_eps_fn if "batch_stats" in variables else model_eps_fn
        return fn(eps_fn_of(model, variables), schedule, x_T, noise, **settings)

    return sample


__all__ = ["BN_STATS", "EpsFn", "ModelFn", "PREDICTIONS", "SAMPLERS", "chapter_sample", "check_options", "ddim_sample",
           "ddpm_sample", "dpmpp_2m_sample", "get_sampler", "make_sample_fn", "model_eps_fn",
           "model_eps_fn_batch_stats"]
