"""The configuration of diffusers' ``UNet2DModel`` port (:class:`UNet2DConfig`), its channel
plan, its safetensors metadata form and the digits-sized default.

The fields are diffusers 0.42.1's ``UNet2DModel.__init__`` arguments with their names,
meanings and defaults; what the port does not implement is refused in ``__post_init__`` with
:class:`~jax_ddpm.models.arch.ArchConfigError` naming the field and the value. The module
itself is in :mod:`jax_ddpm.models.unet2d`, which re-exports everything here.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np

from .arch import ArchConfigError

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2D", None)
ACT_FNS = ("silu", "swish")  # diffusers' get_activation maps both to nn.SiLU
METADATA_KEY = "unet2d_config"  # safetensors metadata: the config as one JSON object


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- the config
@dataclass(frozen=True)
class UNet2DConfig:
    """diffusers' ``UNet2DModel`` arguments (0.42.1), same names, meanings and defaults.

    Implemented: everything with the values listed here. Refused (``ArchConfigError``):
    ``time_embedding_type`` other than ``positional`` (fourier, learned), block types other
    than ``DownBlock2D``/``AttnDownBlock2D``/``UpBlock2D``/``AttnUpBlock2D`` (a ``UNetRes``
    prefix is stripped, as diffusers does), ``act_fn`` other than silu/swish,
    ``resnet_time_scale_shift`` other than ``default``, ``downsample_type``/``upsample_type``
    other than ``conv`` (or None, diffusers' "conv"), ``downsample_padding`` other than 0/1
    (others break the skip shapes), ``class_embed_type``/``num_class_embeds`` other than None,
    ``norm_num_groups`` None, group counts that do not divide a normalised channel count,
    ``attention_head_dim`` not dividing an attention's channels.

    ``sample_size`` (the pipeline's image size) and ``num_train_timesteps`` (only read by
    ``time_embedding_type="learned"``) do not enter the forward pass; they are kept so that a
    config round-trips. ``attention_head_dim`` None means one head (head_dim = channels).
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    downsample_type: str | None = "conv"
    upsample_type: str | None = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int | None = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None

    def __post_init__(self):
        def fix(name, value):
            object.__setattr__(self, name, value)

        def refuse(name, what):
            raise ArchConfigError(name, f"{what}, got {getattr(self, name)!r}")

        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                refuse(name, "must be a list")
            fix(name, tuple(value))
        strip = lambda s: s[7:] if isinstance(s, str) and s.startswith("UNetRes") else s  # noqa: E731 (diffusers)
        fix("down_block_types", tuple(strip(s) for s in self.down_block_types))
        fix("up_block_types", tuple(strip(s) for s in self.up_block_types))
        if isinstance(self.sample_size, Sequence) and not isinstance(self.sample_size, str):
            fix("sample_size", tuple(self.sample_size))

        ss = self.sample_size
        if not (ss is None or (_is_int(ss) and ss > 0)
                or (isinstance(ss, tuple) and len(ss) == 2 and all(_is_int(v) and v > 0 for v in ss))):
            refuse("sample_size", "must be None, a positive integer or [height, width]")
        for name in ("in_channels", "out_channels", "layers_per_block"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                refuse(name, "must be a positive integer")
        for name in ("center_input_sample", "flip_sin_to_cos", "add_attention"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                refuse(name, "must be true or false")
        if self.time_embedding_type != "positional":
            refuse("time_embedding_type", "only 'positional' is implemented (not fourier or learned)")
        if self.time_embedding_dim is not None and (not _is_int(self.time_embedding_dim)
                                                    or self.time_embedding_dim < 1):
            refuse("time_embedding_dim", "must be None (4 * block_out_channels[0]) or a positive integer")
        n = len(self.block_out_channels)
        if n < 1 or any(not _is_int(c) or c < 1 for c in self.block_out_channels):
            refuse("block_out_channels", "must be a non-empty list of positive integers")
        if not _is_number(self.freq_shift) or not math.isfinite(self.freq_shift):
            refuse("freq_shift", "must be a number")
        if self.block_out_channels[0] // 2 - self.freq_shift == 0:
            refuse("freq_shift", "makes block_out_channels[0] // 2 - freq_shift zero (a division by zero)")
        for name, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            bad = [s for s in getattr(self, name) if s not in allowed]
            if bad:
                raise ArchConfigError(name, f"only {' and '.join(allowed)} are implemented, got {bad[0]!r}")
            if len(getattr(self, name)) != n:
                raise ArchConfigError(name, f"needs one entry per block_out_channels ({n}), "
                                      f"got {len(getattr(self, name))}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            refuse("mid_block_type", "only 'UNetMidBlock2D' or None is implemented")
        if not _is_number(self.mid_block_scale_factor) or not self.mid_block_scale_factor > 0:
            refuse("mid_block_scale_factor", "must be a positive number")
        if not _is_int(self.downsample_padding) or self.downsample_padding not in (0, 1):
            refuse("downsample_padding", "must be 0 (pad right/bottom) or 1")
        for name in ("downsample_type", "upsample_type"):
            if getattr(self, name) not in ("conv", None):
                refuse(name, "only 'conv' is implemented")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            refuse("dropout", "must be in [0, 1)")
        if self.act_fn not in ACT_FNS:
            refuse("act_fn", "only silu (swish) is implemented")
        if not _is_number(self.norm_eps) or not self.norm_eps > 0:
            refuse("norm_eps", "must be a positive number")
        if self.resnet_time_scale_shift != "default":
            refuse("resnet_time_scale_shift", "only 'default' is implemented")
        if self.class_embed_type is not None:
            refuse("class_embed_type", "class conditioning is not implemented: must be None")
        if self.num_class_embeds is not None:
            refuse("num_class_embeds", "class conditioning is not implemented: must be None")
        if self.num_train_timesteps is not None and not _is_int(self.num_train_timesteps):
            refuse("num_train_timesteps", "must be None or an integer")
        if not _is_int(self.norm_num_groups) or self.norm_num_groups < 1:
            refuse("norm_num_groups", "must be a positive integer")
        if self.attn_norm_num_groups is not None and (not _is_int(self.attn_norm_num_groups)
                                                      or self.attn_norm_num_groups < 1):
            refuse("attn_norm_num_groups", "must be None or a positive integer")
        if self.attention_head_dim is not None and (not _is_int(self.attention_head_dim)
                                                    or self.attention_head_dim < 1):
            refuse("attention_head_dim", "must be None (one head) or a positive integer")
        plan = channel_plan(self)
        for field_name, groups in (("norm_num_groups", self.norm_num_groups),
                                   ("attn_norm_num_groups", self.attn_norm_num_groups)):
            for where, channels in plan[field_name]:
                if channels % groups:
                    raise ArchConfigError(field_name, f"{groups} groups do not divide the {channels} channels of "
                                          f"{where}, got {groups}")
        for where, channels in plan["attention"]:
            head_dim = self.attention_head_dim or channels
            if channels % head_dim:
                raise ArchConfigError("attention_head_dim", f"does not divide the {channels} channels of {where}, "
                                      f"got {self.attention_head_dim}")

    @property
    def img_channels(self) -> int:
        """``in_channels`` (the name the chapter's config uses for the image channels)."""
        return self.in_channels

    @property
    def time_embed_dim(self) -> int:
        """The time embedding's width: ``time_embedding_dim or 4 * block_out_channels[0]`` (diffusers)."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (tuples as lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(UNet2DConfig))


def config_from_dict(d: Mapping[str, Any]) -> UNet2DConfig:
    """``UNet2DConfig(**d)``, refusing keys that are not fields (ArchConfigError naming the key).

    Missing keys take diffusers' defaults, as in diffusers.
    """
    for key in d:
        if key not in CONFIG_FIELDS:
            raise ArchConfigError(str(key), f"is not a UNet2DModel setting this port implements (diffusers 0.42.1); "
                                  f"refused rather than ignored, got {d[key]!r}")
    return UNet2DConfig(**dict(d))


def channel_plan(config: UNet2DConfig) -> dict[str, list[tuple[str, int]]]:
    """Where each GroupNorm and attention sits and its channel count, following the skip
    stack exactly as the forward pass builds it: ``{'norm_num_groups': [(module, C)],
    'attn_norm_num_groups': [...], 'attention': [...], 'resnets': [(module, C_in, C_out)]}``."""
    boc, layers = config.block_out_channels, config.layers_per_block
    n = len(boc)
    out = {"norm_num_groups": [], "attn_norm_num_groups": [], "attention": [], "resnets": []}

    def resnet(where, c_in, c_out):
        out["resnets"].append((where, c_in, c_out))
        out["norm_num_groups"] += [(f"{where}.norm1", c_in), (f"{where}.norm2", c_out)]

    def attention(where, c, groups_field="norm_num_groups"):
        out["attention"].append((where, c))
        if groups_field == "attn_norm_num_groups" and config.attn_norm_num_groups is not None:
            out["attn_norm_num_groups"].append((f"{where}.group_norm", c))
        else:
            out["norm_num_groups"].append((f"{where}.group_norm", c))

    ch, skips = boc[0], [boc[0]]
    for i, kind in enumerate(config.down_block_types):
        for j in range(layers):
            resnet(f"down_blocks.{i}.resnets.{j}", ch, boc[i])
            ch = boc[i]
            if kind == "AttnDownBlock2D":
                attention(f"down_blocks.{i}.attentions.{j}", ch)
            skips.append(ch)
        if i < n - 1:
            skips.append(ch)
    if config.mid_block_type is not None:
        resnet("mid_block.resnets.0", ch, ch)
        if config.add_attention:
            attention("mid_block.attentions.0", ch, "attn_norm_num_groups")
        resnet("mid_block.resnets.1", ch, ch)
    for i, kind in enumerate(config.up_block_types):
        c_out = boc[n - 1 - i]
        for j in range(layers + 1):
            resnet(f"up_blocks.{i}.resnets.{j}", ch + skips.pop(), c_out)
            ch = c_out
            if kind == "AttnUpBlock2D":
                attention(f"up_blocks.{i}.attentions.{j}", ch)
    out["norm_num_groups"].append(("conv_norm_out", boc[0]))
    return out


# ----------------------------------------------------------------------------- metadata and defaults
def to_metadata(config: UNet2DConfig) -> dict[str, str]:
    """``{'arch': 'unet2d', 'unet2d_config': <the config as one JSON object>}``."""
    return {"arch": "unet2d", METADATA_KEY: json.dumps(config.to_dict(), sort_keys=True)}


def from_metadata(meta: Mapping[str, str]) -> UNet2DConfig:
    """Inverse of :func:`to_metadata`. Raises ValueError (ArchConfigError naming a field)."""
    if METADATA_KEY not in meta:
        raise ValueError(f"metadata lacks {METADATA_KEY}")
    try:
        d = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"metadata {METADATA_KEY} is not JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"metadata {METADATA_KEY} is not a JSON object")
    return config_from_dict(d)


def default_config(channels: int = 1) -> UNet2DConfig:
    """A digits-sized model (1.11 M parameters): 3 levels (32, 64, 64), one resnet per
    level, attention at the lowest resolution (4x4 for 16x16 images) and in the mid block,
    head_dim 16, 8 groups, sample_size 16; everything else diffusers' defaults."""
    return UNet2DConfig(sample_size=16, in_channels=channels, out_channels=channels,
                        block_out_channels=(32, 64, 64), layers_per_block=1,
                        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                        attention_head_dim=16, norm_num_groups=8)


def config_from_fields(channels: int, arch_config: str = "") -> UNet2DConfig:
    """The config of ``ModelConfig.arch_config``: the config as one JSON object (the format of
    :func:`to_metadata`'s ``unet2d_config``), or ``""`` (work folders written before the field)
    for the digits-sized :func:`default_config`. Its ``in_channels`` and ``out_channels`` must
    be ``channels``.

    Raises:
      ValueError: not a JSON object; ArchConfigError: a refused value or other channels.
    """
    if not arch_config:
        return default_config(channels)
    config = from_metadata({METADATA_KEY: arch_config})
    for name in ("in_channels", "out_channels"):
        if getattr(config, name) != channels:
            raise ArchConfigError(name, f"must equal the image channels ({channels}), got {getattr(config, name)}")
    return config
