"""pytest wiring for the parity suite: one session-wide context (device + compiled functions).

Device: ``--parity-device {auto,cpu,cuda}`` or the environment variable
``JAX_DDPM_PARITY_DEVICE`` (default ``auto``: cuda when torch and JAX both see a GPU).
"""
from __future__ import annotations

import os

import pytest

from parity_tests.context import DEVICES, Context, DeviceUnavailable, make_context


def pytest_addoption(parser):
    parser.addoption("--parity-device", default=os.environ.get("JAX_DDPM_PARITY_DEVICE", "auto"),
                     choices=DEVICES, help="device for the parity tests (default: auto)")


@pytest.fixture(scope="session")
def parity_ctx(request) -> Context:
    """The shared context: models and jitted functions are built once per session."""
    try:
        return make_context(request.config.getoption("--parity-device"))
    except DeviceUnavailable as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def fresh_ctx(parity_ctx) -> Context:
    """A context of its own, for the mutants (test_can_fail*.py): nothing built before a
    monkeypatched break is reused."""
    return make_context(parity_ctx.device)
