"""Issue 18, checkpoints: resume falls back past a damaged newest checkpoint (moved aside, not
deleted; orbax's listing undisturbed), a malformed ``data_position`` is one line, readers skip
a checkpoint pruned under them, and a save that fails (disk full) or is interrupted leaves no
temporary folder and the earlier checkpoints intact.

Disk full is simulated in-process (orbax's JSON writer raising ENOSPC); ``-m slow`` adds a real
one on a small tmpfs (root only) and the CLI-level resume past a damaged checkpoint.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest

from cli_util import SHARED_STEPS, cli_env, run_copy, train_cmd, trained  # noqa: F401 (trained, run_copy: fixtures)
from jax_ddpm import checkpoint as ckpt
from jax_ddpm.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _truncate_state(workdir, step):
    for root, _, files in os.walk(workdir / "checkpoints" / str(step) / "state"):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)


def _meta_path(workdir, step):
    return workdir / "checkpoints" / str(step) / "meta" / "metadata"


def _restore_for_train(workdir, capsys):
    """``app.train``'s resume point for the shared run's command on ``workdir`` (no compilation)."""
    from jax_ddpm.app import train as train_mod
    from jax_ddpm.app.cli import build_parser
    from jax_ddpm.app.config import train_config_from_args
    from jax_ddpm.app.devices import setup_devices
    from jax_ddpm.app.factories import run_keys

    argv = train_cmd(workdir, "--xla-flags", "none")[3:]
    config = train_config_from_args(build_parser().parse_args(argv))
    images, data_fp = train_mod._load_data(config)
    restored = train_mod._restore(config, setup_devices(config), data_fp, run_keys(config.seed))
    return restored, capsys.readouterr().err.strip()


def _tmp_folders(workdir) -> list[str]:
    return [n for n in os.listdir(ckpt.checkpoint_dir(str(workdir))) if ckpt.TMP_MARKER in n]


# ----------------------------------------------------------------------------- item 4: fall back, move aside
def test_resume_falls_back_past_a_damaged_checkpoint_and_moves_it_aside(run_copy, capsys):
    _truncate_state(run_copy, 60)
    restored, err = _restore_for_train(run_copy, capsys)
    assert restored.start == 50 and restored.state is not None
    moved = run_copy / "damaged-checkpoints" / "60"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"jax-ddpm: warning: {run_copy}/checkpoints/60: checkpoint is incomplete, corrupt")
    assert err.endswith(f"moved it to {moved}, resuming from checkpoint 50")
    assert moved.is_dir() and not (run_copy / "checkpoints" / "60").exists()  # moved, not deleted
    assert ckpt.complete_steps(str(run_copy)) == [40, 50]
    manager = ckpt.make_manager(str(run_copy), keep=3)  # a writable manager (what train opens) agrees
    try:
        assert sorted(manager.all_steps()) == [40, 50]
    finally:
        manager.close()
    assert sorted(os.listdir(moved)) == sorted(os.listdir(run_copy / "checkpoints" / "50"))


def test_no_checkpoint_that_restores_is_one_line_and_nothing_moves(run_copy, capsys):
    shutil.rmtree(run_copy / "checkpoints" / "40")
    for step in (50, 60):
        _truncate_state(run_copy, step)
    code = main(train_cmd(run_copy, "--xla-flags", "none")[3:])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "checkpoints/60: checkpoint is incomplete, corrupt" in err
    assert ckpt.complete_steps(str(run_copy)) == [50, 60] and not (run_copy / "damaged-checkpoints").exists()


@pytest.mark.parametrize("edit", ["missing", "malformed"])
def test_a_bad_data_position_is_one_line_not_a_traceback(run_copy, capsys, edit):
    for step in (40, 50):
        shutil.rmtree(run_copy / "checkpoints" / str(step))
    meta = json.loads(_meta_path(run_copy, 60).read_text())
    if edit == "missing":
        del meta["data_position"]
    else:
        meta["data_position"] = ["x", None]
    _meta_path(run_copy, 60).write_text(json.dumps(meta))
    code = main(train_cmd(run_copy, "--xla-flags", "none", steps=70)[3:])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "checkpoints/60: checkpoint metadata has no valid data_position" in err


def test_a_reader_skips_a_checkpoint_pruned_under_it(run_copy, monkeypatch, capsys):
    from jax_ddpm.app import workdir

    real = workdir._restore_step

    def pruned_while_read(wd, step):
        if step == 60:  # a running trainer prunes it between the listing and the read
            shutil.rmtree(os.path.join(ckpt.checkpoint_dir(wd), "60"))
            raise ckpt.CheckpointError(f"{wd}/checkpoints/60: checkpoint metadata is unreadable (gone)")
        return real(wd, step)

    monkeypatch.setattr(workdir, "_restore_step", pruned_while_read)
    assert workdir.load_run(str(run_copy)).step == 50
    assert capsys.readouterr().err == ""  # pruned, not damaged: nothing to say


# ----------------------------------------------------------------------------- item 5: a save that fails
@pytest.fixture(scope="module")
def state_tree(trained):
    """The shared run's latest state as a checkpoint tree, and its metadata (read once)."""
    from jax_ddpm.app.workdir import load_run

    run = load_run(str(trained))
    return ckpt.state_to_tree(run.state, jax.random.key(0)), dict(run.meta)


def _failing_json_writer(monkeypatch, exc):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    async def write(self, x, directory):
        raise exc

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", write)


def test_disk_full_during_a_save_is_one_line_and_cleans_up(run_copy, state_tree, monkeypatch, capsys):
    tree, meta = state_tree
    _failing_json_writer(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    manager = ckpt.make_manager(str(run_copy), keep=3)
    try:
        with pytest.raises(ckpt.CheckpointSaveError) as info:
            ckpt.save(manager, 70, tree, meta)
    finally:
        manager.close()
    assert str(info.value) == (f"{run_copy}/checkpoints: no space left on device while saving checkpoint 70 (its "
                               "partial folder was removed; the checkpoints saved before are intact)")
    assert _tmp_folders(run_copy) == [] and ckpt.complete_steps(str(run_copy)) == [40, 50, 60]
    assert capsys.readouterr().err == ""  # orbax's tracebacks kept off the terminal


@pytest.mark.slow
def test_disk_full_through_the_command_is_exit_2(trained, tmp_path, monkeypatch, capsys):
    exported = tmp_path / "m.safetensors"
    assert main(["convert", "--workdir", str(trained), "--out", str(exported)]) == 0
    capsys.readouterr()
    _failing_json_writer(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    code = main(["convert", "--from-torch", str(exported), "--workdir", str(tmp_path / "new")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.endswith("no space left on device while saving checkpoint 0 (its partial folder was removed; the "
                        "checkpoints saved before are intact)")
    assert _tmp_folders(tmp_path / "new") == []


def test_an_interrupted_save_removes_its_partial_folder(run_copy, state_tree, monkeypatch):
    tree, meta = state_tree
    _failing_json_writer(monkeypatch, KeyboardInterrupt())
    manager = ckpt.make_manager(str(run_copy), keep=3)
    try:
        with pytest.raises(KeyboardInterrupt):
            ckpt.save(manager, 70, tree, meta)
    finally:
        manager.close()
    assert _tmp_folders(run_copy) == [] and ckpt.complete_steps(str(run_copy)) == [40, 50, 60]


# ----------------------------------------------------------------------------- -m slow: the real things
def _can_mount_tmpfs(path) -> bool:
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.mark.slow
def test_disk_full_on_a_real_tmpfs(tmp_path, tmp_path_factory):
    mount = tmp_path / "small"
    if not _can_mount_tmpfs(mount):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:  # 7 MB: two tiny checkpoints (3.1 MB each) fit, the third does not
        done = subprocess.run(train_cmd(mount / "run", steps=60, every=10), env=cli_env(tmp_path_factory),
                              capture_output=True, text=True, timeout=600)
        err = done.stderr.strip()
        assert done.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err == (f"jax-ddpm: error: {mount}/run/checkpoints: no space left on device while saving checkpoint "
                       "30 (its partial folder was removed; the checkpoints saved before are intact)")
        assert ckpt.complete_steps(str(mount / "run")) == [10, 20] and _tmp_folders(mount / "run") == []
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.mark.slow
def test_train_resumes_past_a_damaged_checkpoint_to_the_same_bits(trained, run_copy, tmp_path_factory):
    _truncate_state(run_copy, 60)
    done = subprocess.run(train_cmd(run_copy), env=cli_env(tmp_path_factory), capture_output=True, text=True,
                          timeout=600)
    err = done.stderr.strip()
    assert done.returncode == 0 and len(err.splitlines()) == 1 and "resuming from checkpoint 50" in err, err
    import orbax.checkpoint as ocp

    def tree(wd):
        with ocp.StandardCheckpointer() as reader:
            return reader.restore(os.path.join(ckpt.checkpoint_dir(str(wd)), str(SHARED_STEPS), ckpt.STATE_ITEM))

    for a, b in zip(jax.tree_util.tree_leaves(tree(trained)), jax.tree_util.tree_leaves(tree(run_copy))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert (run_copy / "damaged-checkpoints" / "60").is_dir()
