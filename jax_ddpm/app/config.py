"""Typed, frozen run configurations, built and validated at the command-line boundary.

``cli.py`` parses argv into an ``argparse.Namespace``; the ``*_config_from_args``
functions here turn it into frozen dataclasses and raise :class:`ConfigError` with one
line naming the option and what is wrong. Nothing below this module sees a namespace:
factories unpack the dataclasses into scalars.

Every choice list and rule is imported from the module that owns it (schedules, samplers,
dtypes, data layouts, architectures); the architecture's own config decides which model
settings it accepts (:func:`arch_config`).

A training run's *identity* (:func:`identity`) is everything that decides which numbers
it computes: model, diffusion (with ``--prediction``: what the loss regresses), data and
optimizer settings and the seed. A resume must keep it; training-length and bookkeeping
options (``--steps``, ``--checkpoint-every``, ``--sample-every``, ``--eval-every``: grids and
quality rows are drawn beside the training and never change its weights, ...) may change, and
so may the devices: N devices compute the same maths as one (``jax_ddpm.parallel``), so
neither the device count nor ``--distributed`` is part of the identity. A field missing from a
saved identity (``model.arch``: checkpoints written before the architecture registry;
``diffusion.prediction``: before ``--prediction``) takes what those runs computed, not today's
default (:func:`complete_identity`, ``FIELDS_ADDED_LATER``). ``jax-ddpm train`` on a folder that
holds a run takes the options not given from the run (``app.resume_settings``).

An architecture other than the chapter's is described by its own config, held as canonical
JSON in ``ModelConfig.arch_config`` (``app.arch_options``); its fields compare one by one.
The settings a run samples with by default (``SAMPLING_DEFAULTS``: the DDPM variance and
x0 clipping) are not part of the identity: they live in the checkpoint metadata (an
imported diffusers scheduler sets them) and ``sample`` options override them. The sampler
options (``--num-steps``, ``--eta``, ...: :func:`sampler_settings`) are checked with
``samplers.check_options`` against the run's T before anything is loaded or compiled; the
grids ``train`` draws take the same options as ``--sample-*`` (bookkeeping, not identity).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from ..data import CHANNELS, LAYOUTS
from ..diffusion import VARIANCES
from ..models.arch import ArchConfigError, Architecture
from ..models.registry import ARCH_NAMES, DEFAULT_ARCH, get_arch
from ..parallel import DTYPES
from ..parameterization import PREDICTIONS
from ..sampling import BN_STATS, SAMPLERS
from ..schedules import BETA_END, BETA_START, MIN_TIMESTEPS, SCHEDULES
from ..training import LR_SCHEDULES, TIMESTEP_DRAWS
from .arch_options import (ARCH_CONFIG_FIELD, NOT_COMPARED_FIELDS, UNET2D_FIELD_OPTIONS, arch_config_from_args,
                           arch_error, canonical_arch_config)
from .checks import ConfigError, betas_from_args, check_timesteps_option, checkpoint_step_from_args
from .checks import at_least, choice as _choice
from .checks import existing_file as _existing_file, existing_folder, int_list
from .checks import finite_float as _finite_float, new_folder, non_negative as _non_negative
from .checks import not_run_file as _not_run_file, out_file as _out_file, positive as _positive, resolve_data_source
from .checks import quality_data, seed as _seed, workdir_path as _workdir
from .sampler_options import (SAMPLER_OPTION_NAMES, given_sampler_options, sampler_option_names,
                              sampler_options_from_args, sampler_settings)
from .config_types import (DEFAULT_EVAL_NUM, DEFAULT_LR_SCHEDULE, MIN_EVAL_NUM, SAMPLING_DEFAULTS, ConvertConfig, DataConfig,
                           DiffusionConfig, ModelConfig, OptimConfig, SampleConfig, TrainConfig)


# ----------------------------------------------------------------------------- identity / JSON
# Dotted config field -> the option that sets it (for error messages).
OPTION_NAMES = {
    "model.image_size": "--image-size", "model.channels": "--channels", "model.features": "--features",
    "model.time_emb_dim": "--time-emb-dim", "model.dtype": "--dtype", "model.arch": "--arch",
    "model.arch_config": "--unet2d-config",
    "diffusion.timesteps": "--timesteps", "diffusion.schedule": "--schedule",
    "diffusion.beta_start": "--beta-start", "diffusion.beta_end": "--beta-end", "diffusion.prediction": "--prediction",
    "diffusion.timestep_draw": "--timestep-draw", "diffusion.snr_gamma": "--snr-gamma",
    "data.source": "--data", "data.layout": "--layout",
    "optim.batch_size": "--batch-size", "optim.lr": "--lr", "optim.ema_decay": "--ema-decay",
    "optim.grad_clip": "--grad-clip", "optim.lr_schedule": "--lr-schedule",
    "optim.lr_decay_steps": "--lr-decay-steps", "optim.lr_end_factor": "--lr-end-factor", "seed": "--seed",
}
# An architecture config field (ArchConfigError.field) -> the option that sets it.
ARCH_FIELD_OPTIONS = {"features": "--features", "time_emb_dim": "--time-emb-dim", "img_channels": "--channels",
                      ARCH_CONFIG_FIELD: "--unet2d-config", **UNET2D_FIELD_OPTIONS}


def to_dict(config: Any) -> dict:
    """A frozen dataclass -> plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def identity(config: TrainConfig) -> dict[str, Any]:
    """The flat ``{dotted_field: value}`` a resumed run must reproduce exactly."""
    flat: dict[str, Any] = {}
    for part in ("model", "diffusion", "data", "optim"):
        for k, v in dataclasses.asdict(getattr(config, part)).items():
            flat[f"{part}.{k}"] = list(v) if isinstance(v, tuple) else v
    flat["seed"] = config.seed
    return flat


# The identity fields added after the first release, at what runs saved without them computed.
# Not today's defaults: a default may change (--prediction's did), what an old folder computed does not.
FIELDS_ADDED_LATER: dict[str, Any] = {
    "model.arch": "chapter", "model.arch_config": "",  # before the architecture registry
    "diffusion.beta_start": BETA_START, "diffusion.beta_end": BETA_END,  # before --beta-start/--beta-end
    "diffusion.prediction": "eps",  # before --prediction
    "diffusion.timestep_draw": "per-image",  # before --timestep-draw
    "diffusion.snr_gamma": 0.0,  # before --snr-gamma: an unweighted loss
    # before --lr-schedule: a constant learning rate
    "optim.lr_schedule": "constant", "optim.lr_decay_steps": 0, "optim.lr_end_factor": 0.0,
}


def complete_identity(saved: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` with every field it lacks: a field added after the first release at what runs
    saved without it computed (``FIELDS_ADDED_LATER``: ``model.arch`` = the chapter's U-Net,
    ``diffusion.prediction`` = eps, ...), any other at its default."""
    return {**identity(TrainConfig(workdir="")), **FIELDS_ADDED_LATER, **saved}


def identity_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any], *, parts: tuple[str, ...] | None = None,
                      ignore: tuple[str, ...] = (), ignore_arch_fields: tuple[str, ...] = ()) -> str | None:
    """First difference between two :func:`identity` dicts as a phrase, or None if equal.

    Fields missing on either side take their defaults (:func:`complete_identity`).
    ``model.arch_config`` compares the two architecture configs field by field (naming the
    option of the first that differs; ``ignore_arch_fields`` are skipped). ``parts``: compare
    only these parts (``'model'``, ``'diffusion'``, ...); ``ignore``: dotted fields skipped."""
    saved, current = complete_identity(saved), complete_identity(current)
    for key in sorted(set(saved) | set(current)):
        if (parts is not None and key.split(".")[0] not in parts) or key in ignore:
            continue
        if key == f"model.{ARCH_CONFIG_FIELD}":
            diff = _arch_config_mismatch(saved, current, ignore_arch_fields)
            if diff:
                return diff
        elif saved.get(key) != current.get(key):
            option = OPTION_NAMES.get(key, key)
            return f"{option} was {_show(saved.get(key))}, now {_show(current.get(key))}"
    return None


def _arch_config_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: tuple[str, ...]) -> str | None:
    """The first architecture config field that differs (the identities name the same arch)."""
    key = f"model.{ARCH_CONFIG_FIELD}"
    if saved[key] == current[key]:
        return None
    try:
        a, b = (arch_config(ModelConfig(arch=i["model.arch"], channels=i["model.channels"], arch_config=i[key]))[1]
                for i in (saved, current))
        readable = ARCH_CONFIG_FIELD in get_arch(current["model.arch"]).fields
    except (ValueError, TypeError):
        readable = False
    if not readable:  # compare the text
        return f"{OPTION_NAMES[key]} was {saved[key] or '(the default)'}, now {current[key] or '(the default)'}"
    for f in dataclasses.fields(a):
        if f.name not in ignore + NOT_COMPARED_FIELDS and getattr(a, f.name) != getattr(b, f.name):
            option = UNET2D_FIELD_OPTIONS.get(f.name, f"{current['model.arch']} config field {f.name}")
            return f"{option} was {_show(getattr(a, f.name))}, now {_show(getattr(b, f.name))}"
    return None


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def train_config_from_identity(workdir: str, ident: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig whose :func:`identity` is ``ident`` (fields it lacks and all other
    fields at their defaults)."""
    full = complete_identity(ident)
    parts: dict[str, dict] = {"model": {}, "diffusion": {}, "data": {}, "optim": {}}
    for key, value in full.items():
        if "." in key:
            part, name = key.split(".", 1)
            parts[part][name] = tuple(value) if isinstance(value, list) else value
    return TrainConfig(workdir=workdir, model=ModelConfig(**parts["model"]),
                       diffusion=DiffusionConfig(**parts["diffusion"]), data=DataConfig(**parts["data"]),
                       optim=OptimConfig(**parts["optim"]), seed=int(full["seed"]))


# ----------------------------------------------------------------------------- the architecture
def arch_config(model: ModelConfig) -> tuple[Architecture, Any]:
    """``(architecture, its config)`` for ``model``: the registry entry ``model.arch`` and
    ``config_from_fields(channels, **{f: model.f for f in arch.fields})``.

    Raises:
      ValueError: unknown architecture; ArchConfigError: a value it does not accept.
    """
    arch = get_arch(model.arch)
    return arch, arch.config_from_fields(model.channels, **{f: getattr(model, f) for f in arch.fields})


def model_config_from_arch(arch: Architecture, config: Any, image_size: int, dtype: str = "float32") -> ModelConfig:
    """The inverse of :func:`arch_config` (for an imported file): the ``Architecture.fields``
    from the config's attributes of the same names, and the channel count in ``CHANNELS``
    for which ``config_from_fields`` gives ``config`` back.

    Raises:
      ValueError: no channel count in ``CHANNELS`` gives the config back.
    """
    fields = {f: canonical_arch_config(config) if f == ARCH_CONFIG_FIELD else getattr(config, f) for f in arch.fields}
    for channels in CHANNELS:
        model = ModelConfig(image_size=image_size, channels=channels, dtype=dtype, arch=arch.name, **fields)
        try:
            if arch_config(model)[1] == config:
                return model
        except ValueError:
            continue
    raise ValueError(f"its {arch.name} settings are not ones the command builds for {' or '.join(map(str, CHANNELS))} "
                     f"image channels (ModelConfig sets only {', '.join(('channels',) + arch.fields)})")


def default_size_multiple(arch: str = DEFAULT_ARCH) -> int:
    """The image size multiple of ``arch`` as the command builds it with the default options."""
    entry, config = arch_config(ModelConfig(arch=arch))
    return entry.size_multiple(config)


def check_arch(model: ModelConfig) -> ModelConfig:
    """Validates the model settings with the architecture's own rules and its size multiple.

    Raises:
      ConfigError: naming the option (--arch, --features, --time-emb-dim, --channels, --image-size).
    """
    try:
        arch, config = arch_config(model)
        unused = [f for f in ARCH_FIELD_OPTIONS if f not in arch.fields and hasattr(model, f)
                  and getattr(model, f) != getattr(ModelConfig(), f)]
    except ArchConfigError as e:
        if e.field in ARCH_FIELD_OPTIONS:
            raise ConfigError(f"{ARCH_FIELD_OPTIONS[e.field]}: {e.message}") from None
        raise arch_error(e) from None
    except ValueError as e:
        raise ConfigError(f"--arch: {e}") from None
    if unused:  # refused, not silently ignored
        raise ConfigError(f"{ARCH_FIELD_OPTIONS[unused[0]]}: --arch {arch.name} has no such setting")
    check_image_size(model.image_size, arch.size_multiple(config), arch.name)
    return model


# ----------------------------------------------------------------------------- validation
def parse_features(text: str) -> tuple[int, ...]:
    """``'16,32,64,128'`` -> (16, 32, 64, 128): comma-separated positive integers (how many:
    the architecture decides, :func:`check_arch`)."""
    return int_list("--features", text)


def check_image_size(size: int, multiple: int | None = None, arch: str = DEFAULT_ARCH) -> int:
    """``size`` if it is a positive multiple of ``multiple`` (default: the ``arch``'s size
    multiple at its default config). Raises ConfigError."""
    if multiple is None:
        multiple = default_size_multiple(arch)
    if size < multiple or size % multiple:
        raise ConfigError(f"--image-size must be a positive multiple of {multiple} for --arch {arch}, got {size}")
    return size


def default_timestep_draw(arch: str) -> str:
    """``--timestep-draw`` when not given: per-batch for the chapter's U-Net, whose BatchNorm samples
    with the statistics of a batch of images all at one t (trained so, its samples score far better:
    docs/quality.md), per-image for an architecture without batch statistics."""
    return "per-batch" if arch == "chapter" else "per-image"


def default_snr_gamma(arch: str) -> float:
    """``--snr-gamma`` when not given: 5 for the chapter's U-Net (its samples score better on both
    halves of the digits goal at every training seed measured: docs/quality.md), 0 (no weighting)
    for an architecture it was not measured on."""
    return 5.0 if arch == "chapter" else 0.0


def check_snr_gamma_option(value: Any) -> float:
    """``--snr-gamma``: 0 or a finite number > 0. Raises ConfigError."""
    gamma = _finite_float("--snr-gamma", value, 0.0)
    if gamma != 0 and gamma < 1e-6:
        raise ConfigError(f"--snr-gamma must be 0 (no weighting) or at least 1e-6, got {value}")
    return gamma


def train_config_from_args(args: Any) -> TrainConfig:
    """Validates the ``train`` namespace. Raises ConfigError (one line)."""
    arch = _choice("--arch", getattr(args, "arch", DEFAULT_ARCH), ARCH_NAMES)
    channels = _choice("--channels", args.channels, CHANNELS)
    model = check_arch(ModelConfig(image_size=args.image_size, channels=channels,
                                   features=parse_features(args.features),
                                   time_emb_dim=args.time_emb_dim,
                                   dtype=_choice("--dtype", args.dtype, DTYPES), arch=arch,
                                   arch_config=arch_config_from_args(args, arch, get_arch(arch).fields, channels,
                                                                     args.image_size)))
    schedule = _choice("--schedule", args.schedule, SCHEDULES)
    diffusion = DiffusionConfig(timesteps=check_timesteps_option(args.timesteps), schedule=schedule,
                                prediction=_choice("--prediction", getattr(args, "prediction", DiffusionConfig.prediction), PREDICTIONS),
                                timestep_draw=_choice("--timestep-draw", getattr(args, "timestep_draw", None)
                                                      or default_timestep_draw(arch), TIMESTEP_DRAWS),
                                snr_gamma=check_snr_gamma_option(default_snr_gamma(arch)
                                                                 if getattr(args, "snr_gamma", None) is None
                                                                 else args.snr_gamma),
                                **betas_from_args(args, schedule))
    data = DataConfig(source=resolve_data_source(args.data), layout=_choice("--layout", args.layout, LAYOUTS))
    steps = _positive("--steps", args.steps)
    optim = OptimConfig(batch_size=_positive("--batch-size", args.batch_size),
                        lr=_finite_float("--lr", args.lr, 0.0, low_open=True),
                        ema_decay=_finite_float("--ema-decay", args.ema_decay, 0.0, 1.0),
                        grad_clip=_finite_float("--grad-clip", args.grad_clip, 0.0),
                        **lr_schedule_from_args(args, steps))
    grid_sampler = _choice("--sample-sampler", getattr(args, "sample_sampler", "ddpm"), SAMPLERS)
    grid = {f"sample_{k}": v for k, v in sampler_options_from_args(args, "sample_").items()}
    config = TrainConfig(workdir=_workdir(args.workdir), model=model, diffusion=diffusion, data=data, optim=optim,
                       sample_sampler=grid_sampler, **grid,
                       seed=_seed("--seed", args.seed), steps=steps,
                       checkpoint_every=_positive("--checkpoint-every", args.checkpoint_every),
                       keep_checkpoints=_positive("--keep-checkpoints", args.keep_checkpoints),
                       sample_every=_non_negative("--sample-every", args.sample_every),
                       num_samples=_positive("--num-samples", args.num_samples),
                       bn_stats=_choice("--bn-stats", args.bn_stats, BN_STATS),
                       log_every=_positive("--log-every", args.log_every), quiet=bool(args.quiet),
                       distributed=bool(getattr(args, "distributed", False)),
                       eval_every=_non_negative("--eval-every", getattr(args, "eval_every", 0)),
                       eval_num=at_least("--eval-num", getattr(args, "eval_num", DEFAULT_EVAL_NUM), MIN_EVAL_NUM))
    grid_sampler_settings(config)  # checked now, against this run's T
    if config.eval_every:  # refused before anything is read or written
        quality_data("--eval-every", config.data.source)
    return config


def lr_schedule_from_args(args: Any, steps: int) -> dict[str, Any]:
    """``--lr-schedule`` (default :data:`DEFAULT_LR_SCHEDULE`), ``--lr-decay-steps`` (cosine's
    default: ``--steps``) and ``--lr-end-factor`` (default 0) as OptimConfig fields.

    Raises:
      ConfigError: ``--lr-decay-steps``/``--lr-end-factor`` with the constant schedule, or out of range.
    """
    schedule = _choice("--lr-schedule", getattr(args, "lr_schedule", None) or DEFAULT_LR_SCHEDULE, LR_SCHEDULES)
    decay, end = getattr(args, "lr_decay_steps", None), getattr(args, "lr_end_factor", None)
    if schedule == "constant":
        for option, value in (("--lr-decay-steps", decay), ("--lr-end-factor", end)):
            if value is not None:
                raise ConfigError(f"{option}: only with a decaying --lr-schedule (cosine); "
                                  f"the schedule is constant")
        return {"lr_schedule": schedule, "lr_decay_steps": 0, "lr_end_factor": 0.0}
    return {"lr_schedule": schedule,
            "lr_decay_steps": steps if decay is None else _positive("--lr-decay-steps", decay),
            "lr_end_factor": 0.0 if end is None else _finite_float("--lr-end-factor", end, 0.0, 1.0)}


def grid_sampler_settings(config: TrainConfig, run_sampling: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The library options of the sample grids' sampler (``--sample-sampler``, ``--sample-num-steps``,
    ...; ``sampler_settings``) with the run's variance and clipping (``run_sampling``, default
    ``SAMPLING_DEFAULTS``). Raises ConfigError naming the ``--sample-*`` option."""
    given = {name: getattr(config, f"sample_{name}", None) for name in SAMPLER_OPTION_NAMES}
    return sampler_settings(config.sample_sampler, given, SAMPLING_DEFAULTS if run_sampling is None else run_sampling,
                            config.diffusion.timesteps, prediction=config.diffusion.prediction, prefix="--sample-")


def sample_config_from_args(args: Any) -> SampleConfig:
    """Validates the ``sample`` namespace. Raises ConfigError (one line)."""
    workdir = _workdir(args.workdir)
    out = _not_run_file("--out", args.out, _out_file("--out", args.out, (".png", ".npz")), workdir)
    batch_size = getattr(args, "batch_size", None)
    config = SampleConfig(workdir=workdir, out=out, batch_size=None if batch_size is None else
                        _positive("--batch-size", batch_size), **sampler_options_from_args(args),
                        num=_positive("--num", args.num), seed=_seed("--seed", args.seed),
                        sampler=_choice("--sampler", args.sampler, SAMPLERS),
                        step=checkpoint_step_from_args(args),
                        noise=None if args.noise is None else _existing_file("--noise", args.noise),
                        clip_denoised=None if args.clip_denoised is None else bool(args.clip_denoised),
                        bn_stats=_choice("--bn-stats", args.bn_stats, BN_STATS),
                        variance=None if getattr(args, "variance", None) is None
                        else _choice("--variance", args.variance, VARIANCES))
    sampler_settings(config.sampler, given_sampler_options(config), SAMPLING_DEFAULTS)  # T is checked at load
    return config


def convert_config_from_args(args: Any) -> ConvertConfig:
    """Validates the ``convert`` namespace: exactly one of --out / --to-diffusers (export) and
    --from-torch / --from-diffusers (import).

    ``--image-size`` is checked against the architecture's size multiple at import, once
    the file says which architecture it holds."""
    to_diffusers, from_diffusers = getattr(args, "to_diffusers", None), getattr(args, "from_diffusers", None)
    given = [o for o, v in (("--out", args.out), ("--to-diffusers", to_diffusers), ("--from-torch", args.from_torch),
                            ("--from-diffusers", from_diffusers)) if v is not None]
    if len(given) != 1:
        raise ConfigError("convert needs exactly one of --out FILE or --to-diffusers DIR (export), --from-torch FILE "
                          "or --from-diffusers DIR (import)" + (f"; got {' and '.join(given)}" if given else ""))
    workdir = _workdir(args.workdir)
    return ConvertConfig(workdir=workdir,
                         out=None if args.out is None else _not_run_file("--out", args.out, _out_file(
                             "--out", args.out, (".safetensors",)), workdir),
                         from_torch=None if args.from_torch is None else _existing_file("--from-torch",
                                                                                        args.from_torch),
                         step=checkpoint_step_from_args(args),
                         image_size=_positive("--image-size", args.image_size),
                         to_diffusers=None if to_diffusers is None else _not_run_file(
                             "--to-diffusers", to_diffusers, new_folder("--to-diffusers", to_diffusers), workdir),
                         from_diffusers=None if from_diffusers is None else existing_folder("--from-diffusers",
                                                                                            from_diffusers))


__all__ = [
    "ARCH_FIELD_OPTIONS", "ARCH_NAMES", "BN_STATS", "CHANNELS", "ConfigError", "ConvertConfig", "DEFAULT_EVAL_NUM",
    "DEFAULT_LR_SCHEDULE", "DTYPES", "FIELDS_ADDED_LATER", "LR_SCHEDULES", "MIN_EVAL_NUM",
    "SAMPLER_OPTION_NAMES", "SAMPLING_DEFAULTS", "VARIANCES", "given_sampler_options", "grid_sampler_settings",
    "lr_schedule_from_args", "sampler_option_names", "sampler_settings",
    "DataConfig", "DiffusionConfig", "LAYOUTS", "MIN_TIMESTEPS", "ModelConfig", "OPTION_NAMES", "OptimConfig",
    "SAMPLERS", "SCHEDULES", "SampleConfig", "TrainConfig", "arch_config", "check_arch", "check_image_size",
    "check_timesteps_option", "checkpoint_step_from_args", "complete_identity", "convert_config_from_args",
    "default_size_multiple",
    "identity", "identity_mismatch", "model_config_from_arch", "parse_features", "resolve_data_source",
    "sample_config_from_args", "to_dict", "train_config_from_args", "train_config_from_identity",
]
