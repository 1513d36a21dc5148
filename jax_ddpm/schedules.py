"""Beta schedules and the ``DiffusionSchedule`` pytree.

Precision rule (P1, shared with ``torch_ref.diffusion``): every array is computed in
float64 with NumPy and stored as float32.
"""
from __future__ import annotations

import flax.struct
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine")
MIN_TIMESTEPS = 2  # one step has no posterior: the clipped log variance repeats entry 1
BETA_START, BETA_END = 1e-4, 0.02  # the linear schedule's defaults (Ho et al. 2020)


def check_timesteps(timesteps) -> int:
    """``timesteps`` if it is an integer >= ``MIN_TIMESTEPS``; raises ValueError otherwise."""
    if not isinstance(timesteps, (int, np.integer)) or isinstance(timesteps, bool) or timesteps < MIN_TIMESTEPS:
        raise ValueError(f"timesteps must be an integer >= {MIN_TIMESTEPS}, got {timesteps!r}")
    return int(timesteps)


def linear_beta_schedule(timesteps: int, start: float = BETA_START, end: float = BETA_END, *,
                         beta_start: float | None = None, beta_end: float | None = None) -> np.ndarray:
    """Ho et al. (2020): betas evenly spaced from ``start`` to ``end`` (``beta_start`` /
    ``beta_end``: the same, under diffusers' names). float64 [T].

    diffusers' ``linear`` is ``torch.linspace(beta_start, beta_end, T)`` in float32, within
    1 ulp of these values rounded to float32."""
    start = start if beta_start is None else beta_start
    end = end if beta_end is None else beta_end
    return np.linspace(start, end, timesteps, dtype=np.float64)


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal (2021), eq. 17: ``abar(t) = cos^2(((t/T) + s)/(1 + s) * pi/2)``.

    Betas are ``1 - abar_t / abar_{t-1}``, clipped to [0, 0.999]. float64 [T].
    """
    x = np.linspace(0, timesteps, timesteps + 1, dtype=np.float64)
    alphas_cumprod = np.cos(((x / timesteps) + s) / (1 + s) * np.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return np.clip(betas, 0, 0.999)


@flax.struct.dataclass
class DiffusionSchedule:
    """Every per-timestep array a DDPM needs, float32 [T] each."""

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]


def schedule_arrays(betas: np.ndarray) -> dict[str, np.ndarray]:
    """All derived arrays in float64, keyed like ``DiffusionSchedule``'s fields."""
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
        "posterior_variance": posterior_variance,
        # posterior_variance[0] == 0; the log repeats the t=1 value there (Ho et al.).
        "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }


def check_linear_betas(beta_start, beta_end) -> tuple[float, float]:
    """``(beta_start, beta_end)`` as floats if both are finite numbers in (0, 1); raises ValueError."""
    for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not 0 < v < 1:
            raise ValueError(f"{name} must be a number in (0, 1), got {v!r}")
    return float(beta_start), float(beta_end)


def make_schedule(timesteps: int, kind: str = "linear", *, beta_start: float = BETA_START,
                  beta_end: float = BETA_END) -> DiffusionSchedule:
    """Builds the float32 ``DiffusionSchedule`` for ``kind`` in ``SCHEDULES``.

    ``beta_start`` / ``beta_end`` are the linear schedule's first and last beta (defaults:
    Ho et al.'s 1e-4 and 0.02, what this function always used); the cosine schedule has none.

    Raises:
      ValueError: if ``timesteps < MIN_TIMESTEPS`` (:func:`check_timesteps`), ``kind``
        is unknown, a beta is not in (0, 1), or betas other than the defaults are given for
        the cosine schedule.
    """
    check_timesteps(timesteps)
    if kind == "linear":
        betas = linear_beta_schedule(timesteps, *check_linear_betas(beta_start, beta_end))
    elif kind == "cosine":
        if (beta_start, beta_end) != (BETA_START, BETA_END):
            raise ValueError(f"beta_start and beta_end apply to the linear schedule only, got {beta_start!r} and "
                             f"{beta_end!r} for the cosine schedule")
        betas = cosine_beta_schedule(timesteps)
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    arrays = schedule_arrays(betas)
    return DiffusionSchedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in arrays.items()})
