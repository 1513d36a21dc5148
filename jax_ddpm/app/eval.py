"""``jax-ddpm eval``: sample quality of a trained work folder (or of an .npz of samples), offline.

With ``--workdir W``, draws ``--num`` samples exactly as ``jax-ddpm sample`` does
(``app.sample.draw_samples``: EMA weights, the run's sampling settings unless overridden),
then computes ``jax_ddpm.quality.quality_metrics`` against the digits' held-out split with the
cached digits classifier, and writes ``W/eval.json`` (atomically) and one line on stdout. With
``--samples FILE.npz`` (written by ``jax-ddpm sample --out FILE.npz``) it scores those images
instead; ``--json FILE`` writes the result elsewhere (or, without ``--workdir``, at all).

Only data with a feature extractor can be scored (``jax_ddpm.quality.REFERENCES``: the
digits); anything else is refused in one line, exit status 2. See docs/quality.md.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from .checks import ConfigError, checkpoint_step_from_args, choice, existing_file, out_file, positive, seed
from .checks import workdir_path
from .config import BN_STATS, SAMPLERS, VARIANCES, SampleConfig
from .sampler_options import sampler_options_from_args  # --num-steps, --eta, ... checked as for sample

DEFAULT_NUM = 1000  # samples drawn with --workdir (docs/quality.md: the FID's noise against time)
EVAL_FILE = "eval.json"
SAMPLING_OPTIONS = ("sampler", "checkpoint_step", "clip_denoised", "variance", "bn_stats", "num", "batch_size",
                    "num_steps", "eta", "timestep_spacing", "steps_offset")


@dataclass(frozen=True)
class EvalConfig:
    workdir: str | None = None  # a trained work folder: sample from it (and write eval.json there)
    samples: str | None = None  # an .npz of samples to score instead of sampling
    json: str | None = None  # where to write the result (default: WORKDIR/eval.json)
    num: int = DEFAULT_NUM
    seed: int = 0  # seeds x_T and the chain's noise (as in sample) and the floor's draw of real images
    sampler: str = "ddpm"
    step: int | None = None
    clip_denoised: bool | None = None
    variance: str | None = None
    bn_stats: str = "batch"
    batch_size: int | None = None  # images per sampling chunk, as sample's --batch-size; None = sized to fit
    num_steps: int | None = None  # the sampler's options, as sample's (None = the sampler's default)
    eta: float | None = None
    timestep_spacing: str | None = None
    steps_offset: int | None = None

    def sample_config(self) -> SampleConfig:
        return SampleConfig(workdir=self.workdir or "", out="", num=self.num, seed=self.seed, sampler=self.sampler,
                            step=self.step, clip_denoised=self.clip_denoised, bn_stats=self.bn_stats,
                            variance=self.variance, batch_size=self.batch_size, num_steps=self.num_steps,
                            eta=self.eta, timestep_spacing=self.timestep_spacing, steps_offset=self.steps_offset)


def eval_config_from_args(args: Any) -> EvalConfig:
    """Validates the ``eval`` namespace. Raises ConfigError (one line)."""
    if args.workdir is None and args.samples is None:
        raise ConfigError("eval needs --workdir DIR (sample from a trained run) or --samples FILE.npz")
    workdir = None if args.workdir is None else workdir_path(args.workdir)
    if workdir is not None and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {args.workdir}: no such folder")
    samples = None
    if args.samples is not None:
        samples = existing_file("--samples", args.samples)
        if not samples.lower().endswith(".npz"):
            raise ConfigError(f"--samples {args.samples}: must be an .npz file (jax-ddpm sample --out FILE.npz)")
        given = [o for o in SAMPLING_OPTIONS if getattr(args, o, None) is not None]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')}: --samples FILE already holds the samples; "
                              "it applies only to sampling from --workdir")
    step = checkpoint_step_from_args(args)
    return EvalConfig(workdir=workdir, samples=samples,
                      json=None if args.json is None else out_file("--json", args.json, (".json",)),
                      num=DEFAULT_NUM if args.num is None else positive("--num", args.num),
                      seed=seed("--seed", args.seed),
                      sampler=choice("--sampler", args.sampler or "ddpm", SAMPLERS), step=step,
                      clip_denoised=None if args.clip_denoised is None else bool(args.clip_denoised),
                      variance=None if args.variance is None else choice("--variance", args.variance, VARIANCES),
                      bn_stats=choice("--bn-stats", args.bn_stats or "batch", BN_STATS),
                      batch_size=None if args.batch_size is None else positive("--batch-size", args.batch_size),
                      **sampler_options_from_args(args))


def read_samples_file(path: str) -> np.ndarray:
    """``samples`` (float32 [N, H, W, C] in [-1, 1]) or else ``images`` (uint8) of an .npz."""
    from ..data import to_unit_range

    try:
        with np.load(path, allow_pickle=False) as f:
            if "samples" in f:
                x = np.asarray(f["samples"], np.float32)
            elif "images" in f:
                images = np.asarray(f["images"])
                if images.dtype != np.uint8:
                    raise ConfigError(f"--samples {path}: 'images' must be uint8, got {images.dtype}")
                x = to_unit_range(images)
            else:
                raise ConfigError(f"--samples {path}: holds neither 'samples' nor 'images' "
                                  f"(has {', '.join(f.files) or 'no arrays'})")
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"--samples {path}: not a readable .npz file ({' '.join(str(e).split())[:160]})") from None
    if x.ndim != 4 or x.shape[0] < 2 or x.shape[1] != x.shape[2] or x.shape[3] not in (1, 3):
        raise ConfigError(f"--samples {path}: expected [N, S, S, 1 or 3] images with N >= 2, got {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise ConfigError(f"--samples {path}: holds NaN or inf values")
    return x


def metrics_summary(m: dict) -> str:
    """The numbers of a :func:`score` result as the one line prints them (``FID ... | confident
    ... | classes ... | classifier acc ...``); ``train --eval-every`` prints the same."""
    ratio = "-" if m["fid_ratio"] is None else f"{m['fid_ratio']:.1f}x"
    return (f"FID {m['fid']:.2f} (floor {m['fid_floor']:.2f}+-{m['fid_floor_std']:.2f}, {ratio}) | confident "
            f"{m['confident']:.1%} (real {m['real_confident']:.1%}) | classes {m['coverage']}/{m['num_classes']}, "
            f"largest {m['largest_class_share']:.1%} | classifier acc {m['classifier_accuracy']:.1%}")


def _summary(m: dict, where: str | None) -> str:
    s = m["sampling"]
    steps = f"{s['num_steps']}/{s['timesteps']} steps" if s.get("num_steps") else f"T={s.get('timesteps')}"
    how = (f"{s['sampler']} {steps}, checkpoint {s['checkpoint_step']}" if "sampler" in s
           else os.path.basename(s["samples_file"]))
    return (f"{metrics_summary(m)} | {m['num_samples']} samples, {how}, {m['wall_s']['total']:.1f}s"
            + (f" -> {where}" if where else ""))


def load_reference(source: str, image_size: int, say=None):
    """``(quality.Reference, how the classifier came: 'cache', 'trained' or 'rebuilt')`` for data
    ``source`` (which must have one: ``checks.quality_data``); when it was trained, says so
    through ``say`` (default: a note on stderr)."""
    from .. import quality
    from .console import note

    t0 = time.perf_counter()
    ref = quality.reference_for(source, image_size)
    made = getattr(ref.extractor, "source", "cache")
    if made != "cache":
        (say or note)(f"{'re' if made == 'rebuilt' else ''}trained the {ref.extractor.name} classifier in "
                      f"{time.perf_counter() - t0:.1f}s (cached in {quality.cache_dir()})")
    return ref, made


def score(samples: np.ndarray, ref, seed: int) -> dict:
    """``quality.quality_metrics`` of ``samples`` against ``ref`` (floor draws seeded by ``seed``).
    Raises ConfigError (samples the metrics cannot take)."""
    from .. import quality

    try:
        return quality.quality_metrics(samples, ref.extractor, ref.sets, seed=seed)
    except quality.QualityError as e:
        raise ConfigError(str(e)) from None


def sampling_record(sc: SampleConfig, run, options: dict) -> dict:
    """How samples drawn from ``run`` with ``sc`` were made, as eval.json's ``sampling`` records it."""
    return {"sampler": sc.sampler, "num": sc.num, "seed": sc.seed, "bn_stats": sc.bn_stats,
            "batch_size": sc.batch_size, "checkpoint_step": run.step, "timesteps": run.config.diffusion.timesteps,
            "schedule": run.config.diffusion.schedule, "arch": run.config.model.arch, **options}


def evaluate(config: EvalConfig, stream: TextIO | None = None) -> int:
    """Runs ``jax-ddpm eval``; returns 0. Raises ConfigError / CheckpointError for bad input."""
    from .. import quality
    from .console import EXIT_OK, warning
    from .sample import draw_samples, sampler_options
    from .workdir import load_run, write_json

    t0 = time.perf_counter()
    run = None if config.workdir is None else load_run(config.workdir, config.step)
    sc = config.sample_config()
    options = None if run is None or config.samples is not None else sampler_options(
        sc, run.sampling, run.config.diffusion.timesteps, run.config.diffusion.prediction)  # checked before sampling
    given = None if config.samples is None else read_samples_file(config.samples)
    source = "digits" if run is None else run.config.data.source
    size = given.shape[1] if run is None else run.config.model.image_size
    if run is not None and given is not None and given.shape[1] != size:
        raise ConfigError(f"--samples {config.samples}: {given.shape[1]}px images, but --workdir "
                          f"{config.workdir} trains {size}px")
    if source not in quality.REFERENCES:
        raise ConfigError(f"--workdir {config.workdir}: trained on --data {source}; eval's metrics need a feature "
                          f"extractor for that data and only {', '.join(quality.REFERENCES)} has one (none exists "
                          "for other data yet)")
    ref, made = load_reference(source, size)
    t1 = time.perf_counter()
    if given is None:
        samples = draw_samples(sc, run, progress=sys.stderr)
        sampling = sampling_record(sc, run, options)
    else:
        samples, sampling = given, {"samples_file": config.samples}
    t2 = time.perf_counter()
    metrics = score(samples, ref, config.seed)
    t3 = time.perf_counter()
    result = {**metrics, "sampling": sampling, "workdir": config.workdir,
              "classifier": {"source": made, "cache": quality.cache_dir(),
                             **(ref.extractor.settings.to_json() if hasattr(ref.extractor, "settings") else {})},
              "wall_s": {"load_and_classifier": round(t1 - t0, 3), "sampling": round(t2 - t1, 3),
                         "metrics": round(t3 - t2, 3), "total": round(t3 - t0, 3)}}
    if not metrics["classifier_ok"]:
        warning(f"the classifier's held-out accuracy is {metrics['classifier_accuracy']:.1%} (below "
                f"{quality.MIN_ACCURACY:.0%}): these numbers are not meaningful")
    where = config.json or (None if config.workdir is None else os.path.join(config.workdir, EVAL_FILE))
    if where is not None:
        write_json(where, result)
    print(_summary(result, where), file=stream or sys.stdout)
    return EXIT_OK


__all__ = ["DEFAULT_NUM", "EVAL_FILE", "EvalConfig", "eval_config_from_args", "evaluate", "load_reference",
           "metrics_summary", "read_samples_file", "sampling_record", "score"]
