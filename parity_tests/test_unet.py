"""The U-Net with converted weights: forward (train/eval), BatchNorm statistics, loss,
gradients of every parameter, and the torch -> flax -> torch weight round trip.

Cases: ``cases.CASES``; tolerances per (reference, device): ``tolerances.py``.
"""
import pytest

from parity_tests.cases import pytest_params
from parity_tests.core import run_case


@pytest.mark.parametrize("case", pytest_params("forward"))
def test_forward(parity_ctx, case):
    row = run_case(parity_ctx, case)
    assert row.passed, row.message()


@pytest.mark.parametrize("case", pytest_params("bn_stats"))
def test_batchnorm_running_stats(parity_ctx, case):
    row = run_case(parity_ctx, case)
    assert row.passed, row.message()


@pytest.mark.parametrize("case", pytest_params("loss"))
def test_loss(parity_ctx, case):
    row = run_case(parity_ctx, case)
    assert row.passed, row.message()


@pytest.mark.parametrize("case", pytest_params("grads"))
def test_grads(parity_ctx, case):
    row = run_case(parity_ctx, case)
    assert row.passed, row.message()


@pytest.mark.parametrize("case", pytest_params("round_trip"))
def test_weight_round_trip(parity_ctx, case):
    row = run_case(parity_ctx, case)
    assert row.passed, row.message()
