"""``jax-ddpm sample``: EMA weights of a checkpoint, eval mode, the whole chain one program.

``--sampler`` (ddpm, ddim, dpmpp_2m, chapter: ``jax_ddpm.samplers``) runs ``--num-steps`` (default all
T) with ``--eta``, ``--timestep-spacing``, ``--steps-offset`` where it has them, and reads the
model's output as the run's ``--prediction`` (eps for runs written before it). The ddpm sampler's
variance and x0 clipping (ddim's clipping) default to the run's sampling settings
(``LoadedRun.sampling``: the posterior variance and clipping for runs trained here, what the
scheduler said for an imported diffusers folder); ``--variance`` / ``--[no-]clip-denoised``
override them. An option the sampler does not have, or a value it refuses, is one line before
the weights are loaded (``sampler_options``).

Chunks (``--batch-size``): the images are sampled ``B`` at a time (default: what fits in the
memory, from an estimate of the network's working memory per image). ``x_T`` is drawn for all
images at once, as one draw (the same as without chunks). When the BatchNorm statistics do not
depend on the batch (``--bn-stats running``, or a model without BatchNorm), each image's
chain gets its own noise key (``fold_in(fold_in(key, 1), image index)``) and the chain runs
image by image (``jax.vmap``), so the samples do not depend on ``B``. With ``--bn-stats batch``
on a BatchNorm model a chunk is the batch whose statistics normalise it: one chunk draws its
noise from ``fold_in(key, 1)`` (the numbers this command always gave), several chunks from
``fold_in(fold_in(key, 1), c)``, and the samples depend on ``B``. A request that cannot fit
(the samples themselves, or ``B`` images at once) is refused in one line; weights or samples
with NaN/inf end in one line and exit status 3, nothing written."""
from __future__ import annotations

import functools
import sys
import time
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from ..data import available_memory, format_bytes
from ..images import atomic_write, save_grid, to_uint8
from ..models.registry import get_arch
from ..sampling import make_sample_fn
from .config import ConfigError, ModelConfig, SampleConfig, given_sampler_options, sampler_settings
from .console import EXIT_OK, NonFiniteError, Progress, is_terminal, warning
from .convert import check_finite_weights, replacing
from .factories import build_model_from, image_shape
from .workdir import LoadedRun, load_run, recorded_run

MIN_BATCH_STATS = 16  # fewer images make --bn-stats batch noisy
MAX_DEFAULT_CHUNK = 1024  # the default --batch-size never exceeds this (larger chunks gain little)
MEMORY_SHARE = 0.5  # the default --batch-size uses at most this share of the available memory


def read_noise_file(path: str, timesteps: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``x_T`` [N, H, W, C] and ``noises`` [T, N, H, W, C] (float32, NHWC) from an .npz; ``timesteps``:
    the sampler's steps (T, or ``--num-steps``: row i is the noise of the grid's i-th timestep)."""
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


def sampler_options(config: SampleConfig, run_sampling: dict, timesteps: int | None = None,
                    prediction: str = "eps") -> dict:
    """The library options of ``config.sampler`` (``config.sampler_settings``): the options given
    (``--num-steps``, ``--eta``, ...), the run's ``variance`` and ``clip_denoised`` where the
    sampler has them and they are not given (ddpm: both; ddim: the clipping), nothing else (the
    sampler's defaults). With ``timesteps``, checked against the run's T and ``prediction``.

    Raises:
      ConfigError: an option the sampler does not have (``--variance`` with ``--sampler chapter``,
        ``--eta`` with dpmpp_2m), or a value it refuses (``--num-steps`` above T, ...).
    """
    return sampler_settings(config.sampler, given_sampler_options(config), run_sampling, timesteps,
                            prediction=prediction)


def write_samples(path: str, samples: np.ndarray) -> None:
    """``.png``: one grid; ``.npz`` (any case): ``samples`` float32 [N, H, W, C] in [-1, 1] and
    ``images`` uint8. Written to a file object, so NumPy adds no ``.npz`` to the temporary name."""
    if path.lower().endswith(".npz"):
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, samples=samples.astype(np.float32), images=to_uint8(samples))

        atomic_write(path, write)
    else:
        save_grid(path, samples)


# ----------------------------------------------------------------------------- memory and chunks
def _value_sizes(jaxpr) -> list[int]:
    """The bytes of every value a jaxpr computes, in order, sub-jaxprs included."""
    sizes: list[int] = []
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            aval = getattr(v, "aval", None)
            if aval is not None and hasattr(aval, "shape") and hasattr(aval, "dtype"):
                sizes.append(int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    sizes += _value_sizes(inner)
    return sizes


def forward_bytes_per_image(model_config: ModelConfig, variables: Any, shape: tuple[int, int, int]) -> tuple[int, int]:
    """An estimate of the network's working memory per image: (every value one forward pass
    computes that grows with the batch, summed: an upper bound; the largest of them: a lower
    bound), from its jaxpr at batch 1 and 2 (traced, not compiled)."""
    model = build_model_from(model_config)

    def fwd(v, x, t):
        return model.apply(v, x, t, train=False)

    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), variables)

    def sizes(b: int) -> list[int]:
        jaxpr = jax.make_jaxpr(fwd)(abstract, jax.ShapeDtypeStruct((b,) + shape, jnp.float32),
                                    jax.ShapeDtypeStruct((b,), jnp.int32))
        return _value_sizes(jaxpr.jaxpr)

    one, two = sizes(1), sizes(2)
    image = 4 * int(np.prod(shape))
    if len(one) != len(two):  # not the same program at both sizes: fall back on the totals
        return max(sum(two) - sum(one), image), image
    growth = [b - a for a, b in zip(one, two) if b > a]
    return max(sum(growth), image), max(max(growth, default=0), image)


def device_memory_available() -> int | None:
    """Bytes free on the first device (its allocator's limit less what is in use); the host's
    available memory for the CPU; None if unknown."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return available_memory()
    try:
        stats = device.memory_stats() or {}
    except Exception:  # a backend without memory statistics
        return None
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return None


def check_output_fits(num: int, shape: tuple[int, int, int], available: int | None) -> None:
    """Refuses ``--num`` images whose arrays (x_T and the samples in float32, their uint8 copy,
    the grid) would not fit in ``available`` bytes of host memory."""
    per_image = int(np.prod(shape))
    need = num * per_image * (4 + 4 + 1) + num * (shape[0] + 1) * (shape[1] + 1) * shape[2]
    if available is not None and need > available:
        raise ConfigError(f"--num {num}: {num} images of {'x'.join(map(str, shape))} need about {format_bytes(need)} "
                          f"of memory (x_T, the samples and their uint8 copy), more than the {format_bytes(available)} "
                          "available; ask for fewer")


def chunk_size(config: SampleConfig, num: int, per_image: tuple[int, int], batch_dependent: bool,
               available: int | None) -> int:
    """Images per compiled chain: ``--batch-size`` (refused if even the lower estimate cannot
    fit), else the most that fit in ``MEMORY_SHARE`` of the memory by the upper estimate
    (at most ``MAX_DEFAULT_CHUNK`` unless the statistics depend on the batch)."""
    upper, lower = per_image
    if config.batch_size is not None:
        b = min(config.batch_size, num)
        if available is not None and b * lower > available:
            raise ConfigError(f"--batch-size {config.batch_size}: {b} images at once need at least "
                              f"{format_bytes(b * lower)} of memory, more than the {format_bytes(available)} "
                              "available; use a smaller --batch-size")
        return b
    if available is not None and lower > available:
        raise ConfigError(f"--workdir {config.workdir}: sampling one image needs at least {format_bytes(lower)} of "
                          f"memory, more than the {format_bytes(available)} available")
    fit = num if available is None else max(1, int(available * MEMORY_SHARE // upper))
    b = min(num, fit) if batch_dependent else min(num, fit, MAX_DEFAULT_CHUNK)
    if batch_dependent and b < num:
        warning(f"--bn-stats batch: {num} images do not fit in memory at once; sampling them in chunks of {b}, each "
                "normalised with its own statistics (--batch-size sets the chunk)")
    return b


@functools.lru_cache(maxsize=8)
def _per_image(sample_fn):
    """``sample_fn`` run image by image over a chunk (``jax.vmap``, one compiled program): each
    image's chain has its own noise key, so no image depends on the others or on the chunk."""
    def one(variables, schedule, x, key):
        return sample_fn(variables, schedule, x[None], key)[0]

    return jax.jit(jax.vmap(one, in_axes=(None, None, 0, 0)))


def _finite(chunk: np.ndarray, start: int, run: LoadedRun) -> np.ndarray:
    if not np.isfinite(chunk).all():
        bad = start + int(np.argmax(~np.isfinite(chunk).reshape(chunk.shape[0], -1).all(axis=1)))
        raise NonFiniteError(f"--workdir {run.config.workdir}: sampling checkpoint {run.step} gave NaN/inf (image "
                             f"{bad} first); nothing written")
    return chunk


def draw_samples(config: SampleConfig, run: LoadedRun, progress: TextIO | None = None) -> np.ndarray:
    """The samples ``sample`` writes: float32 [N, H, W, C] in [-1, 1] from ``run``'s EMA weights
    (``config``'s seed or noise file, sampler and options, in chunks of ``config.batch_size``
    (see the module docstring); ``config.out`` is not used).

    ``progress`` (a stream, stderr in the command; None: silent) is told after each chunk:
    a bar of images done on a terminal, else ``sampled n/N images in Ts`` per chunk when there
    are several (one chunk says nothing the command's own line does not). The chain itself
    stays one compiled program per chunk: no callback inside it.

    Raises:
      ConfigError: the request cannot fit in memory; NonFiniteError: NaN/inf weights or samples.
    """
    check_finite_weights(run)
    shape = image_shape(run.config)
    timesteps = run.config.diffusion.timesteps
    has_bn = get_arch(run.config.model.arch).has_batch_stats and run.state.batch_stats is not None
    batch_dependent = config.bn_stats == "batch" and has_bn
    prediction = run.config.diffusion.prediction
    options = sampler_options(config, run.sampling, timesteps, prediction)
    noises = None
    if config.noise is not None:  # one row per step of the sampler's grid
        x_T, noises = read_noise_file(config.noise, options.get("num_steps") or timesteps, shape)
        num = x_T.shape[0]
        check_output_fits(num, shape, available_memory())
    else:
        num = config.num
        check_output_fits(num, shape, available_memory())
        key = jax.random.key(config.seed)
        x_T = jax.random.normal(jax.random.fold_in(key, 0), (num,) + shape)  # one draw, whatever the chunks
        noise_key = jax.random.fold_in(key, 1)
    sample_fn = _cached_sample_fn(run.config.model, config.sampler, config.bn_stats,
                                  tuple(sorted(dict(options, prediction=prediction).items())))
    variables = run.state.ema_variables
    per_image = forward_bytes_per_image(run.config.model, variables, shape)
    chunk = chunk_size(config, num, per_image, batch_dependent, device_memory_available())
    if batch_dependent and min(chunk, num) < MIN_BATCH_STATS:
        warning(f"{min(chunk, num)} images are few for --bn-stats batch (each image is normalised with the batch's "
                f"statistics); use {MIN_BATCH_STATS} or more, or --bn-stats running")
    out = np.empty((num,) + shape, np.float32)
    shown = progress is not None and (num > chunk or is_terminal(progress))
    bar = Progress(num, quiet=not shown, stream=progress, unit="img", desc="sampling")
    bar.update(0, force=True)  # on a terminal: the bar while the first chunk compiles and runs
    t0 = time.perf_counter()
    try:
        for c, a in enumerate(range(0, num, chunk)):
            b = min(num, a + chunk)
            if noises is not None:  # pre-drawn: the chunk's rows of x_T and of every step's noise
                if batch_dependent:
                    got = sample_fn(variables, run.state.schedule, x_T[a:b], noises[:, a:b])
                else:
                    got = jax.vmap(lambda x, z: sample_fn(variables, run.state.schedule, x[None], z[:, None])[0],
                                   in_axes=(0, 1))(x_T[a:b], noises[:, a:b])
            elif batch_dependent:
                got = sample_fn(variables, run.state.schedule, x_T[a:b],
                                noise_key if num <= chunk else jax.random.fold_in(noise_key, c))
            else:  # image by image: pad the last chunk, so one program serves every chunk
                index = jnp.arange(a, a + chunk)
                keys = jax.vmap(lambda i: jax.random.fold_in(noise_key, i))(index)
                x = jnp.concatenate([x_T[a:b], jnp.zeros((a + chunk - b,) + shape, x_T.dtype)]) if b - a < chunk \
                    else x_T[a:b]
                got = _per_image(sample_fn)(variables, run.state.schedule, x, keys)[:b - a]
            out[a:b] = _finite(np.asarray(jax.device_get(got)), a, run)
            bar.report(b, f"sampled {b}/{num} images in {time.perf_counter() - t0:.1f}s")
    finally:
        bar.close()
    return out


def sample(config: SampleConfig, stream: TextIO | None = None) -> int:
    """Runs ``jax-ddpm sample``: EMA weights, one compiled chain. Returns 0. The sampler's options
    are checked against the run's T (read from the checkpoint metadata) before the weights load."""
    recorded = recorded_run(config.workdir, config.step)
    if recorded is not None:
        sampler_options(config, recorded.sampling, recorded.config.diffusion.timesteps,
                        recorded.config.diffusion.prediction)
    run = load_run(config.workdir, config.step)
    samples = draw_samples(config, run, progress=sys.stderr)
    replaced = replacing(config.out)
    write_samples(config.out, samples)
    print(f"wrote {samples.shape[0]} samples from step {run.step} to {config.out}{replaced}",
          file=stream or sys.stdout)
    return EXIT_OK


__all__ = ["MAX_DEFAULT_CHUNK", "MIN_BATCH_STATS", "check_output_fits", "chunk_size", "device_memory_available",
           "draw_samples", "forward_bytes_per_image", "read_noise_file", "sample", "sampler_options",
           "write_samples"]
