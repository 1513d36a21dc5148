"""The checks, one function per component, each written once and run against every reference.

A check is ``check_*(ctx, ref, **params) -> Measure``: it builds the inputs
(``parity_tests.inputs``), runs jax_ddpm (``parity_tests.jax_side``) and the reference
through its adapter (``ref``, a ``parity_tests.references.Reference``), and measures the
difference (``parity_tests.core``). It never asks which reference it has: what differs
between references lives in their adapters.

- ``closed_forms``: schedules, q_sample, the time embedding, the reverse-step formulas;
- ``forward``: the U-Net forward (train/eval) and BatchNorm running statistics;
- ``training``: loss, gradients, Adam and SGD steps;
- ``sampling``: one reverse step with the U-Net, and whole chains;
- ``convert``: the weight round trip.
"""
