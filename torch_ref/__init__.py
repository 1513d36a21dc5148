"""The chapter's PyTorch code, kept as the reference (errata fixed and marked; see ERRATA.md).

This package imports torch and never jax.
"""
from .diffusion import DiffusionProcess, cosine_beta_schedule, linear_beta_schedule
from .model import Block, ChapterUNet, SinusoidalPositionEmbeddings, UNet
from .sampling import chapter_sample, chapter_step, p_mean_variance, p_sample, sample
from .training import loss_fn, make_optimizer, train_step

__all__ = [
    "Block", "ChapterUNet", "DiffusionProcess", "SinusoidalPositionEmbeddings", "UNet",
    "chapter_sample", "chapter_step", "cosine_beta_schedule", "linear_beta_schedule",
    "loss_fn", "make_optimizer", "p_mean_variance", "p_sample", "sample", "train_step",
]
