"""The float64 NumPy oracle: the closed forms of the DDPM, written from the papers, and its
adapter (``OracleReference``, reference name ``oracle``).

These are the third opinion next to torch_ref and jax_ddpm (both float32). They are
written from the formulas, not copied from either implementation, and import neither
framework (``tests/test_jax_*.py`` use them too, as ``parity_tests.oracle``).
Layout-agnostic: the batch axis is axis 0, per-timestep coefficients broadcast as
``[B, 1, ..., 1]``.

References:
  Ho, Jain, Abbeel (2020), "Denoising Diffusion Probabilistic Models": eq. 4 (q(x_t|x_0)),
    eq. 6-7 (posterior q(x_{t-1}|x_t,x_0)), eq. 11 / Algorithm 2 (the reverse step).
  Nichol & Dhariwal (2021), "Improved DDPM", eq. 17 (cosine schedule).
  Vaswani et al. (2017) section 3.5 (sinusoidal embedding, as the chapter writes it).
"""
from __future__ import annotations

import math

import numpy as np

from . import Reference

F64 = np.float64


def betas(kind: str, timesteps: int) -> np.ndarray:
    """beta_t, t = 0..T-1, float64.

    linear: ``1e-4 + (0.02 - 1e-4) t / (T - 1)``;
    cosine: ``beta_t = clip(1 - f(t+1)/f(t), 0, 0.999)``, ``f(t) = cos^2(pi/2 (t/T + s)/(1 + s))``, s = 0.008.
    """
    T = int(timesteps)
    if kind == "linear":
        if T == 1:
            return np.array([1e-4], F64)
        return np.array([1e-4 + (0.02 - 1e-4) * k / (T - 1) for k in range(T)], F64)
    if kind == "cosine":
        s = 0.008

        def f(t: float) -> float:
            return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

        return np.array([min(max(1 - f(k + 1) / f(k), 0.0), 0.999) for k in range(T)], F64)
    raise ValueError(kind)


def schedule(kind: str, timesteps: int) -> dict[str, np.ndarray]:
    """Every derived array (DiffusionSchedule's field names), float64 [T] each."""
    b = betas(kind, timesteps)
    a = 1.0 - b
    abar = np.cumprod(a)                                  # prod_{s<=t} alpha_s
    abar_prev = np.concatenate([np.ones(1, F64), abar[:-1]])  # abar_{t-1}, abar_{-1} := 1
    post_var = b * (1.0 - abar_prev) / (1.0 - abar)       # beta-tilde_t (eq. 7)
    return {
        "betas": b,
        "alphas": a,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
        "sqrt_recip_alphas_cumprod": 1.0 / np.sqrt(abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt((1.0 - abar) / abar),
        "posterior_variance": post_var,
        # log beta-tilde with the t=0 entry (log 0) replaced by the t=1 one (Ho et al.'s code)
        "posterior_log_variance_clipped": np.log(np.concatenate([post_var[1:2], post_var[1:]])),
        "posterior_mean_coef1": np.sqrt(abar_prev) * b / (1.0 - abar),
        "posterior_mean_coef2": np.sqrt(a) * (1.0 - abar_prev) / (1.0 - abar),
    }


def _at(arr: np.ndarray, t: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.asarray(arr, F64)[np.asarray(t)].reshape((-1,) + (1,) * (x.ndim - 1))


def q_sample(sched: dict, x0: np.ndarray, t: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 4), float64."""
    x0, noise = np.asarray(x0, F64), np.asarray(noise, F64)
    abar = _at(sched["alphas_cumprod"], t, x0)
    return np.sqrt(abar) * x0 + np.sqrt(1.0 - abar) * noise


def predict_x0(sched: dict, x_t: np.ndarray, t: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), float64."""
    x_t, eps = np.asarray(x_t, F64), np.asarray(eps, F64)
    abar = _at(sched["alphas_cumprod"], t, x_t)
    return (x_t - np.sqrt(1.0 - abar) * eps) / np.sqrt(abar)


def posterior_mean_variance(sched: dict, x0: np.ndarray, x_t: np.ndarray, t: np.ndarray):
    """Mean and variance of q(x_{t-1} | x_t, x_0) (eq. 6-7), float64."""
    x0, x_t = np.asarray(x0, F64), np.asarray(x_t, F64)
    b = _at(sched["betas"], t, x_t)
    abar = _at(sched["alphas_cumprod"], t, x_t)
    abar_prev = _at(sched["alphas_cumprod_prev"], t, x_t)
    mean = (np.sqrt(abar_prev) * b * x0 + np.sqrt(1.0 - b) * (1.0 - abar_prev) * x_t) / (1.0 - abar)
    var = b * (1.0 - abar_prev) / (1.0 - abar)
    return mean, var


def p_mean_variance(sched: dict, eps: np.ndarray, x_t: np.ndarray, t: np.ndarray,
                    variance: str = "beta_tilde", clip_denoised: bool = False):
    """Mean and variance of the reverse step p(x_{t-1} | x_t) given the predicted noise, float64.

    Unclipped: ``mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)`` (eq. 11); clipped:
    the posterior mean of ``clip(predict_x0, -1, 1)``. ``variance``: beta_t or beta-tilde_t.
    """
    x_t, eps = np.asarray(x_t, F64), np.asarray(eps, F64)
    b = _at(sched["betas"], t, x_t)
    abar = _at(sched["alphas_cumprod"], t, x_t)
    if clip_denoised:
        mean, _ = posterior_mean_variance(sched, np.clip(predict_x0(sched, x_t, t, eps), -1, 1), x_t, t)
    else:
        mean = (x_t - b / np.sqrt(1.0 - abar) * eps) / np.sqrt(1.0 - b)
    if variance == "beta":
        var = b
    elif variance == "beta_tilde":
        var = posterior_mean_variance(sched, x_t, x_t, t)[1]
    else:
        raise ValueError(variance)
    return mean, var


def embedding_frequencies(dim: int) -> np.ndarray:
    """f_k = 10000^(-k / (dim/2 - 1)), k = 0..dim/2-1, float64 (the chapter's formula)."""
    half = dim // 2
    return np.array([10000.0 ** (-k / (half - 1)) for k in range(half)], F64)


def sinusoidal_embedding(t: np.ndarray, dim: int, float32_argument: bool = False) -> np.ndarray:
    """``cat(sin(t f), cos(t f))`` [B, dim] in float64.

    Args:
      t: [B] timesteps.
      dim: embedding width (even).
      float32_argument: evaluate sin/cos (in float64) at the argument a float32 program
        forms, ``fl32(t * fl32(f_k))`` with the chapter's float32 frequencies
        ``fl32(exp(fl32(-k * fl32(log(10000) / (dim/2 - 1)))))``. This isolates what an
        implementation controls from the argument rounding every float32 program shares
        (up to ulp(t)/2, i.e. 3.05e-5 at t = 999).
    """
    t = np.asarray(t)
    if float32_argument:
        half = dim // 2
        c = np.float32(math.log(10000) / (half - 1))
        k = np.arange(half, dtype=np.float32)
        freqs = np.exp((k * -c).astype(F64)).astype(np.float32)    # [half], correctly rounded
        arg = (t.astype(np.float32)[:, None] * freqs[None, :]).astype(F64)  # IEEE float32 product
    else:
        arg = t.astype(F64)[:, None] * embedding_frequencies(dim)[None, :]
    return np.concatenate([np.sin(arg), np.cos(arg)], axis=-1)


def batchnorm_train(x: np.ndarray, running_mean: np.ndarray, running_var: np.ndarray, scale: np.ndarray,
                    bias: np.ndarray, momentum: float = 0.1, eps: float = 1e-5):
    """torch.nn.BatchNorm2d in training mode over the LAST axis (NHWC), float64.

    Normalises with the biased batch variance; running variance is updated with the
    unbiased one (n / (n - 1)), ``new = (1 - momentum) old + momentum batch``.
    Returns (y, new_running_mean, new_running_var).
    """
    x = np.asarray(x, F64)
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    mean = x.mean(axes)
    var_biased = ((x - mean) ** 2).sum(axes) / n
    var_unbiased = ((x - mean) ** 2).sum(axes) / (n - 1)
    y = (x - mean) / np.sqrt(var_biased + eps) * scale + bias
    return (y, (1 - momentum) * np.asarray(running_mean, F64) + momentum * mean,
            (1 - momentum) * np.asarray(running_var, F64) + momentum * var_unbiased)


def batchnorm_eval(x, running_mean, running_var, scale, bias, eps: float = 1e-5) -> np.ndarray:
    """BatchNorm in eval mode over the last axis, float64."""
    x = np.asarray(x, F64)
    return (x - running_mean) / np.sqrt(np.asarray(running_var, F64) + eps) * scale + bias


# ----------------------------------------------------------------------------- the adapter


def learning_rates(lr: float, decay_steps: int, end_factor: float, steps: int) -> np.ndarray:
    """A cosine decay from ``lr`` to ``end_factor * lr`` over ``decay_steps`` updates, then held
    (float64): ``lr * (f + (1 - f) * (1 + cos(pi * min(i, N) / N)) / 2)`` for update ``i``."""
    i = np.minimum(np.arange(steps, dtype=np.float64), decay_steps)
    return lr * (end_factor + (1 - end_factor) * 0.5 * (1 + np.cos(math.pi * i / decay_steps)))


def min_snr_weights(kind: str, timesteps: int, gamma: float, prediction: str) -> np.ndarray:
    """Hang et al. (2023), "Efficient Diffusion Training via Min-SNR Weighting Strategy": the x0
    error weighted by ``min(SNR_t, gamma)``, ``SNR_t = abar_t / (1 - abar_t)``; an eps target's MSE is
    ``SNR_t`` times the x0 error's, a v target's ``SNR_t + 1`` times, so their weights are divided by
    those. Normalised to mean 1 over t (float64)."""
    abar = schedule(kind, timesteps)["alphas_cumprod"]
    snr = abar / (1.0 - abar)
    w = np.minimum(snr, gamma) / {"x0": np.ones_like(snr), "eps": snr, "v": snr + 1.0}[prediction]
    return w / w.mean()


def weighted_loss(kind: str, timesteps: int, gamma: float, prediction: str, out, x0, t, noise) -> float:
    """mean over images of ``w[t_i] * mean((out_i - target_i)^2)`` (float64); targets: eps, x0,
    ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (Salimans & Ho 2022)."""
    sched = schedule(kind, timesteps)
    x0, noise, out = (np.asarray(a, F64) for a in (x0, noise, out))
    a, s = _at(sched["sqrt_alphas_cumprod"], t, x0), _at(sched["sqrt_one_minus_alphas_cumprod"], t, x0)
    target = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[prediction]
    per_image = ((out - target) ** 2).reshape(len(t), -1).mean(axis=1)
    return float(np.mean(min_snr_weights(kind, timesteps, gamma, prediction)[t] * per_image))


class OracleReference(Reference):
    """The closed forms above as a reference: schedules, q_sample, the embedding, the reverse step.

    No U-Net: the network and training components are torch_ref's alone. Sampling: every
    sampler's chain driven by the analytic denoiser (``oracle_samplers``).
    """

    name = "oracle"
    description = "float64 NumPy closed forms (parity_tests/references/oracle.py, oracle_samplers.py)"
    components = frozenset({"schedule", "q_sample", "embedding", "embedding_exact", "posterior", "chain_ddpm",
                            "chain_ddim", "chain_dpmpp_2m", "chain_chapter", "chain_cosine_eps", "lr_schedule",
                            "loss_weights", "weighted_loss"})

    def loss_weights(self, ctx, kind, timesteps, gamma, prediction):
        return min_snr_weights(kind, timesteps, gamma, prediction)

    def weighted_loss(self, ctx, kind, timesteps, gamma, prediction, out, x0, t, noise):
        return weighted_loss(kind, timesteps, gamma, prediction, out, x0, t, noise)

    def learning_rates(self, ctx, lr, decay_steps, end_factor, steps):
        return learning_rates(lr, decay_steps, end_factor, steps)

    def schedule(self, ctx, kind, timesteps):
        return schedule(kind, timesteps)

    def q_sample(self, ctx, kind, timesteps, x0, t, noise):
        return q_sample(schedule(kind, timesteps), x0, t, noise)

    def embedding(self, ctx, t, dim, exact_argument=False):
        # 'embedding': sin/cos (float64) at the argument a float32 program forms; 'embedding_exact': at t * f_k
        return sinusoidal_embedding(t, dim, float32_argument=not exact_argument)

    def p_mean_variance(self, ctx, kind, timesteps, eps, x_t, t, variance, clip):
        return p_mean_variance(schedule(kind, timesteps), eps, x_t, t, variance, clip)

    def sampler_chain(self, ctx, spec, x_T, noise):
        from .oracle_samplers import run_chain

        return run_chain(spec, x_T, noise)
