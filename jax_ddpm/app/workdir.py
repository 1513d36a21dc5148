"""The work folder (``--workdir``): its files, the resume check, and loading a trained run.

A work folder holds::

    config.json         the resolved TrainConfig of the latest (re)start
    metrics.jsonl       one JSON object per logging point: step, loss, images_per_s, lr, grad_norm, ...;
                        with --eval-every also quality rows ("kind": "eval": step, fid, fid_floor, ...)
    loss.png            the loss curve (redrawn at checkpoints, at most every PLOT_EVERY_S, and at the end)
    quality.png         --eval-every: FID and confident share against step (redrawn at each evaluation)
    samples.png         the final sample grid (EMA weights, DDPM sampler, clipped x0, --bn-stats)
    samples/step_N.png  grids every --sample-every steps
    checkpoints/N/      orbax checkpoints (see jax_ddpm.checkpoint)
    damaged-checkpoints/N/  checkpoints that did not restore, moved aside by train (never deleted)
    .jax-ddpm.lock      the writer's lock (app.lock.WorkdirLock): flock'ed while a train or an import writes here

Guarantees (docs/cli.md, "Guarantees"): one writer per folder (``app.lock.WorkdirLock``, an OS
lock that ends with the process, SIGKILL included; re-exported here); ``train`` writes only into an empty or
new folder or one jax-ddpm wrote (:func:`check_train_target`); resume and the readers
(``sample``, ``convert``) take the newest checkpoint that restores and validates, falling back
past damaged ones (:func:`load_run`, ``app.train``); the final grid records its step
(``images.grid_step``), so a stale one is redrawn.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax

from .. import checkpoint as ckpt
from .. import parallel
from ..images import atomic_write, grid_step
from ..training import TrainState
from .checks import LOCK_NAME
from .config import (SAMPLING_DEFAULTS, VARIANCES, ConfigError, TrainConfig, identity, identity_mismatch,
                     train_config_from_identity)
from .console import warning
from .lock import WorkdirLock

EVAL_KIND = "eval"  # metrics.jsonl: the "kind" of a quality line (loss lines have no "kind")
READ_ATTEMPTS = 20  # load_run: checkpoints pruned under a reader by a running trainer, retried this often

# Starting ``train`` on an imported folder's checkpoint 0 fine-tunes it: the model and the
# diffusion must be the import's, except these (they do not change the imported weights' meaning).
FINE_TUNE_FREE = ("model.dtype",)  # the compute dtype
FINE_TUNE_FREE_ARCH_FIELDS = ("dropout",)  # diffusers' configs record 0 (google/ddpm-cifar10-32 trained with 0.1)
from .factories import abstract_state, build_schedule


@dataclass(frozen=True)
class RunFiles:
    workdir: str

    @property
    def config(self) -> str:
        return os.path.join(self.workdir, "config.json")

    @property
    def metrics(self) -> str:
        return os.path.join(self.workdir, "metrics.jsonl")

    @property
    def loss_plot(self) -> str:
        return os.path.join(self.workdir, "loss.png")

    @property
    def quality_plot(self) -> str:
        return os.path.join(self.workdir, "quality.png")

    @property
    def samples(self) -> str:
        return os.path.join(self.workdir, "samples.png")

    def step_samples(self, step: int) -> str:
        return os.path.join(self.workdir, "samples", f"step_{step:07d}.png")

    @property
    def lock(self) -> str:
        return os.path.join(self.workdir, LOCK_NAME)


# ----------------------------------------------------------------------------- whose folder
def _our_config(path: str) -> bool:
    """Whether ``path`` is a config.json that jax-ddpm wrote (its version and sections)."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("version") == 1 and all(k in d for k in ("model", "diffusion", "workdir"))


def is_work_folder(workdir: str) -> bool:
    """Whether jax-ddpm wrote ``workdir``: a finalized checkpoint, its config.json or its lock file."""
    files = RunFiles(workdir)
    return os.path.exists(files.lock) or _our_config(files.config) or bool(ckpt.complete_steps(workdir))


def check_train_target(workdir: str, option: str = "--workdir") -> None:
    """``train`` and the imports write only into an absent or empty folder, or one jax-ddpm wrote.

    Raises:
      ConfigError: a non-empty folder that holds no jax-ddpm run (nothing there is touched).
    """
    try:
        entries = sorted(os.listdir(workdir))
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise ConfigError(f"{option} {workdir}: exists and is not a folder") from None
    if not entries or is_work_folder(workdir):
        return
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise ConfigError(f"{option} {workdir}: is not empty ({shown}) and holds no jax-ddpm run; use an empty or new "
                      "folder (nothing in it was changed)")


def write_json(path: str, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: open(tmp, "w").write(text))


def append_metrics(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def read_metrics(path: str) -> list[dict]:
    """The metrics lines (skipping a torn last line of a killed run)."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def is_eval_row(row: dict) -> bool:
    """Whether a metrics line is a quality evaluation (``train --eval-every``: ``"kind": "eval"``)
    rather than a loss line (which has no ``kind``, as in every folder written before)."""
    return row.get("kind") == EVAL_KIND


def loss_rows(rows: list[dict]) -> list[dict]:
    """The loss lines of ``rows`` (what loss.png plots)."""
    return [r for r in rows if not is_eval_row(r) and "loss" in r]


def eval_rows(rows: list[dict]) -> list[dict]:
    """The quality lines of ``rows`` (what quality.png plots)."""
    return [r for r in rows if is_eval_row(r)]


def trim_metrics(path: str, last_step: int) -> list[dict]:
    """Drops lines after ``last_step`` (written by a run that died after its last checkpoint)."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    if os.path.exists(path):
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        atomic_write(path, lambda tmp: open(tmp, "w").write(text))
    return rows


def is_import_start(meta: dict, step: int) -> bool:
    """Whether checkpoint ``step`` (metadata ``meta``) is an imported folder's checkpoint 0."""
    return step == 0 and bool(meta.get("imported_from"))


def sampling_settings(meta: dict) -> dict:
    """The run's sampling defaults: the checkpoint's ``sampling`` over ``SAMPLING_DEFAULTS``.

    Raises:
      CheckpointError: a stored value that is not one of the choices.
    """
    s = dict(SAMPLING_DEFAULTS, **(meta.get("sampling") or {}))
    if s["variance"] not in VARIANCES or not isinstance(s["clip_denoised"], bool):
        raise ckpt.CheckpointError(f"checkpoint metadata: unreadable sampling settings {meta.get('sampling')!r}")
    return {k: s[k] for k in SAMPLING_DEFAULTS}


def check_resume(config: TrainConfig, manager, step: int, data_fp: str) -> dict:
    """Reads checkpoint ``step``'s metadata and refuses a run with another identity or data.

    An identity saved before a field existed compares that field at its default
    (``config.identity_mismatch``). An imported folder's checkpoint 0 (:func:`is_import_start`)
    is a starting point for fine-tuning: only the model (but ``FINE_TUNE_FREE``) and the
    diffusion must be the import's; data, optimizer and seed are this run's. Returns the metadata.

    Raises:
      ConfigError: other settings or other images; CheckpointError: unreadable metadata.
    """
    meta = ckpt.restore_meta(manager, step)
    if is_import_start(meta, step):
        diff = identity_mismatch(meta.get("identity", {}), identity(config), parts=("model", "diffusion"),
                                 ignore=FINE_TUNE_FREE, ignore_arch_fields=FINE_TUNE_FREE_ARCH_FIELDS)
        if diff:
            raise ConfigError(f"--workdir {config.workdir} holds weights imported from {meta['imported_from']} with "
                              f"other model or diffusion settings ({diff}); fine-tune with the import's settings "
                              "(convert printed them) or use a new --workdir")
        return meta
    saved_fp = meta.get("data_fingerprint")
    # The content fingerprint is the data's identity: a data set moved elsewhere (or a copy) with the same
    # images resumes; the path is compared only when there is no fingerprint to compare.
    ignore = ("data.source",) if saved_fp is not None else ()
    diff = identity_mismatch(meta.get("identity", {}), identity(config), ignore=ignore)
    if diff:
        raise ConfigError(f"--workdir {config.workdir} holds a run with other settings ({diff}); "
                          "resume with the same model, data and optimizer options or use a new --workdir")
    if saved_fp is not None and saved_fp != data_fp:
        raise ConfigError(f"--data {config.data.source}: the images differ from those the run in --workdir "
                          f"{config.workdir} was trained on (fingerprint {data_fp}, expected {saved_fp})")
    data_position(meta, config.workdir, step)
    return meta


def data_position(meta: dict, workdir: str, step: int) -> tuple[int, int]:
    """The checkpoint's ``data_position`` ``(epoch, index)``.

    Raises:
      CheckpointError: missing or not two non-negative integers (a damaged checkpoint).
    """
    pos = meta.get("data_position")
    if (not isinstance(pos, (list, tuple)) or len(pos) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pos)):
        raise ckpt.CheckpointError(f"{ckpt.checkpoint_dir(workdir)}/{step}: checkpoint metadata has no valid "
                                   f"data_position (got {pos!r}; expected [epoch, index])")
    return int(pos[0]), int(pos[1])


def holds_run(workdir: str) -> bool:
    """Whether ``workdir`` already has a checkpoint or a config.json."""
    return bool(ckpt.complete_steps(workdir)) or os.path.exists(RunFiles(workdir).config)


def grid_is_current(workdir: str, step: int) -> bool:
    """Whether ``samples.png`` is the grid of checkpoint ``step``: its recorded step
    (``images.grid_step``) equals ``step``. A grid without the record (written before it
    existed) counts as current unless it is older than that checkpoint's folder, which is what
    a run killed while drawing its final grid leaves."""
    files = RunFiles(workdir)
    if not os.path.exists(files.samples):
        return False
    recorded = grid_step(files.samples)
    if recorded is not None:
        return recorded == step
    try:
        return os.path.getmtime(files.samples) >= os.path.getmtime(os.path.join(ckpt.checkpoint_dir(workdir),
                                                                               str(step)))
    except OSError:
        return True


@dataclass(frozen=True)
class LoadedRun:
    config: TrainConfig
    step: int
    state: TrainState
    meta: dict

    @property
    def sampling(self) -> dict:
        """The run's sampling defaults (:func:`sampling_settings`)."""
        return sampling_settings(self.meta)


@dataclass(frozen=True)
class RecordedRun:
    """A checkpoint's settings from its metadata alone (no array restored): what a command checks
    its options against before it loads the weights."""

    config: TrainConfig
    step: int
    meta: dict

    @property
    def sampling(self) -> dict:
        return sampling_settings(self.meta)


def recorded_run(workdir: str, step: int | None = None) -> RecordedRun | None:
    """The settings of checkpoint ``step`` (None: the newest complete one) read from its metadata,
    or None when there is none or it does not read (``load_run`` then says why, or falls back)."""
    steps = ckpt.complete_steps(workdir)
    if not steps or (step is not None and step not in steps):
        return None
    step = steps[-1] if step is None else step
    try:
        manager = ckpt.make_manager(workdir, read_only=True)
        try:
            meta = ckpt.restore_meta(manager, step)
        finally:
            manager.close()
        recorded = RecordedRun(config=train_config_from_identity(workdir, meta["identity"]), step=step, meta=meta)
        recorded.sampling  # readable
        return recorded
    except Exception:  # a damaged or changing checkpoint: load_run decides
        return None


def _restore_step(workdir: str, step: int) -> LoadedRun:
    """Checkpoint ``step`` restored onto one device, with its config. Raises CheckpointError."""
    try:
        manager = ckpt.make_manager(workdir, read_only=True)
    except Exception as e:  # the folder changed while orbax listed it
        raise ckpt.CheckpointError(f"{ckpt.checkpoint_dir(workdir)}: cannot read the checkpoints "
                                   f"({ckpt.error_text(e)})") from None
    try:
        meta = ckpt.restore_meta(manager, step)
        try:
            config = train_config_from_identity(workdir, meta["identity"])
        except (KeyError, TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{ckpt.checkpoint_dir(workdir)}/{step}: unreadable run settings "
                                       f"({e})") from None
        template = abstract_state(config)
        key_like = jax.random.key_data(jax.random.key(0))
        # onto one device, whatever mesh the run was trained on (orbax otherwise insists on its topology)
        one_device = parallel.make_mesh(jax.local_devices()[:1])
        tree = ckpt.restore(manager, step, parallel.abstract_replicated(ckpt.state_to_tree(template, key_like),
                                                                        one_device))
    finally:
        manager.close()
    state, _ = ckpt.tree_to_state(template.replace(schedule=build_schedule(config)), tree)
    return LoadedRun(config=config, step=step, state=state, meta=meta)


def _listing_after_failure(workdir: str, step: int) -> list[int]:
    """The steps listed after checkpoint ``step`` failed to restore: if it is still listed, a
    moment later again (a trainer's prune may be deleting it right now)."""
    steps = ckpt.complete_steps(workdir)
    for pause in (0.05, 0.2, 0.5):
        if step not in steps:
            break
        time.sleep(pause)
        steps = ckpt.complete_steps(workdir)
    return steps


def load_run(workdir: str, step: int | None = None,
             on_damaged: Callable[[str], None] | None = warning) -> LoadedRun:
    """The TrainState of checkpoint ``step`` (latest if None) on one device, and its config
    (rebuilt from the checkpoint's identity; fields it lacks at their defaults).

    The latest is the newest checkpoint that restores: one that a running trainer prunes while
    it is read is skipped (the listing is read again), one that is damaged is passed over
    with one line to ``on_damaged`` (it stays where it is: readers change nothing). A step
    given explicitly is that one or an error.

    Raises:
      CheckpointError: no checkpoint, no such step, or no checkpoint that restores (the
        newest one's error).
    """
    steps = ckpt.complete_steps(workdir)
    if not steps:
        raise ckpt.CheckpointError(f"--workdir {workdir}: no checkpoint found (run jax-ddpm train first)")
    if step is not None:
        if step not in steps:
            raise ckpt.CheckpointError(f"--checkpoint-step {step}: no checkpoint for this step in {workdir} "
                                       f"(have {', '.join(map(str, steps))})")
        return _restore_step(workdir, step)
    damaged: dict[int, ckpt.CheckpointError] = {}
    for _ in range(READ_ATTEMPTS):
        candidates = [s for s in reversed(steps) if s not in damaged]
        if not candidates:
            break
        try:
            run = _restore_step(workdir, candidates[0])
        except ckpt.CheckpointError as e:
            steps = _listing_after_failure(workdir, candidates[0])
            if candidates[0] in steps:  # still listed: damaged, not pruned
                damaged[candidates[0]] = e
            continue
        if damaged and on_damaged is not None:
            newest = max(damaged)
            on_damaged(f"{damaged[newest]}; using checkpoint {run.step}, the newest that restores")
        return run
    if damaged:
        raise damaged[max(damaged)]
    raise ckpt.CheckpointError(f"--workdir {workdir}: the checkpoints kept changing while they were read "
                               f"({READ_ATTEMPTS} attempts); try again")


__all__ = ["EVAL_KIND", "FINE_TUNE_FREE", "FINE_TUNE_FREE_ARCH_FIELDS", "LoadedRun", "RecordedRun", "RunFiles",
           "WorkdirLock", "append_metrics", "check_resume", "check_train_target", "data_position", "eval_rows",
           "grid_is_current", "holds_run", "is_eval_row", "is_import_start", "is_work_folder", "load_run",
           "loss_rows", "read_metrics", "recorded_run", "sampling_settings", "trim_metrics", "write_json"]
