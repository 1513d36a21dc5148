"""A small digits classifier that jax_ddpm trains itself (Flax MLP, optax AdamW), used as the
feature extractor of the quality metrics.

The network: the image (channels averaged to gray, [-1, 1]) flattened, ``hidden`` ReLU
layers (default 256, 64), a linear layer to the 10 logits. Its features are the last hidden
layer (64 values, after the ReLU); its probabilities the softmax of the logits.

Training is a pure function of ``ClassifierSettings`` and the training images: parameters
from ``jax.random.key(seed)``, epoch ``e`` visits the images in ``data.epoch_order(N, seed, e)``
in batches of ``batch_size`` (the incomplete tail dropped), cross-entropy, AdamW, all steps
one jitted ``lax.scan``. The default (40 epochs of 1,297 images) takes about 2 s on the
2-core CPU. ``shuffle_labels`` permutes
the labels before training: a classifier that has learned nothing, for tests (its held-out
accuracy gives it away).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..data import epoch_order
from .metrics import QualityError, RealSets

CLASSIFIER_VERSION = 1  # bump when a change to this module changes the trained numbers


@dataclass(frozen=True)
class ClassifierSettings:
    """Everything that decides the trained classifier (with the training images: the cache key)."""

    image_size: int = 16
    hidden: tuple[int, ...] = (256, 64)  # the last is the feature dimension
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    shuffle_labels: bool = False  # a classifier that learns nothing (tests)

    def __post_init__(self):
        if self.image_size < 1 or self.epochs < 1 or self.batch_size < 1 or not self.hidden:
            raise ValueError(f"unusable classifier settings {self}")

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "hidden": list(self.hidden), "version": CLASSIFIER_VERSION}


class MLP(nn.Module):
    """[N, D] -> (features [N, hidden[-1]], logits [N, num_classes])."""

    hidden: tuple[int, ...]
    num_classes: int

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"hidden_{i}")(x))
        return x, nn.Dense(self.num_classes, name="logits")(x)


def flatten_images(images: np.ndarray) -> np.ndarray:
    """[N, S, S, C] -> [N, S*S] float32: channels averaged (gray digits repeated into RGB stay the same)."""
    x = np.asarray(images, np.float32)
    return x.mean(axis=-1).reshape(x.shape[0], -1)


@functools.lru_cache(maxsize=8)
def _forward(hidden: tuple[int, ...], num_classes: int):
    model = MLP(hidden, num_classes)

    @jax.jit
    def forward(params, x):  # x [N, D]
        features, logits = model.apply({"params": params}, x)
        return features, jax.nn.softmax(logits, axis=-1)

    return forward


@functools.lru_cache(maxsize=8)
def _trainer(hidden: tuple[int, ...], num_classes: int, lr: float, weight_decay: float):
    """``train(key, x [N, D], y [N], batches [steps, B]) -> params``: the initialisation and every
    step one jitted program (a ``lax.scan``; eager initialisation compiles many small ops)."""
    model, tx = MLP(hidden, num_classes), optax.adamw(lr, weight_decay=weight_decay)

    @jax.jit
    def train(key, x, y, batches):
        params = model.init(key, x[:1])["params"]

        def step(carry, idx):
            params, opt_state = carry

            def loss_fn(p):
                _, logits = model.apply({"params": p}, x[idx])
                return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

            updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        return jax.lax.scan(step, (params, tx.init(params)), batches)[0][0]

    return train


def train_classifier(settings: ClassifierSettings, sets: RealSets) -> dict:
    """Trains the MLP on ``sets.train`` (see the module docstring); returns its params (NumPy)."""
    x = flatten_images(sets.train)  # [N, S*S]
    if sets.train.shape[1] != settings.image_size:
        raise QualityError(f"classifier for {settings.image_size}px images, training images are "
                           f"{sets.train.shape[1]}px")
    y = np.asarray(sets.train_labels, np.int32)
    if settings.shuffle_labels:
        y = np.random.default_rng([settings.seed, 7]).permutation(y)
    n, b = x.shape[0], min(settings.batch_size, x.shape[0])
    batches = np.stack([epoch_order(n, settings.seed, epoch)[i:i + b] for epoch in range(settings.epochs)
                        for i in range(0, n - b + 1, b)])  # [steps, B] indices
    train = _trainer(settings.hidden, sets.num_classes, settings.lr, settings.weight_decay)
    params = train(jax.random.key(settings.seed), jnp.asarray(x), jnp.asarray(y), jnp.asarray(batches))
    return jax.tree_util.tree_map(np.asarray, jax.device_get(params))


@dataclass(frozen=True, eq=False)
class MLPClassifier:
    """A trained :class:`MLP` as a :class:`~jax_ddpm.quality.metrics.FeatureExtractor`.

    ``source``: where its parameters came from (``'trained'``, ``'cache'``, ``'rebuilt'``: a
    damaged cache entry retrained)."""

    settings: ClassifierSettings
    params: Any
    num_classes: int = 10
    key: str = ""
    source: str = "trained"

    @property
    def name(self) -> str:
        width = "x".join(map(str, self.settings.hidden))
        return f"digits-mlp{width}-{self.settings.image_size}px-v{CLASSIFIER_VERSION}" + \
            (f"-{self.key[:8]}" if self.key else "")

    def _run(self, images: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[1:3] != (self.settings.image_size,) * 2:
            raise QualityError(f"the {self.name} classifier takes [N, {self.settings.image_size}, "
                               f"{self.settings.image_size}, C] images, got shape {tuple(x.shape)}")
        forward = _forward(self.settings.hidden, self.num_classes)
        flat = flatten_images(x)
        parts = [jax.device_get(forward(self.params, flat[i:i + batch])) for i in range(0, flat.shape[0], batch)]
        return (np.concatenate([p[0] for p in parts]).astype(np.float64),
                np.concatenate([p[1] for p in parts]).astype(np.float64))

    def features(self, images: np.ndarray) -> np.ndarray:
        return self._run(images)[0]

    def probs(self, images: np.ndarray) -> np.ndarray:
        return self._run(images)[1]


__all__ = ["CLASSIFIER_VERSION", "ClassifierSettings", "MLP", "MLPClassifier", "flatten_images", "train_classifier"]
