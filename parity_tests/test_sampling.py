"""One reverse step and whole 100-step chains (ddpm: both variances and clip_denoised;
chapter_sample) with the same converted weights in eval mode and shared pre-drawn noise.

Chains are compared on the clamped output and on every step's state (unclamped).
"""
import pytest

from parity_tests.cases import pytest_params
from parity_tests.core import run_case


@pytest.mark.parametrize("case", pytest_params("sampler"))
def test_sampler(parity_ctx, case):
    row = run_case(parity_ctx, case)
    assert row.passed, row.message()
