"""``jax-ddpm convert``: a checkpoint's EMA weights <-> a safetensors file under torch names
(here) or a diffusers folder (``app.diffusers_folder``).

Export (``--out``) writes the architecture's weight table (``Architecture.weight_table``;
a model without BatchNorm has no ``batch_stats`` rows) with ``convert.arch_metadata`` plus
``image_size``, ``step`` and ``prediction`` (eps, x0 or v; a file without it is eps). Import
(``--from-torch``) reads such a file (no ``arch`` key: the chapter's U-Net, files written
before the registry) into checkpoint 0 of a new work folder.

An imported folder's checkpoint 0 records ``imported_from``: ``train`` on it fine-tunes
(``app.train``), and its ``sampling`` metadata holds the sample settings the source carried.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Mapping, TextIO

import jax
import numpy as np

from .. import checkpoint as ckpt
from ..convert import (arch_from_metadata, arch_metadata, first_bad_value, from_torch_state_dict, load_safetensors,
                       save_safetensors, to_torch_state_dict)
from ..images import atomic_write
from ..models.registry import get_arch
from ..parameterization import PREDICTIONS
from ..schedules import SCHEDULES
from ..training import model_variables
from .config import (SAMPLING_DEFAULTS, ConfigError, ConvertConfig, DiffusionConfig, TrainConfig, arch_config,
                     check_image_size, check_timesteps_option, identity, model_config_from_arch, to_dict)
from .console import EXIT_OK, NonFiniteError
from .factories import abstract_state, run_keys, state_from_variables
from .workdir import LoadedRun, RunFiles, WorkdirLock, check_train_target, holds_run, load_run, write_json


def check_finite_weights(run: LoadedRun, what: str = "nothing written") -> None:
    """Refuses a checkpoint whose EMA weights hold NaN/inf (or a negative running variance),
    naming the tensor by its torch name.

    Raises:
      NonFiniteError: (exit status 3).
    """
    arch, arch_cfg = arch_config(run.config.model)
    why = first_bad_value(jax.device_get(run.state.ema_variables), arch.weight_table(arch_cfg))
    if why:
        raise NonFiniteError(f"--workdir {run.config.workdir}: checkpoint {run.step}: {why}; {what}")


def replacing(path: str) -> str:
    """`` (replacing the file there)`` when ``path`` exists (the commands say so when they write)."""
    return " (replacing the file that was there)" if os.path.exists(path) else ""


def export_weights(config: ConvertConfig, stream: TextIO | None = None) -> int:
    """``convert --out``: the EMA weights (and BatchNorm statistics, if any) under torch names."""
    run = load_run(config.workdir, config.step)
    check_finite_weights(run)
    m, d = run.config.model, run.config.diffusion
    arch, arch_cfg = arch_config(m)
    state_dict = to_torch_state_dict(jax.device_get(run.state.ema_variables), table=arch.weight_table(arch_cfg))
    metadata = arch_metadata(arch.name, arch_cfg, d.timesteps, d.schedule)
    metadata.update(image_size=str(m.image_size), step=str(run.step), prediction=d.prediction)
    replaced = replacing(config.out)
    atomic_write(config.out, lambda tmp: save_safetensors(tmp, state_dict, metadata))
    print(f"wrote {len(state_dict)} tensors (EMA weights, step {run.step}) to {config.out}{replaced}",
          file=stream or sys.stdout)
    return EXIT_OK


def _int_meta(meta: Mapping[str, str], key: str) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        raise ValueError(f"{key}={meta.get(key)!r} is missing or not an integer") from None


def _run_config_from_metadata(config: ConvertConfig, meta: Mapping[str, str]) -> TrainConfig:
    """The TrainConfig an imported file describes (architecture, diffusion, image size).

    Raises:
      ConfigError: "--from-torch FILE: ..." for missing or bad metadata.
    """
    path = config.from_torch
    missing = [k for k in ("timesteps", "schedule") if k not in meta]
    if missing:
        raise ConfigError(f"--from-torch {path}: metadata lacks {', '.join(missing)}")
    try:
        name, arch_cfg = arch_from_metadata(meta)
        arch = get_arch(name)
        multiple = arch.size_multiple(arch_cfg)
        timesteps = check_timesteps_option(_int_meta(meta, "timesteps"), "timesteps")
        if meta["schedule"] not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {meta['schedule']!r}")
        if "image_size" in meta:
            image_size = check_image_size(_int_meta(meta, "image_size"), multiple, name)
        else:
            image_size = config.image_size
        model = model_config_from_arch(arch, arch_cfg, image_size)
    except ValueError as e:  # ConfigError and ArchConfigError are ValueErrors
        raise ConfigError(f"--from-torch {path}: bad metadata ({e})") from None
    if "image_size" not in meta:
        check_image_size(image_size, multiple, name)  # --image-size: the user's option, named as such
    prediction = meta.get("prediction", "eps")  # files written before prediction types: eps
    if prediction not in PREDICTIONS:
        raise ConfigError(f"--from-torch {path}: bad metadata (prediction must be one of {', '.join(PREDICTIONS)}, "
                          f"got {prediction!r})")
    return TrainConfig(workdir=config.workdir, model=model,
                       diffusion=DiffusionConfig(timesteps=timesteps, schedule=meta["schedule"], prediction=prediction))


def _variables_from_tensors(path: str, tensors: Mapping[str, np.ndarray], run_config: TrainConfig) -> dict:
    """The file's tensors as the model's variables (NumPy), checked name by name, shape and dtype."""
    arch, arch_cfg = arch_config(run_config.model)
    template = abstract_state(run_config)
    like = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),  # convert.py compares arrays
                                  model_variables(template.params, template.batch_stats))
    try:
        variables = from_torch_state_dict(tensors, like=like, table=arch.weight_table(arch_cfg))
    except ValueError as e:
        raise ConfigError(f"--from-torch {path}: {e}") from None
    torch_name = {tuple(flax_path): name for name, flax_path, _ in arch.weight_table(arch_cfg)}
    for leaf_path, ref in jax.tree_util.tree_leaves_with_path(like):
        got: Any = variables
        for k in leaf_path:
            got = got[k.key]
        if np.dtype(got.dtype) != np.dtype(ref.dtype):
            keys = tuple(k.key for k in leaf_path)
            name = torch_name.get(keys, jax.tree_util.keystr(leaf_path))
            raise ConfigError(f"--from-torch {path}: tensor {name} is {got.dtype}, expected {ref.dtype}")
    return variables


def check_new_workdir(workdir: str) -> None:
    """Import targets a work folder without a run, and not a non-empty folder of other files
    (nothing there is overwritten)."""
    check_train_target(workdir)
    if holds_run(workdir):
        raise ConfigError(f"--workdir {workdir}: already holds a run; import into a new --workdir")


def import_weights(config: ConvertConfig, stream: TextIO | None = None) -> int:
    """``convert --from-torch``: a safetensors file -> checkpoint 0 of a new work folder (for sample)."""
    path = config.from_torch
    check_new_workdir(config.workdir)
    try:
        tensors, meta = load_safetensors(path)
    except ValueError as e:  # "<path>: not a readable safetensors file (...)"
        raise ConfigError(f"--from-torch {e}") from None
    run_config = _run_config_from_metadata(config, meta)
    variables = _variables_from_tensors(path, tensors, run_config)
    write_imported_run(run_config, variables, path)
    print(f"imported {path} into {config.workdir} (checkpoint 0)", file=stream or sys.stdout)
    return EXIT_OK


def write_imported_run(run_config: TrainConfig, variables: Mapping[str, Any], source: str,
                       sampling: Mapping[str, Any] | None = None) -> None:
    """Checkpoint 0 of a new work folder with ``variables`` as params and EMA params (the rest
    of the state freshly initialised), its config.json, and ``imported_from`` / ``sampling``
    (default ``SAMPLING_DEFAULTS``) in the checkpoint metadata."""
    sampling = dict(SAMPLING_DEFAULTS, **(sampling or {}))
    keys = run_keys(run_config.seed)
    state = state_from_variables(run_config, variables)
    workdir = run_config.workdir
    with WorkdirLock(workdir) as lock:  # one writer: not while a train (or another import) writes here
        check_new_workdir(workdir)  # again, under the lock
        lock.record_owner()
        write_json(RunFiles(workdir).config, dict(to_dict(run_config), version=1, imported_from=source,
                                                  sampling=sampling))
        manager = ckpt.make_manager(workdir, keep=run_config.keep_checkpoints)
        try:
            ckpt.save(manager, 0, ckpt.state_to_tree(state, keys["train"]),
                      {"identity": identity(run_config), "data_fingerprint": None, "data_position": [0, 0],
                       "num_images": None, "imported_from": source, "sampling": sampling})
        finally:
            manager.close()


def convert(config: ConvertConfig) -> int:
    """``jax-ddpm convert``: the direction its one given option names."""
    if config.out:
        return export_weights(config)
    if config.from_torch:
        return import_weights(config)
    from .diffusers_folder import export_diffusers, import_diffusers

    return export_diffusers(config) if config.to_diffusers else import_diffusers(config)


__all__ = ["check_finite_weights", "check_new_workdir", "convert", "export_weights", "import_weights", "replacing",
           "write_imported_run"]
