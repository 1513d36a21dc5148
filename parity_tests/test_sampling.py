"""One reverse step and whole 100-step chains (ddpm: both variances and clip_denoised;
chapter_sample) with the same converted weights in eval mode and shared pre-drawn noise.

Chains are compared on the clamped output and on every step's state (unclamped).
"""
import pytest

from parity_tests import report


@pytest.mark.parametrize("case", report.pytest_params("sampler"))
def test_sampler(parity_ctx, case):
    row = report.run_case(parity_ctx, case)
    assert row.passed, row.message()
