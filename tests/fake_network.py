"""A one-parameter "network" for train-step tests: the step's plumbing without a U-Net to compile."""
from __future__ import annotations


def scale_network(variables, x, t, train=True, rngs=None):
    """x_t times the one parameter ``w``: an ``apply_fn`` for ``training.train_state_from_variables``."""
    return x * variables["params"]["w"]
