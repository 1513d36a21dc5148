"""What ``jax-ddpm train``, ``sample`` and ``convert`` do: the loop, checkpoints, metrics, samples.

A work folder (``--workdir``) holds::

    config.json         the resolved TrainConfig of the latest (re)start
    metrics.jsonl       one JSON object per logging point: step, loss, images_per_s, lr, grad_norm, ...
    loss.png            the loss curve (redrawn at checkpoints, at most every 30 s, and at the end)
    samples.png         the final sample grid (EMA weights, DDPM sampler, clipped x0, --bn-stats)
    samples/step_N.png  grids every --sample-every steps
    checkpoints/N/      orbax checkpoints (see jax_ddpm.checkpoint)

Exact resume: the train step draws ``t`` and the noise from ``fold_in(train_key, step)``
and the data order is a function of ``(seed, epoch)``; the checkpoint holds the whole
state, the key and the data position, so a run restarted from any checkpoint computes the
same bits as one that never stopped (on one CPU backend; ``tests/test_cli_resume.py``).

Devices (``jax_ddpm.parallel``): :func:`setup_devices` joins a multi-process run when asked
(before any other JAX call), builds one ``data`` mesh over every device and checks that the
global ``--batch-size`` splits evenly. The state and key are replicated over the mesh
(after init and after restore), every process draws the same global batch indices and
feeds only its own rows, and :func:`make_step_fn` is ``parallel.make_sharded_train_step``.
Every process takes part in the steps, the checkpoint saves and restores and the
non-finite-loss stop; only process 0 writes ``config.json``, ``metrics.jsonl``, plots,
sample grids and messages. In a multi-process run Ctrl-C is acted on at the next logging
or checkpoint step, once all processes agree (one small all-gather there).

Testing hooks (not options): ``JAX_DDPM_DEBUG_NAN_AT_STEP=k`` replaces the batch of step
``k`` with NaNs, to exercise the non-finite-loss stop (exit status 3);
``JAX_DDPM_DEBUG_STEP_DELAY=s`` sleeps ``s`` seconds on the host after each step, so a test
can kill a run in the middle.
"""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from . import checkpoint as ckpt
from . import parallel
from .config import (ConfigError, ConvertConfig, SampleConfig, TrainConfig, identity, identity_mismatch, to_dict,
                     train_config_from_identity)
from .convert import from_torch_state_dict, load_safetensors, metadata_for, save_safetensors, to_torch_state_dict
from .data import BatchIterator, DataPosition, fingerprint, load_images
from .images import atomic_write, save_grid, save_loss_plot, to_uint8
from .models import UNet
from .sampling import make_sample_fn
from .schedules import DiffusionSchedule, make_schedule
from .training import TrainState, create_train_state, make_optimizer, train_step

DEBUG_NAN_ENV = "JAX_DDPM_DEBUG_NAN_AT_STEP"
DEBUG_DELAY_ENV = "JAX_DDPM_DEBUG_STEP_DELAY"
EXIT_OK, EXIT_NONFINITE, EXIT_INTERRUPTED = 0, 3, 130
MIN_BATCH_STATS = 16  # fewer images make --bn-stats batch noisy
PLOT_EVERY_S = 30.0  # loss.png is redrawn at a checkpoint at most this often (and always at the end)


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; training stopped (exit status 3)."""


# ----------------------------------------------------------------------------- factories
def build_model(config: TrainConfig) -> UNet:
    m = config.model
    return UNet(img_channels=m.channels, time_emb_dim=m.time_emb_dim, features=tuple(m.features),
                dtype=parallel.compute_dtype(m.dtype))


def build_schedule(config: TrainConfig) -> DiffusionSchedule:
    return make_schedule(config.diffusion.timesteps, config.diffusion.schedule)


def build_optimizer(config: TrainConfig):
    return make_optimizer(config.optim.lr, config.optim.grad_clip or None)


def image_shape(config: TrainConfig) -> tuple[int, int, int]:
    return (config.model.image_size, config.model.image_size, config.model.channels)


def run_keys(seed: int) -> dict[str, jax.Array]:
    """Independent typed keys for initialisation, training noise and sample grids."""
    init_key, train_key, sample_key = jax.random.split(jax.random.key(seed), 3)
    return {"init": init_key, "train": train_key, "sample": sample_key}


def make_init_fn(config: TrainConfig) -> Callable[[jax.Array, DiffusionSchedule], TrainState]:
    """``init(key, schedule) -> TrainState``, jitted (eager init dispatches hundreds of tiny ops)."""
    model, tx, shape = build_model(config), build_optimizer(config), image_shape(config)

    def init(key, schedule):
        return create_train_state(model, key, shape, schedule, tx, config.optim.ema_decay)

    return init


def init_state(config: TrainConfig, key: jax.Array, schedule: DiffusionSchedule) -> TrainState:
    """A fresh TrainState. The initialiser is compiled without XLA's backend optimisations:
    it runs once, and its many random draws otherwise take ~6x longer to compile on CPU."""
    lowered = jax.jit(make_init_fn(config)).lower(key, schedule)
    try:
        compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    except Exception:  # a backend or jax version without the option
        compiled = lowered.compile()
    return compiled(key, schedule)


def abstract_state(config: TrainConfig) -> TrainState:
    """The TrainState's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), computed without FLOPs."""
    return jax.eval_shape(make_init_fn(config), jax.random.key(0), build_schedule(config))


def make_step_fn(mesh: Mesh | None = None,
                 donate: bool = True) -> Callable[[TrainState, np.ndarray, jax.Array], tuple[TrainState, dict]]:
    """``step_fn(state, local_batch, key) -> (state, metrics)``: the one place a train step is
    compiled and fed: ``parallel.make_sharded_train_step`` over ``mesh`` (every device by default).

    ``local_batch`` is this process's NumPy rows of the global batch ([B, H, W, C] in a
    single-process run); the state must be replicated on ``mesh`` (``parallel.shard_state``)
    and is donated; outputs come back replicated.
    """
    return parallel.make_sharded_train_step(parallel.make_mesh() if mesh is None else mesh, train_step,
                                            donate=donate)


# ----------------------------------------------------------------------------- devices
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
        raise ConfigError(f"{what}: cannot join the multi-process run ({_one_line(e)})") from None
    mesh = parallel.make_mesh()
    try:
        sizes = parallel.batch_sizes(config.optim.batch_size, mesh)
    except ValueError as e:
        raise ConfigError(f"--batch-size: {e}") from None
    return Devices(mesh=mesh, sizes=sizes, process_index=jax.process_index(), process_count=jax.process_count())


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


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


# ----------------------------------------------------------------------------- work folder
@dataclass(frozen=True)
class RunFiles:
    workdir: str

    @property
    def config(self) -> str:
        return os.path.join(self.workdir, "config.json")

    @property
    def metrics(self) -> str:
        return os.path.join(self.workdir, "metrics.jsonl")

    @property
    def loss_plot(self) -> str:
        return os.path.join(self.workdir, "loss.png")

    @property
    def samples(self) -> str:
        return os.path.join(self.workdir, "samples.png")

    def step_samples(self, step: int) -> str:
        return os.path.join(self.workdir, "samples", f"step_{step:07d}.png")


def write_json(path: str, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: open(tmp, "w").write(text))


def read_metrics(path: str) -> list[dict]:
    """The metrics lines (skipping a torn last line of a killed run)."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def trim_metrics(path: str, last_step: int) -> list[dict]:
    """Drops lines after ``last_step`` (written by a run that died after its last checkpoint)."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    if os.path.exists(path):
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        atomic_write(path, lambda tmp: open(tmp, "w").write(text))
    return rows


# ----------------------------------------------------------------------------- progress
class Progress:
    """A one-line progress display on stderr (``\\r``) when it is a terminal; plain lines at
    logging points otherwise; nothing with ``quiet``."""

    def __init__(self, total: int, quiet: bool, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.total = total
        self.quiet = quiet
        self.live = (not quiet) and getattr(self.stream, "isatty", lambda: False)()
        self.loss = float("nan")
        self.rate = float("nan")
        self._last_draw = 0.0

    def update(self, step: int, force: bool = False) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.2:
            return
        self._last_draw = now
        width = 24
        done = int(width * step / max(self.total, 1))
        bar = "#" * done + "-" * (width - done)
        self.stream.write(f"\r[{bar}] step {step}/{self.total}  loss {self.loss:.4f}  {self.rate:,.0f} img/s ")
        self.stream.flush()

    def log(self, step: int, loss: float, rate: float) -> None:
        self.loss, self.rate = loss, rate
        if self.live:
            self.update(step, force=True)
        elif not self.quiet:
            self.stream.write(f"step {step}/{self.total}  loss {loss:.4f}  {rate:,.0f} img/s\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self.live:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


class InterruptFlag:
    """Turns the first SIGINT into a flag the loop checks between steps; a second one raises."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            self.raised = True
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: no handler, Ctrl-C raises as usual
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# ----------------------------------------------------------------------------- training
def _check_resume(config: TrainConfig, manager, step: int, data_fp: str) -> dict:
    """Reads the checkpoint's metadata and refuses a run with another identity or data."""
    meta = ckpt.restore_meta(manager, step)
    diff = identity_mismatch(meta.get("identity", {}), identity(config))
    if diff:
        raise ConfigError(f"--workdir {config.workdir} holds a run with other settings ({diff}); "
                          "resume with the same model, data and optimizer options or use a new --workdir")
    saved_fp = meta.get("data_fingerprint")
    if saved_fp is not None and saved_fp != data_fp:
        raise ConfigError(f"--data {config.data.source}: the images differ from those the run in --workdir "
                          f"{config.workdir} was trained on (fingerprint {data_fp}, expected {saved_fp})")
    return meta


def _sample_grid_fn(config: TrainConfig, keys: Mapping[str, jax.Array]) -> Callable[[TrainState], np.ndarray]:
    """``grid(state) -> [N, H, W, C]`` samples from fixed x_T and noise (EMA, eval mode, clipped x0)."""
    sample = make_sample_fn(build_model(config), "ddpm", bn_stats=config.bn_stats, clip_denoised=True)
    x_T = jax.random.normal(jax.random.fold_in(keys["sample"], 0), (config.num_samples,) + image_shape(config))
    noise_key = jax.random.fold_in(keys["sample"], 1)

    def grid(state: TrainState) -> np.ndarray:
        return np.asarray(jax.device_get(sample(state.ema_variables, state.schedule, x_T, noise_key)))

    return grid


def _nonfinite_step(rows: list[tuple[int, float, float]]) -> tuple[int, float, float] | None:
    for row in rows:
        if not (math.isfinite(row[1]) and math.isfinite(row[2])):
            return row
    return None


def train(config: TrainConfig, stream: TextIO | None = None) -> int:
    """Runs ``jax-ddpm train``. Returns the exit status (0, 3 on NaN, 130 on Ctrl-C).

    Raises:
      ConfigError, DataError, CheckpointError: bad input, before anything in the work
        folder is changed.
      NonFiniteLossError: after stopping on a non-finite loss (the last good checkpoint kept).
    """
    stream = stream or sys.stderr
    devices = setup_devices(config)  # first: jax.distributed.initialize must precede any other JAX call
    mesh, primary = devices.mesh, devices.primary
    files = RunFiles(config.workdir)
    images = load_images(config.data.source, config.model.image_size, config.model.channels, config.data.layout)
    if config.optim.batch_size > images.shape[0]:
        raise ConfigError(f"--batch-size {config.optim.batch_size} exceeds the {images.shape[0]} images in "
                          f"--data {config.data.source}")
    data_fp = fingerprint(images)
    steps_done = ckpt.complete_steps(config.workdir)
    schedule = build_schedule(config)
    keys = run_keys(config.seed)

    if steps_done:  # resume: check everything before touching the folder
        start = steps_done[-1]
        reader = ckpt.make_manager(config.workdir, read_only=True)
        meta = _check_resume(config, reader, start, data_fp)
        template = abstract_state(config)
        target = parallel.abstract_replicated(ckpt.state_to_tree(template, jax.random.key_data(keys["train"])), mesh)
        tree = ckpt.restore(reader, start, target)  # arrays come back replicated over the mesh
        reader.close()
        state, train_key = ckpt.tree_to_state(template.replace(schedule=schedule), tree)
        position = DataPosition(*meta["data_position"])
    else:
        start, position, state, train_key = 0, DataPosition(0, 0), None, keys["train"]

    progress = Progress(config.steps, config.quiet or not primary, stream)
    if start >= config.steps:
        if primary and not os.path.exists(files.samples):  # killed between the last checkpoint and the grid
            save_grid(files.samples, _sample_grid_fn(config, keys)(local_copy(state)))
        progress.message(f"{config.workdir}: already at step {start} (--steps {config.steps}); nothing to train")
        return EXIT_OK

    os.makedirs(config.workdir, exist_ok=True)
    if primary:
        # the XLA_FLAGS this session ran with (jax-ddpm --xla-flags): a record, not part of the identity
        write_json(files.config, dict(to_dict(config), version=1, parallel=devices.sizes,
                                      xla_flags=os.environ.get("XLA_FLAGS", "")))
        history = trim_metrics(files.metrics, start)
    else:
        history = []
    progress.message(devices.describe())
    if state is None:
        state = init_state(config, keys["init"], schedule)
    else:
        progress.message(f"resuming {config.workdir} from step {start}")
    parallel.check_float32_state(state)  # --dtype bfloat16 is compute only
    state, train_key = parallel.shard_state(state, mesh), parallel.shard_state(train_key, mesh)
    manager = ckpt.make_manager(config.workdir, keep=config.keep_checkpoints)
    ident = identity(config)

    def save(step: int) -> None:
        """Called by every process (orbax coordinates a multi-process save)."""
        meta = {"identity": ident, "data_fingerprint": data_fp, "data_position": list(iterator.position),
                "num_images": int(images.shape[0]), "parallel": devices.sizes}
        ckpt.save(manager, step, ckpt.state_to_tree(state, train_key), meta)

    last_plot = [-float("inf")]

    def plot(force: bool = False) -> None:
        """Redraws loss.png (matplotlib takes ~0.5 s: at most every PLOT_EVERY_S, and at the end)."""
        if primary and history and (force or time.monotonic() - last_plot[0] >= PLOT_EVERY_S):
            save_loss_plot(files.loss_plot, [r["step"] for r in history], [r["loss"] for r in history])
            last_plot[0] = time.monotonic()

    step_fn = make_step_fn(mesh)
    sample_grid = _sample_grid_fn(config, keys)  # compiled at its first call

    def grid(state: TrainState) -> np.ndarray:
        return sample_grid(local_copy(state))  # one device, not the whole mesh

    iterator = BatchIterator(images, config.optim.batch_size, config.seed, position)
    nan_at = int(os.environ.get(DEBUG_NAN_ENV, "0") or 0)
    delay = float(os.environ.get(DEBUG_DELAY_ENV, "0") or 0)
    batch_size = config.optim.batch_size
    pending: list[tuple[int, dict]] = []
    last_good = start if steps_done else None
    step = start
    timer_step, timer = step, time.perf_counter()
    first_step_done = False

    def flush_metrics() -> None:
        """Fetches the pending losses (one host sync), stops on NaN, appends a metrics line.

        Every process runs it (the metrics are replicated, so all of them stop together)."""
        nonlocal timer_step, timer
        if not pending:
            return
        fetched = jax.device_get(local_copy([m for _, m in pending]))
        rows = [(s, float(m["loss"]), float(m["grad_norm"])) for (s, _), m in zip(pending, fetched)]
        pending.clear()
        bad = _nonfinite_step(rows)
        if bad is not None:
            kept = (f"the last good checkpoint is step {last_good} in {ckpt.checkpoint_dir(config.workdir)}"
                    if last_good is not None else "no checkpoint was saved")
            raise NonFiniteLossError(f"loss became {bad[1]} (gradient norm {bad[2]}) at step {bad[0]}; "
                                     f"training stopped, {kept}")
        now = time.perf_counter()
        rate = batch_size * (step - timer_step) / max(now - timer, 1e-9)
        row = {"step": step, "loss": float(np.mean([r[1] for r in rows])), "grad_norm": rows[-1][2],
               "images_per_s": round(rate, 2), "lr": config.optim.lr, "epoch": int(iterator.position[0]),
               "time": round(time.time(), 3)}
        if primary:
            history.append(row)
            with open(files.metrics, "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        progress.log(step, row["loss"], rate)
        timer_step, timer = step, now

    status = EXIT_OK
    try:
        with InterruptFlag() as interrupt:
            while step < config.steps:
                # Every process draws the same global indices and keeps its own rows.
                indices = parallel.host_local_batch_indices(iterator.next_indices(), devices.process_index,
                                                            devices.process_count)
                batch = images[indices]  # [B / processes, H, W, C] float32
                if nan_at and step + 1 == nan_at:
                    batch = np.full_like(batch, np.nan)
                state, metrics = step_fn(state, batch, train_key)
                step += 1
                pending.append((step, metrics))
                if not first_step_done:  # the first step includes compilation: keep it out of img/s
                    jax.block_until_ready(metrics)
                    first_step_done = True
                    progress.message(f"compiled and ran the first step in {time.perf_counter() - timer:.1f}s")
                    timer_step, timer = step, time.perf_counter()
                at_log = step % config.log_every == 0
                at_checkpoint = step % config.checkpoint_every == 0 or step == config.steps
                if devices.process_count == 1:
                    stop = interrupt.raised
                else:  # processes must agree on where to stop: only at steps every one of them checks
                    stop = (at_log or at_checkpoint) and any_process(interrupt.raised, devices)
                at_checkpoint = at_checkpoint or stop
                if at_log or at_checkpoint:
                    flush_metrics()  # raises NonFiniteLossError before a bad state is saved
                if at_checkpoint:
                    save(step)
                    last_good = step
                    plot()
                    timer_step, timer = step, time.perf_counter()  # checkpoint time is not training time
                if config.sample_every and step % config.sample_every == 0 and step < config.steps and not stop:
                    if primary:
                        os.makedirs(os.path.dirname(files.step_samples(step)), exist_ok=True)
                        save_grid(files.step_samples(step), grid(state))
                    timer_step, timer = step, time.perf_counter()  # sampling time is not training time
                progress.update(step)
                if delay:
                    time.sleep(delay)
                if stop:
                    status = EXIT_INTERRUPTED
                    break
    finally:
        progress.close()
        manager.close()
    if status == EXIT_INTERRUPTED:
        plot(force=True)
        if primary:
            print(f"jax-ddpm: interrupted; saved checkpoint {step} in {ckpt.checkpoint_dir(config.workdir)}",
                  file=stream)
        return status
    if primary:
        t0 = time.perf_counter()
        save_grid(files.samples, grid(state))
        progress.message(f"sampled {config.num_samples} images in {time.perf_counter() - t0:.1f}s")
        plot(force=True)
        if not config.quiet:
            print(f"trained {config.workdir} to step {step}; samples: {files.samples}")
    return EXIT_OK


# ----------------------------------------------------------------------------- loading a run
@dataclass(frozen=True)
class LoadedRun:
    config: TrainConfig
    step: int
    state: TrainState
    meta: dict


def load_run(workdir: str, step: int | None = None) -> LoadedRun:
    """The TrainState of checkpoint ``step`` (latest if None) and its config.

    Raises:
      CheckpointError: no checkpoint, no such step, or an unreadable checkpoint.
    """
    steps = ckpt.complete_steps(workdir)
    if not steps:
        raise ckpt.CheckpointError(f"--workdir {workdir}: no checkpoint found (run jax-ddpm train first)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ckpt.CheckpointError(f"--steps {step}: no checkpoint for this step in {workdir} "
                                   f"(have {', '.join(map(str, steps))})")
    manager = ckpt.make_manager(workdir, read_only=True)
    try:
        meta = ckpt.restore_meta(manager, step)
        try:
            config = train_config_from_identity(workdir, meta["identity"])
        except (KeyError, TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{ckpt.checkpoint_dir(workdir)}/{step}: unreadable run settings ({e})") from None
        template = abstract_state(config)
        key_like = jax.random.key_data(jax.random.key(0))
        # onto one device, whatever mesh the run was trained on (orbax otherwise insists on its topology)
        one_device = parallel.make_mesh(jax.local_devices()[:1])
        tree = ckpt.restore(manager, step, parallel.abstract_replicated(ckpt.state_to_tree(template, key_like),
                                                                        one_device))
    finally:
        manager.close()
    state, _ = ckpt.tree_to_state(template.replace(schedule=build_schedule(config)), tree)
    return LoadedRun(config=config, step=step, state=state, meta=meta)


# ----------------------------------------------------------------------------- sampling
def read_noise_file(path: str, timesteps: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``x_T`` [N, H, W, C] and ``noises`` [T, N, H, W, C] (float32, NHWC) from an .npz."""
    try:
        with np.load(path, allow_pickle=False) as f:
            x_T, noises = np.asarray(f["x_T"], np.float32), np.asarray(f["noises"], np.float32)
    except KeyError as e:
        raise ConfigError(f"--noise {path}: lacks array {e} (needs x_T and noises)") from None
    except Exception as e:
        raise ConfigError(f"--noise {path}: not a readable .npz file ({' '.join(str(e).split())})") from None
    if x_T.ndim != 4 or x_T.shape[1:] != shape:
        raise ConfigError(f"--noise {path}: x_T has shape {x_T.shape}, expected [N, {', '.join(map(str, shape))}]")
    if noises.shape != (timesteps,) + x_T.shape:
        raise ConfigError(f"--noise {path}: noises has shape {noises.shape}, expected {(timesteps,) + x_T.shape}")
    return x_T, noises


@functools.lru_cache(maxsize=8)
def _cached_sample_fn(model_config, sampler: str, bn_stats: str, clip_denoised: bool | None):
    """One compiled sampler per model and options within a process (repeated ``sample`` calls)."""
    options = {} if clip_denoised is None else {"clip_denoised": clip_denoised}
    model = build_model(TrainConfig(workdir="", model=model_config))
    return make_sample_fn(model, sampler, bn_stats=bn_stats, **options)


def write_samples(path: str, samples: np.ndarray) -> None:
    """``.png``: one grid; ``.npz``: ``samples`` float32 [N, H, W, C] in [-1, 1] and ``images`` uint8."""
    if path.lower().endswith(".npz"):
        atomic_write(path, lambda tmp: np.savez(tmp, samples=samples.astype(np.float32), images=to_uint8(samples)))
    else:
        save_grid(path, samples)


def sample(config: SampleConfig, stream: TextIO | None = None) -> int:
    """Runs ``jax-ddpm sample``: EMA weights, eval mode, one compiled chain. Returns 0."""
    run = load_run(config.workdir, config.step)
    shape = image_shape(run.config)
    timesteps = run.config.diffusion.timesteps
    if config.noise is not None:
        x_T, noise = read_noise_file(config.noise, timesteps, shape)
    else:
        key = jax.random.key(config.seed)
        x_T = jax.random.normal(jax.random.fold_in(key, 0), (config.num,) + shape)
        noise = jax.random.fold_in(key, 1)
    sample_fn = _cached_sample_fn(run.config.model, config.sampler, config.bn_stats,
                                  config.clip_denoised if config.sampler == "ddpm" else None)
    if config.bn_stats == "batch" and x_T.shape[0] < MIN_BATCH_STATS:
        print(f"jax-ddpm: warning: {x_T.shape[0]} images are few for --bn-stats batch (each image is "
              f"normalised with the batch's statistics); use {MIN_BATCH_STATS} or more, or --bn-stats running",
              file=sys.stderr)
    samples = np.asarray(jax.device_get(sample_fn(run.state.ema_variables, run.state.schedule, x_T, noise)))
    write_samples(config.out, samples)
    print(f"wrote {samples.shape[0]} samples from step {run.step} to {config.out}", file=stream or sys.stdout)
    return EXIT_OK


# ----------------------------------------------------------------------------- convert
def export_weights(config: ConvertConfig, stream: TextIO | None = None) -> int:
    """``convert --out``: the EMA weights (and BatchNorm statistics) under torch_ref's names."""
    run = load_run(config.workdir, config.step)
    m, d = run.config.model, run.config.diffusion
    state_dict = to_torch_state_dict(jax.device_get(run.state.ema_variables))
    metadata = metadata_for(m.channels, m.time_emb_dim, m.features, d.timesteps, d.schedule)
    metadata.update(image_size=str(m.image_size), step=str(run.step))
    atomic_write(config.out, lambda tmp: save_safetensors(tmp, state_dict, metadata))
    print(f"wrote {len(state_dict)} tensors (EMA weights, step {run.step}) to {config.out}",
          file=stream or sys.stdout)
    return EXIT_OK


def _int_meta(path: str, meta: Mapping[str, str], key: str) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        raise ConfigError(f"--from-torch {path}: metadata {key}={meta.get(key)!r} is missing or not an integer") from None


def import_weights(config: ConvertConfig, stream: TextIO | None = None) -> int:
    """``convert --from-torch``: a safetensors file -> checkpoint 0 of a new work folder (for sample)."""
    from .config import DiffusionConfig, ModelConfig, TrainConfig as _TrainConfig, check_image_size, parse_features

    path = config.from_torch
    if ckpt.complete_steps(config.workdir) or os.path.exists(RunFiles(config.workdir).config):
        raise ConfigError(f"--workdir {config.workdir}: already holds a run; import into a new --workdir")
    try:
        tensors, meta = load_safetensors(path)
    except ValueError as e:  # "<path>: not a readable safetensors file (...)"
        raise ConfigError(f"--from-torch {e}") from None
    missing = [k for k in ("img_channels", "time_emb_dim", "features", "timesteps", "schedule") if k not in meta]
    if missing:
        raise ConfigError(f"--from-torch {path}: metadata lacks {', '.join(missing)}")
    try:
        features = parse_features(meta["features"])
        image_size = check_image_size(int(meta["image_size"])) if "image_size" in meta else config.image_size
        model = ModelConfig(image_size=image_size, channels=_int_meta(path, meta, "img_channels"),
                            features=features, time_emb_dim=_int_meta(path, meta, "time_emb_dim"))
        diffusion = DiffusionConfig(timesteps=_int_meta(path, meta, "timesteps"), schedule=meta["schedule"])
        if model.channels not in (1, 3) or diffusion.timesteps < 1 or diffusion.schedule not in ("linear", "cosine"):
            raise ConfigError("bad img_channels, timesteps or schedule")
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"--from-torch {path}: bad metadata ({e})") from None
    run_config = _TrainConfig(workdir=config.workdir, model=model, diffusion=diffusion)
    template = abstract_state(run_config)
    like = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),  # convert.py compares arrays
                                  {"params": template.params, "batch_stats": template.batch_stats})
    try:
        variables = from_torch_state_dict(tensors, like=like)
    except ValueError as e:
        raise ConfigError(f"--from-torch {path}: {e}") from None
    for leaf_path, ref in jax.tree_util.tree_leaves_with_path(like):
        got = variables
        for k in leaf_path:
            got = got[k.key]
        if np.dtype(got.dtype) != np.dtype(ref.dtype):
            raise ConfigError(f"--from-torch {path}: tensor {jax.tree_util.keystr(leaf_path)} is {got.dtype}, "
                              f"expected {ref.dtype}")
    schedule = build_schedule(run_config)
    keys = run_keys(run_config.seed)
    state = init_state(run_config, keys["init"], schedule)
    params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
    state = state.replace(params=params, ema_params=jax.tree_util.tree_map(jnp.copy, params),
                          batch_stats=jax.tree_util.tree_map(jnp.asarray, variables["batch_stats"]))
    os.makedirs(config.workdir, exist_ok=True)
    write_json(RunFiles(config.workdir).config, dict(to_dict(run_config), version=1, imported_from=path))
    manager = ckpt.make_manager(config.workdir, keep=run_config.keep_checkpoints)
    ckpt.save(manager, 0, ckpt.state_to_tree(state, keys["train"]),
              {"identity": identity(run_config), "data_fingerprint": None, "data_position": [0, 0],
               "num_images": None, "imported_from": path})
    manager.close()
    print(f"imported {path} into {config.workdir} (checkpoint 0)", file=stream or sys.stdout)
    return EXIT_OK


__all__ = [
    "Devices", "EXIT_INTERRUPTED", "EXIT_NONFINITE", "EXIT_OK", "LoadedRun", "NonFiniteLossError", "Progress", "RunFiles",
    "abstract_state", "build_model", "build_optimizer", "build_schedule", "export_weights", "image_shape",
    "import_weights", "init_state", "load_run", "local_copy", "make_init_fn", "make_step_fn", "read_noise_file",
    "run_keys", "sample", "setup_devices", "train", "write_samples",
]
