"""jax_ddpm's unet2d (diffusers' UNet2DModel in Flax) against diffusers itself, live: forward
(eval; train with dropout 0), loss and every gradient, Adam steps, 20-step DDPM chains
(DDPMScheduler.step) and the weight round trip, in float32 and float64, on tiny configs
(``cases.UNET2D_NETS``: the ddpm-cifar10 architecture at 1/8 width, several heads, odd groups).
The schedule and q_sample rows vs diffusers run with the closed forms (test_closed_forms.py).

Cases: ``cases.CASES`` (group 'unet2d'); tolerances and their derivations: ``tolerances.py``.
Without diffusers installed every case is skipped, naming why.
"""
import pytest

from parity_tests.cases import pytest_params
from parity_tests.core import run_case


@pytest.mark.parametrize("case", pytest_params("unet2d"))
def test_unet2d_vs_diffusers(parity_ctx, case):
    row = run_case(parity_ctx, case)
    assert row.passed, row.message()
