"""The frozen dataclasses of a run's configuration (``ModelConfig`` ... ``ConvertConfig``) and
the defaults they carry; ``app.config`` builds and validates them and re-exports every name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..models.registry import DEFAULT_ARCH
from ..schedules import BETA_END, BETA_START

# What a run samples with unless ``sample`` says otherwise (checkpoint metadata ``sampling``;
# runs trained here and folders written before it: the posterior variance, clipped x0).
SAMPLING_DEFAULTS: dict[str, Any] = {"variance": "beta_tilde", "clip_denoised": True}
DEFAULT_EVAL_NUM = 256  # train --eval-num: samples per evaluation (docs/quality.md: the FID's noise at this N)
MIN_EVAL_NUM = 2  # a Frechet distance needs at least two samples
DEFAULT_LR_SCHEDULE = "constant"  # train --lr-schedule's default (OptimConfig.lr_schedule: what older runs did)


@dataclass(frozen=True)
class ModelConfig:
    """The network (an architecture of ``jax_ddpm.models.registry``) and the image shape it is trained on.

    ``features`` and ``time_emb_dim`` are read by the architectures that name them in
    ``Architecture.fields``; the architecture's config validates them.
    """

    image_size: int = 16
    channels: int = 1
    features: tuple[int, ...] = (16, 32, 64, 128)
    time_emb_dim: int = 32
    dtype: str = "float32"  # compute dtype; parameters stay float32
    arch: str = DEFAULT_ARCH
    arch_config: str = ""  # the architecture's own config as canonical JSON (app.arch_options); "" = its default


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 200
    schedule: str = "cosine"
    beta_start: float = BETA_START  # the linear schedule's first and last beta (the cosine one has none)
    beta_end: float = BETA_END
    # what the network regresses (parameterization.PREDICTIONS): the command's default, x0, scores far better on
    # the digits (docs/quality.md); runs saved without the field are eps (FIELDS_ADDED_LATER)
    prediction: str = "x0"
    # how training draws t (training.TIMESTEP_DRAWS): per-image, what every run before the field did (and what
    # a folder made by convert gets). `train`'s default depends on the architecture (config.default_timestep_draw):
    # per-batch for the chapter's U-Net (BatchNorm with the sampling batch's statistics; docs/quality.md)
    timestep_draw: str = "per-image"
    # the loss's min-SNR-gamma weighting over t (diffusion.min_snr_weights); 0 = none, what every run before the
    # field did (and what a folder made by convert gets). `train`'s default depends on the architecture
    # (config.default_snr_gamma): 5 for the chapter's U-Net (measured: docs/quality.md), 0 otherwise
    snr_gamma: float = 0.0


@dataclass(frozen=True)
class DataConfig:
    """``source`` is ``'digits'`` or an absolute path (folder, .npz or .npy)."""

    source: str = "digits"
    layout: str = "auto"


@dataclass(frozen=True)
class OptimConfig:
    batch_size: int = 48
    # the defaults since 2026-12-03 (docs/quality.md, "Choosing a better default"); before: lr 1e-3, EMA 0.999
    # (always saved in a run's identity, so older folders keep theirs)
    lr: float = 3e-4
    ema_decay: float = 0.998
    grad_clip: float = 1.0  # 0 = no clipping
    # the learning rate over the steps (training.learning_rate): constant, what every run before the field did
    # (FIELDS_ADDED_LATER), or cosine from lr to lr_end_factor * lr over lr_decay_steps (train's default: --steps)
    lr_schedule: str = "constant"
    lr_decay_steps: int = 0  # 0 with constant
    lr_end_factor: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    workdir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    steps: int = 4500
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    sample_every: int = 0  # 0 = only at the end
    num_samples: int = 64
    bn_stats: str = "batch"
    log_every: int = 25
    quiet: bool = False
    distributed: bool = False  # join a multi-process run (jax.distributed.initialize); not part of the identity
    # the sample grids' sampler (--sample-sampler, ...; None = its default, the run's variance and clipping):
    # bookkeeping like --num-samples, not part of the identity
    sample_sampler: str = "ddpm"
    sample_num_steps: int | None = None  # None = all T steps
    sample_eta: float | None = None
    sample_timestep_spacing: str | None = None
    sample_steps_offset: int | None = None
    # quality during training (--eval-every, --eval-num): bookkeeping too, free on resume; 0 = off (older runs)
    eval_every: int = 0
    eval_num: int = DEFAULT_EVAL_NUM


@dataclass(frozen=True)
class SampleConfig:
    workdir: str
    out: str
    num: int = 64
    seed: int = 0
    sampler: str = "ddpm"
    step: int | None = None  # checkpoint step (--checkpoint-step); None = latest
    noise: str | None = None  # .npz with x_T [N, H, W, C] and noises [T, N, H, W, C]
    clip_denoised: bool | None = None  # None = the run's (SAMPLING_DEFAULTS unless imported otherwise)
    bn_stats: str = "batch"
    variance: str | None = None  # ddpm: 'beta_tilde' or 'beta'; None = the run's
    batch_size: int | None = None  # images per sampling chunk (--batch-size); None = sized to fit the memory
    num_steps: int | None = None  # None = all T steps
    eta: float | None = None  # ddim; None = 0
    timestep_spacing: str | None = None  # None = the sampler's default
    steps_offset: int | None = None  # None = 0


@dataclass(frozen=True)
class ConvertConfig:
    workdir: str
    out: str | None = None  # export: safetensors file to write
    from_torch: str | None = None  # import: safetensors file to read
    step: int | None = None  # export: checkpoint step (--checkpoint-step); None = latest
    image_size: int = 16  # import only: the image size recorded for sampling
    to_diffusers: str | None = None  # export: a DDPMPipeline folder to create
    from_diffusers: str | None = None  # import: a diffusers UNet2DModel or pipeline folder


__all__ = ["ConvertConfig", "DEFAULT_EVAL_NUM", "DataConfig", "DiffusionConfig", "MIN_EVAL_NUM", "ModelConfig",
           "OptimConfig", "SAMPLING_DEFAULTS", "SampleConfig", "TrainConfig"]
