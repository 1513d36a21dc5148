"""Schedules, q_sample, the sinusoidal embedding and the reverse-step formulas.

jax_ddpm vs torch_ref and vs the float64 NumPy oracle (parity_tests/references/). Each case
lives in ``cases.CASES``, its tolerance per (reference, device) in ``tolerances.py``
(measured values in the comments there); this file only runs them.
"""
import pytest

from parity_tests.cases import pytest_params
from parity_tests.core import run_case


@pytest.mark.parametrize("case", pytest_params("schedule"))
def test_schedule(parity_ctx, case):
    row = run_case(parity_ctx, case)
    assert row.passed, row.message()


@pytest.mark.parametrize("case", pytest_params("q_sample"))
def test_q_sample(parity_ctx, case):
    row = run_case(parity_ctx, case)
    assert row.passed, row.message()


@pytest.mark.parametrize("case", pytest_params("embedding"))
def test_embedding(parity_ctx, case):
    row = run_case(parity_ctx, case)
    assert row.passed, row.message()


@pytest.mark.parametrize("case", pytest_params("posterior"))
def test_reverse_step_formulas(parity_ctx, case):
    row = run_case(parity_ctx, case)
    assert row.passed, row.message()
