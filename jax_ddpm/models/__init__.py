"""Architectures (Flax Linen, NHWC) and the registry that names them (``registry.get_arch``)."""
from .arch import ArchConfigError, Architecture
from .chapter_unet import Block, ChapterUNetConfig, SinusoidalPositionEmbeddings, UNet
from .layers import TorchBatchNorm
from .registry import ARCH_NAMES, ARCHITECTURES, DEFAULT_ARCH, build_model, get_arch
from .unet2d import UNet2DConfig, UNet2DModel

__all__ = ["ARCHITECTURES", "ARCH_NAMES", "ArchConfigError", "Architecture", "Block", "ChapterUNetConfig",
           "DEFAULT_ARCH", "SinusoidalPositionEmbeddings", "TorchBatchNorm", "UNet", "UNet2DConfig", "UNet2DModel",
           "build_model", "get_arch"]
