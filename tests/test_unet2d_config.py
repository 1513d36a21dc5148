"""jax_ddpm.models.unet2d_config: the unet2d config (diffusers' UNet2DModel arguments, their
defaults, what the port refuses) and its registry entry (metadata form, digits default).

Split off tests/test_unet2d.py (the model itself: weight table, forward and gradient parity,
the train step). Nothing here builds a model; the one test that reads diffusers' signature
skips without torch and diffusers.
"""
from __future__ import annotations

import inspect

import pytest

from jax_ddpm import convert
from jax_ddpm.models import registry, unet2d
from jax_ddpm.models.arch import ArchConfigError
from jax_ddpm.models.unet2d import UNet2DConfig

D, AD, U, AU = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"


def _torch():
    torch = pytest.importorskip("torch", reason="the diffusers comparison needs torch")
    pytest.importorskip("diffusers", reason="the diffusers comparison needs diffusers")
    return torch


def test_config_fields_and_defaults_are_diffusers():
    """Every UNet2DModel.__init__ argument of the installed diffusers is a field, with its default."""
    _torch()
    from diffusers import UNet2DModel

    params = dict(inspect.signature(UNet2DModel.__init__).parameters)
    params.pop("self")
    assert set(params) == set(unet2d.CONFIG_FIELDS)
    for name, p in params.items():
        default = getattr(UNet2DConfig(), name)
        assert (tuple(p.default) if isinstance(p.default, (list, tuple)) else p.default) == default, name


@pytest.mark.parametrize("field, value", [
    ("time_embedding_type", "fourier"),
    ("time_embedding_type", "learned"),
    ("down_block_types", ("DownBlock2D", "CrossAttnDownBlock2D")),
    ("down_block_types", ("DownBlock2D", "SkipDownBlock2D")),
    ("up_block_types", ("AttnSkipUpBlock2D", "UpBlock2D")),
    ("down_block_types", ("DownBlock2D",)),  # not one per level
    ("mid_block_type", "UNetMidBlock2DCrossAttn"),
    ("act_fn", "gelu"),
    ("act_fn", "mish"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("resnet_time_scale_shift", "spatial"),
    ("downsample_type", "resnet"),
    ("upsample_type", "resnet"),
    ("downsample_padding", 2),
    ("class_embed_type", "timestep"),
    ("class_embed_type", "identity"),
    ("num_class_embeds", 10),
    ("norm_num_groups", None),
    ("norm_num_groups", 6),           # does not divide 16
    ("attn_norm_num_groups", 5),      # does not divide the mid block's 32
    ("attention_head_dim", 6),        # does not divide 32
    ("dropout", 1.0),
    ("norm_eps", 0.0),
    ("mid_block_scale_factor", 0),
    ("in_channels", 0),
    ("block_out_channels", (16, -32)),
    ("sample_size", "big"),
    ("time_embedding_dim", 0),
    ("flip_sin_to_cos", "yes"),
    ("freq_shift", 8),                # 16 // 2 - 8 = 0: diffusers would divide by zero
])
def test_config_refuses_what_it_does_not_implement(field, value):
    base = dict(block_out_channels=(16, 32), down_block_types=(D, AD), up_block_types=(AU, U), norm_num_groups=8,
                layers_per_block=1)
    with pytest.raises(ArchConfigError) as info:
        UNet2DConfig(**{**base, field: value})
    assert info.value.field == field
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{field}: ") and "got " in msg, msg


def test_config_normalises_lists_and_the_unetres_prefix():
    c = UNet2DConfig(block_out_channels=[16, 32], down_block_types=["UNetResDownBlock2D", AD],
                     up_block_types=[AU, "UNetResUpBlock2D"], norm_num_groups=8, sample_size=[8, 16])
    assert c.block_out_channels == (16, 32) and c.down_block_types == (D, AD) and c.up_block_types == (AU, U)
    assert c.sample_size == (8, 16)
    hash(c)  # frozen and hashable: usable as a static jit argument


def test_config_from_dict_refuses_unknown_keys():
    with pytest.raises(ArchConfigError, match=r"^resnet_skip_time_act: .*got True$"):
        unet2d.config_from_dict({"resnet_skip_time_act": True})


def test_registry_entry():
    arch = registry.get_arch("unet2d")
    config = arch.config_from_fields(3)
    assert arch.fields == ("arch_config",) and not arch.has_batch_stats
    assert config == unet2d.default_config(3) and config.in_channels == config.out_channels == 3
    assert config.block_out_channels == (32, 64, 64) and config.down_block_types == (D, D, AD)
    assert arch.size_multiple(config) == 4 and arch.size_multiple(UNet2DConfig()) == 8
    meta = arch.to_metadata(config)
    assert set(meta) == {"arch", "unet2d_config"} and meta["arch"] == "unet2d"
    assert arch.from_metadata(meta) == config and convert.arch_from_metadata(meta) == ("unet2d", config)
    with pytest.raises(ValueError, match="metadata lacks unet2d_config"):
        arch.from_metadata({"arch": "unet2d"})
    with pytest.raises(ArchConfigError, match="^act_fn: "):
        arch.from_metadata({"unet2d_config": '{"act_fn": "relu"}'})
