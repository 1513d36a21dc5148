"""argparse pieces of the ``jax-ddpm`` command: the help formatter, the help texts the
sub-commands share, and ``train``'s option groups (``add_train_parser``). ``app.cli`` builds the
parser from them and re-exports the names it always had (``HelpFormatter``, ``BN_HELP``,
``TRAIN_EPILOG``, ...)."""
from __future__ import annotations

import argparse

from ..models.registry import ARCH_NAMES, ARCHITECTURES, DEFAULT_ARCH
from ..parameterization import PREDICTIONS
from ..samplers import SPACINGS
from ..training import LR_SCHEDULES, TIMESTEP_DRAWS
from .arch_options import add_unet2d_arguments
from .config import (BN_STATS, CHANNELS, DEFAULT_LR_SCHEDULE, DTYPES, LAYOUTS, MIN_TIMESTEPS, SAMPLERS, SCHEDULES,
                     DiffusionConfig, ModelConfig, OptimConfig, TrainConfig, default_size_multiple)
from .sample import MIN_BATCH_STATS

TRAIN_EPILOG = """\
The work folder gets config.json, metrics.jsonl (step, loss, images/s, lr; with --eval-every
also quality lines, "kind": "eval"), loss.png, quality.png (--eval-every), samples/step_N.png
(every --sample-every steps), samples.png (at the end) and checkpoints/N/ (orbax: params,
BatchNorm statistics, optimizer state, EMA params, step, RNG key, data position). Running the
same command again resumes from the latest complete checkpoint and reproduces an
uninterrupted run bit for bit (CPU). On resume the model, diffusion, data and optimizer
options not given take the run's own values (also after a default changed: --prediction was
eps before 2026-12-02), said in one note; one given with another value is refused. Only
--steps, --checkpoint-every, --keep-checkpoints,
--sample-every, --num-samples, the --sample-sampler options, --eval-every, --eval-num,
--log-every and --quiet may change, and so may the devices and --xla-flags (other
XLA flags may round differently, so bit for bit only with the same ones; config.json
records the XLA_FLAGS of the latest session). Ctrl-C (or SIGTERM) saves a checkpoint and exits with status 130
(143). One train at a time per work folder (a second one is refused, naming the PID of the
first); a non-empty folder that holds no jax-ddpm run is refused; a damaged newest checkpoint
is moved to damaged-checkpoints/ and the run resumes from the newest one that restores.

Devices: training is data-parallel over every device JAX sees (jax.sharding, one 'data'
mesh axis): --batch-size is the global batch, each device gets an equal slice, and
BatchNorm statistics are taken over the global batch, so N devices compute what one
device computes with the same global batch. See docs/scaling.md."""

BN_HELP = ("BatchNorm statistics while sampling: 'batch' normalises with the statistics of the sample batch "
           f"(all images at the same t; use a batch of {MIN_BATCH_STATS} or more), 'running' is eval mode with the "
           "running statistics. The chapter's U-Net applies one BatchNorm to two convolutions (erratum E5), so its "
           "running statistics blend two layers' and eval-mode samples are poor")

PREDICTION_HELP = ("what the network learns to output (the loss regresses it): eps, the noise (Ho et al. 2020); x0, "
                   "the clean image (diffusers' prediction_type 'sample'); v = sqrt(abar) eps - sqrt(1 - abar) x0 "
                   "(Salimans & Ho 2022; 'v_prediction'). Every sampler reads it; part of the run's identity")

SAMPLER_HELP = ("ddpm: ancestral sampling, Ho et al. 2020 Algorithm 2 (respaced with --num-steps; --variance, "
                "--clip-denoised); ddim: Song et al. 2021 (--eta, --clip-denoised); dpmpp_2m: DPM-Solver++(2M), Lu et "
                "al. 2022, deterministic; chapter: the chapter's printed loop (errata E2, E3), all T steps, for "
                "comparison only. All take --num-steps (chapter: T only), --timestep-spacing and --steps-offset "
                "(but chapter)")

XLA_FLAGS_HELP = ("XLA flags added to XLA_FLAGS before JAX starts. 'auto': "
                  "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution (XLA:CPU's own "
                  "convolutions instead of YNNPACK's, faster on CPU: measured in benchmarks/README.md) when "
                  "this jaxlib accepts it, checked by starting JAX once in a subprocess, and unless XLA_FLAGS "
                  "already sets that option; 'none': XLA_FLAGS as it is; anything else: added as given, after "
                  "the same check (write --xla-flags=--xla_...)")

CHECKPOINT_STEP_HELP = "checkpoint step to {what} (default: the latest)"
DEPRECATED_STEPS_HELP = "deprecated spelling of --checkpoint-step (kept for one release)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` after every option that has a meaningful default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is not None and default is not argparse.SUPPRESS and not isinstance(default, bool) \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _add_train_data(p, m: ModelConfig) -> None:
    g = p.add_argument_group("work folder")
    g.add_argument("--workdir", required=True, metavar="DIR",
                   help="folder for checkpoints, config, metrics, plots and samples; an existing run there is resumed")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits", metavar="SOURCE",
                   help="'digits' (scikit-learn's 1,797 8x8 digits, no download), a folder of PNG/JPEG images, "
                        "or an .npz/.npy file of uint8 images (the array 'images' or the only array)")
    g.add_argument("--layout", default="auto", choices=LAYOUTS,
                   help="axis order of an .npz/.npy file: [N,H,W,C] or [N,C,H,W]; 'auto' infers it only when "
                        "exactly one of axis 1 and axis 3 has 1 or 3 entries")
    multiples = ", ".join(f"{name}: {default_size_multiple(name)}" for name in ARCH_NAMES)
    g.add_argument("--image-size", type=int, default=m.image_size, metavar="S",
                   help="images are resized (shorter side) and center-cropped to S x S; a multiple of the "
                        f"architecture's size multiple ({multiples})")
    g.add_argument("--channels", type=int, default=m.channels, choices=CHANNELS,
                   help="1 = grayscale, 3 = RGB (images are converted)")


def _add_train_model(p, m: ModelConfig, d: DiffusionConfig) -> None:
    g = p.add_argument_group("model and diffusion")
    arches = "; ".join(f"{name}: {a.description}" for name, a in ARCHITECTURES.items())
    g.add_argument("--arch", default=DEFAULT_ARCH, choices=ARCH_NAMES, help=f"the network ({arches})")
    g.add_argument("--features", default=",".join(map(str, m.features)), metavar="F0,F1,...",
                   help="--arch chapter: channel widths, comma-separated positive integers; how many depends on "
                        "--arch (chapter: 4, the chapter's own are 64,128,256,512; unet2d: --block-out-channels)")
    g.add_argument("--time-emb-dim", type=int, default=m.time_emb_dim, metavar="D",
                   help="size of the sinusoidal time embedding (even)")
    g.add_argument("--timesteps", type=int, default=d.timesteps, metavar="T",
                   help=f"number of diffusion steps T, at least {MIN_TIMESTEPS} (the chain length when sampling)")
    g.add_argument("--schedule", default=d.schedule, choices=SCHEDULES,
                   help="beta schedule: linear (Ho et al. 2020; diffusers' 'linear') or cosine (Nichol & Dhariwal "
                        "2021; diffusers' 'squaredcos_cap_v2')")
    g.add_argument("--beta-start", type=float, default=None, metavar="B",
                   help=f"--schedule linear: the first beta, in (0, 1) (default {d.beta_start:g})")
    g.add_argument("--beta-end", type=float, default=None, metavar="B",
                   help=f"--schedule linear: the last beta, in (0, 1) (default {d.beta_end:g})")
    g.add_argument("--dtype", default=m.dtype, choices=DTYPES,
                   help="compute dtype of the network; parameters, optimizer state and the loss stay float32")
    g.add_argument("--prediction", default=d.prediction, choices=PREDICTIONS, help=PREDICTION_HELP)
    g.add_argument("--timestep-draw", default=None, choices=TIMESTEP_DRAWS,
                   help="how training draws t: per-image (Ho et al.'s Algorithm 1) or per-batch (one t for the "
                        "whole batch, as a sampling batch is: the chapter's U-Net samples with the BatchNorm "
                        "statistics of that batch). Part of the run's identity (default: per-batch for --arch "
                        "chapter, per-image otherwise; runs saved before the option: per-image)")
    g.add_argument("--snr-gamma", type=float, default=None, metavar="G",
                   help="min-SNR-gamma loss weighting (Hang et al. 2023; diffusers' training scripts' --snr_gamma): "
                        "each image's loss weighted by min(SNR_t, G) in x0 terms (x0: min(SNR, G); eps: "
                        "min(SNR, G) / SNR; v: min(SNR, G) / (SNR + 1)), the weights divided by their mean over t; "
                        "0 = unweighted. Part of the run's identity (default: 5 for --arch chapter, 0 otherwise; "
                        "runs saved before the option: 0)")


def _add_train_optim(p, o: OptimConfig, t: TrainConfig) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=o.batch_size, metavar="B",
                   help="images per optimizer step: the global batch over all devices, split evenly between them "
                        "(a multiple of the device count; must not exceed the number of images)")
    g.add_argument("--steps", type=int, default=t.steps, metavar="N",
                   help="train until step N (counting from the start of the run, also on resume)")
    g.add_argument("--lr", type=float, default=o.lr,
                   help="Adam learning rate (with --lr-schedule cosine: the first step's, the peak; 1e-3 before the "
                        "default changed on 2026-12-03: a run keeps its own)")
    g.add_argument("--lr-schedule", default=None, choices=LR_SCHEDULES,
                   help=f"the learning rate over the steps: constant, or cosine (torch's CosineAnnealingLR: from "
                        f"--lr down to --lr-end-factor x --lr over --lr-decay-steps steps, then held there). Part "
                        f"of the run's identity (default: {DEFAULT_LR_SCHEDULE}; runs saved before the option: "
                        f"constant)")
    g.add_argument("--lr-decay-steps", type=int, default=None, metavar="N",
                   help="cosine: the steps the decay takes (default: --steps of the run's first start; a resume "
                        "keeps the run's, and steps beyond it train at the final rate)")
    g.add_argument("--lr-end-factor", type=float, default=None, metavar="F",
                   help="cosine: the final learning rate as a fraction of --lr, in [0, 1) (default 0)")
    g.add_argument("--ema-decay", type=float, default=o.ema_decay,
                   help="decay of the exponential moving average of the weights used for sampling; 0 = off")
    g.add_argument("--grad-clip", type=float, default=o.grad_clip,
                   help="clip the gradient's global norm to this value; 0 = no clipping")
    g.add_argument("--seed", type=int, default=t.seed,
                   help="seeds initialisation, the data order, the training noise and the sample grids")


def _add_train_bookkeeping(p, t: TrainConfig) -> None:
    g = p.add_argument_group("checkpoints, logging and samples")
    g.add_argument("--checkpoint-every", type=int, default=t.checkpoint_every, metavar="N",
                   help="save a checkpoint every N steps (and always at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=t.keep_checkpoints, metavar="K",
                   help="keep the K most recent checkpoints")
    g.add_argument("--sample-every", type=int, default=t.sample_every, metavar="N",
                   help="write samples/step_N.png every N steps; 0 = only samples.png at the end")
    g.add_argument("--num-samples", type=int, default=t.num_samples, metavar="N",
                   help="images in each sample grid")
    g.add_argument("--bn-stats", default=t.bn_stats, choices=BN_STATS, help=BN_HELP)
    g.add_argument("--sample-sampler", default=t.sample_sampler, choices=SAMPLERS,
                   help="the sampler of the sample grids (samples/step_N.png, samples.png); see 'jax-ddpm sample "
                        "--help'")
    g.add_argument("--sample-num-steps", type=int, default=None, metavar="N",
                   help="the grids' number of sampling steps, 1 to --timesteps (default: all T)")
    g.add_argument("--sample-eta", type=float, default=None, metavar="E",
                   help="--sample-sampler ddim: the grids' eta (default 0)")
    g.add_argument("--sample-timestep-spacing", default=None, choices=SPACINGS,
                   help="the grids' timestep spacing (default: the sampler's, see 'jax-ddpm sample --help')")
    g.add_argument("--sample-steps-offset", type=int, default=None, metavar="K",
                   help="the grids' steps_offset (--sample-timestep-spacing leading only; default 0)")
    g.add_argument("--log-every", type=int, default=t.log_every, metavar="N",
                   help="fetch the loss and append to metrics.jsonl every N steps (a host sync)")
    g.add_argument("--quiet", action="store_true", help="no progress display or messages (errors still print)")
    g = p.add_argument_group("quality during training (--data digits; docs/quality.md)")
    g.add_argument("--eval-every", type=int, default=t.eval_every, metavar="N",
                   help="every N steps and at the last one, score --eval-num samples of the EMA weights as "
                        "'jax-ddpm eval' does (the grids' sampler settings, --seed): FID beside the real-vs-real "
                        "floor, confident share, classes; a line in metrics.jsonl and quality.png. Costs about "
                        "the sampling of --eval-num images each time; the trained weights are the same bits "
                        "with or without it. 0 = off")
    g.add_argument("--eval-num", type=int, default=t.eval_num, metavar="M",
                   help="samples per evaluation (at least 2); the FID's noise and its floor depend on M, so "
                        "compare numbers at the same M (docs/quality.md has the noise measured at 256 and 1000)")
    g = p.add_argument_group("devices")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run (jax.distributed.initialize) before using any device; start the "
                        "same command on every host. Cloud TPU, SLURM and Open MPI are detected; elsewhere set "
                        "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID (a set "
                        "JAX_COORDINATOR_ADDRESS alone also turns this on). Without it, training still runs "
                        "data-parallel over every device of this machine")
    g.add_argument("--xla-flags", default="auto", metavar="FLAGS", help=XLA_FLAGS_HELP)


def add_train_parser(sub) -> None:
    """``jax-ddpm train`` and its options, under the sub-parsers ``sub``."""
    t = TrainConfig(workdir="")
    p = sub.add_parser("train", help="train a DDPM on images, with checkpoints and exact resume",
                       description="Train a DDPM on images, checkpointing into --workdir.",
                       epilog=TRAIN_EPILOG, formatter_class=HelpFormatter)
    _add_train_data(p, t.model)
    _add_train_model(p, t.model, t.diffusion)
    add_unet2d_arguments(p)
    _add_train_optim(p, t.optim, t)
    _add_train_bookkeeping(p, t)


__all__ = ["BN_HELP", "CHECKPOINT_STEP_HELP", "DEPRECATED_STEPS_HELP", "HelpFormatter", "PREDICTION_HELP",
           "SAMPLER_HELP", "TRAIN_EPILOG", "XLA_FLAGS_HELP", "add_train_parser"]
