"""Issue 18, the work folder: one writer per folder (an OS lock that dies with its process), a
non-empty folder that holds no run is refused, nothing the tool did not write is touched, the
final grid records its step, and the smaller items of `--out`, `--seed`, `--features`, data.

Cheap in-process checks on copies of the session's shared tiny run (`cli_util.shared_run`);
the real concurrent trainer is in tests/test_hardening_signals.py.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cli_util import SHARED_STEPS, run_copy, train_cmd, trained  # noqa: F401 (trained, run_copy: fixtures)
from jax_ddpm import checkpoint as ckpt
from jax_ddpm.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# Holds the work folder's lock as a trainer does (flock on WORKDIR/.jax-ddpm.lock), without JAX.
HOLDER = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
          "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)")


def _snapshot(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = (hashlib.sha256(open(path, "rb").read()).hexdigest(),
                                                  os.path.getmtime(path))
    return out


def _fails(argv, capsys, status=2) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == status, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("jax-ddpm"), err
    return err


def _train(workdir, *more, steps=SHARED_STEPS) -> list[str]:
    """In-process argv of the shared run's command (no XLA-flag probe: JAX is already up here)."""
    return train_cmd(workdir, "--xla-flags", "none", *more, steps=steps)[3:]


# ----------------------------------------------------------------------------- item 1: one writer
def test_a_second_writer_is_refused_naming_the_pid_and_the_lock_dies_with_its_holder(run_copy, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_copy / ".jax-ddpm.lock")],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        before = _snapshot(run_copy)
        err = _fails(_train(run_copy, steps=SHARED_STEPS + 10), capsys)
        assert f"another jax-ddpm process (PID {holder.pid}) is writing to it" in err
        assert _snapshot(run_copy) == before  # refused: nothing in the folder changed, not even the lock file
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL left no stale lock: the next train takes it (and finds nothing to train).
    assert main(_train(run_copy)) == 0, capsys.readouterr().err
    assert open(run_copy / ".jax-ddpm.lock").read().split()[0] == str(os.getpid())


# ----------------------------------------------------------------------------- item 2: foreign folders
def test_a_non_empty_folder_without_a_run_is_refused_and_left_alone(tmp_path, trained, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, text in (("config.json", '{"mine": true}'), ("samples.png", "not a png"), ("metrics.jsonl", "x\n"),
                       ("loss.png", "mine")):
        (folder / name).write_text(text)
    before = _snapshot(folder)
    err = _fails(_train(folder), capsys)
    assert f"--workdir {folder}: is not empty (config.json, loss.png, metrics.jsonl, ...) and holds no jax-ddpm run" \
        in err
    exported = tmp_path / "m.safetensors"
    assert main(["convert", "--workdir", str(trained), "--out", str(exported)]) == 0
    capsys.readouterr()
    err = _fails(["convert", "--from-torch", str(exported), "--workdir", str(folder)], capsys)
    assert "holds no jax-ddpm run" in err
    assert _snapshot(folder) == before


# ----------------------------------------------------------------------------- item 6: the final grid's step
def test_the_final_grid_records_its_step_and_a_stale_one_is_known(trained, run_copy):
    from jax_ddpm.app.workdir import grid_is_current
    from jax_ddpm.images import grid_step, save_grid

    assert grid_step(str(trained / "samples.png")) == SHARED_STEPS
    assert grid_is_current(str(run_copy), SHARED_STEPS)
    grid = str(run_copy / "samples.png")
    save_grid(grid, np.zeros((4, 8, 8, 1), np.float32), step=40)  # a continued run killed while drawing its grid
    assert not grid_is_current(str(run_copy), SHARED_STEPS)
    # A grid written before the record existed: current unless older than the checkpoint.
    save_grid(grid, np.zeros((4, 8, 8, 1), np.float32))
    assert grid_step(grid) is None and grid_is_current(str(run_copy), SHARED_STEPS)
    step_dir = os.path.join(ckpt.checkpoint_dir(str(run_copy)), str(SHARED_STEPS))
    os.utime(grid, (os.path.getmtime(step_dir) - 60,) * 2)
    assert not grid_is_current(str(run_copy), SHARED_STEPS)


@pytest.mark.slow
def test_a_rerun_redraws_a_stale_final_grid(trained, run_copy, capsys):
    from jax_ddpm.images import grid_step, save_grid

    save_grid(str(run_copy / "samples.png"), np.zeros((4, 8, 8, 1), np.float32), step=40)  # an older run's grid
    assert main(_train(run_copy)) == 0, capsys.readouterr().err  # nothing to train, but the grid is not step 60's
    assert grid_step(str(run_copy / "samples.png")) == SHARED_STEPS
    with Image.open(run_copy / "samples.png") as now, Image.open(trained / "samples.png") as want:
        assert np.array_equal(np.asarray(now), np.asarray(want))  # the same grid the uninterrupted run drew


# ----------------------------------------------------------------------------- item 9: --out, --seed, --features
def test_out_never_replaces_the_runs_own_files(trained, capsys):
    for command, out in (("sample", "samples.png"), ("sample", "checkpoints/x.npz"), ("convert", "m.safetensors")):
        path = trained / out if command == "sample" else trained / "checkpoints" / out
        err = _fails([command, "--workdir", str(trained), "--out", str(path)], capsys)
        assert "is the work folder's own" in err and "choose a file outside those" in err


def test_export_replacing_a_file_says_so_and_honours_the_umask(trained, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    old = os.umask(0o027)
    try:
        assert main(["convert", "--workdir", str(trained), "--out", str(out)]) == 0
        assert "(replacing the file" not in capsys.readouterr().out
        assert os.stat(out).st_mode & 0o777 == 0o640  # not safetensors' 0o600
        assert main(["convert", "--workdir", str(trained), "--out", str(out)]) == 0
        assert "(replacing the file that was there)" in capsys.readouterr().out
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temporary file left


def test_npz_out_in_upper_case_leaves_no_hidden_file(tmp_path):
    from jax_ddpm.app.sample import write_samples

    out = tmp_path / "x.NPZ"
    samples = np.linspace(-1, 1, 2 * 8 * 8).reshape(2, 8, 8, 1).astype(np.float32)
    write_samples(str(out), samples)  # used to fail naming a temporary file and leave it behind
    assert os.listdir(tmp_path) == ["x.NPZ"]
    with np.load(out) as f:
        np.testing.assert_array_equal(f["samples"], samples)


@pytest.mark.parametrize("command", ["train", "sample"])
@pytest.mark.parametrize("seed", ["-1", str(2 ** 32), str(2 ** 63), str(2 ** 70)])
def test_seed_outside_32_bits_is_refused(tmp_path, capsys, command, seed):
    argv = (_train(tmp_path / "w", "--seed", seed) if command == "train"
            else ["sample", "--workdir", str(tmp_path), "--out", str(tmp_path / "x.png"), "--seed", seed])
    err = _fails(argv, capsys)
    assert f"--seed must be an integer in [0, 4294967295], got {seed}" in err
    assert not (tmp_path / "w").exists()


def test_negative_features_get_the_options_own_message(tmp_path, capsys):
    err = _fails(["train", "--workdir", str(tmp_path / "w"), "--features", "-8,16,32,64"], capsys)
    assert "--features must be comma-separated positive integers, got '-8,16,32,64'" in err
    err = _fails(["train", "--workdir", str(tmp_path / "w"), "--lr", "-1e-3"], capsys)
    assert "--lr must be in (0, inf), got -0.001" in err


# ----------------------------------------------------------------------------- item 9: data
def test_a_moved_data_set_with_the_same_images_resumes(trained, tmp_path):
    """The content fingerprint is the data's identity, not the path (an old folder keeps resuming)."""
    from jax_ddpm.app.cli import build_parser
    from jax_ddpm.app.config import ConfigError, train_config_from_args
    from jax_ddpm.app.workdir import check_resume

    moved = tmp_path / "moved.npz"
    np.savez(moved, images=np.zeros((20, 8, 8, 1), np.uint8))
    config = train_config_from_args(build_parser().parse_args(_train(tmp_path / "w", "--data", str(moved))))
    manager = ckpt.make_manager(str(trained), read_only=True)
    try:
        saved_fp = ckpt.restore_meta(manager, SHARED_STEPS)["data_fingerprint"]
        config = type(config)(**{**config.__dict__, "workdir": str(trained)})
        assert check_resume(config, manager, SHARED_STEPS, saved_fp)["step"] == SHARED_STEPS
        with pytest.raises(ConfigError, match="the images differ from those"):
            check_resume(config, manager, SHARED_STEPS, "0" * 16)
        other = type(config)(**{**config.__dict__, "seed": 1})
        with pytest.raises(ConfigError, match="--seed was 0, now 1"):
            check_resume(other, manager, SHARED_STEPS, saved_fp)
    finally:
        manager.close()


def test_a_garbage_npy_is_not_called_pickled(tmp_path, capsys):
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"these are not images" * 10)
    err = _fails(_train(tmp_path / "w", "--data", str(junk)), capsys)
    assert "junk.npy: not a .npy/.npz file" in err and "pickle" not in err
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "holds Python objects, which cannot load without pickles" in _fails(
        _train(tmp_path / "w", "--data", str(objects)), capsys)
    assert not (tmp_path / "w").exists()
