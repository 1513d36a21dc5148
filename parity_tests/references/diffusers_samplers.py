"""diffusers' schedulers stepping the analytic denoiser: DDPMScheduler, DDIMScheduler and
DPMSolverMultistepScheduler (diffusers 0.42.1, torch float32 on ``ctx.torch_device``).

Each chain is the pipeline's loop: ``set_timesteps(n)``, then for each ``t`` in
``scheduler.timesteps`` the model output ``A[t] x + B[t] mu`` (``oracle_samplers``' exact
posterior mean, its float64 tables rounded to float32, as jax_ddpm's side gets them) and
``scheduler.step``. Noise row i (the i-th grid timestep ascending) is the noise of the step
from that timestep:

- DDPMScheduler.step takes no noise: ``diffusers._ddpm_step`` writes its last lines out,
  checked bit-exact against ``step()`` fed its own replayed draw, then feeds row i;
- DDIMScheduler.step: ``variance_noise=row i``; ``use_clipped_model_output=clip_sample``
  (jax_ddpm's ddim takes eps from the clipped x0);
- DPMSolverMultistepScheduler (``dpmsolver++``, order 2, ``midpoint``): deterministic;
  ``clip_denoised`` -> ``thresholding=True, sample_max_value=1.0`` (its dynamic threshold s is
  clamped to [1, 1]: plain clipping of each data prediction).

The schedulers get jax_ddpm's option names mapped to diffusers' (``variance`` beta_tilde /
beta -> ``fixed_small`` / ``fixed_large``, ``clip_denoised`` -> ``clip_sample``, prediction
eps / x0 / v -> ``epsilon`` / ``sample`` / ``v_prediction``); ``timestep_spacing``,
``steps_offset``, ``eta``, ``lower_order_final`` and ``final_sigmas_type`` are diffusers' own.
The final state is clamped to [-1, 1] as the pipelines do.
"""
from __future__ import annotations

import numpy as np

from .oracle_samplers import ChainSpec, denoiser_tables, gaussian_mu

PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
VARIANCE_TYPES = {"beta_tilde": "fixed_small", "beta": "fixed_large"}
DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "dpmpp_2m": "linspace"}


def scheduler(spec: ChainSpec):
    """The diffusers scheduler for ``spec``, ``set_timesteps`` done (schedulers are stateful: one per chain)."""
    import diffusers

    opts = spec.opts
    common = dict(num_train_timesteps=spec.timesteps, beta_schedule=BETA_SCHEDULES[spec.kind], beta_start=1e-4,
                  beta_end=0.02, prediction_type=PREDICTION_TYPES[spec.prediction],
                  timestep_spacing=opts.get("timestep_spacing", DEFAULT_SPACING[spec.sampler]),
                  steps_offset=opts.get("steps_offset", 0))
    if spec.sampler == "ddpm":
        s = diffusers.DDPMScheduler(**common, variance_type=VARIANCE_TYPES[opts.get("variance", "beta_tilde")],
                                    clip_sample=opts.get("clip_denoised", False))
    elif spec.sampler == "ddim":
        s = diffusers.DDIMScheduler(**common, clip_sample=opts.get("clip_denoised", False), set_alpha_to_one=True)
    elif spec.sampler == "dpmpp_2m":
        s = diffusers.DPMSolverMultistepScheduler(
            **common, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
            lower_order_final=opts.get("lower_order_final", True),
            final_sigmas_type=opts.get("final_sigmas_type", "zero"),
            # thresholding with sample_max_value 1: the threshold s is clamped to [1, 1], plain clipping
            thresholding=opts.get("clip_denoised", False), sample_max_value=1.0)
    else:
        raise ValueError(f"diffusers has no {spec.sampler!r} scheduler")
    s.set_timesteps(spec.n)
    return s


def run_chain(ctx, spec: ChainSpec, x_T: np.ndarray, noise: np.ndarray):
    """(clamped x_0 [B, H, W, C], {t: the state fed to the model}) from diffusers' scheduler."""
    import torch

    from .diffusers import _ddpm_step
    from .torch_ref import to_np, to_torch

    sched = scheduler(spec)
    A, B = (torch.from_numpy(v.astype(np.float32)) for v in denoiser_tables(spec.kind, spec.timesteps,
                                                                           spec.prediction))
    mu = to_torch(ctx, gaussian_mu(spec.shape[1:]).astype(np.float32)[None], nchw=True)  # [1, C, H, W]
    ts = [int(t) for t in sched.timesteps]
    row = {t: i for i, t in enumerate(sorted(ts))}
    z = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 1, 4, 2, 3))).to(ctx.torch_device)  # [n, B, C, H, W]
    x = to_torch(ctx, x_T, nchw=True)
    generator = torch.Generator(device="cpu").manual_seed(0)  # DDPM step()'s own draw, replayed
    traj: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for t in sched.timesteps:
            ti = int(t)
            traj[ti] = to_np(x, nhwc=True)
            out = A[ti] * x + B[ti] * mu
            if spec.sampler == "ddpm":
                x = _ddpm_step(sched, out, t, x, z[row[ti]], generator)
            elif spec.sampler == "ddim":
                clip = spec.opts.get("clip_denoised", False)
                x = sched.step(out, t, x, eta=spec.opts.get("eta", 0.0), use_clipped_model_output=clip,
                               variance_noise=z[row[ti]]).prev_sample
            else:
                x = sched.step(out, t, x).prev_sample
    return to_np(x.clamp(-1, 1), nhwc=True), traj


__all__ = ["BETA_SCHEDULES", "DEFAULT_SPACING", "PREDICTION_TYPES", "VARIANCE_TYPES", "run_chain", "scheduler"]
