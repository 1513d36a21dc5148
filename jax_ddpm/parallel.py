"""Data-parallel training over every device JAX sees, with ``jax.sharding`` (no pmap).

The picture (one ``Mesh`` axis, ``data``)::

    global batch [B, H, W, C]  --sharded along 'data'-->  B / N rows on each of N devices
    TrainState (params, batch_stats, opt_state, ema, schedule)  --replicated-->  every device
    key                                                       --replicated-->  every device

One ``jax.jit`` with ``in_shardings``/``out_shardings`` compiles the ordinary
``training.train_step``; GSPMD partitions it. Every reduction over the batch axis (the
BatchNorm mean and variance, the loss mean, the gradient sum) becomes a cross-device
all-reduce, so N devices compute the same maths as one device with the same global batch
(up to float summation order; ``tests/test_parallel.py`` measures it). Random ``t`` and
noise are drawn for the *global* batch from ``fold_in(key, step)``, so they do not depend on
the device count either.

Multi-host: call :func:`maybe_initialize_distributed` before any other JAX call, build the
mesh with :func:`make_mesh` (devices ordered by process, so process ``p`` owns the
contiguous rows ``[p * B/P, (p + 1) * B/P)`` of every global batch), let every process
draw the same global index order and keep its own rows with
:func:`host_local_batch_indices`, then assemble the global array with
:func:`make_global_batch`. See ``docs/scaling.md``.

Mixed precision: :func:`compute_dtype` maps ``--dtype`` to the UNet's compute dtype;
parameters, optimizer state, BatchNorm statistics and the loss stay float32
(:func:`check_float32_state`).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .training import train_step

DATA_AXIS = "data"
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPES = tuple(COMPUTE_DTYPES)  # --dtype choices


# ----------------------------------------------------------------------------- multi-host
def maybe_initialize_distributed(enabled: bool = False, env: Mapping[str, str] | None = None) -> bool:
    """Joins a multi-process JAX run when asked to or when the environment says so.

    Must run before anything touches a JAX backend (``jax.devices()``, array creation).

    Initialises when ``enabled`` (``--distributed``) or when ``JAX_COORDINATOR_ADDRESS``
    is set. ``JAX_COORDINATOR_ADDRESS`` (``host:port``), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` are passed on when present; whatever is missing is left to
    ``jax.distributed.initialize``'s cluster auto-detection (SLURM, Open MPI, Cloud TPU,
    GKE, ...).

    Args:
      enabled: the ``--distributed`` flag.
      env: the environment (``os.environ`` when None).

    Returns:
      True when ``jax.distributed.initialize`` was called.

    Raises:
      ValueError: if ``JAX_NUM_PROCESSES`` or ``JAX_PROCESS_ID`` is not an integer.
    """
    env = os.environ if env is None else env
    address = env.get("JAX_COORDINATOR_ADDRESS") or None
    if not (enabled or address):
        return False
    kwargs: dict[str, Any] = {}
    if address:
        kwargs["coordinator_address"] = address
    for var, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if env.get(var):
            try:
                kwargs[arg] = int(env[var])
            except ValueError:
                raise ValueError(f"{var} must be an integer, got {env[var]!r}") from None
    jax.distributed.initialize(**kwargs)
    return True


def host_local_batch_indices(global_indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This process's rows of a global batch: the contiguous block number ``process_index``.

    Every process draws the same global index order (same seed), then keeps its block;
    together the blocks are the global batch, in order, with no overlap. This matches the
    row layout of :func:`make_global_batch` on a mesh from :func:`make_mesh`.

    Args:
      global_indices: [B] indices (into the data set) of one global batch.
      process_index: ``jax.process_index()``.
      process_count: ``jax.process_count()``.

    Returns:
      [B / process_count] indices.

    Raises:
      ValueError: if ``B`` is not divisible by ``process_count`` or the index is out of range.
    """
    global_indices = np.asarray(global_indices)
    batch_size = global_indices.shape[0]
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    if batch_size % process_count:
        raise ValueError(f"global batch size {batch_size} is not divisible by the number of processes "
                         f"{process_count}")
    per_process = batch_size // process_count
    return global_indices[process_index * per_process:(process_index + 1) * per_process]


# ----------------------------------------------------------------------------- mesh + shardings
def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over ``devices`` (all of ``jax.devices()`` by default).

    Devices are ordered by (process_index, id), so each process's devices form one
    contiguous block of the axis (and of every batch sharded along it). The axis type is
    left to ``Mesh``'s default (``Auto`` on jax >= 0.6): GSPMD decides intermediate shardings.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split along ``data``, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def check_global_batch(batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError unless ``batch_size`` splits evenly over the mesh's devices.

    Raises:
      ValueError: naming the batch size and the device count.
    """
    num_devices = mesh.devices.size
    if batch_size < 1 or batch_size % num_devices:
        raise ValueError(f"global batch size {batch_size} is not divisible by the number of devices "
                         f"{num_devices}; use a multiple of {num_devices}")


def batch_sizes(batch_size: int, mesh: Mesh) -> dict[str, int]:
    """The numbers to report: global batch, per-device batch, per-process batch, counts.

    Raises:
      ValueError: from :func:`check_global_batch`.
    """
    check_global_batch(batch_size, mesh)
    num_devices = mesh.devices.size
    num_processes = len({d.process_index for d in mesh.devices.flat})
    return {"global_batch": batch_size, "per_device_batch": batch_size // num_devices,
            "per_process_batch": batch_size // num_processes, "num_devices": num_devices,
            "num_processes": num_processes}


# ----------------------------------------------------------------------------- placing data
def shard_state(state: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``state`` (a TrainState, a key, any pytree) replicated on ``mesh``.

    Leaves already replicated on ``mesh`` (e.g. restored by orbax with these shardings) are
    kept as they are; leaves on the same devices under another sharding object (a
    single-device array on a one-device mesh) are re-labelled on device; others go through
    host memory, which also works in a multi-process run as long as every process holds the
    same values (same seed, same checkpoint).

    The label matters: the sharded step's outputs carry ``replicated(mesh)``, and an input
    state that carried an equivalent but different sharding gave the step's second call other
    input types, so the train step compiled twice (measured: 17 s each on a tiny model).
    """
    sharding = replicated(mesh)

    def place(x):
        if isinstance(x, jax.Array):
            if x.sharding == sharding:
                return x
            if x.sharding.is_equivalent_to(sharding, x.ndim) and x.is_fully_addressable:
                return jax.device_put(x, sharding)
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed key: move its data
                impl = jax.random.key_impl(x)
                return jax.random.wrap_key_data(place(jax.random.key_data(x)), impl=impl)
        return jax.device_put(np.asarray(x), sharding)

    return jax.tree_util.tree_map(place, state)


def make_global_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """Assembles one global ``[B, ...]`` batch sharded along ``data`` from each process's rows.

    Single process: ``local_batch`` is the whole global batch. Multi-process: it is this
    process's ``B / process_count`` rows, as picked by :func:`host_local_batch_indices`.

    Args:
      local_batch: [B / process_count, ...] NumPy array.
      mesh: from :func:`make_mesh`.

    Returns:
      A global jax.Array of shape [B, ...].

    Raises:
      ValueError: if the global batch does not split evenly over the devices.
    """
    local_batch = np.asarray(local_batch)
    num_processes = len({d.process_index for d in mesh.devices.flat})
    global_shape = (local_batch.shape[0] * num_processes,) + local_batch.shape[1:]
    check_global_batch(global_shape[0], mesh)
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch, global_shape)


# ----------------------------------------------------------------------------- the step
def make_sharded_train_step(mesh: Mesh, step_fn: Callable = train_step, donate: bool = True) -> Callable:
    """``step_fn(state, batch, key) -> (state, metrics)`` jitted data-parallel over ``mesh``.

    State and key replicated, batch sharded along ``data``, outputs replicated; the state
    argument is donated. A drop-in for ``train_loop.make_step_fn``'s function: ``batch`` may
    be a NumPy array (this process's rows: the whole global batch in a single process, its
    :func:`host_local_batch_indices` rows in a multi-process run), assembled with
    :func:`make_global_batch`, or an already global ``jax.Array``. The key is placed with
    :func:`shard_state` (a no-op once it is). ``state`` must already be on the mesh
    (:func:`shard_state` once after init or restore; the step's outputs stay there).

    Args:
      mesh: from :func:`make_mesh`.
      step_fn: a pure step with ``training.train_step``'s signature.
      donate: donate the input state's buffers.

    Returns:
      ``sharded_step(state, batch, key) -> (state, metrics)``, with the compiled function
      as ``.jitted`` (for ``.lower``) and the mesh as ``.mesh``.

    Raises (when called):
      ValueError: if the global batch does not split evenly over the devices.
    """
    rep, data = replicated(mesh), batch_sharding(mesh)
    jitted = jax.jit(step_fn, in_shardings=(rep, data, rep), out_shardings=(rep, rep),
                     donate_argnums=(0,) if donate else ())

    def sharded_step(state, batch, key):
        if isinstance(batch, jax.Array):
            check_global_batch(batch.shape[0], mesh)
        else:
            batch = make_global_batch(batch, mesh)
        return jitted(state, batch, shard_state(key, mesh))

    sharded_step.jitted = jitted
    sharded_step.mesh = mesh
    return sharded_step


def abstract_replicated(tree: Any, mesh: Mesh) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying ``replicated(mesh)``: an orbax restore target
    that lands every array replicated on the mesh (needed in a multi-process run)."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


# ----------------------------------------------------------------------------- mixed precision
def compute_dtype(name: str) -> Any:
    """``--dtype`` -> the UNet's compute dtype (``UNet(dtype=...)``).

    Raises:
      ValueError: for a name not in ``COMPUTE_DTYPES``.
    """
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"--dtype must be one of {tuple(COMPUTE_DTYPES)}, got {name!r}")
    return COMPUTE_DTYPES[name]


def check_float32_state(state: Any) -> None:
    """Raises TypeError unless params, optimizer state, EMA and BatchNorm stats are float32.

    Mixed precision here means bfloat16 *compute* only (the UNet casts activations);
    integer leaves (step counters, ``num_batches_tracked``) are allowed.
    """
    for part in ("params", "opt_state", "ema_params", "batch_stats"):
        leaves = jax.tree_util.tree_leaves_with_path(getattr(state, part))
        for path, leaf in leaves:
            dtype = jnp.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype
            if jnp.issubdtype(dtype, jnp.floating) and dtype != jnp.float32:
                raise TypeError(f"{part}{jax.tree_util.keystr(path)} is {dtype}, expected float32")


__all__ = [
    "COMPUTE_DTYPES", "DATA_AXIS", "DTYPES", "abstract_replicated", "batch_sharding", "batch_sizes", "check_float32_state", "check_global_batch",
    "compute_dtype", "host_local_batch_indices", "make_global_batch", "make_mesh", "make_sharded_train_step",
    "maybe_initialize_distributed", "replicated", "shard_state",
]
