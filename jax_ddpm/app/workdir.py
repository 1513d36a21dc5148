"""The work folder (``--workdir``): its files, the resume check, and loading a trained run.

A work folder holds::

    config.json         the resolved TrainConfig of the latest (re)start
    metrics.jsonl       one JSON object per logging point: step, loss, images_per_s, lr, grad_norm, ...
    loss.png            the loss curve (redrawn at checkpoints, at most every PLOT_EVERY_S, and at the end)
    samples.png         the final sample grid (EMA weights, DDPM sampler, clipped x0, --bn-stats)
    samples/step_N.png  grids every --sample-every steps
    checkpoints/N/      orbax checkpoints (see jax_ddpm.checkpoint)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import jax

from .. import checkpoint as ckpt
from .. import parallel
from ..images import atomic_write
from ..training import TrainState
from .config import (SAMPLING_DEFAULTS, VARIANCES, ConfigError, TrainConfig, identity, identity_mismatch,
                     train_config_from_identity)

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
    def samples(self) -> str:
        return os.path.join(self.workdir, "samples.png")

    def step_samples(self, step: int) -> str:
        return os.path.join(self.workdir, "samples", f"step_{step:07d}.png")


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
    diff = identity_mismatch(meta.get("identity", {}), identity(config))
    if diff:
        raise ConfigError(f"--workdir {config.workdir} holds a run with other settings ({diff}); "
                          "resume with the same model, data and optimizer options or use a new --workdir")
    saved_fp = meta.get("data_fingerprint")
    if saved_fp is not None and saved_fp != data_fp:
        raise ConfigError(f"--data {config.data.source}: the images differ from those the run in --workdir "
                          f"{config.workdir} was trained on (fingerprint {data_fp}, expected {saved_fp})")
    return meta


def holds_run(workdir: str) -> bool:
    """Whether ``workdir`` already has a checkpoint or a config.json."""
    return bool(ckpt.complete_steps(workdir)) or os.path.exists(RunFiles(workdir).config)


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


def load_run(workdir: str, step: int | None = None) -> LoadedRun:
    """The TrainState of checkpoint ``step`` (latest if None) on one device, and its config
    (rebuilt from the checkpoint's identity; fields it lacks at their defaults).

    Raises:
      CheckpointError: no checkpoint, no such step, or an unreadable checkpoint.
    """
    steps = ckpt.complete_steps(workdir)
    if not steps:
        raise ckpt.CheckpointError(f"--workdir {workdir}: no checkpoint found (run jax-ddpm train first)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ckpt.CheckpointError(f"--checkpoint-step {step}: no checkpoint for this step in {workdir} "
                                   f"(have {', '.join(map(str, steps))})")
    manager = ckpt.make_manager(workdir, read_only=True)
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


__all__ = ["FINE_TUNE_FREE", "FINE_TUNE_FREE_ARCH_FIELDS", "LoadedRun", "RunFiles", "append_metrics", "check_resume",
           "holds_run", "is_import_start", "load_run", "read_metrics", "sampling_settings", "trim_metrics",
           "write_json"]
