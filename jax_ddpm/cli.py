"""The ``jax-ddpm`` command: thin parse -> validate (config.py) -> call (train_loop.py).

Exit status: 0 done; 2 bad input (one line on stderr, ``jax-ddpm: error: ...``);
3 the loss became NaN/inf (training stopped, last good checkpoint kept); 130 interrupted
(Ctrl-C; ``train`` saves a checkpoint first).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .config import (BN_STATS, CHANNELS, DTYPES, LAYOUTS, SAMPLERS, SCHEDULES, ConfigError, ModelConfig, OptimConfig,
                     TrainConfig, DiffusionConfig, convert_config_from_args, sample_config_from_args,
                     train_config_from_args, SampleConfig)

PROG = "jax-ddpm"
EXIT_BAD_INPUT = 2

DESCRIPTION = """\
A functional JAX/Flax DDPM (Ho et al. 2020) that mirrors a textbook chapter's PyTorch code.

  jax-ddpm train   --workdir runs/digits            train on scikit-learn's digits (or --data)
  jax-ddpm sample  --workdir runs/digits --out x.png  sample with the EMA weights
  jax-ddpm convert --workdir runs/digits --out m.safetensors   export for torch_ref
  jax-ddpm parity ...   the parity report (needs torch)
  jax-ddpm bench ...    the JAX vs PyTorch benchmarks (needs torch)

Run 'jax-ddpm COMMAND --help' for a command's options.
Exit status: 0 ok, 2 bad input, 3 loss became NaN (train), 130 interrupted."""

TRAIN_EPILOG = """\
The work folder gets config.json, metrics.jsonl (step, loss, images/s, lr), loss.png,
samples/step_N.png (every --sample-every steps), samples.png (at the end) and
checkpoints/N/ (orbax: params, BatchNorm statistics, optimizer state, EMA params, step,
RNG key, data position). Running the same command again resumes from the latest complete
checkpoint and reproduces an uninterrupted run bit for bit (CPU); only --steps,
--checkpoint-every, --keep-checkpoints, --sample-every, --num-samples, --log-every and
--quiet may change, and so may the devices and --xla-flags (other XLA flags may round
differently, so bit for bit only with the same ones; config.json records the XLA_FLAGS of
the latest session). Ctrl-C saves a checkpoint and exits with status 130.

Devices: training is data-parallel over every device JAX sees (jax.sharding, one 'data'
mesh axis): --batch-size is the global batch, each device gets an equal slice, and
BatchNorm statistics are taken over the global batch, so N devices compute what one
device computes with the same global batch. See docs/scaling.md."""


BN_HELP = ("BatchNorm statistics while sampling: 'batch' normalises with the statistics of the sample batch "
           "(all images at the same t; needs a batch of 16 or more), 'running' is eval mode with the running "
           "statistics. The chapter's U-Net applies one BatchNorm to two convolutions (erratum E5), so its "
           "running statistics blend two layers' and eval-mode samples are poor")


XLA_FLAGS_HELP = ("XLA flags added to XLA_FLAGS before JAX starts. 'auto': "
                  "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution (XLA:CPU's own "
                  "convolutions instead of YNNPACK's: on the 2-core development CPU, training ran 1.27x "
                  "faster with it for the default model and 1.57x for the chapter's U-Net at 32x32; "
                  "benchmarks/README.md) when this jaxlib accepts it, checked by starting JAX once in a "
                  "subprocess (about 2 s), and unless XLA_FLAGS already sets that option; 'none': XLA_FLAGS "
                  "as it is; anything else: added as given, after the same check (write "
                  "--xla-flags=--xla_...)")


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


def _add_train(sub) -> None:
    m, d, o, t = ModelConfig(), DiffusionConfig(), OptimConfig(), TrainConfig(workdir="")
    p = sub.add_parser("train", help="train a DDPM on images, with checkpoints and exact resume",
                       description="Train the U-Net DDPM on images, checkpointing into --workdir.",
                       epilog=TRAIN_EPILOG, formatter_class=HelpFormatter)
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
    g.add_argument("--image-size", type=int, default=m.image_size, metavar="S",
                   help="images are resized (shorter side) and center-cropped to S x S; a multiple of 8")
    g.add_argument("--channels", type=int, default=m.channels, choices=CHANNELS,
                   help="1 = grayscale, 3 = RGB (images are converted)")
    g = p.add_argument_group("model and diffusion")
    g.add_argument("--features", default=",".join(map(str, m.features)), metavar="F0,F1,F2,F3",
                   help="U-Net channel widths, 4 comma-separated integers (the chapter: 64,128,256,512)")
    g.add_argument("--time-emb-dim", type=int, default=m.time_emb_dim, metavar="D",
                   help="size of the sinusoidal time embedding (even)")
    g.add_argument("--timesteps", type=int, default=d.timesteps, metavar="T", help="number of diffusion steps T (the chain length when sampling)")
    g.add_argument("--schedule", default=d.schedule, choices=SCHEDULES,
                   help="beta schedule: linear (Ho et al. 2020) or cosine (Nichol & Dhariwal 2021)")
    g.add_argument("--dtype", default=m.dtype, choices=DTYPES,
                   help="compute dtype of the U-Net; parameters, optimizer state and the loss stay float32")
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


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample images from a trained work folder (EMA weights, eval mode)",
                       description="Draw samples with the EMA weights of a checkpoint (BatchNorm in eval mode), "
                                   "the whole chain compiled as one program.", formatter_class=HelpFormatter)
    p.add_argument("--workdir", required=True, metavar="DIR", help="a work folder written by 'jax-ddpm train'")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="FILE.png: one grid; FILE.npz: 'samples' float32 [N,H,W,C] in [-1,1] and 'images' uint8")
    p.add_argument("--num", type=int, default=64, metavar="N", help="number of images (ignored with --noise)")
    p.add_argument("--seed", type=int, default=0, help="seeds x_T and the noise of every step")
    p.add_argument("--sampler", default="ddpm", choices=SAMPLERS,
                   help="ddpm: ancestral sampling, Ho et al. 2020 Algorithm 2 (posterior variance); chapter: the "
                        "chapter's printed loop (errata E2, E3), for comparison only")
    p.add_argument("--steps", type=int, default=None, metavar="STEP",
                   help="checkpoint step to load (default: the latest)")
    p.add_argument("--no-clip-denoised", dest="clip_denoised", action="store_false",
                   help="do not clip the predicted x0 to [-1, 1] at each ddpm step")
    p.add_argument("--bn-stats", default=SampleConfig.bn_stats, choices=BN_STATS, help=BN_HELP)
    p.add_argument("--noise", default=None, metavar="FILE.npz",
                   help="pre-drawn noise instead of --seed: 'x_T' [N,H,W,C] and 'noises' [T,N,H,W,C] float32, "
                        "noises[i] added at step i (the same file torch_ref.sample reads)")
    p.add_argument("--xla-flags", default="auto", metavar="FLAGS", help=XLA_FLAGS_HELP)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="export weights to torch_ref's safetensors, or import them",
                       description="Export the EMA weights of a checkpoint under torch_ref's state_dict names "
                                   "(--out), or import such a file into a new work folder (--from-torch).",
                       formatter_class=HelpFormatter)
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="the trained work folder (export) or a new one to create (import)")
    p.add_argument("--out", default=None, metavar="FILE.safetensors",
                   help="export: write the EMA weights and BatchNorm statistics here, with the model settings "
                        "as metadata (torch_ref.weights.load_unet reads it)")
    p.add_argument("--from-torch", default=None, metavar="FILE.safetensors",
                   help="import: read torch_ref weights (torch_ref.weights.save_unet) and write checkpoint 0 "
                        "into --workdir, which must not hold a run yet")
    p.add_argument("--steps", type=int, default=None, metavar="STEP",
                   help="export: checkpoint step to export (default: the latest)")
    p.add_argument("--image-size", type=int, default=ModelConfig().image_size, metavar="S",
                   help="import: image size to sample at, when the file's metadata has none")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    _add_train(sub)
    _add_sample(sub)
    _add_convert(sub)
    sub.add_parser("parity", add_help=False, help="print the JAX vs PyTorch parity report (needs torch); "
                                                  "'jax-ddpm parity --help' for its options")
    sub.add_parser("bench", add_help=False, help="run the JAX vs PyTorch benchmarks (needs torch); "
                                                 "'jax-ddpm bench --help' for its options")
    return parser


def _error(message: str, status: int = EXIT_BAD_INPUT) -> int:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status


def _set_xla_flags(request: str, quiet: bool = False) -> None:
    """``--xla-flags``: adds the flags to XLA_FLAGS before JAX starts (raises ConfigError)."""
    from . import xla_flags

    try:
        note = xla_flags.setup(request)
    except xla_flags.XlaFlagsError as e:
        raise ConfigError(f"--xla-flags: {e}") from None
    if note and not quiet:
        print(f"{PROG}: note: {note}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("parity", "bench"):
        # These need torch (jax_ddpm itself does not): a missing piece is one line, exit 2.
        try:
            if argv[0] == "parity":
                from parity_tests.report import main as command_main
            else:
                from benchmarks.__main__ import main as command_main
        except ImportError as e:
            print(f"jax-ddpm {argv[0]}: error: cannot import what it needs ({e}); "
                  f"install the test extra: pip install -e '.[test]'", file=sys.stderr)
            return 2
        return command_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return int(e.code or 0)
    try:
        if args.command == "train":
            config = train_config_from_args(args)
            _set_xla_flags(args.xla_flags, quiet=config.quiet)
            from . import train_loop
            return train_loop.train(config)
        if args.command == "sample":
            config = sample_config_from_args(args)
            _set_xla_flags(args.xla_flags)
            from . import train_loop
            return train_loop.sample(config)
        if args.command == "convert":
            config = convert_config_from_args(args)
            from . import train_loop
            return train_loop.export_weights(config) if config.out else train_loop.import_weights(config)
    except KeyboardInterrupt:
        return _error("interrupted", 130)
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return _error(f"{where}{e.strerror or e}")
    except Exception as e:
        from .checkpoint import CheckpointError
        from .data import DataError
        from .train_loop import EXIT_NONFINITE, NonFiniteLossError

        if isinstance(e, (ConfigError, DataError, CheckpointError)):
            return _error(str(e))
        if isinstance(e, NonFiniteLossError):
            return _error(str(e), EXIT_NONFINITE)
        raise
    return _error(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
