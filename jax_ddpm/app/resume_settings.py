"""``jax-ddpm train`` on a folder that holds a run: the options not given take the run's values.

Running the same command again resumes a run, also after a default changed (``--prediction``'s
did): an identity option (``config.identity``) that the command line does not give takes the
value the run was trained with, read from the newest checkpoint whose metadata reads. An option
that *is* given is compared as before (``workdir.check_resume`` refuses another value in one
line). Options that set one field together are one group (:data:`GROUPS`): ``--schedule`` with
``--beta-start``/``--beta-end``, and the network (``--arch``, ``--features``, ``--time-emb-dim``,
``--channels`` and the unet2d options); a group takes the run's values only when none of its
options is given. On an imported folder's checkpoint 0 (a fine-tuning start) only the model
and diffusion settings are the import's; data, optimizer and seed stay this command's.

Nothing here writes; :func:`apply` (what ``app.train`` calls, after the devices are set up:
reading a checkpoint starts JAX, so it must come after ``--xla-flags`` and
``jax.distributed.initialize``) says in one note what was taken where it differs from the
command's value.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Mapping

from .. import checkpoint as ckpt
from .arch_options import UNET2D_OPTIONS
from .checks import quality_data
from .config import OPTION_NAMES, TrainConfig, complete_identity, grid_sampler_settings, identity, \
    train_config_from_identity
from .console import note
from .workdir import is_import_start

_ARCH_FIELDS = ("model.arch", "model.arch_config", "model.features", "model.time_emb_dim", "model.channels")
_ARCH_DESTS = ("arch", "features", "time_emb_dim", "channels", *UNET2D_OPTIONS.values())

# (identity fields, the argparse dests that set them): a group is taken from the run only when
# the command gives none of its dests.
GROUPS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (_ARCH_FIELDS, _ARCH_DESTS),
    (("model.image_size",), ("image_size",)),
    (("model.dtype",), ("dtype",)),
    (("diffusion.timesteps",), ("timesteps",)),
    (("diffusion.schedule", "diffusion.beta_start", "diffusion.beta_end"), ("schedule", "beta_start", "beta_end")),
    (("diffusion.prediction",), ("prediction",)),
    (("diffusion.timestep_draw",), ("timestep_draw",)),
    (("diffusion.snr_gamma",), ("snr_gamma",)),
    (("data.source",), ("data",)),
    (("data.layout",), ("layout",)),
    (("optim.batch_size",), ("batch_size",)),
    (("optim.lr",), ("lr",)),
    (("optim.ema_decay",), ("ema_decay",)),
    (("optim.grad_clip",), ("grad_clip",)),
    (("optim.lr_schedule", "optim.lr_decay_steps", "optim.lr_end_factor"),
     ("lr_schedule", "lr_decay_steps", "lr_end_factor")),
    (("seed",), ("seed",)),
)
_FINE_TUNE_PARTS = ("model", "diffusion")  # what an imported checkpoint 0 decides (workdir.check_resume)


def saved_run(workdir: str) -> tuple[dict[str, Any], bool] | None:
    """``(identity, is an import start)`` of the newest checkpoint in ``workdir`` whose metadata
    reads, or None (no checkpoint, none readable: the resume itself then says what is wrong)."""
    if not os.path.isdir(ckpt.checkpoint_dir(workdir)):
        return None
    try:
        steps = ckpt.complete_steps(workdir)
    except ckpt.CheckpointError:
        return None
    if not steps:
        return None
    reader = ckpt.make_manager(workdir, read_only=True)
    try:
        for step in reversed(steps):
            try:
                meta = ckpt.restore_meta(reader, step)
            except ckpt.CheckpointError:
                continue
            saved = meta.get("identity")
            if isinstance(saved, dict):
                return complete_identity(saved), is_import_start(meta, step)
        return None
    finally:
        reader.close()


def with_run_settings(config: TrainConfig, given: Iterable[str]) -> tuple[TrainConfig, dict[str, Any]]:
    """``config`` with every identity group whose options are not in ``given`` (argparse dests)
    set to the run's values in ``config.workdir``; and ``{field: run's value}`` for the fields
    taken that differ from ``config``'s. No run there: ``config`` unchanged.

    Raises:
      ConfigError: a ``--sample-*`` option that does not suit the run's settings (its T).
    """
    found = saved_run(config.workdir)
    if found is None:
        return config, {}
    saved, imported = found
    given = set(given)
    current = identity(config)
    merged = dict(current)
    for fields, dests in GROUPS:
        if given.intersection(dests):
            continue
        for f in fields:
            if not imported or f.split(".")[0] in _FINE_TUNE_PARTS:
                merged[f] = saved[f]
    taken = {f: merged[f] for f in merged if merged[f] != current[f]}
    if not taken:
        return config, {}
    run = train_config_from_identity(config.workdir, merged)
    config = dataclasses.replace(config, model=run.model, diffusion=run.diffusion, data=run.data, optim=run.optim,
                                 seed=run.seed)
    grid_sampler_settings(config)  # the grids' options against the run's T and prediction
    return config, taken


def apply(config: TrainConfig, given: Iterable[str], say: bool = True) -> TrainConfig:
    """:func:`with_run_settings`, with one note naming what was taken (``say``), and the checks
    that depend on the settings taken (``--eval-every`` needs the digits)."""
    config, taken = with_run_settings(config, given)
    if taken and say:
        note(f"resuming {config.workdir} with its own settings for the options not given: {describe(taken)}")
    if config.eval_every:
        quality_data("--eval-every", config.data.source)
    return config


def describe(taken: Mapping[str, Any]) -> str:
    """``'--prediction eps, --lr 0.001'``: the options taken from the run, as a user would write them."""
    parts = []
    for f, v in taken.items():
        if f == "model.arch_config":
            continue  # the unet2d settings: shown through --arch (their own options name them on a mismatch)
        text = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        parts.append(f"{OPTION_NAMES.get(f, f)} {text}")
    if "model.arch_config" in taken and not any(p.startswith("--arch ") for p in parts):
        parts.append("the run's unet2d settings")
    return ", ".join(parts)


__all__ = ["GROUPS", "apply", "describe", "saved_run", "with_run_settings"]
