"""The float64 NumPy oracle, as ``from parity_tests import oracle`` (tests/test_jax_*.py).

The closed forms and the oracle's adapter live in ``parity_tests/references/oracle.py``;
this module re-exports the formulas. NumPy only: importing it imports neither framework.
"""
from __future__ import annotations

from .references.oracle import (F64, batchnorm_eval, batchnorm_train, betas, embedding_frequencies, p_mean_variance,
                                posterior_mean_variance, predict_x0, q_sample, schedule, sinusoidal_embedding)

__all__ = ["F64", "batchnorm_eval", "batchnorm_train", "betas", "embedding_frequencies", "p_mean_variance",
           "posterior_mean_variance", "predict_x0", "q_sample", "schedule", "sinusoidal_embedding"]
