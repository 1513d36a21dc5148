"""The ``train`` options that set diffusers' ``UNet2DModel`` config (``--arch unet2d``), and
``ModelConfig.arch_config``: that config as canonical JSON.

Architectures whose registry entry reads ``arch_config`` (``Architecture.fields``; today
``unet2d``) are described by their whole config, not by the chapter's ``--features`` /
``--time-emb-dim``: a config has more fields than the command has options, and a diffusers
``config.json`` may set any of them. ``ModelConfig.arch_config`` holds the config as one
JSON object with sorted keys (the format of the ``unet2d_config`` safetensors metadata), so
it is part of the run's identity like any other model setting; ``""`` (work folders written
before the field) means the digits-sized default.

The config is built as: ``--unet2d-config FILE`` (a diffusers UNet ``config.json``, or a
diffusers UNet or pipeline folder) or the digits-sized default, then every option given on
top of it; ``in_channels``/``out_channels`` are ``--channels`` and ``sample_size`` is
``--image-size``. A value the port does not implement is refused by ``UNet2DConfig`` and
reported naming the option that sets it (or the file and the field).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from ..diffusers_io import CONFIG_NAME, init_kwargs_from_diffusers
from ..models.arch import ArchConfigError
from ..models.unet2d import UNet2DConfig, config_from_dict, default_config
from .checks import ConfigError, int_list

ARCH_CONFIG_FIELD = "arch_config"  # the ModelConfig field (and Architecture.fields entry)
# UNet2DConfig field -> the train option that sets it (errors name the option)
UNET2D_FIELD_OPTIONS = {
    "block_out_channels": "--block-out-channels", "layers_per_block": "--layers-per-block",
    "down_block_types": "--attention-levels", "up_block_types": "--attention-levels",
    "attention_head_dim": "--attention-head-dim", "norm_num_groups": "--norm-num-groups", "dropout": "--dropout",
    "in_channels": "--channels", "out_channels": "--channels", "sample_size": "--image-size",
}
# Not compared on resume: diffusers' sample_size is the pipeline's image size, set to --image-size
# (compared as model.image_size); work folders written before arch_config hold the default's 16.
NOT_COMPARED_FIELDS = ("sample_size",)
# option -> argparse dest, in the order of --help
UNET2D_OPTIONS = {"--unet2d-config": "unet2d_config", "--block-out-channels": "block_out_channels",
                  "--layers-per-block": "layers_per_block", "--attention-levels": "attention_levels",
                  "--attention-head-dim": "attention_head_dim", "--norm-num-groups": "norm_num_groups",
                  "--dropout": "dropout"}


def add_unet2d_arguments(parser) -> None:
    """The ``--arch unet2d`` option group of ``jax-ddpm train`` (every default: None = not given)."""
    d = default_config(1)
    g = parser.add_argument_group(
        "unet2d model (--arch unet2d: diffusers' UNet2DModel)",
        "Start from --unet2d-config or the digits-sized default below; each option given replaces\n"
        "that field. Any other field: --unet2d-config. in_channels = out_channels = --channels,\n"
        "sample_size = --image-size.")
    g.add_argument("--unet2d-config", metavar="FILE", default=None,
                   help="a diffusers UNet2DModel config.json (or a diffusers UNet or pipeline folder): every field, "
                        "refused naming the field where this port does not implement its value")
    g.add_argument("--block-out-channels", metavar="C0,C1,...", default=None,
                   help="channels of each level, highest resolution first; each level after the first halves the "
                        "image (size multiple 2^(levels-1)); default "
                        f"{','.join(map(str, d.block_out_channels))}")
    g.add_argument("--layers-per-block", type=int, metavar="N", default=None,
                   help=f"resnets per down level (up levels run N+1); default {d.layers_per_block}")
    g.add_argument("--attention-levels", metavar="L0,L1,...|none", default=None,
                   help="levels (0 = highest resolution) whose blocks have self-attention (AttnDownBlock2D and the "
                        "mirrored AttnUpBlock2D); the mid block has attention unless add_attention is false; "
                        "default: the config's blocks, or the lowest-resolution level when --block-out-channels "
                        "changes the level count")
    g.add_argument("--attention-head-dim", metavar="D|none", default=None,
                   help=f"channels per attention head ('none': one head); default {d.attention_head_dim}")
    g.add_argument("--norm-num-groups", type=int, metavar="G", default=None,
                   help=f"GroupNorm groups (must divide every normalised channel count); default {d.norm_num_groups}")
    g.add_argument("--dropout", type=float, metavar="P", default=None,
                   help=f"dropout in the resnets while training, in [0, 1); default {d.dropout}")


def given_unet2d_options(args: Any) -> list[str]:
    """The unet2d options set on the command line (argparse dests not None)."""
    return [opt for opt, dest in UNET2D_OPTIONS.items() if getattr(args, dest, None) is not None]


def canonical_arch_config(config: Any) -> str:
    """The config as one JSON object with sorted keys (``ModelConfig.arch_config``)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    return json.dumps(d, sort_keys=True)


def read_unet2d_config(option: str, text: str) -> tuple[str, dict[str, Any]]:
    """``(path, the UNet2DModel arguments it sets)`` of a diffusers UNet ``config.json`` (or the
    one of a UNet folder, or a pipeline's ``unet/``); the values are checked once the options
    are applied on top (:func:`unet2d_config_from_args`)."""
    path = os.path.abspath(os.path.expanduser(text))
    if os.path.isdir(path):
        for candidate in (os.path.join(path, CONFIG_NAME), os.path.join(path, "unet", CONFIG_NAME)):
            if os.path.isfile(candidate):
                path = candidate
                break
        else:
            raise ConfigError(f"{option} {text}: a folder without {CONFIG_NAME} or unet/{CONFIG_NAME}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{option} {text}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{option} {path}: not a readable JSON file ({' '.join(str(e).split())})") from None
    try:
        return path, init_kwargs_from_diffusers(raw)
    except ArchConfigError as e:
        raise ConfigError(f"{option} {path}: {e}") from None


def _attention_levels(text: str, n: int) -> set[int]:
    if text.strip().lower() == "none":
        return set()
    levels = set()
    for part in text.split(","):
        try:
            level = int(part)
        except ValueError:
            raise ConfigError(f"--attention-levels must be 'none' or comma-separated level numbers, "
                              f"got {text!r}") from None
        if not 0 <= level < n:
            raise ConfigError(f"--attention-levels: level {level} does not exist; the model has {n} levels "
                              f"(0 ... {n - 1}), got {text!r}")
        levels.add(level)
    return levels


def _head_dim(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"--attention-head-dim must be a positive integer or 'none', got {text!r}")
    return value


def _block_types(levels: set[int], n: int) -> dict[str, tuple[str, ...]]:
    down = tuple("AttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if n - 1 - i in levels else "UpBlock2D" for i in range(n))
    return {"down_block_types": down, "up_block_types": up}


def arch_error(e: ArchConfigError, source: str | None = None) -> ConfigError:
    """An ``ArchConfigError`` as a ConfigError naming the option that sets its field, else
    ``source`` (the config file) and the field."""
    option = UNET2D_FIELD_OPTIONS.get(e.field)
    if option is None:
        return ConfigError(f"{source or '--unet2d-config'}: {e}")
    return ConfigError(f"{option}: {e.message}")


def unet2d_config_from_args(args: Any, channels: int, image_size: int) -> UNet2DConfig:
    """The ``--arch unet2d`` config: the file's (or the default), the options given on top."""
    source = None
    if args.unet2d_config is not None:
        path, given = read_unet2d_config("--unet2d-config", args.unet2d_config)
        source = f"--unet2d-config {path}"
        base = {**UNet2DConfig().to_dict(), **given}  # diffusers' defaults for what the file leaves out
        for name in ("in_channels", "out_channels"):
            if base[name] != channels:
                raise ConfigError(f"{source}: {name} is {base[name]!r}, but --channels is {channels} "
                                  f"(give --channels {base[name]!r})")
    else:
        base = default_config(channels).to_dict()
    changes: dict[str, Any] = {"sample_size": image_size}
    if args.block_out_channels is not None:
        changes["block_out_channels"] = int_list("--block-out-channels", args.block_out_channels)
    old_n = len(base["block_out_channels"]) if isinstance(base["block_out_channels"], (list, tuple)) else None
    n = len(changes["block_out_channels"]) if "block_out_channels" in changes else old_n
    if n is not None and args.attention_levels is not None:  # (n None: the file's list is refused below)
        changes.update(_block_types(_attention_levels(args.attention_levels, n), n))
    elif n is not None and n != old_n:
        changes.update(_block_types({n - 1}, n))
    if args.layers_per_block is not None:
        changes["layers_per_block"] = args.layers_per_block
    if args.attention_head_dim is not None:
        changes["attention_head_dim"] = _head_dim(args.attention_head_dim)
    if args.norm_num_groups is not None:
        changes["norm_num_groups"] = args.norm_num_groups
    if args.dropout is not None:
        changes["dropout"] = args.dropout
    try:
        return config_from_dict({**base, **changes})
    except ArchConfigError as e:
        raise arch_error(e, source) from None
    except TypeError as e:  # a value of a kind the config cannot even compare
        raise ConfigError(f"{source or '--arch unet2d'}: {' '.join(str(e).split())}") from None


def arch_config_from_args(args: Any, arch: str, fields: tuple[str, ...], channels: int, image_size: int) -> str:
    """``ModelConfig.arch_config`` for ``train``: canonical JSON for an architecture that reads
    it (``fields``), ``""`` otherwise; the unet2d options are refused for other architectures."""
    if arch != "unet2d" or ARCH_CONFIG_FIELD not in fields:
        given = given_unet2d_options(args)
        if given:
            raise ConfigError(f"{given[0]}: --arch {arch} has no such setting (it is an --arch unet2d option)")
        return ""
    return canonical_arch_config(unet2d_config_from_args(args, channels, image_size))


__all__ = ["ARCH_CONFIG_FIELD", "NOT_COMPARED_FIELDS", "UNET2D_FIELD_OPTIONS", "UNET2D_OPTIONS", "add_unet2d_arguments", "arch_config_from_args",
           "arch_error", "canonical_arch_config", "given_unet2d_options", "read_unet2d_config",
           "unet2d_config_from_args"]
