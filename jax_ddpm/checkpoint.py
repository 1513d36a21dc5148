"""Orbax save/restore of the whole training state, atomically, under ``WORKDIR/checkpoints``.

Each checkpoint ``checkpoints/<step>/`` holds two orbax items:

* ``state``: a pytree of arrays (``StandardSave``): ``params``, ``batch_stats`` (when the
  model has BatchNorm statistics),
  ``opt_state``, ``ema_params`` (when EMA is on), ``step`` and ``rng`` (the training key as
  raw ``uint32`` key data, ``jax.random.key_data``);
* ``meta``: JSON (``JsonSave``): the run's identity (``config.identity``), the data
  fingerprint and the data position ``(epoch, index)`` of the next batch.

Orbax writes each step into a temporary folder (``<step>.orbax-checkpoint-tmp``) and renames
it when finalized, so a process killed mid-save leaves no folder that looks complete;
``CheckpointManager`` lists finalized steps only, and temporary leftovers are removed when a
writable manager opens. Saving is synchronous: the next (donated) train step cannot race the
writer. A save that fails (a full disk: :class:`CheckpointSaveError`, "no space left on
device") or is interrupted removes its temporary folder before the error goes up; the
checkpoints saved before are untouched (orbax prunes old steps only after a finalized save).

A checkpoint that does not restore can be moved aside (:func:`move_aside`) into
``WORKDIR/damaged-checkpoints/`` (outside ``checkpoints/``, so orbax's step listing never
sees it); nothing is deleted.

Multi-process runs: every process calls :func:`save` and :func:`restore` with the same
arguments (orbax writes each replicated array once and commits the step once); give
:func:`restore` a template whose leaves carry the replicated sharding
(``parallel.abstract_replicated``) and the arrays come back replicated over the mesh.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import io
import logging
import os
import re
import shutil
import sys
import time
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from .errors import one_line as _one_line

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "damaged-checkpoints"  # beside checkpoints/: where move_aside puts what does not restore
TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's temporary folder of a step being written: <step><TMP_MARKER>...
STATE_ITEM = "state"
META_ITEM = "meta"
FORMAT_VERSION = 1
LIST_ATTEMPTS = 5  # complete_steps retries a listing that a concurrent prune disturbed


class CheckpointError(ValueError):
    """A missing, incomplete or incompatible checkpoint; one line naming the folder."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (e.g. no space left on device); its temporary folder was removed."""


_NOISE = (re.compile(r"\s*\[source locations='[^\]]*'\]"), re.compile(r"\s*\[type\.googleapis\.com/[^\]]*\]"),
          re.compile(r"\s*\[os_error_code='?\d+'?\]"), re.compile(r"\s*tensorstore_spec=\S+"),
          re.compile(r"\s*See full TensorStore details:.*$"), re.compile(r"<bound method pybind11\S*[^>]*>\.?"))


def error_text(e: BaseException | str, limit: int = 200) -> str:
    """An orbax / tensorstore error as one short line: source locations, status payloads and
    spec dumps (pybind's noise) dropped."""
    text = " ".join(str(e).split())
    for pattern in _NOISE:
        text = pattern.sub("", text)
    return _one_line(text or type(e).__name__, limit=limit)


def is_no_space(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is ENOSPC: an OSError, or tensorstore's text of one."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        text = str(e)
        if "No space left on device" in text or "os_error_code='28'" in text or "Disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


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

    Read-only managers never create or delete anything (used by sample and convert); opening
    one logs nothing (orbax warns about a step a running trainer prunes while it is listed).
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1, create=not read_only,
        read_only=read_only, enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
    with _quiet_read_only(), (_quiet_orbax() if read_only else contextlib.nullcontext()):
        return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=(STATE_ITEM, META_ITEM))


def complete_steps(workdir: str) -> list[int]:
    """Finalized checkpoint steps in ``workdir`` (ascending); [] if there are none.

    A listing that fails because a running trainer pruned a step meanwhile is retried.

    Raises:
      CheckpointError: the folder cannot be listed.
    """
    last: Exception | None = None
    for attempt in range(LIST_ATTEMPTS):
        if not os.path.isdir(checkpoint_dir(workdir)):
            return []
        try:
            manager = make_manager(workdir, read_only=True)
            try:
                return sorted(int(s) for s in manager.all_steps())
            finally:
                manager.close()
        except Exception as e:  # FileNotFoundError and orbax's errors about a step that just went away
            last = e
            time.sleep(0.05 * (attempt + 1))
    raise CheckpointError(f"{checkpoint_dir(workdir)}: cannot list the checkpoints ({error_text(last)})")


def partial_folders(directory: str, step: int) -> list[str]:
    """The temporary folders orbax left in ``directory`` (a checkpoints folder) for ``step``."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(os.path.join(directory, n) for n in names if n.startswith(f"{step}{TMP_MARKER}"))


def remove_partial(directory: str, step: int) -> None:
    """Removes ``step``'s temporary folders (a failed or interrupted save); retried briefly,
    since writer threads may still be closing files in them."""
    for attempt in range(10):
        left = partial_folders(directory, step)
        if not left:
            return
        for path in left:
            shutil.rmtree(path, ignore_errors=True)
        time.sleep(0.02 * attempt)


def move_aside(workdir: str, step: int) -> str:
    """Moves checkpoint ``step`` (one that does not restore) to ``WORKDIR/damaged-checkpoints/<step>``
    (``<step>-<n>`` if that exists); returns the new path. Nothing is deleted."""
    target_dir = os.path.join(os.path.abspath(workdir), DAMAGED_SUBDIR)
    os.makedirs(target_dir, exist_ok=True)
    target, n = os.path.join(target_dir, str(step)), 1
    while os.path.exists(target):
        target, n = os.path.join(target_dir, f"{step}-{n}"), n + 1
    os.replace(os.path.join(checkpoint_dir(workdir), str(step)), target)
    return target


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


class _DropAbandonedTasks(logging.Filter):
    """After a failed read or write, orbax's abandoned asyncio tasks are collected later (at
    exit, say) and asyncio logs each one ("Task exception was never retrieved", also for
    futures): the failure
    was reported already, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in record.getMessage()  # Task, _GatheringFuture, Future


_ABANDONED = _DropAbandonedTasks()


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Orbax's noise around a failed read or write kept off the terminal: its logged tracebacks
    (absl, asyncio "Task exception was never retrieved"), and what its worker threads and
    tensorstore callbacks print on stderr ("Event loop is closed", unraisable coroutines).
    Stderr is held meanwhile: passed on after success, dropped after a failure (the caller
    reports it in one line). Threads still finishing are given a moment, and the coroutines
    they left are collected, while it is held."""
    loggers, drop = [logging.getLogger(name) for name in ("absl", "asyncio")], _DropAll()
    for logger in loggers:
        logger.addFilter(drop)
    stderr, held = sys.stderr, io.StringIO()
    sys.stderr = held
    try:
        yield
    except BaseException:
        if _ABANDONED not in loggers[1].filters:
            loggers[1].addFilter(_ABANDONED)
        time.sleep(0.2)
        gc.collect()
        raise
    else:
        if held.getvalue():
            stderr.write(held.getvalue())
    finally:
        if sys.stderr is held:
            sys.stderr = stderr
        for logger in loggers:
            logger.removeFilter(drop)


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
    """Writes checkpoint ``step`` and waits until it is finalized. False if it already exists.

    Raises:
      CheckpointSaveError: the save failed ("<folder>: no space left on device ..." for a full
        disk); its temporary folder is removed, earlier checkpoints are untouched. An
        interruption (KeyboardInterrupt) also removes the temporary folder, then goes up.
    """
    if step in manager.all_steps():
        return False
    meta = dict(meta, format=FORMAT_VERSION, step=int(step))
    directory = str(manager.directory)
    try:
        with _quiet_orbax():
            manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(tree),
                                                          META_ITEM: ocp.args.JsonSave(meta)}), force=True)
            manager.wait_until_finished()
    except BaseException as e:
        remove_partial(directory, step)
        if not isinstance(e, Exception):
            raise
        if is_no_space(e):
            raise CheckpointSaveError(f"{directory}: no space left on device while saving checkpoint {step} (its "
                                      "partial folder was removed; the checkpoints saved before are intact)") from None
        raise CheckpointSaveError(f"{os.path.join(directory, str(step))}: saving the checkpoint failed "
                                  f"({error_text(e)}); its partial folder was removed") from None
    return True


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The JSON part of checkpoint ``step``. Raises CheckpointError."""
    try:
        with _quiet_orbax():
            restored = manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
            meta = dict(restored[META_ITEM])
    except Exception as e:
        raise CheckpointError(f"{_step_dir(manager, step)}: checkpoint metadata is unreadable ({error_text(e)})") from None
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
        with _quiet_orbax():
            restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(
                abstract)}))
            tree = restored[STATE_ITEM]
    except Exception as e:
        raise CheckpointError(f"{_step_dir(manager, step)}: checkpoint is incomplete, corrupt or does not match "
                              f"the model ({error_text(e)})") from None
    bad = [jax.tree_util.keystr(p) for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(abstract),
                                                        jax.tree_util.tree_leaves(tree))
           if tuple(a.shape) != tuple(np.shape(b))]
    if bad:
        raise CheckpointError(f"{_step_dir(manager, step)}: checkpoint arrays do not match the model ({bad[0]})")
    return tree


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


__all__ = [
    "CHECKPOINT_SUBDIR", "CheckpointError", "CheckpointSaveError", "DAMAGED_SUBDIR", "TMP_MARKER", "checkpoint_dir",
    "complete_steps", "error_text", "is_no_space", "make_manager", "move_aside", "partial_folders", "remove_partial",
    "restore", "restore_meta", "save", "state_to_tree", "tree_to_state",
]
