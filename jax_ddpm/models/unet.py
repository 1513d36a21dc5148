"""Kept for imports written before the registry: the chapter's U-Net lives in ``chapter_unet``."""
from .chapter_unet import Block, SinusoidalPositionEmbeddings, UNet

__all__ = ["Block", "SinusoidalPositionEmbeddings", "UNet"]
