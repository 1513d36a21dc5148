"""Schedules, q_sample, the sinusoidal embedding and the reverse-step formulas.

jax_ddpm vs torch_ref and vs the float64 NumPy oracle (parity_tests/oracle.py). Each case
and its tolerance per device live in ``report.CASES`` / ``report.TOL`` (measured values in
the comments there); this file only runs them.
"""
import pytest

from parity_tests import report


@pytest.mark.parametrize("case", report.pytest_params("schedule"))
def test_schedule(parity_ctx, case):
    row = report.run_case(parity_ctx, case)
    assert row.passed, row.message()


@pytest.mark.parametrize("case", report.pytest_params("q_sample"))
def test_q_sample(parity_ctx, case):
    row = report.run_case(parity_ctx, case)
    assert row.passed, row.message()


@pytest.mark.parametrize("case", report.pytest_params("embedding"))
def test_embedding(parity_ctx, case):
    row = report.run_case(parity_ctx, case)
    assert row.passed, row.message()


@pytest.mark.parametrize("case", report.pytest_params("posterior"))
def test_reverse_step_formulas(parity_ctx, case):
    row = report.run_case(parity_ctx, case)
    assert row.passed, row.message()
