"""The float64 oracle of every sampler, driven by an analytic denoiser (NumPy only).

**The denoiser.** For Gaussian data ``x_0 ~ N(mu, s^2 I)`` and ``x_t = a x_0 + sigma eps``
(``a = sqrt(abar_t)``, ``sigma = sqrt(1 - abar_t)``), ``x_t ~ N(a mu, D I)`` with ``D = a^2 s^2 +
sigma^2``, and the exact posterior means are linear in ``x_t``::

    E[eps | x_t] = sigma / D (x_t - a mu)
    E[x_0 | x_t] = mu + a s^2 / D (x_t - a mu)
    E[v   | x_t] = a E[eps | x_t] - sigma E[x_0 | x_t]          (v = a eps - sigma x_0)

so each prediction type is ``A[t] x_t + B[t] mu`` (:func:`denoiser_tables`). A sampler fed
these has no network error: a chain's error is the sampler's and its arithmetic's alone.
The float32 sides (jax_ddpm, diffusers) evaluate the same formula from the float64 tables
rounded once to float32.

**The chains**, written from the papers with the oracle's own grids (not jax_ddpm's):

- ``ddpm``: Ho et al. 2020, Algorithm 2, on a grid with betas ``1 - abar_i / abar_{i-1}``
  (Nichol & Dhariwal 2021, section 4); no noise at the last step;
- ``ddim``: Song et al. 2021, eq. 12 with sigma of eq. 16, each step to the next grid point,
  ``abar = 1`` after the last;
- ``dpmpp_2m``: Lu et al. 2022 (DPM-Solver++), Algorithm 2 (multistep, second order), in
  log-SNR lambda; first order at the first step and at a last step to sigma = 0;
- ``chapter``: the chapter's printed loop (errata E2, E3), all T steps.

Each returns the clamped x_0 and the trajectory ``{t: the state fed to the model at t}``.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .oracle import F64, schedule

DATA_MU = 0.9   # mu spans [-0.9, 0.9] over the pixels ...
DATA_STD = 0.25  # ... with s = 0.25: the x0 predictions leave [-1, 1] late in the chain (clip binds)
CHAIN_SHAPE = (4, 4, 4, 1)  # [B, H, W, C]


@dataclasses.dataclass(frozen=True)
class ChainSpec:
    """One sampler chain: what both sides run (the parity case's parameter).

    ``options`` are the sampler's keyword options as ``((name, value), ...)``; ``dtype`` is
    jax_ddpm's compute dtype (float64: x64, a float64 schedule and denoiser).
    """

    sampler: str
    kind: str
    timesteps: int
    num_steps: int | None = None
    prediction: str = "eps"
    options: tuple = ()
    shape: tuple = CHAIN_SHAPE
    dtype: str = "float32"

    @property
    def opts(self) -> dict:
        return dict(self.options)

    @property
    def n(self) -> int:
        return self.timesteps if self.num_steps is None else self.num_steps

    @property
    def label(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in self.options)
        return " ".join(x for x in (f"{self.sampler} {self.kind} T={self.timesteps} n={self.n}", opts,
                                    self.prediction, "" if self.dtype == "float32" else self.dtype) if x)


def gaussian_mu(shape) -> np.ndarray:
    """The data mean [H, W, C]: evenly spread over [-DATA_MU, DATA_MU], float64."""
    return np.linspace(-DATA_MU, DATA_MU, int(np.prod(shape))).reshape(shape)


def denoiser_tables(kind: str, timesteps: int, prediction: str, std: float = DATA_STD):
    """(A, B), float64 [T] each: the exact E[output | x_t] = A[t] x_t + B[t] mu for ``prediction``."""
    sch = schedule(kind, timesteps)
    a = np.sqrt(sch["alphas_cumprod"])
    sigma = np.sqrt(1.0 - sch["alphas_cumprod"])
    d = a ** 2 * std ** 2 + sigma ** 2
    if prediction == "eps":
        return sigma / d, -a * sigma / d
    if prediction == "x0":
        return a * std ** 2 / d, sigma ** 2 / d
    if prediction == "v":
        return a * sigma * (1 - std ** 2) / d, -sigma / d
    raise ValueError(prediction)


def analytic_model(kind: str, timesteps: int, prediction: str, mu: np.ndarray):
    """``model(x, t) -> output`` in float64 (t an int scalar or [B])."""
    A, B = denoiser_tables(kind, timesteps, prediction)

    def model(x, t):
        t = np.broadcast_to(np.asarray(t), (x.shape[0],))
        shape = (-1,) + (1,) * (x.ndim - 1)
        return A[t].reshape(shape) * x + B[t].reshape(shape) * mu

    return model


# ----------------------------------------------------------------------------- grids (diffusers' definitions)


def grid(sampler: str, timesteps: int, num_steps: int | None, spacing: str | None = None, offset: int = 0) -> list[int]:
    """The timesteps (ascending) the sampler visits: DDPMScheduler/DDIMScheduler.set_timesteps for
    ddpm and ddim, DPMSolverMultistepScheduler.set_timesteps for dpmpp_2m, all T for chapter."""
    T = timesteps
    n = T if num_steps is None else num_steps
    if sampler == "chapter":
        return list(range(T))
    spacing = spacing or ("linspace" if sampler == "dpmpp_2m" else "leading")
    if spacing == "trailing":
        return sorted(int(np.round(T - k * T / n)) - 1 for k in range(n))
    if sampler == "dpmpp_2m":  # n + 1 points, the lowest dropped
        if spacing == "leading":
            return [k * (T // (n + 1)) + offset for k in range(1, n + 1)]
        return [int(v) for v in np.round(np.linspace(0, T - 1, n + 1))[1:]]
    if spacing == "leading":
        return [k * (T // n) + offset for k in range(n)]
    return [int(v) for v in np.round(np.linspace(0, T - 1, n))]


# ----------------------------------------------------------------------------- the chains


def _x0_eps(out, x, abar, prediction):
    """(x0, eps) implied by the model output at a noise level abar."""
    a, s = math.sqrt(abar), math.sqrt(1.0 - abar)
    if prediction == "eps":
        return (x - s * out) / a, out
    if prediction == "x0":
        return out, (x - a * out) / s
    return a * x - s * out, s * x + a * out  # v = a eps - s x0


def ddpm(sch, g, model, x_T, noise, prediction="eps", variance="beta_tilde", clip=False):
    """Ho et al. (2020), Algorithm 2, over the grid g (ascending); noise[i] belongs to g[i]."""
    abar = sch["alphas_cumprod"]
    x, traj = np.asarray(x_T, F64), {}
    for i in range(len(g) - 1, -1, -1):
        t = g[i]
        ab_t, ab_s = abar[t], (abar[g[i - 1]] if i > 0 else 1.0)
        beta = 1.0 - ab_t / ab_s
        traj[t] = x.copy()
        x0, eps = _x0_eps(model(x, t), x, ab_t, prediction)
        if clip:
            x0 = np.clip(x0, -1, 1)
        if clip or prediction != "eps":   # the posterior mean of x0 (eq. 7)
            mean = (math.sqrt(ab_s) * beta * x0 + math.sqrt(1 - beta) * (1 - ab_s) * x) / (1 - ab_t)
        else:                             # eq. 11
            mean = (x - beta / math.sqrt(1 - ab_t) * eps) / math.sqrt(1 - beta)
        var = beta if variance == "beta" else beta * (1 - ab_s) / (1 - ab_t)
        x = mean + (math.sqrt(var) * np.asarray(noise[i], F64) if i > 0 else 0.0)
    return np.clip(x, -1, 1), traj


def ddim(sch, g, model, x_T, noise, prediction="eps", eta=0.0, clip=False):
    """Song et al. (2021), eq. 12 / 16, each step to the next grid point; abar = 1 after the last."""
    abar = sch["alphas_cumprod"]
    x, traj = np.asarray(x_T, F64), {}
    for i in range(len(g) - 1, -1, -1):
        t = g[i]
        ab_t, ab_s = abar[t], (abar[g[i - 1]] if i > 0 else 1.0)
        traj[t] = x.copy()
        x0, eps = _x0_eps(model(x, t), x, ab_t, prediction)
        if clip:
            x0 = np.clip(x0, -1, 1)
            eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_s)
        x = math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s - sigma ** 2) * eps + sigma * np.asarray(noise[i], F64)
    return np.clip(x, -1, 1), traj


def dpmpp_2m(sch, g, model, x_T, noise=None, prediction="eps", lower_order_final=True, final_sigmas_type="zero",
             clip=False):
    """Lu et al. (2022), DPM-Solver++ Algorithm 2 (2M), in lambda = log(alpha / sigma); ``clip``
    clips each data prediction to [-1, 1] (kept clipped for the next step's extrapolation)."""
    del noise
    abar = sch["alphas_cumprod"]
    n = len(g)
    x, traj = np.asarray(x_T, F64), {}
    m_prev, h_prev = None, None
    for i in range(n - 1, -1, -1):
        t = g[i]
        a_s, s_s = math.sqrt(abar[t]), math.sqrt(1 - abar[t])
        traj[t] = x.copy()
        m0, _ = _x0_eps(model(x, t), x, abar[t], prediction)
        if clip:
            m0 = np.clip(m0, -1, 1)
        last = i == 0
        if last and final_sigmas_type == "zero":
            x, m_prev = m0, m0  # sigma_t = 0: the data prediction itself
            continue
        ab_to = abar[g[i - 1]] if not last else abar[0]
        a_t, s_t = math.sqrt(ab_to), math.sqrt(1 - ab_to)
        h = (math.log(a_t) - math.log(s_t)) - (math.log(a_s) - math.log(s_s))
        first_order = m_prev is None or (last and lower_order_final and n < 15)
        if first_order:
            d = m0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * m0 - (1 / (2 * r)) * m_prev
        x = (s_t / s_s) * x - a_t * (math.exp(-h) - 1) * d
        m_prev, h_prev = m0, h
    return np.clip(x, -1, 1), traj


def chapter(sch, g, model, x_T, noise, prediction="eps"):
    """The chapter's printed loop: x <- (x - (1 - abar) / sqrt(1 - abar) eps) / sqrt(abar) + [i > 1] sqrt(beta) z."""
    abar, betas = sch["alphas_cumprod"], sch["betas"]
    x, traj = np.asarray(x_T, F64), {}
    for i in range(len(g) - 1, -1, -1):
        t = g[i]
        traj[t] = x.copy()
        _, eps = _x0_eps(model(x, t), x, abar[t], prediction)
        x = (x - (1 - abar[t]) / math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t])
        x = x + (math.sqrt(betas[t]) * np.asarray(noise[i], F64) if i > 1 else 0.0)
    return np.clip(x, -1, 1), traj


def run_chain(spec: ChainSpec, x_T: np.ndarray, noise: np.ndarray):
    """The oracle's chain for ``spec`` from x_T [B, H, W, C] and noise [n, B, H, W, C] (float64 arithmetic)."""
    opts = spec.opts
    g = grid(spec.sampler, spec.timesteps, spec.num_steps, opts.get("timestep_spacing"), opts.get("steps_offset", 0))
    sch = schedule(spec.kind, spec.timesteps)
    model = analytic_model(spec.kind, spec.timesteps, spec.prediction, gaussian_mu(spec.shape[1:]))
    if spec.sampler == "ddpm":
        return ddpm(sch, g, model, x_T, noise, spec.prediction, opts.get("variance", "beta_tilde"),
                    opts.get("clip_denoised", False))
    if spec.sampler == "ddim":
        return ddim(sch, g, model, x_T, noise, spec.prediction, opts.get("eta", 0.0), opts.get("clip_denoised", False))
    if spec.sampler == "dpmpp_2m":
        return dpmpp_2m(sch, g, model, x_T, noise, spec.prediction, opts.get("lower_order_final", True),
                        opts.get("final_sigmas_type", "zero"), opts.get("clip_denoised", False))
    if spec.sampler == "chapter":
        return chapter(sch, g, model, x_T, noise, spec.prediction)
    raise ValueError(spec.sampler)


__all__ = ["CHAIN_SHAPE", "ChainSpec", "DATA_MU", "DATA_STD", "analytic_model", "chapter", "ddim", "ddpm",
           "denoiser_tables", "dpmpp_2m", "gaussian_mu", "grid", "run_chain"]
