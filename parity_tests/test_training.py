"""10 training steps on the same batches, t and noise: Adam (each step from torch's state,
and the optimiser alone on torch's gradients) and the SGD control run (slow).

Why the Adam parameter row counts elements instead of taking a max: see ``tolerances.py``
(the ``adam_step_params`` entry).
"""
import pytest

from parity_tests.cases import pytest_params
from parity_tests.core import run_case


@pytest.mark.parametrize("case", pytest_params("train"))
def test_train_steps(parity_ctx, case):
    row = run_case(parity_ctx, case)
    assert row.passed, row.message()


@pytest.mark.parametrize("case", pytest_params("lr_schedule", "loss_weights", "weighted_loss"))
def test_learning_rates_and_loss_weights(parity_ctx, case):
    """The cosine learning rate of every update, the min-SNR weight of every t and the weighted
    loss of given outputs (no network: float32 closed forms against the references)."""
    row = run_case(parity_ctx, case)
    assert row.passed, row.message()
