"""``jax-ddpm train``: the loop, checkpoints, metrics, sample grids and quality rows.

Exact resume: the train step draws ``t`` and the noise from ``fold_in(train_key, step)``
and the data order is a function of ``(seed, epoch)``; the checkpoint holds the whole
state, the key and the data position, so a run restarted from any checkpoint computes the
same bits as one that never stopped (on one CPU backend; ``tests/test_cli_resume.py``).

Devices (``app.devices``): the state and key are replicated over the mesh (after init and
after restore), every process draws the same global batch indices and feeds only its own
rows, and the step is ``factories.make_step_fn``. Every process takes part in the steps,
the checkpoint saves and restores and the non-finite-loss stop; only process 0 writes
``config.json``, ``metrics.jsonl``, plots, sample grids and messages. In a multi-process
run Ctrl-C or SIGTERM is acted on at the next logging or checkpoint step, once all processes
agree (one small all-gather there).

One writer per folder: process 0 holds ``lock.WorkdirLock`` from before the first read of
a checkpoint to the end; a second trainer is refused naming the PID that holds it. Nothing is
written before every check has passed, and only into an empty or new folder or one jax-ddpm
wrote (``workdir.check_train_target``). SIGTERM is handled like the first Ctrl-C (a
checkpoint at the step reached, one line, exit status 143; 130 for Ctrl-C); a second signal
during that save waits for it to finish. Resume takes the newest checkpoint that restores
and validates; newer ones that do not are moved to ``damaged-checkpoints/`` (said in one line
each (``app.resume``). A save that fails (no space left on device) is one line, exit status 2,
its temporary folder removed. The final grid records its step, so a rerun redraws a stale one.

What is drawn beside the training (``app.train_outputs``): sample grids, and with
``--eval-every`` the quality lines of metrics.jsonl and quality.png, each scored after the
checkpoint of its step is saved; a run that starts from a due step without its line (stopped
there by a signal, killed while scoring it) scores it first. Neither touches the training key
or the state, so the weights are the same bits with or without them.

An imported folder's checkpoint 0 (``convert --from-torch`` / ``--from-diffusers``) is a
starting point, not a run to resume: ``train`` on it fine-tunes the imported weights (params
and EMA params) with a freshly initialised optimizer, this run's data, optimizer settings and
seed (``workdir.check_resume`` says what must match). Its sampling defaults (checkpoint
metadata ``sampling``) are carried into every checkpoint the run writes.

The loop is a few functions over one :class:`_Loop` (its context and mutable state).
:class:`TrainHooks` lets a caller (the tests' ``tests/train_runner.py``) change a batch or
act after a step; the command itself passes none.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, TextIO

import jax
import numpy as np

from .. import checkpoint as ckpt
from .. import parallel
from ..data import BatchIterator, ImageSet, fingerprint, load_image_set
from ..images import save_grid, save_loss_plot, save_quality_plot
from ..training import TrainState
from .checks import quality_data
from .config import ConfigError, TrainConfig, identity, to_dict
from .console import EXIT_INTERRUPTED, EXIT_OK, InterruptFlag, NonFiniteError, Progress, StopAgain, exit_status
from .devices import Devices, any_process, local_copy, setup_devices
from .factories import build_schedule, init_state, learning_rate_of_update, lr_decay_note, make_step_fn, run_keys
from . import resume_settings
from .lock import WorkdirLock
from .resume import Restored as _Restored, restore as _restore
from .train_outputs import (PLOT_EVERY_S, QualityEvaluator, eval_due, eval_owed, record_evaluation, sample_grid_fn,
                            sample_grid_record)
from .workdir import (RunFiles, append_metrics, check_train_target, eval_rows, grid_is_current, loss_rows,
                      read_metrics, trim_metrics, write_json)


class NonFiniteLossError(NonFiniteError):
    """The loss (or gradient norm) became NaN/inf; training stopped (exit status 3)."""


@dataclass(frozen=True)
class TrainHooks:
    """Optional callbacks into the loop (for tests and tools; the command passes none).

    corrupt_batch: ``(step, batch) -> batch``, called with the number of the step the host
      batch (this process's rows, float32 [B, H, W, C]) is about to feed; returns the batch to use.
    after_step: ``(step) -> None``, called on the host after each step's bookkeeping.
    """

    corrupt_batch: Callable[[int, np.ndarray], np.ndarray] | None = None
    after_step: Callable[[int], None] | None = None


@dataclass
class _Loop:
    """The loop's context (fixed) and its state (changes every step)."""

    config: TrainConfig
    devices: Devices
    files: RunFiles
    images: ImageSet
    data_fp: str
    progress: Progress
    hooks: TrainHooks
    manager: Any
    iterator: BatchIterator
    step_fn: Callable
    sample_grid: Callable[[TrainState], np.ndarray]
    state: TrainState
    train_key: jax.Array
    step: int
    last_good: int | None
    history: list[dict]  # the loss lines of metrics.jsonl (loss.png)
    sampling: Mapping[str, Any]
    evaluator: QualityEvaluator | None = None  # --eval-every (process 0 only)
    evals: list[dict] = field(default_factory=list)  # the quality lines of metrics.jsonl (quality.png)
    pending: list[tuple[int, dict]] = field(default_factory=list)
    timer_step: int = 0
    timer: float = 0.0
    last_plot: float = -math.inf
    first_step_done: bool = False
    stop_signal: int | None = None  # the SIGINT / SIGTERM the run stopped on
    stopped_again: int | None = None  # a second one ended the run before (or while) it saved
    saving: int | None = None  # the step being saved while that happened

    def restart_timer(self) -> None:
        """img/s counts training only: compile, checkpoint and sampling time are left out."""
        self.timer_step, self.timer = self.step, time.perf_counter()


# ----------------------------------------------------------------------------- before the loop
def _load_data(config: TrainConfig) -> tuple[ImageSet, str]:
    """The images, kept compact (uint8 or the digits' source) and decoded per batch, and their fingerprint."""
    images = load_image_set(config.data.source, config.model.image_size, config.model.channels, config.data.layout)
    if config.optim.batch_size > images.shape[0]:
        raise ConfigError(f"--batch-size {config.optim.batch_size} exceeds the {images.shape[0]} images in "
                          f"--data {config.data.source}")
    return images, fingerprint(images)


def _lock(config: TrainConfig, devices: Devices) -> WorkdirLock:
    """Process 0 takes the folder's lock; every process learns whether it did.

    Raises:
      ConfigError: another process writes to the folder (every process of this run stops).
    """
    lock, failed = WorkdirLock(config.workdir), None
    if devices.primary:
        try:
            lock.acquire()
        except ConfigError as e:
            failed = e
    if devices.process_count > 1 and any_process(failed is not None, devices) and failed is None:
        failed = ConfigError(f"--workdir {config.workdir}: process 0 could not take the work folder's lock "
                             "(another jax-ddpm process is writing to it)")
    if failed is not None:
        raise failed
    return lock


def _prepare_folder(config: TrainConfig, devices: Devices, start: int, sampling: Mapping[str, Any]) -> list[dict]:
    """Creates the folder, records config.json and trims metrics past ``start``; the lines kept
    (loss lines, and quality lines of ``--eval-every``)."""
    os.makedirs(config.workdir, exist_ok=True)
    if not devices.primary:
        return []
    files = RunFiles(config.workdir)
    # the XLA_FLAGS this session ran with (jax-ddpm --xla-flags): a record, not part of the identity
    write_json(files.config, dict(to_dict(config), version=1, parallel=devices.sizes, sampling=dict(sampling),
                                  sample_grid=sample_grid_record(config, sampling),
                                  xla_flags=os.environ.get("XLA_FLAGS", "")))
    return trim_metrics(files.metrics, start)


def _start(config: TrainConfig, devices: Devices, images: np.ndarray, data_fp: str, restored: _Restored,
           keys: Mapping[str, jax.Array], progress: Progress, hooks: TrainHooks,
           evaluator: QualityEvaluator | None) -> _Loop:
    rows = _prepare_folder(config, devices, restored.start, restored.sampling)
    progress.message(devices.describe())
    if restored.state is None:
        state = init_state(config, keys["init"], build_schedule(config))
    else:
        state = restored.state
        progress.message(f"fine-tuning the weights imported from {restored.imported_from}" if restored.imported_from
                         else f"resuming {config.workdir} from step {restored.start}")
    parallel.check_float32_state(state)  # --dtype bfloat16 is compute only
    loop = _Loop(config=config, devices=devices, files=RunFiles(config.workdir), images=images, data_fp=data_fp,
                 progress=progress, hooks=hooks,
                 manager=ckpt.make_manager(config.workdir, keep=config.keep_checkpoints),
                 iterator=BatchIterator(images, config.optim.batch_size, config.seed, restored.position),
                 step_fn=make_step_fn(devices.mesh), sample_grid=sample_grid_fn(config, keys, restored.sampling),
                 state=parallel.shard_state(state, devices.mesh),
                 train_key=parallel.shard_state(restored.train_key, devices.mesh), step=restored.start,
                 last_good=restored.start if restored.state is not None else None, history=loss_rows(rows),
                 sampling=restored.sampling, evaluator=evaluator, evals=eval_rows(rows))
    if evaluator is not None and eval_owed(config, loop.step, loop.evals):  # stopped (or killed) before scoring it
        _evaluate(loop)
    elif evaluator is not None and loop.evals:  # the lines kept: a resume trims those past its checkpoint
        save_quality_plot(loop.files.quality_plot, loop.evals)
    loop.restart_timer()
    return loop


# ----------------------------------------------------------------------------- the loop's parts
def _save(loop: _Loop, interrupt: InterruptFlag | None = None) -> None:
    """Checkpoint ``loop.step``; called by every process (orbax coordinates a multi-process save).
    A second SIGINT/SIGTERM during the save waits for it (``InterruptFlag.shield``).

    Raises:
      CheckpointSaveError: the save failed (no space left on device, ...); its temporary folder removed.
    """
    meta = {"identity": identity(loop.config), "data_fingerprint": loop.data_fp,
            "data_position": list(loop.iterator.position), "num_images": int(loop.images.shape[0]),
            "parallel": loop.devices.sizes, "sampling": dict(loop.sampling),
            "sample_grid": sample_grid_record(loop.config, loop.sampling)}
    loop.saving = loop.step
    with interrupt.shield() if interrupt is not None else contextlib.nullcontext():
        ckpt.save(loop.manager, loop.step, ckpt.state_to_tree(loop.state, loop.train_key), meta)
    loop.saving = None
    loop.last_good = loop.step


def _plot(loop: _Loop, force: bool = False) -> None:
    """Redraws loss.png (matplotlib is slow: at most every PLOT_EVERY_S, and at the end)."""
    if loop.devices.primary and loop.history and (force or time.monotonic() - loop.last_plot >= PLOT_EVERY_S):
        save_loss_plot(loop.files.loss_plot, [r["step"] for r in loop.history], [r["loss"] for r in loop.history])
        loop.last_plot = time.monotonic()


def _evaluate(loop: _Loop) -> None:
    """``--eval-every``: the quality line of ``loop.step`` (metrics.jsonl, quality.png; process 0)."""
    record_evaluation(loop.evaluator, loop.files, loop.evals, loop.state, loop.step, loop.progress)


def _nonfinite_step(rows: list[tuple[int, float, float]]) -> tuple[int, float, float] | None:
    for row in rows:
        if not (math.isfinite(row[1]) and math.isfinite(row[2])):
            return row
    return None


def _flush_metrics(loop: _Loop) -> None:
    """Fetches the pending losses (one host sync), stops on NaN, appends a metrics line.

    Every process runs it (the metrics are replicated, so all of them stop together).

    Raises:
      NonFiniteLossError: before a bad state is saved.
    """
    if not loop.pending:
        return
    fetched = jax.device_get(local_copy([m for _, m in loop.pending]))
    rows = [(s, float(m["loss"]), float(m["grad_norm"])) for (s, _), m in zip(loop.pending, fetched)]
    loop.pending.clear()
    bad = _nonfinite_step(rows)
    if bad is not None:
        kept = (f"the last good checkpoint is step {loop.last_good} in {ckpt.checkpoint_dir(loop.config.workdir)}"
                if loop.last_good is not None else "no checkpoint was saved")
        raise NonFiniteLossError(f"loss became {bad[1]} (gradient norm {bad[2]}) at step {bad[0]}; "
                                 f"training stopped, {kept}")
    now = time.perf_counter()
    rate = loop.config.optim.batch_size * (loop.step - loop.timer_step) / max(now - loop.timer, 1e-9)
    row = {"step": loop.step, "loss": float(np.mean([r[1] for r in rows])), "grad_norm": rows[-1][2],
           "images_per_s": round(rate, 2), "lr": learning_rate_of_update(loop.config, loop.step - 1),
           "epoch": int(loop.iterator.position[0]), "time": round(time.time(), 3)}
    if loop.devices.primary:
        loop.history.append(row)
        append_metrics(loop.files.metrics, row)
    loop.progress.log(loop.step, row["loss"], rate)
    loop.timer_step, loop.timer = loop.step, now


def _train_one_step(loop: _Loop) -> None:
    """Draws the next batch (every process the same global indices, its own rows), runs the step."""
    d = loop.devices
    indices = parallel.host_local_batch_indices(loop.iterator.next_indices(), d.process_index, d.process_count)
    batch = loop.images[indices]  # [B / processes, H, W, C] float32, decoded from the compact set
    if loop.hooks.corrupt_batch is not None:
        batch = loop.hooks.corrupt_batch(loop.step + 1, batch)
    loop.state, metrics = loop.step_fn(loop.state, batch, loop.train_key)
    loop.step += 1
    loop.pending.append((loop.step, metrics))
    if not loop.first_step_done:  # the first step includes compilation: keep it out of img/s
        jax.block_until_ready(metrics)
        loop.first_step_done = True
        loop.progress.message(f"compiled and ran the first step in {time.perf_counter() - loop.timer:.1f}s")
        loop.restart_timer()


def _agreed_signal(signum: int | None, devices: Devices) -> int | None:
    """The stop signal any process saw (the same number on every process; an all-gather)."""
    if devices.process_count == 1:
        return signum
    from jax.experimental import multihost_utils

    seen = np.asarray(multihost_utils.process_allgather(np.asarray(signum or 0, np.int32)))
    return int(seen.max()) or None


def _should_stop(loop: _Loop, interrupt: InterruptFlag, at_boundary: bool) -> int | None:
    """The SIGINT/SIGTERM seen; with several processes only at steps every one of them checks,
    once all agree."""
    if loop.devices.process_count == 1:
        return interrupt.signum
    return _agreed_signal(interrupt.signum, loop.devices) if at_boundary else None


def _after_step(loop: _Loop, interrupt: InterruptFlag) -> int | None:
    """Logging, checkpoint, sample grid and progress after a step; the signal to stop on (or None)."""
    c = loop.config
    at_log = loop.step % c.log_every == 0
    at_checkpoint = loop.step % c.checkpoint_every == 0 or loop.step == c.steps
    stop = _should_stop(loop, interrupt, at_log or at_checkpoint)
    at_checkpoint = at_checkpoint or stop is not None
    if at_log or at_checkpoint:
        _flush_metrics(loop)  # raises NonFiniteLossError before a bad state is saved
    if at_checkpoint:
        _save(loop, interrupt)
        _plot(loop)
        loop.restart_timer()
    if stop is None and eval_due(c, loop.step):  # after the save: the weights scored are the checkpoint's
        if loop.evaluator is not None:
            _evaluate(loop)
        loop.restart_timer()
    if c.sample_every and loop.step % c.sample_every == 0 and loop.step < c.steps and stop is None:
        if loop.devices.primary:
            os.makedirs(os.path.dirname(loop.files.step_samples(loop.step)), exist_ok=True)
            save_grid(loop.files.step_samples(loop.step), loop.sample_grid(loop.state), step=loop.step)
        loop.restart_timer()
    loop.progress.update(loop.step)
    if loop.hooks.after_step is not None:
        loop.hooks.after_step(loop.step)
    if stop is None and interrupt.again and loop.devices.process_count == 1:
        # the first signal came during a save, and a second one too: stop now
        stop = interrupt.signum
        if loop.last_good != loop.step:
            _save(loop, interrupt)
    return stop


def _run(loop: _Loop) -> int:
    """Steps until ``--steps`` or a signal; EXIT_OK, or 130 (SIGINT) / 143 (SIGTERM) with a
    checkpoint saved (or, after a second signal, ``loop.stopped_again`` set)."""
    try:
        with InterruptFlag() as interrupt:
            try:
                while loop.step < loop.config.steps:
                    _train_one_step(loop)
                    stop = _after_step(loop, interrupt)
                    if stop is not None:
                        loop.stop_signal = stop
                        return exit_status(stop)
            except StopAgain as e:  # a second signal before the checkpoint was saved, or a third during the save
                loop.stop_signal = loop.stopped_again = interrupt.signum or e.signum
                return exit_status(loop.stop_signal)
    finally:
        loop.progress.close()
        loop.manager.close()
    return EXIT_OK


def _stop_text(signum: int | None) -> str:
    return "terminated (SIGTERM)" if signum is not None and exit_status(signum) != EXIT_INTERRUPTED else "interrupted"


def _finish(loop: _Loop, status: int, stream: TextIO) -> int:
    """The final grid and plot (or, stopped by a signal, the plot and where the checkpoint is)."""
    c, primary = loop.config, loop.devices.primary
    if loop.stop_signal is not None:
        where = ckpt.checkpoint_dir(c.workdir)
        kept = (f"the latest checkpoint is {loop.last_good} in {where}" if loop.last_good is not None
                else "no checkpoint was saved")
        if loop.stopped_again is not None:
            what = (f"checkpoint {loop.saving} was not saved (its partial folder was removed)"
                    if loop.saving is not None else "no checkpoint was saved at the step reached")
            text = f"jax-ddpm: {_stop_text(loop.stop_signal)} again; {what}; {kept}"
        else:
            _plot(loop, force=True)
            text = f"jax-ddpm: {_stop_text(loop.stop_signal)}; saved checkpoint {loop.step} in {where}"
        if primary:
            print(text, file=stream)
        return status
    if primary:
        t0 = time.perf_counter()
        save_grid(loop.files.samples, loop.sample_grid(loop.state), step=loop.step)
        loop.progress.message(f"sampled {c.num_samples} images in {time.perf_counter() - t0:.1f}s")
        _plot(loop, force=True)
        if not c.quiet:
            print(f"trained {c.workdir} to step {loop.step}; samples: {loop.files.samples}")
    return EXIT_OK


def _already_trained(config: TrainConfig, devices: Devices, restored: _Restored, keys: Mapping[str, jax.Array],
                     progress: Progress, evaluator: QualityEvaluator | None) -> int:
    """Nothing to train; the final grid is redrawn unless it is that checkpoint's (killed while
    drawing it, or left by an earlier, shorter run: ``workdir.grid_is_current``), and with
    ``--eval-every`` the checkpoint is scored if it is due and has no quality line yet."""
    files = RunFiles(config.workdir)
    rows = eval_rows(read_metrics(files.metrics)) if evaluator is not None else []
    if evaluator is not None and eval_owed(config, restored.start, rows):
        record_evaluation(evaluator, files, rows, restored.state, restored.start, progress)
    if devices.primary and not grid_is_current(config.workdir, restored.start):
        save_grid(files.samples, sample_grid_fn(config, keys, restored.sampling)(restored.state),
                  step=restored.start)
        progress.message(f"{files.samples} was not the grid of step {restored.start}: redrew it")
    progress.message(f"{config.workdir}: already at step {restored.start} (--steps {config.steps}); nothing to train")
    return EXIT_OK


# ----------------------------------------------------------------------------- entry point
def train(config: TrainConfig, stream: TextIO | None = None, hooks: TrainHooks | None = None,
          given: Iterable[str] | None = None) -> int:
    """Runs ``jax-ddpm train``. Returns the exit status (0; 130 on Ctrl-C, 143 on SIGTERM).

    ``given``: the options the command line set (argparse dests, ``cli.given_options``); on a
    folder that holds a run, the identity options not among them take the run's values
    (``app.resume_settings``, read after the devices are set up: JAX starts there), said in one
    note. None (a caller's own config): ``config`` as it is.

    Raises:
      ConfigError, DataError, CheckpointError: bad input, before anything in the work
        folder is changed.
      NonFiniteLossError: after stopping on a non-finite loss (the last good checkpoint kept;
        exit status 3 in the command).
    """
    stream = stream or sys.stderr
    if config.eval_every:  # data without a feature extractor: refused before anything is read or written
        quality_data("--eval-every", config.data.source)
    devices = setup_devices(config)  # first: jax.distributed.initialize must precede any other JAX call
    if given is not None:
        config = resume_settings.apply(config, given, say=devices.primary and not config.quiet)
    images, data_fp = _load_data(config)
    check_train_target(config.workdir)  # an empty or new folder, or one jax-ddpm wrote
    lock = _lock(config, devices)  # one writer: held until this process ends
    try:
        keys = run_keys(config.seed)
        restored = _restore(config, devices, data_fp, keys)  # checks everything before writing
        if devices.primary:
            lock.record_owner()
        progress = Progress(config.steps, config.quiet or not devices.primary, stream)
        evaluator = (QualityEvaluator.load(config, restored.sampling, say=progress.message)
                     if config.eval_every and devices.primary else None)  # the classifier: cached, or trained now
        if restored.start >= config.steps:
            return _already_trained(config, devices, restored, keys, progress, evaluator)
        if (note := lr_decay_note(config, restored.start)) is not None:
            progress.message(note)
        loop = _start(config, devices, images, data_fp, restored, keys, progress, hooks or TrainHooks(), evaluator)
        return _finish(loop, _run(loop), stream)
    finally:
        lock.release()


__all__ = ["NonFiniteLossError", "PLOT_EVERY_S", "TrainHooks", "train"]
