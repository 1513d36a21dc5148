"""Flax variables <-> torch state_dict names, as a flat dict of NumPy arrays.

No torch here: the exchange format is ``{torch_name: np.ndarray}``, saved as safetensors
with the model settings in the file's metadata (for the chapter's U-Net, the same format
``torch_ref.weights`` reads and writes, plus an ``arch`` key; a file without it is the
chapter's). The map is a table, one per architecture in the registry
(``Architecture.weight_table``; :func:`weight_table`): module paths are the same in both
frameworks, only the leaf names and the kernel layouts differ. The chapter's:

=====================  ==========================  ==============================================
flax                   torch                       layout
=====================  ==========================  ==============================================
params/X/kernel (4-D)  X.weight                    HWIO -> OIHW
params/upN/transform   upN.transform.weight        flipped HWIO -> IOHW (ConvTranspose2d)
params/X/kernel (2-D)  X.weight                    [in, out] -> [out, in]
params/X/bias          X.bias                      same
params/X/scale         X.weight  (BatchNorm)       same
batch_stats/X/mean     X.running_mean              same
batch_stats/X/var      X.running_var               same
batch_stats/X/num_b..  X.num_batches_tracked       int32 <-> int64
=====================  ==========================  ==============================================
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from .models.arch import WeightRow
from .models.registry import DEFAULT_ARCH, get_arch

from .models.chapter_unet import BLOCKS  # noqa: E402,F401  (public here before the registry)

META_KEYS = ("img_channels", "time_emb_dim", "features", "timesteps", "schedule")  # the chapter's files
SCHEDULE_META_KEYS = ("timesteps", "schedule")  # every file, whatever its architecture


def weight_table(arch: str = DEFAULT_ARCH, config: Any = None) -> list[WeightRow]:
    """Rows (torch_name, flax_path, layout) for every tensor of architecture ``arch``
    (the registry's table; the chapter's U-Net by default)."""
    return get_arch(arch).weight_table(config)


def _to_torch(a: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":  # HWIO -> OIHW
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    if layout == "conv_transpose":  # flipped HWIO -> IOHW
        return np.ascontiguousarray(a[::-1, ::-1].transpose(2, 3, 0, 1))
    if layout == "dense":
        return np.ascontiguousarray(a.T)
    if layout == "count":
        return np.asarray(a, dtype=np.int64)
    return np.ascontiguousarray(a)


def _from_torch(a: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":  # OIHW -> HWIO
        return np.ascontiguousarray(a.transpose(2, 3, 1, 0))
    if layout == "conv_transpose":  # IOHW -> HWIO, flipped
        return np.ascontiguousarray(a.transpose(2, 3, 0, 1)[::-1, ::-1])
    if layout == "dense":
        return np.ascontiguousarray(a.T)
    if layout == "count":
        return np.array(a, dtype=np.int32)
    return np.array(a, copy=True)  # never alias the caller's (possibly torch-owned) memory


def _get(tree: Mapping[str, Any], path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def to_torch_state_dict(variables: Mapping[str, Any], table: list[WeightRow] | None = None) -> dict[str, np.ndarray]:
    """Flax ``{'params'[, 'batch_stats']}`` -> ``{torch_name: np.ndarray}``.

    ``table``: the architecture's weight table (default: the chapter's U-Net, :func:`weight_table`).
    """
    table = weight_table() if table is None else table
    return {name: _to_torch(np.asarray(_get(variables, path)), layout) for name, path, layout in table}


RUNNING_VAR_SUFFIX = ".running_var"  # BatchNorm running variances: must be >= 0


def bad_value(name: str, value: np.ndarray) -> str | None:
    """Why tensor ``name`` (a torch name) cannot be a trained model's, or None: NaN/inf entries,
    or a negative BatchNorm running variance."""
    a = np.asarray(value)
    if a.dtype.kind not in "fc" and str(a.dtype) != "bfloat16":
        return None
    a = a.astype(np.float32) if str(a.dtype) == "bfloat16" else a
    finite = np.isfinite(a)
    if not finite.all():
        kinds = sorted({"NaN" if np.isnan(v) else "inf" for v in a[~finite].ravel()[:1000]})
        return f"tensor {name} holds {' and '.join(kinds)} ({int((~finite).sum())} of {a.size} entries)"
    if name.endswith(RUNNING_VAR_SUFFIX) and a.size and a.min() < 0:
        return f"tensor {name} (a BatchNorm running variance) has negative entries (min {float(a.min()):g})"
    return None


def check_values(state_dict: Mapping[str, np.ndarray]) -> None:
    """Raises ValueError naming the first tensor (by its torch name) with NaN/inf entries or a
    negative running variance (:func:`bad_value`)."""
    for name in sorted(state_dict):
        why = bad_value(name, state_dict[name])
        if why:
            raise ValueError(why)


def first_bad_value(variables: Mapping[str, Any], table: list[WeightRow] | None = None) -> str | None:
    """:func:`bad_value` for Flax variables, naming the tensor by its torch name (``table``)."""
    table = weight_table() if table is None else table
    for name, path, _ in table:
        try:
            value = _get(variables, path)
        except (KeyError, TypeError):
            continue
        why = bad_value(name, np.asarray(value))
        if why:
            return why
    return None


def from_torch_state_dict(state_dict: Mapping[str, np.ndarray], like: Mapping[str, Any] | None = None,
                          table: list[WeightRow] | None = None, check: bool = True) -> dict:
    """``{torch_name: np.ndarray}`` -> Flax ``{'params'[, 'batch_stats']}`` (NumPy leaves).

    Args:
      state_dict: the torch names and arrays.
      like: optional variables of the target model; every converted array's shape and
        dtype kind must match it.
      table: the architecture's weight table (default: the chapter's U-Net).
      check: refuse NaN/inf tensors and negative running variances (:func:`check_values`).
    Raises:
      ValueError: naming (by torch name) the missing, unexpected, misshaped or non-finite tensors.
    """
    table = weight_table() if table is None else table
    names = {name for name, _, _ in table}
    missing = sorted(names - set(state_dict))
    unexpected = sorted(set(state_dict) - names)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        raise ValueError("; ".join(parts))
    if check:
        check_values({name: state_dict[name] for name in names})
    out: dict = {}
    for name, path, layout in table:
        arr = np.asarray(state_dict[name])
        expected_ndim = {"conv": 4, "conv_transpose": 4, "dense": 2, "count": 0}.get(layout)
        if expected_ndim is not None and arr.ndim != expected_ndim:
            raise ValueError(f"tensor {name} has shape {tuple(arr.shape)}, expected {expected_ndim} dimensions")
        value = _from_torch(arr, layout)
        if like is not None:
            ref = np.asarray(_get(like, path))
            if ref.shape != value.shape:
                want = _to_torch(ref, layout).shape
                raise ValueError(f"tensor {name} has shape {tuple(arr.shape)}, the model needs {tuple(want)}")
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def save_safetensors(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Writes the flat dict and the model settings to ``path``.

    ``metadata`` must hold ``timesteps``, ``schedule`` and what its architecture's
    ``from_metadata`` needs (``arch`` absent = the chapter's U-Net: ``META_KEYS``).
    """
    from safetensors.numpy import save_file

    missing = [k for k in SCHEDULE_META_KEYS if k not in metadata]
    if missing:
        raise ValueError(f"metadata lacks {', '.join(missing)}")
    arch_from_metadata({k: str(v) for k, v in metadata.items()})  # raises ValueError naming what is wrong
    # np.ascontiguousarray makes 0-d arrays 1-d: keep num_batches_tracked a scalar
    save_file({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in state_dict.items()}, os.fspath(path),
              metadata={k: str(v) for k, v in metadata.items()})


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads ``(state_dict, metadata)``; raises ValueError if the file is not safetensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, meta


def metadata_for(img_channels: int, time_emb_dim: int, features, timesteps: int, schedule: str) -> dict[str, str]:
    """The chapter U-Net's metadata (torch_ref.weights' keys) with the schedule; see :func:`arch_metadata`."""
    from .models.chapter_unet import ChapterUNetConfig

    config = ChapterUNetConfig(img_channels=img_channels, time_emb_dim=time_emb_dim, features=tuple(features))
    return arch_metadata("chapter", config, timesteps, schedule)


def arch_metadata(arch: str, config: Any, timesteps: int, schedule: str) -> dict[str, str]:
    """safetensors metadata for any architecture: its own keys (with ``arch``), ``timesteps``, ``schedule``."""
    return dict(get_arch(arch).to_metadata(config), timesteps=str(timesteps), schedule=schedule)


def arch_from_metadata(meta: Mapping[str, str]) -> tuple[str, Any]:
    """``(arch, config)`` from safetensors metadata; no ``arch`` key means the chapter's U-Net
    (files written before the registry). Raises ValueError."""
    arch = meta.get("arch", DEFAULT_ARCH)
    return arch, get_arch(arch).from_metadata(meta)
