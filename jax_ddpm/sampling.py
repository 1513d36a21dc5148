"""Sampling a model: the denoiser from a model and its variables, and one jitted chain.

The samplers themselves live in :mod:`jax_ddpm.samplers` (one module each, one registry);
their names are re-exported here.
"""
from __future__ import annotations

from typing import Callable

import jax

from .samplers import SAMPLERS, EpsFn, chapter_sample, ddpm_sample, get_sampler, is_key as _is_key
from .samplers import scan_timesteps as _scan

# BatchNorm statistics while sampling: the sample batch's (the command's default) or the running ones
BN_STATS = ("batch", "running")


def model_eps_fn(model, variables) -> EpsFn:
    """The UNet in eval mode (running BatchNorm statistics) as an ``eps_fn``."""
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


def make_sample_fn(model, sampler: str = "ddpm", bn_stats: str = "running", **options) -> Callable:
    """Returns ``sample(variables, schedule, x_T, noise) -> x_0``, jitted as one program.

    ``bn_stats``: ``'running'`` (eval mode, :func:`model_eps_fn`) or ``'batch'``
    (:func:`model_eps_fn_batch_stats`). A model without BatchNorm (variables without
    ``batch_stats``) always samples in eval mode: ``bn_stats`` does not apply to it, and its
    dropout stays off.
    """
    fn = get_sampler(sampler)
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
    make_eps_fn = model_eps_fn if bn_stats == "running" else model_eps_fn_batch_stats

    @jax.jit
    def sample(variables, schedule, x_T, noise):
        eps_fn_of = make_eps_fn if "batch_stats" in variables else model_eps_fn
        return fn(eps_fn_of(model, variables), schedule, x_T, noise, **options)

    return sample


__all__ = ["BN_STATS", "EpsFn", "SAMPLERS", "chapter_sample", "ddpm_sample", "get_sampler", "make_sample_fn",
           "model_eps_fn", "model_eps_fn_batch_stats"]
