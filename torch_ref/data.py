"""A real image batch for the reference's demo run: scikit-learn's bundled digits."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def digits_tensor(image_size=32):
    """All 1,797 8x8 digits as a float32 [N, 1, S, S] tensor scaled to [-1, 1]."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    x = torch.from_numpy(images)[:, None]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1
