"""Kept for imports written before ``jax_ddpm.app``: what ``jax-ddpm train``, ``sample`` and
``convert`` do now lives in :mod:`jax_ddpm.app` (``factories``, ``devices``, ``workdir``,
``console``, ``train``, ``sample``, ``convert``)."""
from .app.console import EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_OK, InterruptFlag, Progress  # noqa: F401
from .app.convert import export_weights, import_weights  # noqa: F401
from .app.devices import Devices, any_process, local_copy, setup_devices  # noqa: F401
from .app.factories import (abstract_state, build_model, build_optimizer, build_schedule, image_shape,  # noqa: F401
                            init_state, make_init_fn, make_step_fn, run_keys)
from .app.sample import MIN_BATCH_STATS, read_noise_file, sample, write_samples  # noqa: F401
from .app.train import PLOT_EVERY_S, NonFiniteLossError, TrainHooks, train  # noqa: F401
from .app.workdir import LoadedRun, RunFiles, load_run, read_metrics, trim_metrics, write_json  # noqa: F401

__all__ = [
    "Devices", "EXIT_INTERRUPTED", "EXIT_NONFINITE", "EXIT_OK", "LoadedRun", "NonFiniteLossError", "Progress", "RunFiles",
    "TrainHooks", "abstract_state", "build_model", "build_optimizer", "build_schedule", "export_weights", "image_shape",
    "import_weights", "init_state", "load_run", "local_copy", "make_init_fn", "make_step_fn", "read_noise_file",
    "run_keys", "sample", "setup_devices", "train", "write_samples",
]
