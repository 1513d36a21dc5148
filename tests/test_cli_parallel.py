"""`jax-ddpm train` over several devices: 4 forced CPU devices end to end, the batch check,
--distributed errors, --dtype bfloat16 through the sharded step, and (``-m slow``) two
processes on this machine.

Every run is a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (the
flag must be set before JAX starts and must not leak into other tests), on the tiny model
of ``cli_util``. The 1-device reference is the session's shared tiny run (same options,
same seed), so only the multi-device runs are extra.

Measured (jax 0.10.2, CPU, 2 shared cores; tiny model, 8x8 digits, global batch 16):
  metrics.jsonl loss (mean of the steps since the last line) against the 1-device run:
                 4 devices        2 processes x 2 devices    tolerance
    steps 1-5    1.7e-7 relative  1.8e-6                     2e-5
    steps 6-10   1.0e-5           2.5e-4                     1e-3
    (steps 16-20, 4 devices: 2.5e-4; not tested, see below)
  The step-1 states agree to float32 rounding (tests/test_parallel.py); after that the
  runs drift apart slowly, because at 8x8 a few BatchNorm channels see only 2x2 or 1x1 maps
  and Adam's update lr * g / (|g| + eps) turns a rounding-level change of a tiny gradient
  into a visible move (tests/test_parallel.py explains both). The drift is a property of
  float32 on this model, not of sharding. Control: BatchNorm statistics per device (4 rows
  each, a vmap over the shards of the first batch) change the first step's loss by 1.0e-3
  relative, 50x the steps 1-5 tolerance.
  A 4-device run resumed from a checkpoint ends bit-identical to one that never stopped.
  bfloat16 vs float32, 4 devices, loss of steps 1-5: 2.2e-4 relative (tolerance 3e-3).
  Wall time of the 4-device 10-step tiny run (compile included, persistent cache cold for
  it): 40-70 s; the whole module without -m slow: 100-150 s (machine load) beyond the
  shared 1-device run.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from cli_util import TINY, cli_env, runner_cmd, shared_run, train_cmd
from jax_ddpm import checkpoint as ckpt

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

DEVICES = 4
BATCH = int(TINY[TINY.index("--batch-size") + 1])  # 16: 4 per device
LOSS_RTOL = {5: 2e-5, 10: 1e-3}  # metrics row -> tolerance against the 1-device run (measured above)
BF16_LOSS_RTOL = 3e-3
MULTI_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env(tmp_path_factory, devices: int = DEVICES, **extra) -> dict:
    env = cli_env(tmp_path_factory, **extra)
    env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    for name in list(env):  # no cluster for jax.distributed to detect unless a test sets one
        if name.startswith(("SLURM_", "OMPI_", "PMI_")) or (name in MULTI_ENV and name not in extra):
            del env[name]
    return env


def _loud(cmd: list[str]) -> list[str]:
    """The command without --quiet (to read the start-of-training report)."""
    return [a for a in cmd if a != "--quiet"]


def _metrics(workdir) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}


def _tree(workdir, step: int) -> dict:
    """A checkpoint's arrays as NumPy, read without a template (orbax's own metadata)."""
    import orbax.checkpoint as ocp

    path = os.path.join(ckpt.checkpoint_dir(str(workdir)), str(step), ckpt.STATE_ITEM)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # saved on a 4-device mesh: say where to
    with ocp.StandardCheckpointer() as reader:
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                                        reader.metadata(path).item_metadata.tree)
        tree = reader.restore(path, target)
    return jax.tree_util.tree_map(np.asarray, tree)


def _saved_shardings(workdir, step: int) -> set:
    """{(axis names, mesh shape, partition spec)} of the arrays in a checkpoint, from orbax's metadata."""
    import orbax.checkpoint as ocp

    path = os.path.join(ckpt.checkpoint_dir(str(workdir)), str(step), ckpt.STATE_ITEM)
    with ocp.StandardCheckpointer() as reader:
        leaves = jax.tree_util.tree_leaves(reader.metadata(path).item_metadata.tree)
    return {(type(m.sharding).__name__, tuple(getattr(m.sharding, "axis_names", ())),
             tuple(getattr(m.sharding, "shape", ())), tuple(getattr(m.sharding, "partition_spec", ())))
            for m in leaves}


def _meta(workdir, step: int) -> dict:
    return json.load(open(os.path.join(ckpt.checkpoint_dir(str(workdir)), str(step), "meta", "metadata")))


def _snapshot(folder) -> dict:
    return {os.path.relpath(os.path.join(r, n), folder): open(os.path.join(r, n), "rb").read()
            for r, _, names in os.walk(folder) for n in names}


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    err = done.stderr.decode().strip()
    assert done.returncode == 2, err[-2000:]
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[-2000:]
    assert err.startswith("jax-ddpm: error: ")
    return err


def _assert_losses_match(workdir, reference) -> None:
    got, ref = _metrics(workdir), _metrics(reference)
    print(f"{workdir.name} vs 1 device, relative loss difference:",
          {s: f"{abs(got[s]['loss'] - ref[s]['loss']) / ref[s]['loss']:.2e}" for s in LOSS_RTOL})
    for step, rtol in LOSS_RTOL.items():
        np.testing.assert_allclose(got[step]["loss"], ref[step]["loss"], rtol=rtol, err_msg=f"step {step}")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    return shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def four_device_run(tmp_path_factory):
    """10 steps on 4 forced devices, checkpoints 5 and 10; (workdir, stderr, wall seconds)."""
    workdir = tmp_path_factory.mktemp("four") / "run"
    t0 = time.perf_counter()
    done = subprocess.run(_loud(train_cmd(workdir, steps=10, every=5)), env=_env(tmp_path_factory),
                          capture_output=True, timeout=600)
    wall = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return workdir, done.stderr.decode(), wall


# ----------------------------------------------------------------------------- 4 devices
def test_four_devices_train_end_to_end(four_device_run):
    workdir, err, wall = four_device_run
    print(f"4-device tiny run, 10 steps: {wall:.1f} s wall")
    assert "4 cpu devices, 1 process: global batch 16, 4 per device" in err, err
    expected = {"global_batch": BATCH, "per_device_batch": BATCH // DEVICES, "per_process_batch": BATCH,
                "num_devices": DEVICES, "num_processes": 1}
    assert json.load(open(workdir / "config.json"))["parallel"] == expected
    assert _meta(workdir, 10)["parallel"] == expected
    assert ckpt.complete_steps(str(workdir)) == [5, 10]
    # The state the step produced lived replicated on a 4-device 'data' mesh.
    assert _saved_shardings(workdir, 10) == {("NamedShardingMetadata", ("data",), (DEVICES,), ())}
    assert (workdir / "samples.png").exists() and (workdir / "loss.png").exists()
    assert sorted(_metrics(workdir)) == [5, 10]
    # Same data order as the 1-device run: the position after 10 batches of 16.
    assert _meta(workdir, 10)["data_position"] == [0, 10 * BATCH]
    tree = _tree(workdir, 10)
    assert int(tree["step"]) == 10
    assert {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(tree["params"])} == {"float32"}


def test_one_device_process_loads_a_four_device_checkpoint(four_device_run):
    """What ``jax-ddpm sample`` and ``convert`` read, in this 1-device pytest process."""
    from jax_ddpm.app.workdir import load_run

    run = load_run(str(four_device_run[0]))
    assert run.step == 10 and run.meta["parallel"]["num_devices"] == DEVICES
    params = jax.tree_util.tree_leaves(run.state.ema_params)
    assert all(p.sharding.device_set == {jax.devices()[0]} for p in params)
    saved = jax.tree_util.tree_leaves(_tree(four_device_run[0], 10)["ema_params"])
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(params, saved))


def test_four_devices_losses_match_one_device(four_device_run, reference_run):
    _assert_losses_match(four_device_run[0], reference_run)


def test_four_devices_resume_is_bit_identical(four_device_run, tmp_path, tmp_path_factory):
    """Checkpoint 5 restored onto the 4-device mesh, trained to 10: equal to the straight run."""
    straight = four_device_run[0]
    workdir = tmp_path / "resumed"
    shutil.copytree(straight, workdir)
    shutil.rmtree(workdir / "checkpoints" / "10")
    os.remove(workdir / "samples.png")
    done = subprocess.run(train_cmd(workdir, steps=10, every=5), env=_env(tmp_path_factory), capture_output=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    expected, got = _tree(straight, 10), _tree(workdir, 10)
    flat_e, flat_g = (jax.tree_util.tree_leaves_with_path(t) for t in (expected, got))
    assert [p for p, _ in flat_e] == [p for p, _ in flat_g]
    for (path, e), (_, g) in zip(flat_e, flat_g):
        assert np.array_equal(e, g), f"{jax.tree_util.keystr(path)} differs: max abs {np.abs(e - g).max()}"
    assert _metrics(workdir)[10]["loss"] == _metrics(straight)[10]["loss"]


def test_indivisible_batch_is_refused_before_writing(tmp_path, tmp_path_factory):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    before = _snapshot(existing)
    for workdir in (existing, tmp_path / "new"):
        done = subprocess.run(train_cmd(workdir, "--batch-size", "18"), env=_env(tmp_path_factory),
                              capture_output=True, timeout=300)
        err = _one_line_error(done)
        assert err == ("jax-ddpm: error: --batch-size: global batch size 18 is not divisible by the number of "
                       "devices 4; use a multiple of 4")
    assert _snapshot(existing) == before
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- --distributed
@pytest.mark.parametrize("flag,extra,needle", [
    (["--distributed"], {}, "--distributed: cannot join the multi-process run (coordinator_address should be defined"),
    ([], {"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "two"},
     "JAX_COORDINATOR_ADDRESS is set: cannot join the multi-process run (JAX_NUM_PROCESSES must be an integer, "
     "got 'two')"),
])
def test_distributed_start_failure_is_one_line(tmp_path, tmp_path_factory, flag, extra, needle):
    workdir = tmp_path / "run"
    done = subprocess.run(train_cmd(workdir, *flag), env=_env(tmp_path_factory, devices=1, **extra),
                          capture_output=True, timeout=120)
    assert needle in _one_line_error(done)
    assert not workdir.exists()


# ----------------------------------------------------------------------------- bfloat16
@pytest.mark.slow  # 25-75 s; the bf16 step itself is measured by tests/test_bf16.py (in the two-device worker)
def test_bfloat16_trains_through_the_sharded_step(tmp_path, tmp_path_factory, reference_run):
    workdir = tmp_path / "bf16"
    done = subprocess.run(train_cmd(workdir, "--dtype", "bfloat16", steps=5, every=5),
                          env=_env(tmp_path_factory), capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    config = json.load(open(workdir / "config.json"))
    assert config["model"]["dtype"] == "bfloat16" and config["parallel"]["num_devices"] == DEVICES
    tree = _tree(workdir, 5)
    for part in ("params", "ema_params", "opt_state", "batch_stats"):  # bf16 is compute only
        floats = {str(x.dtype) for x in jax.tree_util.tree_leaves(tree[part]) if x.dtype.kind == "f"}
        assert floats == {"float32"}, (part, floats)
    loss, loss32 = _metrics(workdir)[5]["loss"], _metrics(reference_run)[5]["loss"]
    print(f"bf16 vs fp32 loss, steps 1-5: {abs(loss - loss32) / loss32:.2e} relative")
    np.testing.assert_allclose(loss, loss32, rtol=BF16_LOSS_RTOL)
    assert loss != loss32  # bfloat16 really ran
    assert (workdir / "samples.png").exists()


# ----------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(tmp_path_factory, workdir, steps: int, every: int, interrupt_at: int | None = None,
                   step_delay: float | None = None, **env) -> list[tuple[int, str]]:
    """``jax-ddpm train --distributed`` in two processes, 2 CPU devices each; [(status, stderr)].

    ``interrupt_at``: once checkpoint ``interrupt_at`` is finalized, SIGINT process 1 only.
    ``step_delay``: seconds each process sleeps after a step (tests/train_runner.py).
    """
    port = _free_port()
    cmd = _loud(train_cmd(workdir, "--distributed", steps=steps, every=every))
    cmd = cmd if step_delay is None else runner_cmd(cmd, step_delay=step_delay)
    procs = [subprocess.Popen(cmd,
                              env=_env(tmp_path_factory, devices=2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                       JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i, **env),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    if interrupt_at is not None:
        deadline = time.monotonic() + 600
        while interrupt_at not in ckpt.complete_steps(str(workdir)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint in time"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGINT)
    return [(p.wait(timeout=900), p.communicate()[1].decode()) for p in procs]


@pytest.mark.slow
def test_two_processes_train_resume_and_stop_together(tmp_path, tmp_path_factory, reference_run):
    workdir = tmp_path / "two"
    (rc0, err0), (rc1, err1) = _two_processes(tmp_path_factory, workdir, steps=10, every=5)
    assert rc0 == rc1 == 0, err0[-3000:] + err1[-3000:]
    assert "4 cpu devices, 2 processes: global batch 16, 4 per device, 8 per process" in err0, err0
    assert "step 10/10" in err0 and "step 10/10" not in err1  # process 0 alone reports
    assert json.load(open(workdir / "config.json"))["parallel"] == {
        "global_batch": BATCH, "per_device_batch": BATCH // 4, "per_process_batch": BATCH // 2, "num_devices": 4,
        "num_processes": 2}
    assert ckpt.complete_steps(str(workdir)) == [5, 10]
    assert sorted(_metrics(workdir)) == [5, 10]  # one line per logging step: only process 0 writes
    _assert_losses_match(workdir, reference_run)
    grid_mtime = os.path.getmtime(workdir / "samples.png")
    # Resume in two processes (restored replicated over both); Ctrl-C reaches process 1 only:
    # both stop at the next logging step, save a checkpoint there together and exit 130.
    results = _two_processes(tmp_path_factory, workdir, steps=60, every=5, interrupt_at=15,
                             step_delay=0.1)
    assert [rc for rc, _ in results] == [130, 130], results[0][1][-3000:] + results[1][1][-3000:]
    assert "Traceback" not in results[0][1] + results[1][1]
    saved = int(results[0][1].split("saved checkpoint ")[1].split()[0])
    assert 15 <= saved < 60 and saved % 5 == 0 and max(ckpt.complete_steps(str(workdir))) == saved
    assert "saved checkpoint" not in results[1][1]
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps == list(range(5, saved + 1, 5))
    assert _meta(workdir, saved)["data_position"] == [0, saved * BATCH]
    assert os.path.getmtime(workdir / "samples.png") == grid_mtime  # interrupted: no new final grid
