"""What is measured: the model sizes (:class:`ModelSize`, :data:`SIZES`), their batches per
device and mode (:data:`BATCHES`), the unet2d sizes' sampling chains (:data:`SAMPLE_PLANS`) and
the reference each size is compared with (:func:`reference_impls`).

``benchmarks.cases`` (the runners) re-exports every name here.
"""
from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """One U-Net configuration of the benchmark; ``arch`` names its entry in
    ``jax_ddpm.models.registry`` (the JAX side is built from there). ``features`` are the
    chapter's feature widths or unet2d's ``block_out_channels``; ``arch_config`` is the
    unet2d config as JSON (``ModelConfig.arch_config``'s format; missing keys take
    diffusers' defaults)."""

    name: str
    image_size: int
    channels: int
    features: tuple[int, ...]
    timesteps: int
    note: str
    arch: str = "chapter"
    time_emb_dim: int = 32
    arch_config_json: str = ""

    def arch_config(self):
        """The architecture's config for this size (``Architecture.config_from_fields``, given
        the fields the architecture reads: ``Architecture.fields``)."""
        from jax_ddpm.models.registry import get_arch

        arch = get_arch(self.arch)
        given = {"features": self.features, "time_emb_dim": self.time_emb_dim, "arch_config": self.arch_config_json}
        return arch.config_from_fields(self.channels, **{k: v for k, v in given.items() if k in arch.fields})


def _unet2d_json(**config) -> str:
    return json.dumps(config, sort_keys=True)


_D, _AD, _U, _AU = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"


SIZES = {
    "digits": ModelSize("digits", 16, 1, (16, 32, 64, 128), 200,
                        "jax-ddpm train's default model: scikit-learn digits at 16x16x1, features 16-128, T=200"),
    "chapter": ModelSize("chapter", 64, 3, (64, 128, 256, 512), 100,
                         "the chapter's U-Net: 64x64x3, features 64-512, T=100 (20.3.3)"),
    "probe": ModelSize("probe", 32, 3, (64, 128, 256, 512), 100,
                       "issue 5's CPU probe: the chapter's U-Net at 32x32x3"),
    # jax_ddpm.models.unet2d.default_config(1): what `jax-ddpm train --arch unet2d` builds
    "unet2d-digits": ModelSize(
        "unet2d-digits", 16, 1, (32, 64, 64), 200,
        "unet2d's digits default (jax-ddpm train --arch unet2d): 16x16x1, 32,64,64, attention at 4x4, T=200",
        arch="unet2d", arch_config_json=""),
    # google/ddpm-cifar10-32's config.json (35.75 M parameters), T = 1000 as its scheduler
    "unet2d-cifar10": ModelSize(
        "unet2d-cifar10", 32, 3, (128, 256, 256, 256), 1000,
        "google/ddpm-cifar10-32's architecture (Ho et al.): 32x32x3, 128,256,256,256, attention at 16x16, T=1000",
        arch="unet2d", arch_config_json=_unet2d_json(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256],
            layers_per_block=2, down_block_types=[_D, _AD, _D, _D], up_block_types=[_U, _AU, _U, _U],
            attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, downsample_padding=0,
            flip_sin_to_cos=False, freq_shift=1)),
}
DEFAULT_SIZES = ("digits", "chapter", "unet2d-digits", "unet2d-cifar10")
QUICK_SIZES = ("digits", "chapter", "unet2d-digits")  # --quick's default: one unet2d size

# (train batch, sampling batches) by (device, quick). CPU batches are the ones the CLI and the
# chapter use; the large sampling batch on CPU is kept small enough for a T-step chain to
# take tens of seconds. --quick samples the chapter's model at batch 1 only, 10-step chains.
BATCHES = {
    ("cpu", False): {"digits": (64, (1, 64)), "chapter": (8, (1, 4)), "probe": (32, (1, 8)),
                     "unet2d-digits": (64, (1, 16)), "unet2d-cifar10": (8, (1, 8))},
    ("cpu", True): {"digits": (16, (1, 16)), "chapter": (2, (1,)), "probe": (8, (1,)),
                    "unet2d-digits": (16, (1,)), "unet2d-cifar10": (2, (1,))},
    ("cuda", False): {"digits": (256, (1, 256)), "chapter": (64, (1, 64)), "probe": (128, (1, 128)),
                      "unet2d-digits": (256, (1, 256)), "unet2d-cifar10": (128, (1, 128))},
    ("cuda", True): {"digits": (64, (1, 64)), "chapter": (16, (1, 16)), "probe": (32, (1, 32)),
                     "unet2d-digits": (64, (1, 64)), "unet2d-cifar10": (32, (1, 32))},
}
QUICK_SAMPLE_TIMESTEPS = 10

# Sampling chains of the unet2d sizes: (jax_ddpm sampler name, steps, batches or None), each run
# by jax_ddpm's compiled chain and by the matching diffusers scheduler loop
# (benchmarks.diffusers_runner); batches None = the size's sampling batches (BATCHES: 1 and the
# large one). Step counts are each sampler's usual ones where a CPU run affords them: DDPM the
# full T for the digits model and 50 respaced steps (DDPMPipeline's num_inference_steps) for
# the 1000-step CIFAR-10 model, DDIM 50, DPM-Solver++ 20; on the CPU the CIFAR-10 model runs
# its large batch for the 20-step chain only, so that a full CPU run of both unet2d sizes stays
# near 15 minutes. The chapter's sizes keep torch_ref's full-T DDPM chain. A name not
# registered in jax_ddpm.samplers is skipped with a reason (--samplers).
SAMPLE_PLANS = {
    ("cpu", False): {"unet2d-digits": (("ddpm", 200, None), ("ddim", 50, None), ("dpmpp_2m", 20, None)),
                     "unet2d-cifar10": (("ddpm", 50, (1,)), ("ddim", 50, (1,)), ("dpmpp_2m", 20, None))},
    ("cpu", True): {"unet2d-digits": (("ddim", 10, None),), "unet2d-cifar10": (("ddim", 10, None),)},
    ("cuda", False): {"unet2d-digits": (("ddpm", 200, None), ("ddim", 50, None), ("dpmpp_2m", 20, None)),
                      "unet2d-cifar10": (("ddpm", 1000, (1,)), ("ddim", 50, None), ("dpmpp_2m", 20, None))},
    ("cuda", True): {"unet2d-digits": (("ddim", 50, None), ("dpmpp_2m", 20, None)),
                     "unet2d-cifar10": (("ddim", 50, None), ("dpmpp_2m", 20, None))},
}


def reference_impls(size: ModelSize) -> tuple[str, str]:
    """(eager, compiled) names of the torch implementation a size is compared with."""
    return ("diffusers", "diffusers+compile") if size.arch == "unet2d" else ("torch", "torch.compile")
