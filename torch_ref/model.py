"""The chapter's denoiser (20.3.2): Block, SinusoidalPositionEmbeddings and UNet.

``Block`` and ``SinusoidalPositionEmbeddings`` are exactly as printed, including E5 (one
BatchNorm2d applied twice per Block). ``UNet`` has its wiring fixed for E1; see
``torch_ref/ERRATA.md``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, in_ch, out_ch, time_emb_dim, up=False):
        super().__init__()
        self.time_mlp = nn.Linear(time_emb_dim, out_ch)
        if up:
            self.conv1 = nn.Conv2d(2 * in_ch, out_ch, 3, padding=1)
            self.transform = nn.ConvTranspose2d(out_ch, out_ch, 4, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
            self.transform = nn.Conv2d(out_ch, out_ch, 4, stride=2, padding=1)

        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # E5 (kept as printed): this one BatchNorm2d normalises both conv outputs, so its
        # running statistics are updated twice per forward pass in training mode.
        self.bnorm = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()

    def forward(self, x, t):
        h = self.bnorm(self.relu(self.conv1(x)))
        time_emb = self.relu(self.time_mlp(t))
        time_emb = time_emb[(...,) + (None,) * 2]
        h = h + time_emb
        h = self.bnorm(self.relu(self.conv2(h)))
        return self.transform(h)


class SinusoidalPositionEmbeddings(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, time):
        half_dim = self.dim // 2
        embeddings = np.log(10000) / (half_dim - 1)
        emb = torch.exp(torch.arange(half_dim, device=time.device) * -embeddings)
        emb = time[:, None] * emb[None, :]
        emb = torch.cat((emb.sin(), emb.cos()), dim=-1)
        return emb


class UNet(nn.Module):
    """The chapter's U-Net with its wiring fixed (E1).

    Shapes for features ``[f0, f1, f2, f3]`` and an ``H x W`` input (H, W divisible by 8)::

        x1 = inc(x)                     # [B, f0, H,   W  ]
        x2 = down1(x1, t)               # [B, f1, H/2, W/2]
        x3 = down2(x2, t)               # [B, f2, H/4, W/4]
        x4 = down3(x3, t)               # [B, f3, H/8, W/8]
        x  = up1(cat(x4, x4), t)        # [B, f2, H/4, W/4]
        x  = up2(cat(x,  x3), t)        # [B, f1, H/2, W/2]
        x  = up3(cat(x,  x2), t) + x1   # [B, f0, H,   W  ]
        out = outc(x)                   # [B, C,  H,   W  ]
    """

    def __init__(self, img_channels, time_emb_dim, features=[64, 128, 256, 512]):  # noqa: B006 (chapter's default)
        super().__init__()
        features = list(features)
        if len(features) != 4:
            raise ValueError(f"features must have 4 entries, got {features}")
        self.time_mlp = SinusoidalPositionEmbeddings(time_emb_dim)
        self.inc = nn.Conv2d(img_channels, features[0], kernel_size=3, padding=1)
        self.down1 = Block(features[0], features[1], time_emb_dim)
        self.down2 = Block(features[1], features[2], time_emb_dim)
        self.down3 = Block(features[2], features[3], time_emb_dim)
        # E1: the chapter also builds `bottleneck = Block(f3, f3, up=True)`. A fourth
        # upsampling Block cannot line up with three downsampling ones (the output would be
        # 2H x 2W), so it is not built; see ERRATA.md.
        self.up1 = Block(features[3], features[2], time_emb_dim, up=True)
        self.up2 = Block(features[2], features[1], time_emb_dim, up=True)
        self.up3 = Block(features[1], features[0], time_emb_dim, up=True)
        self.outc = nn.Conv2d(features[0], img_channels, kernel_size=3, padding=1)

    def forward(self, x, t):
        t = self.time_mlp(t)
        x1 = self.inc(x)
        x2 = self.down1(x1, t)
        x3 = self.down2(x2, t)
        x4 = self.down3(x3, t)
        # E1: up-Blocks take 2*in_ch channels: the decoder input concatenated with the
        # encoder output of the same resolution (the chapter adds, at mismatched sizes).
        x = self.up1(torch.cat((x4, x4), dim=1), t)
        x = self.up2(torch.cat((x, x3), dim=1), t)
        x = self.up3(torch.cat((x, x2), dim=1), t) + x1
        output = self.outc(x)
        return output


class ChapterUNet(UNet):
    """The U-Net exactly as printed (E1 unfixed); it fails on its first forward pass.

    Kept only so a test can show the failure the erratum describes.
    """

    def __init__(self, img_channels, time_emb_dim, features=[64, 128, 256, 512]):  # noqa: B006
        super().__init__(img_channels, time_emb_dim, features)
        self.bottleneck = Block(features[3], features[3], time_emb_dim, up=True)

    def forward(self, x, t):
        t = self.time_mlp(t)
        x1 = self.inc(x)
        x2 = self.down1(x1, t)
        x3 = self.down2(x2, t)
        x4 = self.down3(x3, t)
        x5 = self.bottleneck(x4, t)
        x = self.up1(x5, t) + x3
        x = self.up2(x, t) + x2
        x = self.up3(x, t) + x1
        output = self.outc(x)
        return output
