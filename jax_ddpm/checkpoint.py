"""Orbax save/restore of the whole training state, atomically, under ``WORKDIR/checkpoints``.

Each checkpoint ``checkpoints/<step>/`` holds two orbax items:

* ``state``: a pytree of arrays (``StandardSave``): ``params``, ``batch_stats`` (when the
  model has BatchNorm statistics),
  ``opt_state``, ``ema_params`` (when EMA is on), ``step`` and ``rng`` (the training key as
  raw ``uint32`` key data, ``jax.random.key_data``);
* ``meta``: JSON (``JsonSave``): the run's identity (``config.identity``), the data
  fingerprint and the data position ``(epoch, index)`` of the next batch.

Orbax writes each step into a temporary folder and renames it when finalized, so a
process killed mid-save leaves no folder that looks complete; ``CheckpointManager`` lists
finalized steps only, and temporary leftovers are removed when a writable manager opens.
Saving is synchronous: the next (donated) train step cannot race the writer.

Multi-process runs: every process calls :func:`save` and :func:`restore` with the same
arguments (orbax writes each replicated array once and commits the step once); give
:func:`restore` a template whose leaves carry the replicated sharding
(``parallel.abstract_replicated``) and the arrays come back replicated over the mesh.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from .errors import one_line as _one_line

CHECKPOINT_SUBDIR = "checkpoints"
STATE_ITEM = "state"
META_ITEM = "meta"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A missing, incomplete or incompatible checkpoint; one line naming the folder."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


class _DropReadOnlyNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "read only" not in record.getMessage()


@contextlib.contextmanager
def _quiet_read_only() -> Iterator[None]:
    """Orbax logs a warning whenever a read-only manager opens; that is what we asked for."""
    logger, notice = logging.getLogger("absl"), _DropReadOnlyNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def make_manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    """A synchronous manager over ``WORKDIR/checkpoints`` keeping the last ``keep`` steps.

    Read-only managers never create or delete anything (used by sample and convert).
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1, create=not read_only,
        read_only=read_only, enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
    with _quiet_read_only():
        return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=(STATE_ITEM, META_ITEM))


def complete_steps(workdir: str) -> list[int]:
    """Finalized checkpoint steps in ``workdir`` (ascending); [] if there are none."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return []
    manager = make_manager(workdir, read_only=True)
    try:
        return sorted(int(s) for s in manager.all_steps())
    finally:
        manager.close()


def state_to_tree(state: Any, key: jax.Array) -> dict[str, Any]:
    """The checkpointed part of a ``TrainState`` plus the training key (as uint32 key data)."""
    key_data = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": key_data}
    if state.batch_stats is not None:  # a model without BatchNorm has none
        tree["batch_stats"] = state.batch_stats
    if state.ema_params is not None:
        tree["ema_params"] = state.ema_params
    return tree


def tree_to_state(state: Any, tree: Mapping[str, Any]) -> tuple[Any, jax.Array]:
    """Puts a restored tree back into ``state`` (a template); returns (state, typed key)."""
    state = state.replace(step=tree["step"], params=tree["params"], batch_stats=tree.get("batch_stats"),
                          opt_state=tree["opt_state"],
                          ema_params=tree.get("ema_params") if state.ema_params is not None else None)
    rng = tree["rng"]
    if isinstance(rng, jax.Array) and not rng.is_fully_addressable:  # replicated over processes: any copy
        rng = rng.addressable_data(0)
    return state, jax.random.wrap_key_data(np.asarray(rng, np.uint32))


def save(manager: ocp.CheckpointManager, step: int, tree: Mapping[str, Any], meta: Mapping[str, Any]) -> bool:
    """Writes checkpoint ``step`` and waits until it is finalized. False if it already exists."""
    if step in manager.all_steps():
        return False
    meta = dict(meta, format=FORMAT_VERSION, step=int(step))
    manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(tree),
                                                  META_ITEM: ocp.args.JsonSave(meta)}), force=True)
    manager.wait_until_finished()
    return True


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The JSON part of checkpoint ``step``. Raises CheckpointError."""
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
        meta = dict(restored[META_ITEM])
    except Exception as e:
        raise CheckpointError(f"{_step_dir(manager, step)}: checkpoint metadata is unreadable ({_one_line(e)})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{_step_dir(manager, step)}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def restore(manager: ocp.CheckpointManager, step: int, template: Mapping[str, Any]) -> dict[str, Any]:
    """Restores the array tree of checkpoint ``step`` shaped like ``template``.

    Args:
      template: a tree of arrays or ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape`` of
        the initialiser, through :func:`state_to_tree`).
    Raises:
      CheckpointError: if the checkpoint is truncated, corrupt or of another shape.
    """
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, dict(template))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract)}))
        tree = restored[STATE_ITEM]
    except Exception as e:
        raise CheckpointError(f"{_step_dir(manager, step)}: checkpoint is incomplete, corrupt or does not match "
                              f"the model ({_one_line(e)})") from None
    bad = [jax.tree_util.keystr(p) for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(abstract),
                                                        jax.tree_util.tree_leaves(tree))
           if tuple(a.shape) != tuple(np.shape(b))]
    if bad:
        raise CheckpointError(f"{_step_dir(manager, step)}: checkpoint arrays do not match the model ({bad[0]})")
    return tree


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


__all__ = [
    "CHECKPOINT_SUBDIR", "CheckpointError", "checkpoint_dir", "complete_steps", "make_manager", "restore",
    "restore_meta", "save", "state_to_tree", "tree_to_state",
]
