"""Where ``jax-ddpm train`` starts: step 0, or the newest checkpoint that restores and validates.

A checkpoint is checked against this run's settings and data (``workdir.check_resume``: a
resume with another identity or other images is refused, no fallback) and restored replicated
over the mesh. Newer checkpoints that do not restore are moved to ``damaged-checkpoints/`` (one
line each); if none restores, the newest one's error, and nothing is moved. An imported
folder's checkpoint 0 is a starting point for fine-tuning: its weights (params and EMA), a fresh
optimizer and this run's data position. Runs under the folder's lock (``app.train``); writes
nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import jax

from .. import checkpoint as ckpt
from .. import parallel
from ..data import DataPosition
from ..training import TrainState
from .config import SAMPLING_DEFAULTS, TrainConfig, train_config_from_identity
from .console import warning
from .devices import Devices
from .factories import abstract_state, build_schedule, state_from_variables
from .workdir import check_resume, data_position, is_import_start, sampling_settings


@dataclass(frozen=True)
class Restored:
    """Where training starts: step 0 (``state`` None) or a checked, restored checkpoint."""

    start: int
    state: TrainState | None
    train_key: jax.Array
    position: DataPosition
    sampling: Mapping[str, Any] = field(default_factory=lambda: dict(SAMPLING_DEFAULTS))
    imported_from: str | None = None  # fine-tuning an imported folder's checkpoint 0


def restore_step(config: TrainConfig, devices: Devices, data_fp: str, keys: Mapping[str, jax.Array],
                 start: int) -> Restored:
    """Checkpoint ``start``, checked against this run's settings and data, replicated over the mesh.

    Raises:
      ConfigError: other settings or data (not a damaged checkpoint: no fallback);
      CheckpointError: it does not restore or validate.
    """
    reader = ckpt.make_manager(config.workdir, read_only=True)
    try:
        meta = check_resume(config, reader, start, data_fp)
        imported = is_import_start(meta, start)
        position = data_position(meta, config.workdir, start)
        saved = train_config_from_identity(config.workdir, meta["identity"]) if imported else config
        template = abstract_state(saved)
        target = parallel.abstract_replicated(ckpt.state_to_tree(template, jax.random.key_data(keys["train"])),
                                              devices.mesh)
        tree = ckpt.restore(reader, start, target)  # arrays come back replicated over the mesh
    finally:
        reader.close()
    state, train_key = ckpt.tree_to_state(template.replace(schedule=build_schedule(saved)), tree)
    sampling = sampling_settings(meta)
    if imported:  # fine-tune: the imported weights, everything else this run's own fresh start
        state = state_from_variables(config, {"params": state.params, "batch_stats": state.batch_stats},
                                     ema_params=state.ema_params)
        return Restored(0, state, keys["train"], DataPosition(0, 0), sampling, meta["imported_from"])
    return Restored(start, state, train_key, DataPosition(*position), sampling)


def restore(config: TrainConfig, devices: Devices, data_fp: str, keys: Mapping[str, jax.Array]) -> Restored:
    """The newest checkpoint that restores and validates (:func:`restore_step`), or a fresh
    start (see the module docstring)."""
    steps_done = ckpt.complete_steps(config.workdir)
    if not steps_done:
        return Restored(0, None, keys["train"], DataPosition(0, 0))
    damaged: list[tuple[int, ckpt.CheckpointError]] = []
    for start in reversed(steps_done):
        try:
            restored = restore_step(config, devices, data_fp, keys, start)
            break
        except ckpt.CheckpointError as e:
            damaged.append((start, e))
    else:
        raise damaged[0][1]
    for step, e in damaged:
        if devices.primary:
            moved = ckpt.move_aside(config.workdir, step)
            warning(f"{e}; moved it to {moved}, resuming from checkpoint {start}")
    if damaged and devices.process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jax-ddpm: damaged checkpoints moved aside")
    return restored


__all__ = ["Restored", "restore", "restore_step"]
