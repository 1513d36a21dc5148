"""Sample quality, measured offline: an FID in the feature space of a small classifier that
jax_ddpm trains itself, with its real-vs-real floor, confident share and class coverage.

Layers: ``frechet`` (the distance), ``metrics`` (the numbers from an array of samples, the
``FeatureExtractor`` protocol, ``RealSets``), ``digits`` (the fixed digits split),
``classifier`` (the MLP, trained with optax), ``cache`` (per-user safetensors cache).

``REFERENCES`` maps a data source (``TrainConfig.data.source``) to the function that builds
its extractor and real image sets; only scikit-learn's digits have one. A new data set is one
entry here: a function ``(image_size, **options) -> Reference`` whose extractor implements
``FeatureExtractor``. See docs/quality.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .cache import cache_dir, load_or_train_classifier
from .classifier import CLASSIFIER_VERSION, ClassifierSettings, MLPClassifier, train_classifier
from .digits import digits_sets, digits_split
from .frechet import feature_frechet_distance, frechet_distance, gaussian_stats
from .metrics import (CONFIDENCE, COVERAGE_MIN_SHARE, MIN_ACCURACY, FeatureExtractor, QualityError, RealSets,
                      class_stats, quality_metrics)


@dataclass(frozen=True, eq=False)
class Reference:
    """A feature extractor and the real images the metrics compare samples with."""

    extractor: FeatureExtractor
    sets: RealSets


def digits_reference(image_size: int, *, settings: ClassifierSettings | None = None, cache_root: str | None = None,
                     use_cache: bool = True) -> Reference:
    """The digits split at ``image_size`` and the classifier trained on its training split
    (``settings`` default: ``ClassifierSettings(image_size)``; from the cache when there)."""
    settings = ClassifierSettings(image_size=image_size) if settings is None else settings
    if settings.image_size != image_size:
        raise QualityError(f"classifier settings are for {settings.image_size}px images, not {image_size}px")
    sets = digits_sets(image_size)
    return Reference(load_or_train_classifier(settings, sets, root=cache_root, use_cache=use_cache), sets)


REFERENCES: dict[str, Callable[..., Reference]] = {"digits": digits_reference}


def reference_for(source: str, image_size: int, **options) -> Reference:
    """The :class:`Reference` of data source ``source``; QualityError for one without an extractor."""
    if source not in REFERENCES:
        raise QualityError(f"quality metrics need a feature extractor for the data; only {', '.join(REFERENCES)} "
                           f"has one (no extractor for other data exists yet), got --data {source}")
    return REFERENCES[source](image_size, **options)


__all__ = ["CLASSIFIER_VERSION", "CONFIDENCE", "COVERAGE_MIN_SHARE", "ClassifierSettings", "FeatureExtractor",
           "MIN_ACCURACY", "MLPClassifier", "QualityError", "REFERENCES", "RealSets", "Reference", "cache_dir",
           "class_stats", "digits_reference", "digits_sets", "digits_split", "feature_frechet_distance",
           "frechet_distance", "gaussian_stats", "load_or_train_classifier", "quality_metrics", "reference_for",
           "train_classifier"]
