"""The ``jax-ddpm`` command: thin parse -> validate (``app.config``) -> call (``app.train``,
``app.sample``, ``app.convert``).

Exit status: 0 done; 2 bad input (one line on stderr, ``jax-ddpm: error: ...``);
3 NaN/inf (a loss: training stopped, last good checkpoint kept; weights or samples: nothing
written); 130 interrupted (Ctrl-C), 143 terminated (SIGTERM) (``train`` saves a checkpoint first).

Commands that need more than jax_ddpm (``parity``, ``bench``: torch) are not imported from
here: they are entry points of the group ``jax_ddpm.commands`` (pyproject.toml), looked up
by name with ``importlib.metadata`` and called as ``main(argv) -> int``.
"""
from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from typing import Sequence

from ..models.registry import ARCH_NAMES, ARCHITECTURES, DEFAULT_ARCH
from ..parameterization import PREDICTIONS
from ..samplers import SPACINGS
from .arch_options import add_unet2d_arguments
from .config import (BN_STATS, CHANNELS, DTYPES, LAYOUTS, MIN_TIMESTEPS, SAMPLERS, SCHEDULES, VARIANCES, ConfigError,
                     DiffusionConfig, ModelConfig, OptimConfig, SampleConfig, TrainConfig, convert_config_from_args,
                     default_size_multiple, sample_config_from_args, train_config_from_args)
from .console import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_NONFINITE, PROG, error, note, warning
from .sample import MIN_BATCH_STATS

COMMAND_GROUP = "jax_ddpm.commands"  # entry points: name -> main(argv) -> int
EXTERNAL_COMMANDS = {  # the ones this project installs with its test extra (help text for `jax-ddpm --help`)
    "parity": "print the JAX vs PyTorch parity report (needs torch); 'jax-ddpm parity --help' for its options",
    "bench": "run the JAX vs PyTorch benchmarks (needs torch); 'jax-ddpm bench --help' for its options",
}
BUILTIN_COMMANDS = ("train", "sample", "convert", "eval")

DESCRIPTION = """\
A functional JAX/Flax DDPM (Ho et al. 2020) that mirrors a textbook chapter's PyTorch code.

  jax-ddpm train   --workdir runs/digits            train on scikit-learn's digits (or --data)
  jax-ddpm sample  --workdir runs/digits --out x.png  sample with the EMA weights
  jax-ddpm convert --workdir runs/digits --out m.safetensors   export for torch_ref
  jax-ddpm convert --from-diffusers DIR --workdir runs/imported  a diffusers UNet2DModel / DDPMPipeline
  jax-ddpm eval    --workdir runs/digits            sample quality: FID vs its floor, confident share, classes
  jax-ddpm parity ...   the parity report (needs torch)
  jax-ddpm bench ...    the JAX vs PyTorch benchmarks (needs torch)

Run 'jax-ddpm COMMAND --help' for a command's options.
Exit status: 0 ok, 2 bad input, 3 NaN/inf, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM)."""

TRAIN_EPILOG = """\
The work folder gets config.json, metrics.jsonl (step, loss, images/s, lr), loss.png,
samples/step_N.png (every --sample-every steps), samples.png (at the end) and
checkpoints/N/ (orbax: params, BatchNorm statistics, optimizer state, EMA params, step,
RNG key, data position). Running the same command again resumes from the latest complete
checkpoint and reproduces an uninterrupted run bit for bit (CPU); only --steps,
--checkpoint-every, --keep-checkpoints, --sample-every, --num-samples, the --sample-sampler
options, --log-every and --quiet may change, and so may the devices and --xla-flags (other
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


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``jax-ddpm train: error: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {' '.join(message.split())}\n")


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


def _add_train_optim(p, o: OptimConfig, t: TrainConfig) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=o.batch_size, metavar="B",
                   help="images per optimizer step: the global batch over all devices, split evenly between them "
                        "(a multiple of the device count; must not exceed the number of images)")
    g.add_argument("--steps", type=int, default=t.steps, metavar="N",
                   help="train until step N (counting from the start of the run, also on resume)")
    g.add_argument("--lr", type=float, default=o.lr, help="Adam learning rate (constant)")
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
    g = p.add_argument_group("devices")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run (jax.distributed.initialize) before using any device; start the "
                        "same command on every host. Cloud TPU, SLURM and Open MPI are detected; elsewhere set "
                        "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID (a set "
                        "JAX_COORDINATOR_ADDRESS alone also turns this on). Without it, training still runs "
                        "data-parallel over every device of this machine")
    g.add_argument("--xla-flags", default="auto", metavar="FLAGS", help=XLA_FLAGS_HELP)


def _add_train(sub) -> None:
    t = TrainConfig(workdir="")
    p = sub.add_parser("train", help="train a DDPM on images, with checkpoints and exact resume",
                       description="Train a DDPM on images, checkpointing into --workdir.",
                       epilog=TRAIN_EPILOG, formatter_class=HelpFormatter)
    _add_train_data(p, t.model)
    _add_train_model(p, t.model, t.diffusion)
    add_unet2d_arguments(p)
    _add_train_optim(p, t.optim, t)
    _add_train_bookkeeping(p, t)


def _add_checkpoint_step(p, what: str) -> None:
    p.add_argument("--checkpoint-step", type=int, default=None, metavar="STEP",
                   help=CHECKPOINT_STEP_HELP.format(what=what))
    p.add_argument("--steps", type=int, default=None, metavar="STEP", help=DEPRECATED_STEPS_HELP)


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample images from a trained work folder (EMA weights)",
                       description="Draw samples with the EMA weights of a checkpoint, the whole chain compiled "
                                   "as one program.", formatter_class=HelpFormatter)
    p.add_argument("--workdir", required=True, metavar="DIR", help="a work folder written by 'jax-ddpm train'")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="FILE.png: one grid; FILE.npz: 'samples' float32 [N,H,W,C] in [-1,1] and 'images' uint8")
    p.add_argument("--num", type=int, default=SampleConfig.num, metavar="N",
                   help="number of images (ignored with --noise)")
    p.add_argument("--seed", type=int, default=SampleConfig.seed, help="seeds x_T and the noise of every step")
    p.add_argument("--sampler", default=SampleConfig.sampler, choices=SAMPLERS, help=SAMPLER_HELP)
    p.add_argument("--num-steps", type=int, default=None, metavar="N",
                   help="network calls: a grid of N of the T timesteps (1 to T; default: all T; chapter: T only)")
    p.add_argument("--eta", type=float, default=None, metavar="E",
                   help="ddim: the noise of each step, 0 = deterministic, 1 = the DDPM posterior's (default 0)")
    p.add_argument("--timestep-spacing", default=None, choices=SPACINGS,
                   help="which N timesteps (diffusers' definitions): leading, arange(N) * (T // N) + offset; "
                        "trailing, from T - 1 down in steps of T / N; linspace, both ends (default: leading for "
                        "ddpm and ddim, linspace for dpmpp_2m)")
    p.add_argument("--steps-offset", type=int, default=None, metavar="K",
                   help="added to a leading grid's timesteps (diffusers' steps_offset; default 0)")
    _add_checkpoint_step(p, "load")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="images per compiled chain (chunks of B; default: sized to fit the memory). With --bn-stats "
                        "running, or a model without BatchNorm, the samples do not depend on it; with --bn-stats "
                        "batch each chunk is the batch whose statistics normalise it")
    p.add_argument("--clip-denoised", dest="clip_denoised", action="store_const", const=True, default=None,
                   help="clip the predicted x0 to [-1, 1] at each ddpm or ddim step (default: the work folder's "
                        "setting: on for runs trained here, diffusers' clip_sample for imported ones)")
    p.add_argument("--no-clip-denoised", dest="clip_denoised", action="store_const", const=False,
                   help="do not clip the predicted x0 to [-1, 1] at each ddpm or ddim step")
    p.add_argument("--variance", default=None, choices=VARIANCES,
                   help="variance of each ddpm step: beta_tilde (the posterior's; diffusers' fixed_small) or beta "
                        "(diffusers' fixed_large); default: the work folder's (beta_tilde for runs trained here)")
    p.add_argument("--bn-stats", default=SampleConfig.bn_stats, choices=BN_STATS, help=BN_HELP)
    p.add_argument("--noise", default=None, metavar="FILE.npz",
                   help="pre-drawn noise instead of --seed: 'x_T' [N,H,W,C] and 'noises' [S,N,H,W,C] float32, S the "
                        "sampler's steps (T, or --num-steps), noises[i] the noise of the grid's i-th timestep "
                        "ascending: with all T steps, added at step i (the same file torch_ref.sample reads)")
    p.add_argument("--xla-flags", default="auto", metavar="FLAGS", help=XLA_FLAGS_HELP)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="export weights to torch-named safetensors or a diffusers folder, or import "
                                       "them",
                       description="Export the EMA weights of a checkpoint under torch state_dict names "
                                   "(--out) or as a diffusers DDPMPipeline folder (--to-diffusers), or import such "
                                   "a file or folder into a new work folder (--from-torch, --from-diffusers).",
                       formatter_class=HelpFormatter)
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="the trained work folder (export) or a new one to create (import)")
    p.add_argument("--out", default=None, metavar="FILE.safetensors",
                   help="export: write the EMA weights (and BatchNorm statistics) here, with the model settings "
                        "as metadata (torch_ref.weights.load_unet reads the chapter's)")
    p.add_argument("--from-torch", default=None, metavar="FILE.safetensors",
                   help="import: read such a file (e.g. torch_ref.weights.save_unet's) and write checkpoint 0 "
                        "into --workdir, which must not hold a run yet")
    p.add_argument("--to-diffusers", default=None, metavar="DIR",
                   help="export (--arch unet2d runs): write a DDPMPipeline folder (unet/ with the EMA weights, "
                        "scheduler/ with the run's schedule and sampling settings) that diffusers' "
                        "DDPMPipeline.from_pretrained(DIR) loads; DIR must not exist or be empty")
    p.add_argument("--from-diffusers", default=None, metavar="DIR",
                   help="import: a diffusers UNet2DModel folder (config.json + safetensors weights) or pipeline "
                        "folder (model_index.json, unet/, scheduler/) into checkpoint 0 of a new --workdir; the "
                        "scheduler's settings become the run's (T, betas, variance, clipping); a folder without one "
                        "takes DDPMScheduler's defaults")
    _add_checkpoint_step(p, "export")
    p.add_argument("--image-size", type=int, default=ModelConfig().image_size, metavar="S",
                   help="import: image size to sample at, when the file's metadata (or the diffusers config's "
                        "sample_size) has none")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="measure sample quality (digits): FID vs the real-vs-real floor, classes",
                       description="Score samples of a trained work folder (drawn as 'jax-ddpm sample' draws them) "
                                   "or an .npz of samples with jax_ddpm's own digits classifier: FID in its feature "
                                   "space beside the real-vs-real floor, the confident share, class coverage. "
                                   "Writes WORKDIR/eval.json and one line on stdout; see docs/quality.md.",
                       formatter_class=HelpFormatter)
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="a work folder written by 'jax-ddpm train' (on --data digits): sample from its EMA weights "
                        "and write DIR/eval.json")
    p.add_argument("--samples", default=None, metavar="FILE.npz",
                   help="score these images instead of sampling: an .npz written by 'jax-ddpm sample --out FILE.npz' "
                        "('samples' float32 in [-1, 1], else 'images' uint8)")
    p.add_argument("--json", default=None, metavar="FILE.json", help="write the result here (default: DIR/eval.json)")
    p.add_argument("--num", type=int, default=None, metavar="N", help="samples to draw (default: 1000)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds x_T and the chain's noise (as 'sample --seed') and the floor's draw of real images")
    p.add_argument("--sampler", default=None, choices=SAMPLERS, help="the sampler, as in 'jax-ddpm sample' "
                                                                     "(default: ddpm)")
    p.add_argument("--checkpoint-step", type=int, default=None, metavar="STEP",
                   help=CHECKPOINT_STEP_HELP.format(what="sample from"))
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="images per compiled chain, as in 'jax-ddpm sample' (default: sized to fit the memory)")
    p.add_argument("--num-steps", type=int, default=None, metavar="N",
                   help="the sampler's network calls, as in 'jax-ddpm sample' (default: all T)")
    p.add_argument("--eta", type=float, default=None, metavar="E", help="ddim's eta, as in 'jax-ddpm sample' "
                                                                        "(default 0)")
    p.add_argument("--timestep-spacing", default=None, choices=SPACINGS,
                   help="which timesteps, as in 'jax-ddpm sample' (default: the sampler's)")
    p.add_argument("--steps-offset", type=int, default=None, metavar="K",
                   help="a leading grid's offset, as in 'jax-ddpm sample' (default 0)")
    p.add_argument("--clip-denoised", dest="clip_denoised", action="store_const", const=True, default=None,
                   help="clip the predicted x0 at each ddpm step (default: the work folder's setting, as in sample)")
    p.add_argument("--no-clip-denoised", dest="clip_denoised", action="store_const", const=False,
                   help="do not clip the predicted x0 to [-1, 1] at each ddpm step")
    p.add_argument("--variance", default=None, choices=VARIANCES,
                   help="variance of each ddpm step (default: the work folder's, as in sample)")
    p.add_argument("--bn-stats", default=None, choices=BN_STATS, help=BN_HELP + " (default: batch)")
    p.add_argument("--xla-flags", default="auto", metavar="FLAGS", help=XLA_FLAGS_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    _add_train(sub)
    _add_sample(sub)
    _add_convert(sub)
    _add_eval(sub)
    for name, text in EXTERNAL_COMMANDS.items():
        sub.add_parser(name, add_help=False, help=text)
    return parser


# ----------------------------------------------------------------------------- entry-point commands
def find_command(name: str):
    """The entry point ``name`` of the group ``jax_ddpm.commands``, or None."""
    found = [ep for ep in metadata.entry_points(group=COMMAND_GROUP) if ep.name == name]
    return found[0] if found else None


def run_external(name: str, argv: Sequence[str]) -> int | None:
    """Runs entry-point command ``name`` (``main(argv) -> int``); None if it is neither installed
    nor one of ``EXTERNAL_COMMANDS`` (argparse then reports the unknown command)."""
    entry = find_command(name)
    if entry is None and name not in EXTERNAL_COMMANDS:
        return None
    fix = "install the test extra: pip install -e '.[test]'"
    if entry is None:
        return error(f"no '{name}' command is installed (entry point group {COMMAND_GROUP}); {fix}",
                     prog=f"{PROG} {name}")
    try:
        command_main = entry.load()
    except (ImportError, AttributeError) as e:  # e.g. torch missing
        return error(f"cannot import what it needs ({e}); {fix}", prog=f"{PROG} {name}")
    return int(command_main(list(argv)) or 0)


# ----------------------------------------------------------------------------- main
def _set_xla_flags(request: str, quiet: bool = False) -> None:
    """``--xla-flags``: adds the flags to XLA_FLAGS before JAX starts (raises ConfigError)."""
    from .. import xla_flags

    try:
        text = xla_flags.setup(request)
    except xla_flags.XlaFlagsError as e:
        raise ConfigError(f"--xla-flags: {e}") from None
    if text and not quiet:
        note(text)


def _warn_deprecated(args: argparse.Namespace) -> None:
    if getattr(args, "steps", None) is not None and args.command in ("sample", "convert"):
        warning("--steps is deprecated, use --checkpoint-step", prog=f"{PROG} {args.command}")


def _dispatch(args: argparse.Namespace, train_hooks) -> int:
    if args.command == "train":
        config = train_config_from_args(args)
        _set_xla_flags(args.xla_flags, quiet=config.quiet)
        from .train import train
        return train(config, hooks=train_hooks)
    _warn_deprecated(args)
    if args.command == "sample":
        config = sample_config_from_args(args)
        _set_xla_flags(args.xla_flags)
        from .sample import sample
        return sample(config)
    if args.command == "eval":
        from .eval import eval_config_from_args, evaluate
        config = eval_config_from_args(args)
        _set_xla_flags(args.xla_flags)
        return evaluate(config)
    if args.command == "convert":
        config = convert_config_from_args(args)
        from .convert import convert
        return convert(config)
    return error(f"unknown command {args.command!r}")


_NEGATIVE_VALUE = re.compile(r"^-\d")  # '-8,16,...', '-1e-3': a value, not an option (no option starts so)


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--features -8,16`` -> ``--features=-8,16``: argparse takes a value that starts with '-' for an
    option unless it is a plain negative number, and would say "expected one argument"; joined,
    the option's own check names what is wrong."""
    out: list[str] = []
    for token in argv:
        if out and _NEGATIVE_VALUE.match(token) and out[-1].startswith("--") and "=" not in out[-1] \
                and out[-1] != "--":
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: Sequence[str] | None = None, *, train_hooks=None) -> int:
    """``jax-ddpm ARGV``; returns the exit status. ``train_hooks``: an ``app.train.TrainHooks``
    passed to ``train`` (the tests' runner uses it; the console script passes none)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in BUILTIN_COMMANDS and not argv[0].startswith("-"):
        status = run_external(argv[0], argv[1:])
        if status is not None:
            return status
    try:
        args = build_parser().parse_args(_join_negative_values(argv))
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return int(e.code or 0)
    try:
        return _dispatch(args, train_hooks)
    except KeyboardInterrupt:
        return error("interrupted", EXIT_INTERRUPTED)
    except MemoryError:
        return error("out of memory (ask for fewer or smaller images: --num, --batch-size, --image-size)")
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return error(f"{where}{e.strerror or e}")
    except Exception as e:
        from ..checkpoint import CheckpointError
        from ..data import DataError
        from .console import NonFiniteError

        if isinstance(e, (ConfigError, DataError, CheckpointError)):
            return error(str(e))
        if isinstance(e, NonFiniteError):
            return error(str(e), EXIT_NONFINITE)
        raise


__all__ = ["BUILTIN_COMMANDS", "COMMAND_GROUP", "EXTERNAL_COMMANDS", "HelpFormatter", "OneLineParser", "build_parser",
           "find_command", "main", "run_external"]

if __name__ == "__main__":
    sys.exit(main())
