"""Kept for imports and ``python -m jax_ddpm.cli`` written before ``jax_ddpm.app``: the
command lives in :mod:`jax_ddpm.app.cli`."""
import sys

from .app.cli import *  # noqa: F401,F403
from .app.cli import (BN_HELP, DESCRIPTION, TRAIN_EPILOG, XLA_FLAGS_HELP, __all__, main)  # noqa: F401
from .app.config import (BN_STATS, CHANNELS, DTYPES, LAYOUTS, SAMPLERS, SCHEDULES, ConfigError,  # noqa: F401
                         DiffusionConfig, ModelConfig, OptimConfig, SampleConfig, TrainConfig,
                         convert_config_from_args, sample_config_from_args, train_config_from_args)
from .app.console import EXIT_BAD_INPUT, PROG  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
