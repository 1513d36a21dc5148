"""Sample quality from a feature extractor: FID against held-out real images, the real-vs-real
floor, confident share, class coverage and the largest class share (NumPy, float64).

``quality_metrics(samples, extractor, sets)`` is the one function that computes the numbers
from an array of samples; ``jax-ddpm eval`` calls it, and so can a training hook.

Definitions (``docs/quality.md`` has the measured values):

* ``fid``: the Fréchet distance (:mod:`.frechet`) between Gaussians fitted to the extractor's
  ``features`` of the N samples and of the held-out real images (``sets.heldout``).
* ``fid_floor``: the same distance for N real *training* images (``sets.train``, drawn
  without replacement; with replacement if N exceeds the training split) against the same
  held-out images, averaged over ``FLOOR_DRAWS`` (5) draws seeded by ``seed``
  (``fid_floor_std``: their standard deviation): what a perfect generator scores with N
  samples. FID is biased upward at finite N, so the floor is the number to compare with, not 0;
  ``fid_ratio`` is ``fid / fid_floor``.
* ``confident``: the share of images whose largest class probability is >= ``confidence``
  (default 0.9); ``real_confident`` the same for the held-out real images.
* ``coverage``: the number of classes that at least ``COVERAGE_MIN_SHARE`` (1%) of the N
  images are confidently (>= ``confidence``) assigned to; a stray confident sample does not
  make a class present.
* ``largest_class_share``: the largest share of the N images whose argmax (confident or not)
  is one class (balanced digits: about 0.1; mode collapse: towards 1).
* ``classifier_accuracy``: the extractor's argmax accuracy on the held-out labels;
  ``classifier_ok`` is False below ``MIN_ACCURACY``: the other numbers are then meaningless.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .frechet import feature_frechet_distance

CONFIDENCE = 0.9  # a prediction is confident when its top probability is at least this
COVERAGE_MIN_SHARE = 0.01  # a class is covered when this share of the images is confidently assigned to it
MIN_ACCURACY = 0.9  # below this held-out accuracy the classifier's numbers are not trusted
FLOOR_STREAM = 1  # default_rng([seed, FLOOR_STREAM, draw]) draws the floor's training images
FLOOR_DRAWS = 5  # the floor is the mean over this many draws (one draw at N = 256 varies by about +-25%)


class QualityError(ValueError):
    """Metrics that cannot be computed for this input; the message is one line."""


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the metrics need from a network: features for FID and class probabilities.

    ``images``: float32 [N, S, S, C] in [-1, 1], C in (1, 3). The digits classifier
    (:class:`jax_ddpm.quality.classifier.MLPClassifier`) is the one implementation so far.
    """

    name: str

    def features(self, images: np.ndarray) -> np.ndarray:
        """[N, D] float64 (the penultimate layer for a classifier)."""

    def probs(self, images: np.ndarray) -> np.ndarray:
        """[N, K] class probabilities (rows sum to 1)."""


@dataclass(frozen=True, eq=False)
class RealSets:
    """Labelled real images split in two: ``train`` (the extractor learns on it; the floor draws
    from it) and ``heldout`` (the reference FID compares to; accuracy is measured on it).
    Images float32 [N, S, S, C] in [-1, 1], labels int [N]."""

    name: str
    train: np.ndarray
    train_labels: np.ndarray
    heldout: np.ndarray
    heldout_labels: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(max(self.train_labels.max(), self.heldout_labels.max())) + 1


def class_stats(probs: np.ndarray, confidence: float = CONFIDENCE) -> dict:
    """Confident share, coverage, largest class share and per-class counts of ``probs`` [N, K]."""
    p = np.asarray(probs, np.float64)
    n, k = p.shape
    top, pred = p.max(axis=1), p.argmax(axis=1)
    sure = top >= confidence
    confident_counts = np.bincount(pred[sure], minlength=k)
    counts = np.bincount(pred, minlength=k)
    need = max(1, int(np.ceil(COVERAGE_MIN_SHARE * n)))
    return {"confident": float(sure.mean()), "coverage": int((confident_counts >= need).sum()),
            "largest_class_share": float(counts.max() / n), "class_counts": counts.tolist(),
            "confident_class_counts": confident_counts.tolist()}


def _floor_draw(n_train: int, n: int, seed: int, draw: int) -> np.ndarray:
    rng = np.random.default_rng([seed, FLOOR_STREAM, draw])
    return rng.permutation(n_train)[:n] if n <= n_train else rng.integers(0, n_train, n)


def check_images(images: np.ndarray, like: np.ndarray, what: str = "samples") -> np.ndarray:
    """``images`` as float32 [N, S, S, C] with the real images' S and N >= 2; raises QualityError."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[0] < 2 or x.shape[1:3] != like.shape[1:3] or x.shape[3] not in (1, 3):
        raise QualityError(f"{what} must be [N, {like.shape[1]}, {like.shape[2]}, 1 or 3] with N >= 2, got "
                           f"shape {tuple(x.shape)}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise QualityError(f"{what} hold NaN or inf values")
    return x


def quality_metrics(samples: np.ndarray, extractor: FeatureExtractor, sets: RealSets, *, seed: int = 0,
                    confidence: float = CONFIDENCE, floor_draws: int = FLOOR_DRAWS) -> dict:
    """The quality numbers of ``samples`` [N, S, S, C] in [-1, 1] (see the module docstring).

    Deterministic: the same samples, extractor, sets and ``seed`` give the same numbers.
    Raises QualityError for images of another size than the real sets', or fewer than 2.
    """
    x = check_images(samples, sets.heldout)
    if floor_draws < 1:
        raise ValueError(f"floor_draws must be at least 1, got {floor_draws}")
    n = x.shape[0]
    ref_features = extractor.features(sets.heldout)
    fid = feature_frechet_distance(extractor.features(x), ref_features)
    train_features = extractor.features(sets.train)
    floors = [feature_frechet_distance(train_features[_floor_draw(train_features.shape[0], n, seed, d)], ref_features)
              for d in range(floor_draws)]
    floor = float(np.mean(floors))
    real_probs = extractor.probs(sets.heldout)
    accuracy = float((real_probs.argmax(axis=1) == sets.heldout_labels).mean())
    stats, real = class_stats(extractor.probs(x), confidence), class_stats(real_probs, confidence)
    return {
        "num_samples": n, "extractor": extractor.name, "reference": sets.name,
        "num_heldout": int(sets.heldout.shape[0]), "feature_dim": int(ref_features.shape[1]), "seed": seed,
        "fid": fid, "fid_floor": floor, "fid_floor_draws": floor_draws,
        "fid_floor_std": float(np.std(floors, ddof=1)) if floor_draws > 1 else 0.0,
        "fid_ratio": fid / floor if floor > 0 else None,
        "classifier_accuracy": accuracy, "classifier_ok": accuracy >= MIN_ACCURACY, "confidence": confidence,
        **stats, "real_confident": real["confident"], "real_coverage": real["coverage"],
        "real_largest_class_share": real["largest_class_share"], "num_classes": int(real_probs.shape[1]),
    }


__all__ = ["CONFIDENCE", "COVERAGE_MIN_SHARE", "FLOOR_DRAWS", "FLOOR_STREAM", "FeatureExtractor", "MIN_ACCURACY",
           "QualityError", "RealSets", "check_images", "class_stats", "quality_metrics"]
