"""``jax-ddpm`` with test hooks in the train loop, for subprocess tests.

    python tests/train_runner.py [--nan-at-step K] [--step-delay S] train --workdir ... (jax-ddpm's argv)

``--nan-at-step K`` replaces the batch of step K with NaNs (the non-finite-loss stop, exit
status 3); ``--step-delay S`` sleeps S seconds on the host after each step, so a test can
kill a run in the middle. Everything else is ``jax_ddpm.app.cli.main`` unchanged.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from jax_ddpm.app.cli import main
from jax_ddpm.app.train import TrainHooks


def make_hooks(nan_at_step: int | None = None, step_delay: float = 0.0) -> TrainHooks:
    def corrupt_batch(step: int, batch: np.ndarray) -> np.ndarray:
        return np.full_like(batch, np.nan) if step == nan_at_step else batch

    def after_step(step: int) -> None:
        time.sleep(step_delay)

    return TrainHooks(corrupt_batch=corrupt_batch if nan_at_step else None,
                      after_step=after_step if step_delay > 0 else None)


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="train_runner")
    parser.add_argument("--nan-at-step", type=int, default=None)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="jax-ddpm's arguments")
    args = parser.parse_args(argv)
    return main(args.argv, train_hooks=make_hooks(args.nan_at_step, args.step_delay))


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
