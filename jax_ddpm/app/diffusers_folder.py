"""``jax-ddpm convert --from-diffusers DIR`` and ``--to-diffusers DIR``: diffusers folders <->
work folders (``jax_ddpm.diffusers_io`` reads and writes the files; this module maps the
scheduler's settings onto the run's and back).

DDPMScheduler's settings (diffusers 0.42.1) and what a work folder makes of them:

==========================  ==================================================================
``num_train_timesteps``     ``--timesteps`` (T >= 2)
``beta_schedule``           ``linear`` -> linear from ``beta_start`` to ``beta_end`` (diffusers'
                            float32 ``torch.linspace``; ours float64 rounded: within 1 ulp);
                            ``squaredcos_cap_v2`` -> cosine (the same betas); others refused
``prediction_type``         ``--prediction``: ``epsilon`` -> eps, ``sample`` -> x0, ``v_prediction`` -> v
``variance_type``           ``fixed_small`` -> ``--variance beta_tilde``; ``fixed_large`` -> ``beta``;
                            others refused
``clip_sample``             ``--clip-denoised`` / ``--no-clip-denoised`` (``clip_sample_range``
                            other than 1 refused while clipping)
``trained_betas``, ``thresholding``, ``rescale_betas_zero_snr``: refused unless unset / false
``timestep_spacing``, ``steps_offset``: how a pipeline picks fewer inference steps; ``sample``
                            runs all T unless ``--num-steps`` (with its own ``--timestep-spacing``)
==========================  ==================================================================

T, the betas and the prediction type are the run's diffusion settings (its identity); the variance and the
clipping are the run's sampling defaults (checkpoint metadata ``sampling``). A UNet folder
without a scheduler takes DDPMScheduler's defaults (said on stderr). Only DDPMScheduler and
DDIMScheduler configs are read (they describe the same forward process).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Mapping, TextIO

import jax
import numpy as np

from ..data import CHANNELS
from ..diffusers_io import (MODEL_INDEX_NAME, SCHEDULE_DEFAULTS, SCHEDULER_CONFIG_NAME, DiffusersFormatError,
                            load_diffusers, save_diffusers)
from ..parameterization import DIFFUSERS_PREDICTION_TYPES
from ..schedules import BETA_END, BETA_START, check_linear_betas, check_timesteps
from .arch_options import canonical_arch_config
from .checks import ConfigError
from .config import ConvertConfig, DiffusionConfig, ModelConfig, TrainConfig, arch_config, check_arch, check_image_size
from .console import EXIT_OK, note
from .convert import check_finite_weights, check_new_workdir, write_imported_run
from .factories import abstract_state
from .workdir import load_run, sampling_settings

SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler")
BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}  # diffusers' name -> jax_ddpm's
VARIANCE_TYPES = {"fixed_small": "beta_tilde", "fixed_large": "beta"}  # diffusers' name -> --variance
PREDICTION_FROM_DIFFUSERS = {v: k for k, v in DIFFUSERS_PREDICTION_TYPES.items()}  # prediction_type -> --prediction


def _scheduler_path(root: Path) -> Path:
    """Where ``load_diffusers`` read the scheduler config of the pipeline folder ``root``."""
    inside = root / "scheduler" / SCHEDULER_CONFIG_NAME
    return inside if inside.is_file() or not (root / SCHEDULER_CONFIG_NAME).is_file() else root / SCHEDULER_CONFIG_NAME


def run_settings_from_scheduler(raw: Mapping[str, Any], where: str) -> tuple[DiffusionConfig, dict[str, Any]]:
    """A scheduler config dict -> (the run's DiffusionConfig, its sampling defaults).

    Raises:
      ConfigError: ``where: ...`` naming the key of a setting this project does not implement.
    """
    s = {**SCHEDULE_DEFAULTS, **raw}

    def refuse(key: str, what: str):
        raise ConfigError(f"{where}: {key} {s.get(key)!r}: {what}")

    if s.get("_class_name", "DDPMScheduler") not in SCHEDULER_CLASSES:
        refuse("_class_name", f"only {' and '.join(SCHEDULER_CLASSES)} settings are read")
    try:
        timesteps = check_timesteps(s["num_train_timesteps"])
    except ValueError as e:
        raise ConfigError(f"{where}: num_train_timesteps: {e}") from None
    if s["beta_schedule"] not in BETA_SCHEDULES:
        refuse("beta_schedule", "not supported (jax_ddpm has linear and cosine = squaredcos_cap_v2)")
    if s.get("trained_betas") is not None:
        refuse("trained_betas", "not supported (only the linear and squaredcos_cap_v2 schedules)")
    if s.get("rescale_betas_zero_snr"):
        refuse("rescale_betas_zero_snr", "not supported (it changes the betas)")
    if s["prediction_type"] not in PREDICTION_FROM_DIFFUSERS:
        refuse("prediction_type", f"must be one of {', '.join(PREDICTION_FROM_DIFFUSERS)}")
    if s.get("thresholding"):
        refuse("thresholding", "dynamic thresholding is not supported")
    variance = s.get("variance_type", "fixed_small")  # DDIMScheduler has none: its ddpm-like variance is fixed_small
    if variance not in VARIANCE_TYPES:
        refuse("variance_type", f"only {' and '.join(VARIANCE_TYPES)} are supported")
    if not isinstance(s["clip_sample"], (bool, np.bool_)):
        refuse("clip_sample", "must be true or false")
    if s["clip_sample"] and s.get("clip_sample_range", 1.0) != 1.0:
        refuse("clip_sample_range", "only 1 is supported (x0 is clipped to [-1, 1])")
    schedule = BETA_SCHEDULES[s["beta_schedule"]]
    betas = {}
    if schedule == "linear":
        try:
            betas = dict(zip(("beta_start", "beta_end"), check_linear_betas(s["beta_start"], s["beta_end"])))
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    diffusion = DiffusionConfig(timesteps=timesteps, schedule=schedule,
                                prediction=PREDICTION_FROM_DIFFUSERS[s["prediction_type"]], **betas)
    return diffusion, {"variance": VARIANCE_TYPES[variance], "clip_denoised": bool(s["clip_sample"])}


def scheduler_settings_from_run(diffusion: DiffusionConfig, sampling: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse: ``save_diffusers``' ``schedule_settings`` for a run."""
    to_diffusers = {v: k for k, v in BETA_SCHEDULES.items()}
    return {"num_train_timesteps": diffusion.timesteps, "beta_schedule": to_diffusers[diffusion.schedule],
            "beta_start": diffusion.beta_start, "beta_end": diffusion.beta_end,
            "prediction_type": DIFFUSERS_PREDICTION_TYPES[diffusion.prediction],
            "variance_type": {v: k for k, v in VARIANCE_TYPES.items()}[sampling["variance"]],
            "clip_sample": bool(sampling["clip_denoised"])}


def _image_size(config, unet_config_file: str, option_size: int, multiple: int) -> int:
    ss = config.sample_size
    if ss is None:
        return check_image_size(option_size, multiple, "unet2d")  # --image-size, named as such
    if isinstance(ss, tuple):
        if ss[0] != ss[1]:
            raise ConfigError(f"--from-diffusers {unet_config_file}: sample_size {list(ss)}: only square images "
                              "are supported")
        ss = ss[0]
    if ss % multiple:
        raise ConfigError(f"--from-diffusers {unet_config_file}: sample_size {ss} is not a multiple of {multiple} "
                          "(2^(levels-1))")
    return ss


def train_options(run_config: TrainConfig, source: str) -> list[str]:
    """The ``train`` options that describe an imported run's model and diffusion (to fine-tune it)."""
    m, d = run_config.model, run_config.diffusion
    opts = ["--arch", m.arch, "--unet2d-config", source, "--channels", str(m.channels), "--image-size",
            str(m.image_size), "--timesteps", str(d.timesteps), "--schedule", d.schedule, "--prediction", d.prediction]
    if d.schedule == "linear" and (d.beta_start, d.beta_end) != (BETA_START, BETA_END):
        opts += ["--beta-start", repr(d.beta_start), "--beta-end", repr(d.beta_end)]
    return opts


def import_diffusers(config: ConvertConfig, stream: TextIO | None = None) -> int:
    """``convert --from-diffusers DIR``: a diffusers UNet2DModel or pipeline folder -> checkpoint 0."""
    path = config.from_diffusers
    check_new_workdir(config.workdir)
    try:
        _, variables, info = load_diffusers(path)
    except DiffusersFormatError as e:
        raise ConfigError(f"--from-diffusers {e}") from None
    if info.get("scheduler_config") is not None:
        diffusion, sampling = run_settings_from_scheduler(info["scheduler_config"],
                                                          f"--from-diffusers {_scheduler_path(Path(path))}")
    else:
        where = "has no scheduler" if info["kind"] == "pipeline" else f"is a UNet folder (no {MODEL_INDEX_NAME})"
        diffusion, sampling = run_settings_from_scheduler({}, f"--from-diffusers {path}")
        note(f"{path} {where}: using DDPMScheduler's defaults (T={diffusion.timesteps}, linear betas "
             f"{diffusion.beta_start:g} to {diffusion.beta_end:g}, fixed_small variance, clipped x0)")
    unet = info["config"]
    unet_config_file = str(Path(info["unet_folder"]) / "config.json")
    if unet.in_channels not in CHANNELS:
        raise ConfigError(f"--from-diffusers {unet_config_file}: in_channels {unet.in_channels}: the command "
                          f"handles {' or '.join(map(str, CHANNELS))} image channels")
    if unet.out_channels != unet.in_channels:
        raise ConfigError(f"--from-diffusers {unet_config_file}: out_channels {unet.out_channels} differs from "
                          f"in_channels {unet.in_channels} (a noise prediction has the image's channels; learned "
                          "variances are not supported)")
    multiple = 2 ** (len(unet.block_out_channels) - 1)
    image_size = _image_size(unet, unet_config_file, config.image_size, multiple)
    model = check_arch(ModelConfig(image_size=image_size, channels=unet.in_channels, arch="unet2d",
                                   arch_config=canonical_arch_config(dataclasses.replace(unet,
                                                                                          sample_size=image_size))))
    run_config = TrainConfig(workdir=config.workdir, model=model, diffusion=diffusion)
    want = abstract_state(run_config).params
    if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(variables["params"]) or any(
            tuple(a.shape) != tuple(np.shape(b)) for a, b in zip(jax.tree_util.tree_leaves(want),
                                                                  jax.tree_util.tree_leaves(variables["params"]))):
        raise ConfigError(f"--from-diffusers {path}: the weights do not fit the model its config describes")
    write_imported_run(run_config, variables, path, sampling)
    out = stream or sys.stdout
    n = sum(int(np.prod(np.shape(v))) for v in jax.tree_util.tree_leaves(variables["params"]))
    print(f"imported {path} into {config.workdir} (checkpoint 0): unet2d, {n:,} parameters, {image_size}x{image_size}"
          f"x{unet.in_channels}, T={diffusion.timesteps} {diffusion.schedule}, variance {sampling['variance']}, "
          f"clip_denoised {str(sampling['clip_denoised']).lower()}, prediction {diffusion.prediction}", file=out)
    print(f"fine-tune it with: jax-ddpm train --workdir {config.workdir} {' '.join(train_options(run_config, path))}"
          " --data ... --steps N", file=out)
    return EXIT_OK


def export_diffusers(config: ConvertConfig, stream: TextIO | None = None) -> int:
    """``convert --to-diffusers DIR``: a unet2d run's EMA weights as a DDPMPipeline folder."""
    run = load_run(config.workdir, config.step)
    m = run.config.model
    check_finite_weights(run)
    if m.arch != "unet2d":
        raise ConfigError(f"--to-diffusers: --workdir {config.workdir} holds --arch {m.arch}, which diffusers has no "
                          "model for (export it with --out FILE.safetensors)")
    unet = dataclasses.replace(arch_config(m)[1], sample_size=m.image_size)
    variables = jax.tree_util.tree_map(np.asarray, jax.device_get(run.state.ema_variables))
    settings = scheduler_settings_from_run(run.config.diffusion, sampling_settings(run.meta))
    try:
        save_diffusers(config.to_diffusers, unet, variables, settings)
    except DiffusersFormatError as e:
        raise ConfigError(f"--to-diffusers {e}") from None
    print(f"wrote a DDPMPipeline folder (EMA weights, step {run.step}; scheduler T={settings['num_train_timesteps']} "
          f"{settings['beta_schedule']}, {settings['variance_type']}, clip_sample "
          f"{str(settings['clip_sample']).lower()}, {settings['prediction_type']}) to {config.to_diffusers}",
          file=stream or sys.stdout)
    return EXIT_OK


__all__ = ["BETA_SCHEDULES", "SCHEDULER_CLASSES", "VARIANCE_TYPES", "export_diffusers", "import_diffusers",
           "run_settings_from_scheduler", "scheduler_settings_from_run", "train_options"]
