"""Small checks of command-line values, each raising :class:`ConfigError` with one line naming
the option (shared by ``config``, ``arch_options`` and the commands; re-exported by ``config``)."""
from __future__ import annotations

import os
from typing import Any

from ..checkpoint import CHECKPOINT_SUBDIR, DAMAGED_SUBDIR
from ..schedules import MIN_TIMESTEPS, check_timesteps

SEED_LIMIT = 2 ** 32  # --seed must be in [0, SEED_LIMIT): jax.random.key takes 32 bits (larger seeds would collide)
# What a work folder's run owns (``app.workdir``): sample/convert --out never write these.
LOCK_NAME = ".jax-ddpm.lock"
WORK_FOLDER_FILES = ("config.json", "metrics.jsonl", "loss.png", "quality.png", "samples.png", LOCK_NAME)
WORK_FOLDER_DIRS = (CHECKPOINT_SUBDIR, DAMAGED_SUBDIR, "samples")


class ConfigError(ValueError):
    """Bad user input; the message is one line that names the option or file."""


def positive(name: str, value: int) -> int:
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value}")
    return value


def non_negative(name: str, value: int) -> int:
    if value < 0:
        raise ConfigError(f"{name} must be 0 or a positive integer, got {value}")
    return value


def at_least(name: str, value: int, low: int) -> int:
    if value < low:
        raise ConfigError(f"{name} must be an integer of at least {low}, got {value}")
    return value


def seed(name: str, value: int) -> int:
    """A seed in [0, 2^32): ``jax.random.key`` uses 32 bits, so a larger one would silently
    collide with a smaller one; refused instead."""
    if not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{name} must be an integer in [0, {SEED_LIMIT - 1}], got {value}")
    return value


def choice(name: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def finite_float(name: str, value: float, low: float, high: float | None = None, low_open: bool = False,
                 high_open: bool = True) -> float:
    ok = value == value and value not in (float("inf"), float("-inf"))
    ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = f"{high:g}{')' if high_open else ']'}" if high is not None else "inf)"
        raise ConfigError(f"{name} must be in {lo}, {hi}, got {value}")
    return float(value)


def int_list(name: str, text: str) -> tuple[int, ...]:
    """``'16,32,64'`` -> (16, 32, 64): comma-separated positive integers (how many: the caller decides)."""
    try:
        values = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated positive integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ConfigError(f"{name} must be comma-separated positive integers, got {text!r}")
    return values


def resolve_data_source(text: str) -> str:
    """``'digits'`` stays; a path must exist and becomes absolute."""
    if text == "digits":
        return text
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.exists(path):
        raise ConfigError(f"--data {text}: no such file or directory (use 'digits' or a folder, .npz or .npy)")
    if os.path.isfile(path) and not path.lower().endswith((".npz", ".npy")):
        raise ConfigError(f"--data {text}: a file must be .npz or .npy (or give a folder of images)")
    return path


def workdir_path(text: str, option: str = "--workdir") -> str:
    path = os.path.abspath(os.path.expanduser(text))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{option} {text}: exists and is not a folder")
    return path


def out_file(option: str, text: str, suffixes: tuple[str, ...]) -> str:
    path = os.path.abspath(os.path.expanduser(text))
    if not path.lower().endswith(suffixes):
        raise ConfigError(f"{option} {text}: must end in {' or '.join(suffixes)}")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ConfigError(f"{option} {text}: folder {parent} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"{option} {text}: is a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {text}: cannot write into folder {parent}")
    return path


def not_run_file(option: str, text: str, path: str, workdir: str) -> str:
    """``path`` unless it is a file the run in ``workdir`` owns (its samples.png, config.json,
    anything under checkpoints/, ...): ``--out`` never replaces those."""
    base, target = os.path.realpath(workdir), os.path.realpath(path)
    rel = os.path.relpath(target, base)
    if not rel.startswith(os.pardir) and rel != os.curdir and (rel in WORK_FOLDER_FILES
                                                                or rel.split(os.sep)[0] in WORK_FOLDER_DIRS):
        raise ConfigError(f"{option} {text}: is the work folder's own {rel} (train writes it); choose a file "
                          "outside those")
    return path


def new_folder(option: str, text: str) -> str:
    """A folder to create: absent or empty, in an existing folder (nothing there is overwritten)."""
    path = os.path.abspath(os.path.expanduser(text))
    parent = os.path.dirname(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConfigError(f"{option} {text}: already exists and is not an empty folder; refusing to overwrite it")
    if not os.path.isdir(parent):
        raise ConfigError(f"{option} {text}: folder {parent} does not exist")
    return path


def existing_file(option: str, text: str) -> str:
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.isfile(path):
        raise ConfigError(f"{option} {text}: no such file")
    return path


def existing_folder(option: str, text: str) -> str:
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.isdir(path):
        raise ConfigError(f"{option} {text}: no such folder")
    return path


def check_timesteps_option(value: int, option: str = "--timesteps") -> int:
    """``schedules.check_timesteps`` (T >= MIN_TIMESTEPS) as a ConfigError naming ``option``."""
    try:
        return check_timesteps(value)
    except ValueError:
        raise ConfigError(f"{option} must be an integer >= {MIN_TIMESTEPS}, got {value}") from None


def betas_from_args(args: Any, schedule: str) -> dict[str, float]:
    """``--beta-start`` / ``--beta-end`` (the linear schedule's; not given: none, the defaults)."""
    given = {k: getattr(args, k, None) for k in ("beta_start", "beta_end")}
    given = {k: v for k, v in given.items() if v is not None}
    if given and schedule != "linear":
        option = "--" + next(iter(given)).replace("_", "-")
        raise ConfigError(f"{option}: only --schedule linear has betas to set, got --schedule {schedule}")
    return {k: finite_float("--" + k.replace("_", "-"), v, 0.0, 1.0, low_open=True) for k, v in given.items()}


def quality_data(option: str, source: str) -> str:
    """``source`` (a ``--data`` value) if quality metrics can score it (``jax_ddpm.quality.REFERENCES``:
    a feature extractor for that data; only the digits have one), else ConfigError naming ``option``."""
    from ..quality import REFERENCES

    if source not in REFERENCES:
        raise ConfigError(f"{option}: the quality metrics need a feature extractor for the data and only "
                          f"{', '.join(REFERENCES)} has one (none exists for other data yet), got --data {source}")
    return source


def checkpoint_step_from_args(args: Any) -> int | None:
    """``--checkpoint-step`` (or its deprecated spelling ``--steps``): None = the latest."""
    step, old = getattr(args, "checkpoint_step", None), getattr(args, "steps", None)
    if step is not None and old is not None and step != old:
        raise ConfigError(f"--steps {old} and --checkpoint-step {step} disagree; give only --checkpoint-step")
    if step is None and old is not None:
        return non_negative("--steps", old)
    return None if step is None else non_negative("--checkpoint-step", step)


__all__ = ["ConfigError", "LOCK_NAME", "SEED_LIMIT", "WORK_FOLDER_DIRS", "WORK_FOLDER_FILES", "at_least",
           "betas_from_args", "check_timesteps_option", "checkpoint_step_from_args", "choice", "existing_file",
           "existing_folder", "finite_float", "int_list", "new_folder", "non_negative", "not_run_file", "out_file",
           "positive", "quality_data", "resolve_data_source", "seed", "workdir_path"]
