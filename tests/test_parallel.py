"""Data-parallel training (jax_ddpm.parallel): N sharded devices == one device, same global batch.

The sharded cases run in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
(the flag must be set before JAX starts, and must not leak into other tests). The
subprocess is this file run as a script; it prints one ``RESULT {json}`` line of measured
numbers, and the tests below compare them with tolerances. The same subprocess also runs
the bfloat16 step of ``test_bf16`` against its float32 reference step (one compile less).

Reference: ``jax.jit(training.train_step)`` on one device with the whole global batch.
Sharded: ``parallel.make_sharded_train_step`` on a 4-device mesh, the batch split 2 rows per
device. Model: UNet(3, 32, (8, 16, 32, 64)), 16x16 images, global batch 8, Adam lr 1e-3.

Measured (jax 0.10.2, CPU, forced 4 host devices; max abs differences after one step):
  loss                      1.2e-7 (1.1e-7 relative)  tolerance 1e-6 relative
  BN running mean/var       6.0e-8                    tolerance 6e-7
  gradients (Adam mu / 0.1) 3.3e-8 (|g| <= ~0.1)      tolerance 3e-7
  grad^2 (Adam nu / 0.001)  2.3e-9                    tolerance 3e-7
  params, |g| >= 1e-5       1.5e-8                    tolerance 2e-7
  params, all elements      3.4e-5                    not tested: Adam's first step is
      lr * g / (|g| + 1e-8), so where |g| ~ 1e-8 a 1e-9 change of g moves the update by up
      to ~lr/10. Float summation order meeting an ill-conditioned update, not a bug.
Control (shows the comparison can fail): the same loss with BatchNorm statistics taken per
2-row shard (what per-device BN would compute) differs from the global-batch loss by 9.3e-4.

Why 16x16 and not 8x8: at 8x8 the 2x2 and 1x1 feature maps hold so few values per BN
channel that one ReLU pre-activation sits within rounding of 0; there the *single-device*
float32 gradient itself differs from a float64 run by 7.9e-4 (and the sharded one agrees
with either, depending on the rounding), so 8x8 measures the model's conditioning, not
sharding. At 16x16 all three agree to ~3e-8.

The two-process test (``-m slow``, ~2-3 min on 2 shared cores) runs two JAX processes on
this machine (CPU collectives are gloo, the default since jax 0.5.1), 2 CPU devices each,
each feeding its 4 rows of the global batch of 8, and checks the same equality (measured:
loss 2.2e-7 relative, BN 6.0e-8, gradients 3.0e-8, params 1.5e-8) plus an orbax checkpoint
written by both processes, restored replicated by both (bit-exact) and by a third,
single-device process (bit-exact).
"""
from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FEATURES = (8, 16, 32, 64)
IMAGE_SHAPE = (16, 16, 3)  # (H, W, C)
GLOBAL_BATCH = 8
LR = 1e-3
TIMESTEPS = 100
EMA_DECAY = 0.9  # on, so the EMA path runs (sharded, bf16) too
WELL_CONDITIONED_GRAD = 1e-5  # |g| above which Adam's first update is insensitive to g's rounding

# Tolerances (float32, CPU); the measured values are in the module docstring.
LOSS_RTOL = 1e-6
BN_ATOL = 6e-7
GRAD_ATOL = 3e-7
PARAM_ATOL = 2e-7
LOCAL_BN_MIN_GAP = 1e-4  # the control must differ by far more than the tolerances


# ----------------------------------------------------------------------------- shared helpers
def tiny_train_state(dtype=None, seed: int = 0):
    """A TrainState for the tiny UNet with parameters drawn by NumPy.

    ``model.init`` is not run: jitted or eager it costs ~30 CPU-seconds on this model (XLA
    compiling the threefry draws), more than the steps under test. The values only need to
    be generic, drawn like torch's: conv/dense kernels and biases U(+-1/sqrt(fan_in)); BN
    scale U(0.9, 1.1) and bias U(+-0.1). BN statistics start at torch's (0, 1, 0).
    """
    import jax
    import jax.numpy as jnp

    from jax_ddpm import UNet, make_optimizer, make_schedule
    from jax_ddpm.training import train_state_from_variables

    model = UNet(IMAGE_SHAPE[-1], 32, FEATURES, **({} if dtype is None else {"dtype": dtype}))
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1,) + IMAGE_SHAPE), jnp.zeros((1,), jnp.int32),
                                                 train=True), jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        module = shapes["params"]
        for k in path[:-1]:
            module = module[k.key]
        if path[-1].key == "scale":  # BatchNorm
            return rng.uniform(0.9, 1.1, s.shape).astype(np.float32)
        if "kernel" not in module:  # BatchNorm bias
            return rng.uniform(-0.1, 0.1, s.shape).astype(np.float32)
        bound = 1.0 / np.sqrt(np.prod(module["kernel"].shape[:-1]))  # torch's bound for kernel and bias
        return rng.uniform(-bound, bound, s.shape).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
    batch_stats = jax.tree_util.tree_map_with_path(
        lambda p, s: np.ones(s.shape, s.dtype) if p[-1].key == "var" else np.zeros(s.shape, s.dtype),
        shapes["batch_stats"])
    tx = make_optimizer(LR)
    return train_state_from_variables({"params": params, "batch_stats": batch_stats}, model.apply, tx,
                                      make_schedule(TIMESTEPS), ema_decay=EMA_DECAY)


def tiny_batch(n: int, seed: int = 1) -> np.ndarray:
    """[n, H, W, C] float32 images in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1, 1, (n,) + IMAGE_SHAPE).astype(np.float32)


def _max_abs(a, b) -> float:
    import jax
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def compare_states(sharded, sharded_metrics, ref, ref_metrics) -> dict:
    """Measured differences between a sharded step's outputs and the reference step's."""
    import jax
    mu_s, mu_r = sharded.opt_state[0].mu, ref.opt_state[0].mu  # Adam's mu = (1 - b1) * g after step 1
    nu_s, nu_r = sharded.opt_state[0].nu, ref.opt_state[0].nu
    conditioned = []
    for p_s, p_r, g in zip(*(jax.tree_util.tree_leaves(t) for t in (sharded.params, ref.params, mu_r))):
        mask = np.abs(np.asarray(g)) / 0.1 >= WELL_CONDITIONED_GRAD
        conditioned.append(float(np.max(np.abs(np.asarray(p_s) - np.asarray(p_r))[mask], initial=0.0)))
    return {
        "loss_sharded": float(sharded_metrics["loss"]), "loss_ref": float(ref_metrics["loss"]),
        "grad_norm_sharded": float(sharded_metrics["grad_norm"]), "grad_norm_ref": float(ref_metrics["grad_norm"]),
        "bn_stats": _max_abs(sharded.batch_stats, ref.batch_stats),
        "grads": _max_abs(mu_s, mu_r) / 0.1,
        "grad_sq": _max_abs(nu_s, nu_r) / 0.001,
        "params_well_conditioned": max(conditioned),
        "params_all": _max_abs(sharded.params, ref.params),
        "ema_all": _max_abs(sharded.ema_params, ref.ema_params),
        "step": [int(sharded.step), int(ref.step)],
    }


# ----------------------------------------------------------------------------- subprocess workers
def _worker_sharded() -> dict:
    """Runs in a process with 4 forced CPU devices; returns the measured numbers."""
    import jax
    import jax.numpy as jnp

    from jax_ddpm import parallel
    from jax_ddpm.training import loss_fn, draw_t_and_noise, train_step

    assert jax.device_count() == 4, jax.devices()
    state, x = tiny_train_state(), tiny_batch(GLOBAL_BATCH)
    key = jax.random.PRNGKey(1)
    ref, ref_metrics = jax.device_get(jax.jit(train_step)(state, jnp.asarray(x), key))

    mesh = parallel.make_mesh()
    step = parallel.make_sharded_train_step(mesh)
    s_state = parallel.shard_state(state, mesh)
    out, metrics = step(s_state, x, key)  # NumPy batch and an unplaced key, as the train loop passes them
    s_batch, s_key = parallel.make_global_batch(x, mesh), parallel.shard_state(key, mesh)
    hlo = step.jitted.lower(parallel.shard_state(state, mesh), s_batch, s_key).compile().as_text()  # cached
    out_replicated = [leaf.sharding.is_equivalent_to(parallel.replicated(mesh), leaf.ndim)
                      for leaf in jax.tree_util.tree_leaves((out, metrics))]
    typed_key = parallel.shard_state(jax.random.key(3), mesh)
    result = compare_states(jax.device_get(out), jax.device_get(metrics), ref, ref_metrics)

    # Control: BatchNorm over each device's 2 rows instead of the global batch.
    t, noise = draw_t_and_noise(key, state.step, jnp.asarray(x), TIMESTEPS)
    shards = lambda a: a.reshape((4, GLOBAL_BATCH // 4) + a.shape[1:])  # noqa: E731
    local = jax.jit(jax.vmap(lambda x0, tt, nn: loss_fn(state.params, state.batch_stats, state.apply_fn,
                                                        state.schedule, x0, tt, nn)[0]))
    result["loss_local_bn"] = float(jnp.mean(local(shards(jnp.asarray(x)), shards(t), shards(noise))))

    from test_bf16 import measure_bf16  # against this process's float32 step (one compile less)
    result["bf16"] = measure_bf16(x, key, state, ref, ref_metrics)

    errors = []
    for bad in (6, 10):
        try:
            step(out, tiny_batch(bad) if bad == 6 else jnp.asarray(tiny_batch(bad)), s_key)
        except ValueError as e:
            errors.append(str(e))
    result.update({
        "batch_shard_shapes": [list(sh.data.shape) for sh in s_batch.addressable_shards],
        "outputs_replicated": all(out_replicated),
        "typed_key": [str(typed_key.dtype), typed_key.sharding.is_equivalent_to(parallel.replicated(mesh), 0)],
        "all_reduce_ops": hlo.count("all-reduce("),
        "batch_sizes": parallel.batch_sizes(GLOBAL_BATCH, mesh),
        "indivisible_errors": errors,
    })
    return result


def _worker_multiprocess(out_dir: str) -> dict:
    """One of two processes (env: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)."""
    from jax_ddpm import parallel
    assert parallel.maybe_initialize_distributed(False)  # the environment asks for it
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from jax_ddpm.training import train_step

    pid, nproc = jax.process_index(), jax.process_count()
    data = tiny_batch(2 * GLOBAL_BATCH)  # the "data set": every process can read every row
    global_idx = np.random.default_rng(7).permutation(len(data))[:GLOBAL_BATCH]  # same on every process
    local_idx = parallel.host_local_batch_indices(global_idx, pid, nproc)
    state, key = tiny_train_state(), jax.random.PRNGKey(1)
    ref, ref_metrics = jax.device_get(jax.jit(train_step)(state, jnp.asarray(data[global_idx]), key))

    mesh = parallel.make_mesh()
    step = parallel.make_sharded_train_step(mesh)
    # As the train loop calls it: this process's NumPy rows and an unplaced key.
    out, metrics = step(parallel.shard_state(state, mesh), data[local_idx], key)
    result = compare_states(jax.device_get(out), jax.device_get(metrics), ref, ref_metrics)
    result.update({"process_index": pid, "process_count": nproc, "device_count": jax.device_count(),
                   "local_device_count": jax.local_device_count(), "local_idx": local_idx.tolist(),
                   "batch_sizes": parallel.batch_sizes(GLOBAL_BATCH, mesh)})

    # Every process calls save; orbax writes each replicated array once and commits once.
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(out_dir, "ckpt"), {"params": out.params, "batch_stats": out.batch_stats,
                                              "step": out.step})
    ckpt.wait_until_finished()
    saved = {"params": out.params, "batch_stats": out.batch_stats, "step": out.step}
    restored = ckpt.restore(os.path.join(out_dir, "ckpt"), parallel.abstract_replicated(saved, mesh))
    pairs = list(zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(saved)))
    result["restored_replicated"] = all(a.sharding.is_equivalent_to(parallel.replicated(mesh), a.ndim)
                                        for a, _ in pairs)
    result["restored_exact"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)
    if pid == 0:
        flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in
                jax.tree_util.tree_leaves_with_path(jax.device_get(out.params))}
        np.savez(os.path.join(out_dir, "sharded_params.npz"), **flat)
    return result


# ----------------------------------------------------------------------------- fixtures
def _run_worker(args: list[str], env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env_extra}
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve())] + args, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, timeout: float) -> dict:
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"worker failed (rc={proc.returncode}):\n{out}\n{err[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@functools.lru_cache(maxsize=None)
def sharded_worker_result() -> dict:
    """Runs ``_worker_sharded`` once per pytest session (test_bf16 reads its ``bf16`` part)."""
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    return _result(_run_worker(["sharded"], {"XLA_FLAGS": flags}), 600)


@pytest.fixture(scope="module")
def sharded() -> dict:
    return sharded_worker_result()


# ----------------------------------------------------------------------------- 4 forced devices
def test_batch_is_split_along_data(sharded):
    assert sharded["batch_shard_shapes"] == [[GLOBAL_BATCH // 4, *IMAGE_SHAPE]] * 4
    assert sharded["batch_sizes"] == {"global_batch": 8, "per_device_batch": 2, "per_process_batch": 8,
                                      "num_devices": 4, "num_processes": 1}


def test_state_and_metrics_come_back_replicated(sharded):
    assert sharded["outputs_replicated"]
    assert sharded["typed_key"] == ["key<fry>", True]
    assert sharded["step"] == [1, 1]


def test_batch_reductions_are_cross_device(sharded):
    # GSPMD turns the batch means (BN statistics, loss) and the gradient sum into all-reduces.
    assert sharded["all_reduce_ops"] > 0


def test_sharded_loss_equals_single_device(sharded):
    np.testing.assert_allclose(sharded["loss_sharded"], sharded["loss_ref"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(sharded["grad_norm_sharded"], sharded["grad_norm_ref"], rtol=LOSS_RTOL)


def test_sharded_batchnorm_stats_equal_single_device(sharded):
    assert sharded["bn_stats"] <= BN_ATOL


def test_sharded_gradients_equal_single_device(sharded):
    assert sharded["grads"] <= GRAD_ATOL
    assert sharded["grad_sq"] <= GRAD_ATOL


def test_sharded_params_equal_single_device(sharded):
    assert sharded["params_well_conditioned"] <= PARAM_ATOL


def test_per_device_batchnorm_would_be_detected(sharded):
    gap = abs(sharded["loss_local_bn"] - sharded["loss_ref"])
    assert gap > LOCAL_BN_MIN_GAP > LOSS_RTOL * abs(sharded["loss_ref"])


def test_indivisible_global_batch_is_refused(sharded):
    assert sharded["indivisible_errors"] == [
        "global batch size 6 is not divisible by the number of devices 4; use a multiple of 4",
        "global batch size 10 is not divisible by the number of devices 4; use a multiple of 4",
    ]


# ----------------------------------------------------------------------------- pure helpers, in process
def test_host_local_batch_indices_partition_the_global_batch():
    from jax_ddpm.parallel import host_local_batch_indices
    global_idx = np.array([5, 3, 9, 0, 7, 1, 4, 8])
    parts = [host_local_batch_indices(global_idx, p, 4) for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), global_idx)
    np.testing.assert_array_equal(parts[2], [7, 1])


@pytest.mark.parametrize("batch, index, count, message", [
    (8, 0, 3, "global batch size 8 is not divisible by the number of processes 3"),
    (8, 2, 2, "process_index must be in [0, 2), got 2"),
])
def test_host_local_batch_indices_rejects(batch, index, count, message):
    from jax_ddpm.parallel import host_local_batch_indices
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        host_local_batch_indices(np.arange(batch), index, count)


def test_single_device_mesh_and_batch_check():
    import jax

    from jax_ddpm import parallel
    mesh = parallel.make_mesh(jax.devices()[:1])
    assert mesh.axis_names == ("data",) and mesh.devices.size == 1
    parallel.check_global_batch(3, mesh)
    with pytest.raises(ValueError, match="global batch size 0 is not divisible"):
        parallel.check_global_batch(0, mesh)


def test_abstract_replicated_is_a_restore_target():
    import jax

    from jax_ddpm import parallel
    mesh = parallel.make_mesh(jax.devices()[:1])
    target = parallel.abstract_replicated({"w": np.zeros((2, 3), np.float32), "step": np.int32(4)}, mesh)
    assert target["w"] == jax.ShapeDtypeStruct((2, 3), np.float32, sharding=parallel.replicated(mesh))
    assert target["step"].shape == () and target["step"].sharding == parallel.replicated(mesh)


def test_distributed_not_initialized_unless_asked():
    from jax_ddpm.parallel import maybe_initialize_distributed
    assert maybe_initialize_distributed(False, env={}) is False
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer, got 'two'"):
        maybe_initialize_distributed(False, env={"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "two"})


# ----------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_single_process_and_checkpoint_once(tmp_path):
    import jax
    import orbax.checkpoint as ocp

    port, nproc = _free_port(), 2
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    procs = [_run_worker(["multiprocess", str(tmp_path)],
                         {"XLA_FLAGS": flags, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                          "JAX_NUM_PROCESSES": str(nproc), "JAX_PROCESS_ID": str(i)}) for i in range(nproc)]
    results = [_result(p, 600) for p in procs]
    print("two processes:", json.dumps(results))
    for i, r in enumerate(results):
        assert (r["process_index"], r["process_count"], r["device_count"], r["local_device_count"]) == (i, 2, 4, 2)
        assert r["batch_sizes"]["per_device_batch"] == 2 and r["batch_sizes"]["per_process_batch"] == 4
        np.testing.assert_allclose(r["loss_sharded"], r["loss_ref"], rtol=LOSS_RTOL)
        assert r["bn_stats"] <= BN_ATOL and r["grads"] <= GRAD_ATOL
        assert r["params_well_conditioned"] <= PARAM_ATOL
        assert r["restored_replicated"] and r["restored_exact"]  # every process restores the whole state
    assert sorted(results[0]["local_idx"] + results[1]["local_idx"]) == sorted(
        np.random.default_rng(7).permutation(2 * GLOBAL_BATCH)[:GLOBAL_BATCH].tolist())

    # The checkpoint both processes wrote restores, in this single process, to the sharded result.
    expected = dict(np.load(tmp_path / "sharded_params.npz"))
    like = tiny_train_state()
    target = {"params": jax.tree_util.tree_map(np.asarray, like.params),
              "batch_stats": jax.tree_util.tree_map(np.asarray, like.batch_stats), "step": np.zeros((), np.int32)}
    restored = ocp.StandardCheckpointer().restore(tmp_path / "ckpt", target)
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(restored["params"])}
    assert flat.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(flat[name], expected[name], err_msg=name)
    assert int(restored["step"]) == 1


# ----------------------------------------------------------------------------- script entry
if __name__ == "__main__":
    start, cpu = time.time(), time.process_time()
    if sys.argv[1] == "sharded":
        res = _worker_sharded()
    elif sys.argv[1] == "multiprocess":
        res = _worker_multiprocess(sys.argv[2])
    else:
        raise SystemExit(f"unknown worker {sys.argv[1]!r}")
    res["wall_s"], res["cpu_s"] = time.time() - start, time.process_time() - cpu
    print("RESULT " + json.dumps(res), flush=True)
