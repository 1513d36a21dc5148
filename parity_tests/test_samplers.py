"""Every sampler (ddpm all-T and respaced, ddim, dpmpp_2m, chapter) x options x prediction type x
schedule, driven by the exact posterior mean of Gaussian data, against the float64 oracle of each
algorithm and against diffusers' schedulers on the same model outputs and noise.

The cases are ``cases._samplers()`` (the big grid is ``slow``: ``pytest -m slow``, ``jax-ddpm
parity --full``); tolerances and their derivations in ``tolerances.py``; this file only runs them.
"""
import pytest

from parity_tests.cases import pytest_params
from parity_tests.core import run_case


@pytest.mark.parametrize("case", pytest_params("samplers"))
def test_sampler_chain(parity_ctx, case):
    row = run_case(parity_ctx, case)
    assert row.passed, row.message()
