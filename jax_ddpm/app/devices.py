"""The devices a run trains on: one ``data`` mesh over all of them, multi-process or not.

:func:`setup_devices` joins a multi-process run when asked (before any other JAX call),
builds the mesh and checks that the global ``--batch-size`` splits evenly. Every process
takes part in the steps, checkpoints and stops; only process 0 (``Devices.primary``)
writes the work folder's files and prints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from .. import parallel
from ..errors import one_line
from .config import ConfigError, TrainConfig


@dataclass(frozen=True)
class Devices:
    """The mesh a run trains on and the numbers it reports (``parallel.batch_sizes``)."""

    mesh: Mesh
    sizes: dict
    process_index: int
    process_count: int

    @property
    def primary(self) -> bool:
        """Process 0 writes the files and messages; the others only compute and checkpoint."""
        return self.process_index == 0

    def describe(self) -> str:
        z = self.sizes
        text = (f"{z['num_devices']} {jax.devices()[0].platform} device{'s' if z['num_devices'] != 1 else ''}, "
                f"{z['num_processes']} process{'es' if z['num_processes'] != 1 else ''}: "
                f"global batch {z['global_batch']}, {z['per_device_batch']} per device")
        return text + (f", {z['per_process_batch']} per process" if z["num_processes"] > 1 else "")


def setup_devices(config: TrainConfig) -> Devices:
    """Joins a multi-process run when asked, builds the ``data`` mesh and checks the batch.

    Must run before anything else touches a JAX backend (``jax.distributed.initialize``
    refuses afterwards).

    Raises:
      ConfigError: the multi-process start failed, or ``--batch-size`` does not split evenly
        over the devices.
    """
    try:
        parallel.maybe_initialize_distributed(config.distributed)
    except Exception as e:  # ValueError, RuntimeError, XlaRuntimeError (timeouts), ...
        what = "--distributed" if config.distributed else "JAX_COORDINATOR_ADDRESS is set"
        raise ConfigError(f"{what}: cannot join the multi-process run ({one_line(e)})") from None
    mesh = parallel.make_mesh()
    try:
        sizes = parallel.batch_sizes(config.optim.batch_size, mesh)
    except ValueError as e:
        raise ConfigError(f"--batch-size: {e}") from None
    return Devices(mesh=mesh, sizes=sizes, process_index=jax.process_index(), process_count=jax.process_count())


def local_copy(tree: Any) -> Any:
    """Each array's first addressable copy (a single-device array): for host reads of
    replicated arrays (``jax.device_get`` refuses arrays spread over processes) and for
    programs that should run on one device (sample grids)."""
    return jax.tree_util.tree_map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def any_process(flag: bool, devices: Devices) -> bool:
    """True if ``flag`` is set on any process (an all-gather when there are several)."""
    if devices.process_count == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


__all__ = ["Devices", "any_process", "local_copy", "setup_devices"]
