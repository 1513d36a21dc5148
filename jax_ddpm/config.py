"""Typed, frozen run configurations, built and validated at the command-line boundary.

``cli.py`` parses argv into an ``argparse.Namespace``; the ``*_config_from_args``
functions here turn it into frozen dataclasses and raise :class:`ConfigError` with one
line naming the option and what is wrong. Nothing below this module sees a namespace:
factories unpack the dataclasses into scalars.

A training run's *identity* (:func:`identity`) is everything that decides which numbers
it computes: model, diffusion, data and optimizer settings and the seed. A resume must
keep it; training-length and bookkeeping options (``--steps``, ``--checkpoint-every``,
``--sample-every``, ...) may change, and so may the devices: N devices compute the same
maths as one (``jax_ddpm.parallel``), so neither the device count nor ``--distributed`` is
part of the identity.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "chapter")
DTYPES = ("float32", "bfloat16")
LAYOUTS = ("auto", "nhwc", "nchw")
BN_STATS = ("batch", "running")  # sampling: BatchNorm with the sample batch's or the running statistics
CHANNELS = (1, 3)
DOWNSAMPLINGS = 3  # the U-Net halves H and W three times: sizes must be multiples of 2**3
CONFIG_VERSION = 1


class ConfigError(ValueError):
    """Bad user input; the message is one line that names the option or file."""


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net (``jax_ddpm.models.UNet``) and the image shape it is trained on."""

    image_size: int = 16
    channels: int = 1
    features: tuple[int, ...] = (16, 32, 64, 128)
    time_emb_dim: int = 32
    dtype: str = "float32"  # compute dtype; parameters stay float32


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 200
    schedule: str = "cosine"


@dataclass(frozen=True)
class DataConfig:
    """``source`` is ``'digits'`` or an absolute path (folder, .npz or .npy)."""

    source: str = "digits"
    layout: str = "auto"


@dataclass(frozen=True)
class OptimConfig:
    batch_size: int = 32
    lr: float = 1e-3
    ema_decay: float = 0.995
    grad_clip: float = 1.0  # 0 = no clipping


@dataclass(frozen=True)
class TrainConfig:
    workdir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    steps: int = 3000
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    sample_every: int = 0  # 0 = only at the end
    num_samples: int = 64
    bn_stats: str = "batch"
    log_every: int = 25
    quiet: bool = False
    distributed: bool = False  # join a multi-process run (jax.distributed.initialize); not part of the identity


@dataclass(frozen=True)
class SampleConfig:
    workdir: str
    out: str
    num: int = 64
    seed: int = 0
    sampler: str = "ddpm"
    step: int | None = None  # checkpoint step; None = latest
    noise: str | None = None  # .npz with x_T [N, H, W, C] and noises [T, N, H, W, C]
    clip_denoised: bool = True
    bn_stats: str = "batch"


@dataclass(frozen=True)
class ConvertConfig:
    workdir: str
    out: str | None = None  # export: safetensors file to write
    from_torch: str | None = None  # import: safetensors file to read
    step: int | None = None
    image_size: int = 16  # import only: the image size recorded for sampling


# ----------------------------------------------------------------------------- identity / JSON
# Dotted config field -> the option that sets it (for error messages).
OPTION_NAMES = {
    "model.image_size": "--image-size", "model.channels": "--channels", "model.features": "--features",
    "model.time_emb_dim": "--time-emb-dim", "model.dtype": "--dtype",
    "diffusion.timesteps": "--timesteps", "diffusion.schedule": "--schedule",
    "data.source": "--data", "data.layout": "--layout",
    "optim.batch_size": "--batch-size", "optim.lr": "--lr", "optim.ema_decay": "--ema-decay",
    "optim.grad_clip": "--grad-clip", "seed": "--seed",
}


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


def identity_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """First difference between two :func:`identity` dicts as a phrase, or None if equal."""
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            option = OPTION_NAMES.get(key, key)
            return f"{option} was {_show(saved.get(key))}, now {_show(current.get(key))}"
    return None


def _show(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    return str(v)


def train_config_from_dict(d: Mapping[str, Any]) -> TrainConfig:
    """Inverse of :func:`to_dict` for a ``TrainConfig`` (as written to ``config.json``)."""
    model = dict(d["model"])
    model["features"] = tuple(model["features"])
    return TrainConfig(workdir=d["workdir"], model=ModelConfig(**model), diffusion=DiffusionConfig(**d["diffusion"]),
                       data=DataConfig(**d["data"]), optim=OptimConfig(**d["optim"]),
                       **{k: d[k] for k in ("seed", "steps", "checkpoint_every", "keep_checkpoints", "sample_every",
                                            "num_samples", "bn_stats", "log_every", "quiet", "distributed")
                          if k in d})


def train_config_from_identity(workdir: str, ident: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig whose :func:`identity` is ``ident`` (other fields at their defaults)."""
    parts: dict[str, dict] = {"model": {}, "diffusion": {}, "data": {}, "optim": {}}
    for key, value in ident.items():
        if "." in key:
            part, name = key.split(".", 1)
            parts[part][name] = tuple(value) if isinstance(value, list) else value
    return TrainConfig(workdir=workdir, model=ModelConfig(**parts["model"]),
                       diffusion=DiffusionConfig(**parts["diffusion"]), data=DataConfig(**parts["data"]),
                       optim=OptimConfig(**parts["optim"]), seed=int(ident["seed"]))


# ----------------------------------------------------------------------------- validation
def parse_features(text: str) -> tuple[int, ...]:
    """``'16,32,64,128'`` -> (16, 32, 64, 128); four positive integers."""
    try:
        features = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        raise ConfigError(f"--features must be 4 comma-separated integers, got {text!r}") from None
    if len(features) != 4 or any(f < 1 for f in features):
        raise ConfigError(f"--features must be 4 comma-separated positive integers, got {text!r}")
    return features


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value}")
    return value


def _non_negative(name: str, value: int) -> int:
    if value < 0:
        raise ConfigError(f"{name} must be 0 or a positive integer, got {value}")
    return value


def check_image_size(size: int) -> int:
    step = 2 ** DOWNSAMPLINGS
    if size < step or size % step:
        raise ConfigError(f"--image-size must be a positive multiple of {step} (the U-Net halves it "
                          f"{DOWNSAMPLINGS} times), got {size}")
    return size


def _choice(name: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _finite_float(name: str, value: float, low: float, high: float | None = None, low_open: bool = False,
                  high_open: bool = True) -> float:
    ok = value == value and value not in (float("inf"), float("-inf"))
    ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = f"{high:g}{')' if high_open else ']'}" if high is not None else "inf)"
        raise ConfigError(f"{name} must be in {lo}, {hi}, got {value}")
    return float(value)


def resolve_data_source(text: str) -> str:
    """``'digits'`` stays; a path must exist and becomes absolute."""
    if text == "digits":
        return text
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.exists(path):
        raise ConfigError(f"--data {text}: no such file or directory (use 'digits' or a folder, .npz or .npy)")
    if os.path.isfile(path) and not path.lower().endswith((".npz", ".npy")):
        raise ConfigError(f"--data {text}: a file must be .npz or .npy (or give a folder of images)")
    return path


def train_config_from_args(args: Any) -> TrainConfig:
    """Validates the ``train`` namespace. Raises ConfigError (one line)."""
    model = ModelConfig(image_size=check_image_size(args.image_size),
                        channels=_choice("--channels", args.channels, CHANNELS),
                        features=parse_features(args.features),
                        time_emb_dim=_time_emb_dim(args.time_emb_dim),
                        dtype=_choice("--dtype", args.dtype, DTYPES))
    diffusion = DiffusionConfig(timesteps=_positive("--timesteps", args.timesteps),
                                schedule=_choice("--schedule", args.schedule, SCHEDULES))
    data = DataConfig(source=resolve_data_source(args.data), layout=_choice("--layout", args.layout, LAYOUTS))
    optim = OptimConfig(batch_size=_positive("--batch-size", args.batch_size),
                        lr=_finite_float("--lr", args.lr, 0.0, low_open=True),
                        ema_decay=_finite_float("--ema-decay", args.ema_decay, 0.0, 1.0),
                        grad_clip=_finite_float("--grad-clip", args.grad_clip, 0.0))
    return TrainConfig(workdir=_workdir(args.workdir), model=model, diffusion=diffusion, data=data, optim=optim,
                       seed=_non_negative("--seed", args.seed), steps=_positive("--steps", args.steps),
                       checkpoint_every=_positive("--checkpoint-every", args.checkpoint_every),
                       keep_checkpoints=_positive("--keep-checkpoints", args.keep_checkpoints),
                       sample_every=_non_negative("--sample-every", args.sample_every),
                       num_samples=_positive("--num-samples", args.num_samples),
                       bn_stats=_choice("--bn-stats", args.bn_stats, BN_STATS),
                       log_every=_positive("--log-every", args.log_every), quiet=bool(args.quiet),
                       distributed=bool(getattr(args, "distributed", False)))


def _time_emb_dim(value: int) -> int:
    if value < 4 or value % 2:
        raise ConfigError(f"--time-emb-dim must be an even integer >= 4, got {value}")
    return value


def _workdir(text: str) -> str:
    path = os.path.abspath(os.path.expanduser(text))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--workdir {text}: exists and is not a folder")
    return path


def _out_file(option: str, text: str, suffixes: tuple[str, ...]) -> str:
    path = os.path.abspath(os.path.expanduser(text))
    if not path.lower().endswith(suffixes):
        raise ConfigError(f"{option} {text}: must end in {' or '.join(suffixes)}")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ConfigError(f"{option} {text}: folder {parent} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"{option} {text}: is a folder")
    return path


def _existing_file(option: str, text: str) -> str:
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.isfile(path):
        raise ConfigError(f"{option} {text}: no such file")
    return path


def sample_config_from_args(args: Any) -> SampleConfig:
    """Validates the ``sample`` namespace. Raises ConfigError (one line)."""
    return SampleConfig(workdir=_workdir(args.workdir), out=_out_file("--out", args.out, (".png", ".npz")),
                        num=_positive("--num", args.num), seed=_non_negative("--seed", args.seed),
                        sampler=_choice("--sampler", args.sampler, SAMPLERS),
                        step=None if args.steps is None else _non_negative("--steps", args.steps),
                        noise=None if args.noise is None else _existing_file("--noise", args.noise),
                        clip_denoised=bool(args.clip_denoised),
                        bn_stats=_choice("--bn-stats", args.bn_stats, BN_STATS))


def convert_config_from_args(args: Any) -> ConvertConfig:
    """Validates the ``convert`` namespace: exactly one of --out / --from-torch."""
    if (args.out is None) == (args.from_torch is None):
        raise ConfigError("convert needs exactly one of --out FILE (export) or --from-torch FILE (import)")
    return ConvertConfig(workdir=_workdir(args.workdir),
                         out=None if args.out is None else _out_file("--out", args.out, (".safetensors",)),
                         from_torch=None if args.from_torch is None else _existing_file("--from-torch",
                                                                                        args.from_torch),
                         step=None if args.steps is None else _non_negative("--steps", args.steps),
                         image_size=check_image_size(args.image_size))


__all__ = [
    "CONFIG_VERSION", "ConfigError", "ConvertConfig", "DataConfig", "DiffusionConfig", "ModelConfig", "OptimConfig",
    "SampleConfig", "TrainConfig", "check_image_size", "convert_config_from_args", "identity", "identity_mismatch",
    "parse_features", "resolve_data_source", "sample_config_from_args", "to_dict", "train_config_from_args",
    "train_config_from_dict", "train_config_from_identity",
]
