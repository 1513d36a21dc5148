"""Bad input to `jax-ddpm`: one line naming the option or file, exit status 2 (NaN: 3), no
traceback, and nothing already in the work folder changed."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from cli_util import cli_env, runner_cmd, shared_run, train_cmd
from jax_ddpm import checkpoint as ckpt
from jax_ddpm.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

def _snapshot(folder) -> dict:
    """{relative path: sha256} of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def _fails(argv, capsys, status=2) -> str:
    """Runs main(argv) in-process; asserts the status and a one-line, traceback-free stderr."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == status, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("jax-ddpm")
    return err


@pytest.fixture
def workdir(tmp_path):
    """A work folder that already holds something; tests check it is left alone."""
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "notes.txt").write_text("keep me")
    return wd


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained work folder (checkpoints 40, 50, 60), via the real command."""
    return shared_run(tmp_path_factory)


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("options,needle", [
    (["--timesteps", "0"], "--timesteps must be an integer >= 2, got 0"),
    (["--timesteps", "1"], "--timesteps must be an integer >= 2, got 1"),  # one step has no posterior
    (["--schedule", "quadratic"], "--schedule: invalid choice: 'quadratic'"),
    (["--image-size", "12"], "--image-size must be a positive multiple of 8"),
    (["--image-size", "0"], "--image-size must be a positive multiple of 8"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--batch-size", "-8"], "--batch-size must be a positive integer, got -8"),
    (["--features", "8,16"], "--features: the chapter's U-Net has four levels"),
    (["--features", "1,2,3"], "--features: the chapter's U-Net has four levels: 4 positive integers, got 1,2,3"),
    (["--features", "8,x,8,8"], "--features must be comma-separated positive integers"),
    (["--features", "8,0,8,8"], "--features must be comma-separated positive integers"),
    (["--time-emb-dim", "3"], "--time-emb-dim: must be an even integer >= 4, got 3"),
    (["--arch", "unet9"], "--arch: invalid choice: 'unet9'"),
    (["--lr", "0"], "--lr must be in (0, inf)"),
    (["--ema-decay", "1.5"], "--ema-decay must be in [0, 1)"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--channels", "2"], "--channels: invalid choice: 2"),
    (["--dtype", "float16"], "--dtype: invalid choice"),
    (["--batch-size", "many"], "--batch-size: invalid int value: 'many'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--batch-size", "2000"], "--batch-size 2000 exceeds the 1797 images"),
])
def test_bad_train_options(workdir, capsys, options, needle):
    before = _snapshot(workdir)
    err = _fails(["train", "--workdir", str(workdir), *options], capsys)
    assert needle in err
    assert _snapshot(workdir) == before


def test_missing_data(workdir, tmp_path, capsys):
    err = _fails(["train", "--workdir", str(workdir), "--data", str(tmp_path / "nope")], capsys)
    assert f"--data {tmp_path / 'nope'}: no such file or directory" in err


def test_empty_data_folder(workdir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    before = _snapshot(workdir)
    err = _fails(["train", "--workdir", str(workdir), "--data", str(tmp_path / "empty")], capsys)
    assert "empty: no png/jpg/jpeg images" in err and _snapshot(workdir) == before


def test_corrupt_image(workdir, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "ok.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    before = _snapshot(workdir)
    err = _fails(["train", "--workdir", str(workdir), "--data", str(folder), "--image-size", "8"], capsys)
    assert "broken.jpg: cannot read image" in err and _snapshot(workdir) == before


@pytest.mark.parametrize("array,needle", [
    (np.zeros((4, 8, 8), np.float32), "images must be uint8, got float32"),
    (np.zeros((4, 8), np.uint8), "must have rank 4"),
    (np.zeros((2, 4, 8, 8, 1), np.uint8), "must have rank 4"),
    (np.zeros((4, 3, 8, 3), np.uint8), "pass --layout nhwc or nchw"),
])
def test_bad_npz(workdir, tmp_path, capsys, array, needle):
    path = tmp_path / "data.npz"
    np.savez(path, images=array)
    before = _snapshot(workdir)
    err = _fails(["train", "--workdir", str(workdir), "--data", str(path), "--image-size", "8"], capsys)
    assert "data.npz" in err and needle in err and _snapshot(workdir) == before


def test_workdir_is_a_file(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    assert "--workdir" in _fails(["train", "--workdir", str(path)], capsys)


# ----------------------------------------------------------------------------- sample / convert without a run
def test_sample_without_checkpoint(workdir, tmp_path, capsys):
    before = _snapshot(workdir)
    err = _fails(["sample", "--workdir", str(workdir), "--out", str(tmp_path / "x.png")], capsys)
    assert "no checkpoint found" in err and _snapshot(workdir) == before
    assert not (tmp_path / "x.png").exists()
    err = _fails(["convert", "--workdir", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert "no checkpoint found" in err


def test_sample_bad_out_and_missing_step(trained, tmp_path, capsys):
    assert "must end in .png or .npz" in _fails(["sample", "--workdir", str(trained), "--out",
                                                  str(tmp_path / "x.jpg")], capsys)
    err = _fails(["sample", "--workdir", str(trained), "--out", str(tmp_path / "x.png"), "--checkpoint-step", "7"],
                 capsys)
    assert "--checkpoint-step 7: no checkpoint for this step" in err and "have 40, 50, 60" in err


@pytest.mark.parametrize("command,out", [("sample", "x.png"), ("convert", "m.safetensors")])
def test_deprecated_steps_warns_then_works_like_checkpoint_step(trained, tmp_path, capsys, command, out):
    code = main([command, "--workdir", str(trained), "--out", str(tmp_path / out), "--steps", "7"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 2, lines
    assert lines[0] == f"jax-ddpm {command}: warning: --steps is deprecated, use --checkpoint-step"
    assert "--checkpoint-step 7: no checkpoint for this step" in lines[1] and "Traceback" not in lines[1]
    code = main([command, "--workdir", str(trained), "--out", str(tmp_path / out), "--steps", "7",
                 "--checkpoint-step", "50"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 2 and "deprecated" in lines[0], lines
    assert "--steps 7 and --checkpoint-step 50 disagree" in lines[1]


def test_checkpoint_step_picks_the_checkpoint(trained, tmp_path, capsys):
    assert main(["sample", "--workdir", str(trained), "--out", str(tmp_path / "x.npz"), "--num", "2",
                 "--checkpoint-step", "50"]) == 0
    captured = capsys.readouterr()
    assert "from step 50" in captured.out and "deprecated" not in captured.err


def test_convert_needs_one_direction(tmp_path, capsys):
    assert "exactly one of --out" in _fails(["convert", "--workdir", str(tmp_path)], capsys)


# ----------------------------------------------------------------------------- damaged checkpoints
# Readers fall back past a damaged newest checkpoint with one warning line and move nothing
# (issue 18 item 4; train moving it aside: tests/test_hardening_checkpoints.py).
def _falls_back(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 0, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("jax-ddpm: warning:"), err
    assert "using checkpoint 50, the newest that restores" in err
    return err


def test_truncated_checkpoint(trained, tmp_path, capsys):
    wd = tmp_path / "damaged"
    shutil.copytree(trained, wd)
    for root, _, files in os.walk(wd / "checkpoints" / "60" / "state"):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    before = _snapshot(wd)
    err = _falls_back(["convert", "--workdir", str(wd), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert "checkpoints/60: checkpoint is incomplete, corrupt" in err
    err = _fails(["convert", "--workdir", str(wd), "--out", str(tmp_path / "m.safetensors"), "--checkpoint-step",
                  "60"], capsys)  # a step asked for explicitly: that one or an error
    assert "checkpoints/60: checkpoint is incomplete, corrupt" in err
    assert _snapshot(wd) == before


def test_deleted_metadata(trained, tmp_path, capsys):
    wd = tmp_path / "nometa"
    shutil.copytree(trained, wd)
    os.remove(wd / "checkpoints" / "60" / "meta" / "metadata")
    assert "checkpoints/60" in _falls_back(["convert", "--workdir", str(wd), "--out",
                                            str(tmp_path / "m.safetensors")], capsys)


# ----------------------------------------------------------------------------- NaN
def test_nan_loss_stops_with_status_3(tmp_path, tmp_path_factory):
    wd = tmp_path / "nan"
    done = subprocess.run(runner_cmd(train_cmd(wd, steps=20, every=5), nan_at_step=7), env=cli_env(tmp_path_factory),
                          capture_output=True, timeout=400)
    err = done.stderr.decode().strip()
    assert done.returncode == 3, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "at step 7" in err and "last good checkpoint is step 5" in err
    assert ckpt.complete_steps(str(wd)) == [5]
