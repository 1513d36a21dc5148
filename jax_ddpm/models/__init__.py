from .layers import TorchBatchNorm
from .unet import Block, SinusoidalPositionEmbeddings, UNet

__all__ = ["Block", "SinusoidalPositionEmbeddings", "TorchBatchNorm", "UNet"]
