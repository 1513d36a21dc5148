"""The weight table of diffusers' ``UNet2DModel`` port: every tensor's torch name, Flax path
and layout (:func:`weight_table`, rows :data:`~jax_ddpm.models.arch.WeightRow`).

Torch names are diffusers 0.42.1's ``UNet2DModel.state_dict()`` keys; Flax paths are the
module names of :mod:`jax_ddpm.models.unet2d`, diffusers' attribute paths with ``.`` before
an index written ``_`` (:func:`_flax_path`). :mod:`jax_ddpm.models.unet2d` re-exports
:func:`weight_table`.
"""
from __future__ import annotations

from .arch import WeightRow
from .unet2d_config import UNet2DConfig, channel_plan


def _module_rows(torch_prefix: str, flax_path: tuple[str, ...], kind: str) -> list[WeightRow]:
    p = ("params",) + flax_path
    if kind == "conv":
        return [(f"{torch_prefix}.weight", p + ("kernel",), "conv"), (f"{torch_prefix}.bias", p + ("bias",), "same")]
    if kind == "dense":
        return [(f"{torch_prefix}.weight", p + ("kernel",), "dense"), (f"{torch_prefix}.bias", p + ("bias",), "same")]
    if kind == "norm":
        return [(f"{torch_prefix}.weight", p + ("scale",), "same"), (f"{torch_prefix}.bias", p + ("bias",), "same")]
    raise AssertionError(kind)


def _flax_path(torch_prefix: str) -> tuple[str, ...]:
    """``down_blocks.0.resnets.1.conv1`` -> ``('down_blocks_0', 'resnets_1', 'conv1')``."""
    parts, out = torch_prefix.split("."), []
    for part in parts:
        if part.isdigit():
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _rows(torch_prefix: str, kind: str) -> list[WeightRow]:
    return _module_rows(torch_prefix, _flax_path(torch_prefix), kind)


def weight_table(config: UNet2DConfig) -> list[WeightRow]:
    """Rows (torch_name, flax_path, layout) for every tensor of ``config``'s model, named as
    diffusers 0.42.1's ``UNet2DModel.state_dict()`` (attention: ``to_q/to_k/to_v/to_out.0``)."""
    plan = channel_plan(config)
    rows = _rows("conv_in", "conv") + _rows("time_embedding.linear_1", "dense") + \
        _rows("time_embedding.linear_2", "dense")
    for where, c_in, c_out in plan["resnets"]:
        rows += _rows(f"{where}.norm1", "norm") + _rows(f"{where}.conv1", "conv") + \
            _rows(f"{where}.time_emb_proj", "dense") + _rows(f"{where}.norm2", "norm") + _rows(f"{where}.conv2", "conv")
        if c_in != c_out:
            rows += _rows(f"{where}.conv_shortcut", "conv")
    for where, _ in plan["attention"]:
        rows += _rows(f"{where}.group_norm", "norm")
        rows += [r for n in ("to_q", "to_k", "to_v", "to_out.0") for r in _rows(f"{where}.{n}", "dense")]
    n = len(config.block_out_channels)
    for i in range(n - 1):
        rows += _rows(f"down_blocks.{i}.downsamplers.0.conv", "conv")
        rows += _rows(f"up_blocks.{i}.upsamplers.0.conv", "conv")
    rows += _rows("conv_norm_out", "norm") + _rows("conv_out", "conv")
    return rows


__all__ = ["weight_table"]
