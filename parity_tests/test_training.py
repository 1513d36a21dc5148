"""10 training steps on the same batches, t and noise: Adam (each step from torch's state,
and the optimiser alone on torch's gradients) and the SGD control run (slow).

Why the Adam parameter row counts elements instead of taking a max: see ``report.TOL``.
"""
import pytest

from parity_tests import report


@pytest.mark.parametrize("case", report.pytest_params("train"))
def test_train_steps(parity_ctx, case):
    row = report.run_case(parity_ctx, case)
    assert row.passed, row.message()
