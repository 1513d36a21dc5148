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

from ..samplers import SPACINGS
from .config import (BN_STATS, SAMPLERS, VARIANCES, ConfigError, ModelConfig, SampleConfig, convert_config_from_args,
                     sample_config_from_args, train_config_from_args)
from .console import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_NONFINITE, PROG, error, note, warning
from .options import (BN_HELP, CHECKPOINT_STEP_HELP, DEPRECATED_STEPS_HELP, PREDICTION_HELP, SAMPLER_HELP,
                      TRAIN_EPILOG, XLA_FLAGS_HELP, HelpFormatter, add_train_parser)

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


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``jax-ddpm train: error: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {' '.join(message.split())}\n")


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
                   help="clip the predicted x0 to [-1, 1] at each ddpm, ddim or dpmpp_2m step (default: the work "
                        "folder's setting: on for runs trained here, diffusers' clip_sample for imported ones)")
    p.add_argument("--no-clip-denoised", dest="clip_denoised", action="store_const", const=False,
                   help="do not clip the predicted x0 to [-1, 1] at each ddpm, ddim or dpmpp_2m step")
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
                   help="clip the predicted x0 at each ddpm, ddim or dpmpp_2m step (default: the work folder's "
                        "setting, as in sample)")
    p.add_argument("--no-clip-denoised", dest="clip_denoised", action="store_const", const=False,
                   help="do not clip the predicted x0 to [-1, 1] at each ddpm, ddim or dpmpp_2m step")
    p.add_argument("--variance", default=None, choices=VARIANCES,
                   help="variance of each ddpm step (default: the work folder's, as in sample)")
    p.add_argument("--bn-stats", default=None, choices=BN_STATS, help=BN_HELP + " (default: batch)")
    p.add_argument("--xla-flags", default="auto", metavar="FLAGS", help=XLA_FLAGS_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    add_train_parser(sub)
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


def given_options(argv: Sequence[str]) -> frozenset[str]:
    """The argparse dests ``argv`` (a valid ``train`` command line) sets itself, not by default:
    it is parsed again with every default of ``train`` replaced by a marker."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train_parser = commands.choices["train"]
    unset = object()
    train_parser.set_defaults(**{a.dest: unset for a in train_parser._actions if a.dest != "help"})
    args = parser.parse_args(list(argv))
    return frozenset(k for k, v in vars(args).items() if v is not unset)


def _dispatch(args: argparse.Namespace, train_hooks, argv: Sequence[str] = ()) -> int:
    if args.command == "train":
        config = train_config_from_args(args)
        _set_xla_flags(args.xla_flags, quiet=config.quiet)
        from .train import train
        # on a folder that holds a run, the options not given are the run's (app.resume_settings)
        return train(config, hooks=train_hooks, given=given_options(argv))
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
    argv = _join_negative_values(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return int(e.code or 0)
    try:
        return _dispatch(args, train_hooks, argv)
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


__all__ = ["BN_HELP", "BUILTIN_COMMANDS", "COMMAND_GROUP", "EXTERNAL_COMMANDS", "HelpFormatter", "OneLineParser",
           "PREDICTION_HELP", "TRAIN_EPILOG", "XLA_FLAGS_HELP", "build_parser", "find_command", "given_options", "main",
           "run_external"]

if __name__ == "__main__":
    sys.exit(main())
