"""scikit-learn's digits split for quality metrics: a fixed, class-balanced held-out set.

The split (``digits_split``): the 1,797 images are visited in the order
``default_rng(SPLIT_SEED).permutation(1797)``; the first ``HELDOUT_PER_CLASS`` (50) of each
class go to the held-out split (500 images, 50 per digit), the other 1,297 to the training
split. Both are kept in index order. It depends on nothing but these two constants and the
labels, so every image size and every run sees the same split.

The images are ``jax_ddpm.data.digits_images`` (Pillow's bilinear resize to S x S, values in
[-1, 1]): exactly what ``jax-ddpm train --data digits`` trains the generator on. The generator
sees all 1,797 digits; the split holds out images from the *classifier*, so its accuracy and
the FID reference are measured on images it never learned from.
"""
from __future__ import annotations

import numpy as np

from ..data import digits_images
from .metrics import RealSets

SPLIT_SEED = 0
HELDOUT_PER_CLASS = 50


def digits_labels() -> np.ndarray:
    """The 1,797 labels (int64, 0-9) in scikit-learn's order."""
    from sklearn.datasets import load_digits

    return np.asarray(load_digits().target, np.int64)


def digits_split(labels: np.ndarray, per_class: int = HELDOUT_PER_CLASS,
                 seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``(train_indices, heldout_indices)``, each sorted: ``per_class`` of each label held out."""
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(labels.shape[0])
    held = np.concatenate([order[labels[order] == c][:per_class] for c in np.unique(labels)])
    mask = np.zeros(labels.shape[0], bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def digits_sets(image_size: int) -> RealSets:
    """The digits at ``image_size`` (one channel, [-1, 1]) split by :func:`digits_split`."""
    images, labels = digits_images(image_size, 1), digits_labels()
    train, held = digits_split(labels)
    return RealSets(name=f"digits-{image_size}px-heldout{held.size}", train=images[train],
                    train_labels=labels[train], heldout=images[held], heldout_labels=labels[held])


__all__ = ["HELDOUT_PER_CLASS", "SPLIT_SEED", "digits_labels", "digits_sets", "digits_split"]
