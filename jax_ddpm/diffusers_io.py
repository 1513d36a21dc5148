"""diffusers folders in and out, without torch, diffusers or pickle: JSON and safetensors only.

* :func:`load_diffusers` reads a ``UNet2DModel`` folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors``, sharded or not) or a pipeline folder
  (``model_index.json``, ``unet/``, ``scheduler/scheduler_config.json``; the UNet and the
  scheduler config may also sit at the pipeline folder's root, as in the google/ddpm-* repos)
  and returns ``(model, variables, info)``.
* :func:`save_diffusers` writes a ``DDPMPipeline`` folder that
  ``diffusers.DDPMPipeline.from_pretrained(path)`` loads, with the weights bit for bit.
* :func:`config_from_diffusers` / :func:`config_to_diffusers`: a UNet ``config.json`` dict
  <-> :class:`~jax_ddpm.models.unet2d.UNet2DConfig`.

Config keys. Every key of a UNet ``config.json`` is one of:

* a ``UNet2DModel.__init__`` argument of diffusers 0.42.1 (``UNet2DConfig``'s fields): used,
  or refused by ``UNet2DConfig`` when this port does not implement the value;
* bookkeeping, ignored because diffusers drops every ``_``-prefixed key before building the
  model (``ConfigMixin.extract_init_dict``): ``_class_name`` (checked: must be
  ``UNet2DModel``), ``_diffusers_version``, ``_name_or_path``, ``_commit_hash``, and
  ``_use_default_values`` (applied as diffusers does: the keys it lists are dropped, so their
  defaults are used);
* anything else (``quantization_config``, a key of another class or of a newer diffusers):
  refused, naming the key; diffusers 0.42.1 would ignore some of these with a warning, but a
  key this port does not know may change the maths in the version that wrote it.

Weights: float16 and bfloat16 tensors are widened to float32 exactly; float64 ones rounded to
float32 (``info['weights_dtypes']`` says what the file held). Errors are
:class:`DiffusersFormatError` (a ValueError), one line naming the file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .convert import check_values, from_torch_state_dict, to_torch_state_dict
from .images import current_umask
from .models.arch import ArchConfigError
from .models.unet2d import UNet2DConfig, build, config_from_dict, size_multiple, weight_table

DIFFUSERS_VERSION = "0.42.1"  # the format written (and the version whose numerics UNet2DModel matches)
UNET_CLASS = "UNet2DModel"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
MODEL_INDEX_NAME = "model_index.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
BOOKKEEPING_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_commit_hash", "_use_default_values")

# The schedule settings (``info['schedule']``, ``save_diffusers(schedule_settings=...)``) and
# DDPMScheduler 0.42.1's defaults for them (used for keys a scheduler config leaves out).
SCHEDULE_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
    "prediction_type": "epsilon", "variance_type": "fixed_small", "clip_sample": True,
}
# The rest of DDPMScheduler 0.42.1's arguments, written out so that a later diffusers with
# other defaults reads the same scheduler.
_DDPM_SCHEDULER_REST: dict[str, Any] = {
    "trained_betas": None, "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0,
    "sample_max_value": 1.0, "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")  # DDPMScheduler's
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTENTION_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


class DiffusersFormatError(ValueError):
    """A diffusers folder or file this module cannot read or write; one line naming the file."""


# ----------------------------------------------------------------------------- configs
def init_kwargs_from_diffusers(d: Mapping[str, Any]) -> dict[str, Any]:
    """A UNet ``config.json`` dict -> the ``UNet2DModel.__init__`` arguments it sets (bookkeeping
    keys dropped, ``_use_default_values`` applied; values not yet checked).

    Raises:
      ArchConfigError: not a JSON object, or ``_class_name`` is not UNet2DModel.
    """
    if not isinstance(d, Mapping):
        raise ArchConfigError("config", f"must be a JSON object, got {type(d).__name__}")
    cls = d.get("_class_name", UNET_CLASS)
    if cls != UNET_CLASS:
        raise ArchConfigError("_class_name", f"only {UNET_CLASS} is implemented, got {cls!r}")
    used_defaults = d.get("_use_default_values") or []
    return {k: v for k, v in d.items() if not str(k).startswith("_") and k not in used_defaults}


def config_from_diffusers(d: Mapping[str, Any]) -> UNet2DConfig:
    """A UNet ``config.json`` dict -> :class:`UNet2DConfig` (see the module docstring for the keys).

    Raises:
      ArchConfigError: naming the key or field that is refused.
    """
    return config_from_dict(init_kwargs_from_diffusers(d))


def config_to_diffusers(config: UNet2DConfig) -> dict[str, Any]:
    """:class:`UNet2DConfig` -> a UNet ``config.json`` dict (every argument written, as
    ``save_pretrained`` does, with ``_class_name`` and ``_diffusers_version``)."""
    return {"_class_name": UNET_CLASS, "_diffusers_version": DIFFUSERS_VERSION, **config.to_dict()}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DiffusersFormatError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffusersFormatError(f"{path}: not a readable JSON file ({' '.join(str(e).split())})") from None


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- weights
def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file as NumPy (bfloat16 through jax, as NumPy lacks it)."""
    from safetensors import SafetensorError, safe_open

    try:
        tensors = {}
        with safe_open(os.fspath(path), framework="numpy") as f:
            bf16 = []
            for k in f.keys():
                try:
                    tensors[k] = f.get_tensor(k)
                except TypeError:  # NumPy has no bfloat16
                    bf16.append(k)
        if bf16:
            with safe_open(os.fspath(path), framework="flax") as f:
                for k in bf16:
                    tensors[k] = np.asarray(f.get_tensor(k))
    except (SafetensorError, OSError, ValueError) as e:
        raise DiffusersFormatError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None
    return tensors


def _refuse_pickle(folder: Path, stem: str) -> None:
    found = sorted(p.name for p in folder.glob(f"{stem}*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")
                   or p.name.endswith(".bin.index.json"))
    if found:
        raise DiffusersFormatError(
            f"{folder / found[0]}: only pickle weights ({', '.join(found)}); jax_ddpm reads safetensors only "
            f"(unpickling can run code). Convert once where torch is installed: "
            f"UNet2DModel.from_pretrained(folder).save_pretrained(out, safe_serialization=True)")


def _read_unet_weights(folder: Path, variant: str | None) -> tuple[dict[str, np.ndarray], list[str]]:
    """(state dict, the files read) of a UNet folder: a single or a sharded safetensors file."""
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    single = folder / WEIGHTS_NAME.replace(".safetensors", suffix)
    index = folder / WEIGHTS_INDEX_NAME.replace(".safetensors", suffix)
    if single.is_file():
        return _read_safetensors(single), [single.name]
    if index.is_file():
        index_json = _read_json(index)
        weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise DiffusersFormatError(f"{index}: has no weight_map")
        sd: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(_read_safetensors(folder / str(shard)))
        lacking = sorted(k for k in weight_map if k not in sd)
        if lacking:
            raise DiffusersFormatError(f"{index}: {len(lacking)} tensor(s) not in their shards: "
                                       f"{', '.join(lacking[:4])}")
        return sd, [index.name] + sorted(set(map(str, weight_map.values())))
    _refuse_pickle(folder, "diffusion_pytorch_model")
    others = sorted(p.name for p in folder.glob("diffusion_pytorch_model*.safetensors"))
    hint = f" (found {', '.join(others)}: pass variant=...)" if others else ""
    raise DiffusersFormatError(f"{single}: not found{hint}")


def _rename_old_attention(sd: dict[str, np.ndarray], path: Path) -> tuple[dict[str, np.ndarray], str | None]:
    """``query/key/value/proj_attn`` -> ``to_q/to_k/to_v/to_out.0`` (diffusers'
    ``_fix_state_dict_keys_on_load``). Returns (state dict, 'old' | 'current' | None)."""
    out, old, current = {}, False, any(".attentions." in k for k in sd)
    for k, v in sd.items():
        m = _OLD_ATTENTION_RE.match(k)
        if m:
            old = True
            k = f"{m.group(1)}.{_OLD_ATTENTION[m.group(2)]}.{m.group(3)}"
            if k in sd:
                raise DiffusersFormatError(f"{path}: holds both {m.group(0)} and {k}")
        out[k] = v
    return out, ("old" if old else "current" if current else None)


def _torch_shape(flax_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "conv":
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    if layout == "dense":
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def expected_torch_shapes(config: UNet2DConfig) -> dict[str, tuple[int, ...]]:
    """``{torch_name: shape}`` of ``config``'s model, read off the Flax module (``jax.eval_shape``)."""
    model = build(config, conv_impl="xla")
    m = size_multiple(config)
    shapes = jax.eval_shape(partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, m, m, config.in_channels)), jnp.zeros((1,), jnp.int32))
    out = {}
    for name, path, layout in weight_table(config):
        node = shapes
        for k in path:
            node = node[k]
        out[name] = _torch_shape(tuple(node.shape), layout)
    return out


def _check_shapes(sd: Mapping[str, np.ndarray], want: Mapping[str, tuple[int, ...]], where: Path,
                  config_source: str) -> None:
    bad = [f"{k} {tuple(np.shape(sd[k]))} (expected {want[k]})" for k in want if k in sd
           and tuple(np.shape(sd[k])) != want[k]]
    if bad:
        raise DiffusersFormatError(f"{where}: {len(bad)} misshaped tensor(s) for {config_source}: "
                                   f"{'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")


def _as_float32(sd: Mapping[str, np.ndarray], where: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    out, dtypes = {}, set()
    for k, v in sd.items():
        v = np.asarray(v)
        if v.dtype.kind != "f" and str(v.dtype) != "bfloat16":
            raise DiffusersFormatError(f"{where}: tensor {k} is {v.dtype}, expected floating point")
        dtypes.add(str(v.dtype))
        out[k] = v if v.dtype == np.float32 else v.astype(np.float32)
    return out, sorted(dtypes)


# ----------------------------------------------------------------------------- load
def _unet_config_file(folder: Path) -> UNet2DConfig:
    path = folder / CONFIG_NAME
    try:
        return config_from_diffusers(_read_json(path))
    except ArchConfigError as e:
        raise DiffusersFormatError(f"{path}: {e}") from e
    except TypeError as e:  # a value of the wrong kind that the dataclass could not even compare
        raise DiffusersFormatError(f"{path}: {' '.join(str(e).split())}") from None


def _schedule_settings(raw: Mapping[str, Any]) -> dict[str, Any]:
    s = {k: raw.get(k, default) for k, default in SCHEDULE_DEFAULTS.items()}
    s["trained_betas"] = raw.get("trained_betas")
    return s


def load_diffusers(path: str | os.PathLike, *, dtype: Any = jnp.float32, conv_impl: str = "auto",
                   variant: str | None = None):
    """Reads a diffusers UNet2DModel or pipeline folder. Returns ``(model, variables, info)``.

    Args:
      path: a UNet folder (``config.json`` + weights) or a pipeline folder (``model_index.json``).
      dtype, conv_impl: passed to :func:`~jax_ddpm.models.unet2d.build`.
      variant: read ``diffusion_pytorch_model.<variant>.safetensors`` (e.g. ``fp16``).
    Returns:
      model: the :class:`~jax_ddpm.models.unet2d.UNet2DModel`;
      variables: ``{'params': ...}`` (NumPy float32 leaves);
      info: ``kind`` ('unet' | 'pipeline'), ``config`` (UNet2DConfig), ``unet_folder``,
        ``weights_files``, ``weights_dtypes``, ``attention_names`` ('old' | 'current' | None);
        for a pipeline also ``pipeline_class``, and when it has a scheduler ``scheduler_class``,
        ``scheduler_config`` (the raw dict) and ``schedule`` (``SCHEDULE_DEFAULTS``' keys and
        ``trained_betas``; keys the file lacks take DDPMScheduler's defaults). A UNet folder
        alone gives no ``schedule``.
    Raises:
      DiffusersFormatError: one line naming the file (pickle-only weights, a refused config
        value, missing, unexpected or misshaped tensors, unreadable files).
    """
    root = Path(path)
    if not root.is_dir():
        raise DiffusersFormatError(f"{root}: not a folder")
    info: dict[str, Any] = {}
    if (root / MODEL_INDEX_NAME).is_file():
        index = _read_json(root / MODEL_INDEX_NAME)
        if not isinstance(index, dict):
            raise DiffusersFormatError(f"{root / MODEL_INDEX_NAME}: not a JSON object")
        info.update(kind="pipeline", pipeline_class=index.get("_class_name"))
        unet_entry = index.get("unet")
        if not (isinstance(unet_entry, list) and len(unet_entry) == 2):
            raise DiffusersFormatError(f"{root / MODEL_INDEX_NAME}: has no unet entry")
        if unet_entry[1] != UNET_CLASS:
            raise DiffusersFormatError(f"{root / MODEL_INDEX_NAME}: unet is {unet_entry[1]!r}; "
                                       f"only {UNET_CLASS} is implemented")
        unet_folder = root / "unet" if (root / "unet" / CONFIG_NAME).is_file() else root
        if "scheduler" in index and index["scheduler"] is not None:
            sched_path = root / "scheduler" / SCHEDULER_CONFIG_NAME
            if not sched_path.is_file() and (root / SCHEDULER_CONFIG_NAME).is_file():
                sched_path = root / SCHEDULER_CONFIG_NAME
            raw = _read_json(sched_path)
            if not isinstance(raw, dict):
                raise DiffusersFormatError(f"{sched_path}: not a JSON object")
            info.update(scheduler_class=raw.get("_class_name"), scheduler_config=raw,
                        schedule=_schedule_settings(raw))
    elif (root / CONFIG_NAME).is_file():
        info["kind"] = "unet"
        unet_folder = root
    else:
        raise DiffusersFormatError(f"{root}: neither {MODEL_INDEX_NAME} (a pipeline) nor {CONFIG_NAME} (a UNet)")

    config = _unet_config_file(unet_folder)
    sd, files = _read_unet_weights(unet_folder, variant)
    where = unet_folder / files[0]
    sd, attention_names = _rename_old_attention(sd, where)
    sd, dtypes = _as_float32(sd, where)
    try:
        check_values(sd)  # NaN/inf weights: refused, naming the tensor
    except ValueError as e:
        raise DiffusersFormatError(f"{where}: {e}") from None
    table = weight_table(config)
    try:
        variables = from_torch_state_dict(sd, table=table, check=False)
    except ValueError as e:  # missing or unexpected tensors, or wrong dimensions
        raise DiffusersFormatError(f"{where}: {e} (for the config in {unet_folder / CONFIG_NAME})") from None
    _check_shapes(sd, expected_torch_shapes(config), where, f"the config in {unet_folder / CONFIG_NAME}")
    info.update(config=config, unet_folder=str(unet_folder), weights_files=files, weights_dtypes=dtypes,
                attention_names=attention_names)
    return build(config, dtype=dtype, conv_impl=conv_impl), variables, info


# ----------------------------------------------------------------------------- save
def scheduler_config(schedule_settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``scheduler_config.json`` dict of a DDPMScheduler with these settings (keys of
    ``SCHEDULE_DEFAULTS``, plus ``trained_betas``; the rest DDPMScheduler 0.42.1's defaults).

    Raises:
      DiffusersFormatError: an unknown key or a value DDPMScheduler does not take.
    """
    settings = dict(schedule_settings or {})
    unknown = sorted(set(settings) - set(SCHEDULE_DEFAULTS) - {"trained_betas"})
    if unknown:
        raise DiffusersFormatError(f"schedule_settings: unknown key {unknown[0]!r} (known: "
                                   f"{', '.join(SCHEDULE_DEFAULTS)}, trained_betas)")
    s = {**SCHEDULE_DEFAULTS, **_DDPM_SCHEDULER_REST, **settings}
    checks = (("beta_schedule", BETA_SCHEDULES), ("variance_type", VARIANCE_TYPES),
              ("prediction_type", PREDICTION_TYPES))
    for key, allowed in checks:
        if s[key] not in allowed:
            hint = " (the project's cosine schedule is squaredcos_cap_v2)" if key == "beta_schedule" else ""
            raise DiffusersFormatError(f"schedule_settings: {key} must be one of {', '.join(allowed)}{hint}, "
                                       f"got {s[key]!r}")
    t = s["num_train_timesteps"]
    if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or t < 1:
        raise DiffusersFormatError(f"schedule_settings: num_train_timesteps must be a positive integer, got {t!r}")
    for key in ("beta_start", "beta_end"):
        if isinstance(s[key], bool) or not isinstance(s[key], (int, float, np.integer, np.floating)):
            raise DiffusersFormatError(f"schedule_settings: {key} must be a number, got {s[key]!r}")
        s[key] = float(s[key])
    if not isinstance(s["clip_sample"], (bool, np.bool_)):
        raise DiffusersFormatError(f"schedule_settings: clip_sample must be true or false, got {s['clip_sample']!r}")
    s["clip_sample"] = bool(s["clip_sample"])
    s["num_train_timesteps"] = int(t)
    if s["trained_betas"] is not None:
        betas = [float(b) for b in np.asarray(s["trained_betas"], np.float64).reshape(-1)]
        if len(betas) != t:
            raise DiffusersFormatError(f"schedule_settings: trained_betas has {len(betas)} values, "
                                       f"num_train_timesteps is {t}")
        s["trained_betas"] = betas
    return {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **s}


def save_diffusers(path: str | os.PathLike, model_config: UNet2DConfig, variables: Mapping[str, Any],
                   schedule_settings: Mapping[str, Any] | None = None) -> Path:
    """Writes a ``DDPMPipeline`` folder: ``model_index.json``, ``unet/config.json``,
    ``unet/diffusion_pytorch_model.safetensors`` (float32, the weights bit for bit, metadata
    ``{'format': 'pt'}``) and ``scheduler/scheduler_config.json`` (:func:`scheduler_config`).

    The folder is written next to ``path`` and renamed into place, so a failure leaves nothing.

    Raises:
      DiffusersFormatError: ``path`` exists and is not an empty folder; ``model_config`` is
        not a UNet2DConfig or has no ``sample_size`` (the pipeline's image size); the
        variables do not fit the config; bad schedule settings.
    """
    dest = Path(path)
    if not isinstance(model_config, UNet2DConfig):
        raise DiffusersFormatError(f"{dest}: a diffusers UNet2DModel needs a UNet2DConfig (arch unet2d), "
                                   f"got {type(model_config).__name__}")
    if model_config.sample_size is None:
        raise DiffusersFormatError(f"{dest}: the config has no sample_size (DDPMPipeline's image size)")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DiffusersFormatError(f"{dest}: already exists and is not an empty folder; refusing to overwrite it")
    sched = scheduler_config(schedule_settings)
    table = weight_table(model_config)
    extra = sorted({"/".join(str(getattr(k, "key", k)) for k in p) for p, _ in
                    jax.tree_util.tree_leaves_with_path(dict(variables))} - {"/".join(p) for _, p, _ in table})
    if extra:
        raise DiffusersFormatError(f"{dest}: the variables hold {len(extra)} tensor(s) this config does not have: "
                                   f"{', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
    try:
        sd = to_torch_state_dict(variables, table=table)
    except (KeyError, TypeError) as e:
        raise DiffusersFormatError(f"{dest}: the variables lack {e} for this config") from None
    _check_shapes(sd, expected_torch_shapes(model_config), dest, "model_config")
    for k, v in sd.items():
        if v.dtype != np.float32:
            raise DiffusersFormatError(f"{dest}: tensor {k} is {v.dtype}, expected float32")

    from safetensors.numpy import save_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        (tmp / "unet").mkdir()
        (tmp / "scheduler").mkdir()
        _write_json(tmp / MODEL_INDEX_NAME, {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                                             "scheduler": ["diffusers", "DDPMScheduler"],
                                             "unet": ["diffusers", UNET_CLASS]})
        _write_json(tmp / "unet" / CONFIG_NAME, config_to_diffusers(model_config))
        save_file(sd, os.fspath(tmp / "unet" / WEIGHTS_NAME), metadata={"format": "pt"})
        _write_json(tmp / "scheduler" / SCHEDULER_CONFIG_NAME, sched)
        umask = current_umask()  # mkdtemp made the folder 0o700 and safetensors the weights 0o600: the umask's
        os.chmod(tmp / "unet" / WEIGHTS_NAME, 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        os.replace(tmp, dest)  # onto an empty folder or a new name
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


__all__ = ["BOOKKEEPING_KEYS", "DIFFUSERS_VERSION", "DiffusersFormatError", "SCHEDULE_DEFAULTS",
           "config_from_diffusers", "config_to_diffusers", "expected_torch_shapes", "init_kwargs_from_diffusers", "load_diffusers",
           "save_diffusers", "scheduler_config"]
