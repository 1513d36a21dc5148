"""The per-user cache of trained classifiers: safetensors files, never pickles, never in a work folder.

Location: ``$XDG_CACHE_HOME/jax-ddpm/quality/`` (an absolute ``XDG_CACHE_HOME``), else
``~/.cache/jax-ddpm/quality/``. One file per classifier, ``classifier-<key>.safetensors``; the
key (:func:`cache_key`) hashes everything that decides the trained numbers: the settings
(image size, widths, epochs, seed, ...), ``CLASSIFIER_VERSION``, a fingerprint of the training
images and labels, and the jax/jaxlib versions. The file's metadata holds the key and a SHA-256
of the parameters; a file that does not load, has another key or fails the checksum is
retrained and replaced (written atomically). When the folder cannot be written, the classifier
is still trained and used, just not kept.
"""
from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from typing import Mapping

import jax
import numpy as np
from flax import traverse_util

from ..data import fingerprint
from ..images import atomic_write
from .classifier import ClassifierSettings, MLPClassifier, train_classifier
from .metrics import RealSets

CACHE_FORMAT = "jax-ddpm-quality-classifier-1"


def cache_dir(environ: Mapping[str, str] | None = None) -> str:
    """``$XDG_CACHE_HOME/jax-ddpm/quality`` (when absolute) or ``~/.cache/jax-ddpm/quality``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jax-ddpm", "quality")


def cache_key(settings: ClassifierSettings, sets: RealSets) -> str:
    """A hex digest of everything that decides the classifier's parameters."""
    labels = np.asarray(sets.train_labels, np.int64)
    text = json.dumps({"format": CACHE_FORMAT, "settings": settings.to_json(), "images": fingerprint(sets.train),
                       "labels": hashlib.sha256(labels.tobytes()).hexdigest()[:16], "jax": jax.__version__,
                       "jaxlib": _version("jaxlib")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def cache_path(key: str, root: str | None = None) -> str:
    return os.path.join(cache_dir() if root is None else root, f"classifier-{key}.safetensors")


def _checksum(flat: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(flat):
        a = np.ascontiguousarray(flat[name])
        h.update(f"{name}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_classifier(path: str, key: str, params) -> None:
    """Writes ``params`` and their key and checksum to ``path`` (safetensors, atomically)."""
    from safetensors.numpy import save_file

    flat = {k: np.ascontiguousarray(v, np.float32) for k, v in traverse_util.flatten_dict(params, sep=".").items()}
    meta = {"format": CACHE_FORMAT, "key": key, "sha256": _checksum(flat)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=meta))


def load_classifier_params(path: str, key: str):
    """The params stored at ``path`` for ``key``, or None if the file is absent or damaged."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            flat = {name: f.get_tensor(name) for name in f.keys()}
    except Exception:  # truncated, not safetensors, unreadable: rebuild
        return None
    if meta.get("format") != CACHE_FORMAT or meta.get("key") != key or meta.get("sha256") != _checksum(flat):
        return None
    return traverse_util.unflatten_dict(flat, sep=".")


def _shapes_match(params, settings: ClassifierSettings, num_classes: int) -> bool:
    widths = [settings.image_size ** 2, *settings.hidden, num_classes]
    names = [f"hidden_{i}" for i in range(len(settings.hidden))] + ["logits"]
    try:
        return set(params) == set(names) and all(
            params[n]["kernel"].shape == (widths[i], widths[i + 1]) and params[n]["bias"].shape == (widths[i + 1],)
            for i, n in enumerate(names))
    except (KeyError, TypeError, AttributeError):
        return False


def load_or_train_classifier(settings: ClassifierSettings, sets: RealSets, *, root: str | None = None,
                             use_cache: bool = True) -> MLPClassifier:
    """The classifier of ``settings`` trained on ``sets.train``: from the cache when a sound
    entry exists, else trained (and stored unless ``use_cache`` is False)."""
    key = cache_key(settings, sets)
    path = cache_path(key, root)
    existed = use_cache and os.path.exists(path)
    params = load_classifier_params(path, key) if use_cache else None
    if params is not None and _shapes_match(params, settings, sets.num_classes):
        return MLPClassifier(settings, params, sets.num_classes, key=key, source="cache")
    params = train_classifier(settings, sets)
    if use_cache:
        try:
            save_classifier(path, key, params)
        except OSError:
            pass  # an unwritable cache: the classifier is used, not kept
    return MLPClassifier(settings, params, sets.num_classes, key=key, source="rebuilt" if existed else "trained")


__all__ = ["CACHE_FORMAT", "cache_dir", "cache_key", "cache_path", "load_classifier_params",
           "load_or_train_classifier", "save_classifier"]
