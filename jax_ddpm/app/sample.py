"""``jax-ddpm sample``: EMA weights of a checkpoint, eval mode, the whole chain one program.

The ddpm sampler's variance and x0 clipping default to the run's sampling settings
(``LoadedRun.sampling``: the posterior variance and clipping for runs trained here, what the
scheduler said for an imported diffusers folder); ``--variance`` / ``--[no-]clip-denoised``
override them."""
from __future__ import annotations

import functools
import sys
from typing import TextIO

import jax
import numpy as np

from ..images import atomic_write, save_grid, to_uint8
from ..models.registry import get_arch
from ..sampling import make_sample_fn
from .config import ConfigError, ModelConfig, SampleConfig
from .console import EXIT_OK, warning
from .factories import build_model_from, image_shape
from .workdir import load_run

MIN_BATCH_STATS = 16  # fewer images make --bn-stats batch noisy


def read_noise_file(path: str, timesteps: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``x_T`` [N, H, W, C] and ``noises`` [T, N, H, W, C] (float32, NHWC) from an .npz."""
    try:
        with np.load(path, allow_pickle=False) as f:
            x_T, noises = np.asarray(f["x_T"], np.float32), np.asarray(f["noises"], np.float32)
    except KeyError as e:
        raise ConfigError(f"--noise {path}: lacks array {e} (needs x_T and noises)") from None
    except Exception as e:
        raise ConfigError(f"--noise {path}: not a readable .npz file ({' '.join(str(e).split())})") from None
    if x_T.ndim != 4 or x_T.shape[1:] != shape:
        raise ConfigError(f"--noise {path}: x_T has shape {x_T.shape}, expected [N, {', '.join(map(str, shape))}]")
    if noises.shape != (timesteps,) + x_T.shape:
        raise ConfigError(f"--noise {path}: noises has shape {noises.shape}, expected {(timesteps,) + x_T.shape}")
    return x_T, noises


@functools.lru_cache(maxsize=8)
def _cached_sample_fn(model_config: ModelConfig, sampler: str, bn_stats: str, options: tuple):
    """One compiled sampler per model and options within a process (repeated ``sample`` calls)."""
    return make_sample_fn(build_model_from(model_config), sampler, bn_stats=bn_stats, **dict(options))


def sampler_options(config: SampleConfig, run_sampling: dict) -> dict:
    """The ddpm sampler's ``variance`` and ``clip_denoised``: the options given, else the run's.

    Raises:
      ConfigError: ``--variance`` or ``--[no-]clip-denoised`` with a sampler that has no such setting.
    """
    if config.sampler != "ddpm":
        given = [o for o, v in (("--variance", config.variance), ("--clip-denoised", config.clip_denoised))
                 if v is not None]
        if given:
            raise ConfigError(f"{given[0]}: --sampler {config.sampler} has no such setting (--sampler ddpm has)")
        return {}
    return {"variance": run_sampling["variance"] if config.variance is None else config.variance,
            "clip_denoised": run_sampling["clip_denoised"] if config.clip_denoised is None else config.clip_denoised}


def write_samples(path: str, samples: np.ndarray) -> None:
    """``.png``: one grid; ``.npz``: ``samples`` float32 [N, H, W, C] in [-1, 1] and ``images`` uint8."""
    if path.lower().endswith(".npz"):
        atomic_write(path, lambda tmp: np.savez(tmp, samples=samples.astype(np.float32), images=to_uint8(samples)))
    else:
        save_grid(path, samples)


def sample(config: SampleConfig, stream: TextIO | None = None) -> int:
    """Runs ``jax-ddpm sample``: EMA weights, one compiled chain. Returns 0."""
    run = load_run(config.workdir, config.step)
    shape = image_shape(run.config)
    timesteps = run.config.diffusion.timesteps
    if config.noise is not None:
        x_T, noise = read_noise_file(config.noise, timesteps, shape)
    else:
        key = jax.random.key(config.seed)
        x_T = jax.random.normal(jax.random.fold_in(key, 0), (config.num,) + shape)
        noise = jax.random.fold_in(key, 1)
    options = sampler_options(config, run.sampling)
    sample_fn = _cached_sample_fn(run.config.model, config.sampler, config.bn_stats, tuple(sorted(options.items())))
    if (config.bn_stats == "batch" and x_T.shape[0] < MIN_BATCH_STATS
            and get_arch(run.config.model.arch).has_batch_stats):
        warning(f"{x_T.shape[0]} images are few for --bn-stats batch (each image is normalised with the batch's "
                f"statistics); use {MIN_BATCH_STATS} or more, or --bn-stats running")
    samples = np.asarray(jax.device_get(sample_fn(run.state.ema_variables, run.state.schedule, x_T, noise)))
    write_samples(config.out, samples)
    print(f"wrote {samples.shape[0]} samples from step {run.step} to {config.out}", file=stream or sys.stdout)
    return EXIT_OK


__all__ = ["MIN_BATCH_STATS", "read_noise_file", "sample", "sampler_options", "write_samples"]
