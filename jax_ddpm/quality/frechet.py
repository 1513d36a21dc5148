"""The Fréchet distance between two Gaussians fitted to feature sets (float64, NumPy only).

    d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2})

(Fréchet 1957; Dowson & Landau 1982; as FID: Heusel et al. 2017, "GANs Trained by a Two
Time-Scale Update Rule Converge to a Local Nash Equilibrium"). The trace term is computed from
symmetric eigen-decompositions only: ``S_1^{1/2}`` from ``eigh(S_1)``, then the eigenvalues
of the symmetric PSD matrix ``S_1^{1/2} S_2 S_1^{1/2}`` (they equal those of ``S_1 S_2``),
clipped at 0 before the square root. Unlike ``scipy.linalg.sqrtm(S_1 @ S_2)`` this never
returns complex parts and stays stable for singular (rank-deficient) covariances.
"""
from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of ``features`` [N, D], N >= 2."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"shapes disagree: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * cross), 0.0)


def feature_frechet_distance(features1: np.ndarray, features2: np.ndarray) -> float:
    """:func:`frechet_distance` between the Gaussians fitted to two feature sets [N1, D], [N2, D]."""
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))


__all__ = ["feature_frechet_distance", "frechet_distance", "gaussian_stats"]
