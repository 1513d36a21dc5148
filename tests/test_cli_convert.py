"""`jax-ddpm convert` and `sample` against torch_ref: the exported weights load in torch_ref,
and both frameworks turn the same weights and the same pre-drawn noise into the same samples.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from jax_ddpm.cli import main

torch = pytest.importorskip("torch")
from safetensors.numpy import load_file, save_file  # noqa: E402
from safetensors import safe_open  # noqa: E402

import torch_ref.sample as torch_sample  # noqa: E402
from cli_util import SHARED_STEPS, shared_run  # noqa: E402
from torch_ref.weights import load_unet  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

T, N, S = 10, 16, 8

# JAX (XLA CPU, float32) vs torch (CPU, float32), same weights and noise, T = 10, 8x8, 16 images,
# clipped x0: measured max abs difference of the samples in [-1, 1] 6.6e-7 to 3.0e-6 (running)
# and 9.4e-7 to 3.7e-6 (batch) over the runs tried (run with -s to print it).
TOLERANCE = {"running": 1e-4, "batch": 1e-4}


def _ok(argv, capsys) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.safetensors"
    assert main(["convert", "--workdir", str(trained), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def noise_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("noise") / "noise.npz"
    np.savez(path, x_T=rng.standard_normal((N, S, S, 1)).astype(np.float32),
             noises=rng.standard_normal((T, N, S, S, 1)).astype(np.float32))
    return path


def test_export_loads_in_torch_ref(exported):
    model, meta = load_unet(exported)  # strict load_state_dict: every name and shape
    assert meta["features"] == "8,16,32,64" and meta["timesteps"] == "10" and meta["schedule"] == "cosine"
    assert meta["image_size"] == "8" and meta["step"] == str(SHARED_STEPS)
    assert not model.training
    assert int(model.down1.bnorm.num_batches_tracked) == 2 * SHARED_STEPS  # E5: two updates per forward pass


# batch statistics: slow (30 s); the parity suite compares that chain with torch_ref on its own
@pytest.mark.parametrize("bn_stats", ["running", pytest.param("batch", marks=pytest.mark.slow)])
def test_jax_and_torch_samples_agree(trained, exported, noise_file, tmp_path, capsys, bn_stats):
    jax_out, torch_out = tmp_path / "jax.npz", tmp_path / "torch.npz"
    _ok(["sample", "--workdir", str(trained), "--out", str(jax_out), "--noise", str(noise_file),
         "--bn-stats", bn_stats], capsys)
    assert torch_sample.main(["--weights", str(exported), "--out", str(torch_out), "--noise", str(noise_file),
                              "--bn-stats", bn_stats]) == 0
    a, b = np.load(jax_out)["samples"], np.load(torch_out)["samples"]
    assert a.shape == b.shape == (N, S, S, 1)
    assert (np.abs(a) < 0.999).mean() > 0.3  # most values are inside (-1, 1), not clipped
    err = np.abs(a - b).max()
    print(f"jax vs torch samples, bn_stats={bn_stats}: max abs {err:.2e}")
    assert err <= TOLERANCE[bn_stats], f"max abs {err}"
    # Different noise gives different samples (the comparison above can fail).
    other = tmp_path / "other.npz"
    rng = np.random.default_rng(1)
    np.savez(other, x_T=rng.standard_normal((N, S, S, 1)).astype(np.float32),
             noises=rng.standard_normal((T, N, S, S, 1)).astype(np.float32))
    assert torch_sample.main(["--weights", str(exported), "--out", str(tmp_path / "t2.npz"), "--noise", str(other),
                              "--bn-stats", bn_stats]) == 0
    assert np.abs(np.load(tmp_path / "t2.npz")["samples"] - a).max() > 10 * TOLERANCE[bn_stats]


def test_import_round_trip_samples_identically(trained, exported, noise_file, tmp_path, capsys):
    wd = tmp_path / "imported"
    _ok(["convert", "--from-torch", str(exported), "--workdir", str(wd)], capsys)
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    for workdir, out in ((trained, a), (wd, b)):
        _ok(["sample", "--workdir", str(workdir), "--out", str(out), "--noise", str(noise_file),
             "--bn-stats", "running"], capsys)
    np.testing.assert_array_equal(np.load(a)["samples"], np.load(b)["samples"])  # weights round-trip bit-exactly
    # And the imported folder exports the same file contents again.
    again = tmp_path / "again.safetensors"
    _ok(["convert", "--workdir", str(wd), "--out", str(again)], capsys)
    first, second = load_file(str(exported)), load_file(str(again))
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_png_and_seeded_sampling(trained, tmp_path, capsys):
    _ok(["sample", "--workdir", str(trained), "--out", str(tmp_path / "g.png"), "--num", "16", "--seed", "3"], capsys)
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size[0] >= 4 * S


def _fails(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def _tree_hash(folder) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            h.update(name.encode() + open(os.path.join(root, name), "rb").read())
    return h.hexdigest()


def test_import_refuses_an_existing_run(trained, exported, capsys):
    before = _tree_hash(trained)
    err = _fails(["convert", "--from-torch", str(exported), "--workdir", str(trained)], capsys)
    assert "already holds a run" in err and _tree_hash(trained) == before


def _rewrite(src, dst, edit):
    with safe_open(str(src), framework="numpy") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    edit(tensors)
    save_file(tensors, str(dst), metadata=meta)


def test_import_missing_tensor(exported, tmp_path, capsys):
    bad = tmp_path / "missing.safetensors"
    _rewrite(exported, bad, lambda t: t.pop("up2.conv1.weight"))
    err = _fails(["convert", "--from-torch", str(bad), "--workdir", str(tmp_path / "new")], capsys)
    assert "missing.safetensors" in err and "missing 1 tensor(s): up2.conv1.weight" in err
    assert not (tmp_path / "new").exists()


def test_import_misshaped_tensor(exported, tmp_path, capsys):
    bad = tmp_path / "shape.safetensors"

    def edit(t):
        t["down2.conv2.weight"] = np.zeros((32, 32, 3, 2), np.float32)

    _rewrite(exported, bad, edit)
    err = _fails(["convert", "--from-torch", str(bad), "--workdir", str(tmp_path / "new")], capsys)
    assert "tensor down2.conv2.weight has shape (32, 32, 3, 2), the model needs (32, 32, 3, 3)" in err
    assert not (tmp_path / "new").exists()


def test_import_not_safetensors(tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    err = _fails(["convert", "--from-torch", str(junk), "--workdir", str(tmp_path / "new")], capsys)
    assert "junk.safetensors" in err


def _relabel(src, dst, **meta):
    with safe_open(str(src), framework="numpy") as f:
        old = f.metadata()
    save_file(load_file(str(src)), str(dst), metadata={**old, **meta})


def test_torch_ref_reads_the_files_prediction(exported, noise_file, tmp_path, capsys):
    """The shared run is trained at today's default, x0 (the agreement above is an x0 chain); the
    same weights labelled eps sample otherwise in torch_ref; the chapter loop and an unknown
    type are refused in one line."""
    assert load_unet(exported)[1]["prediction"] == "x0"
    eps_file, bad = tmp_path / "eps.safetensors", tmp_path / "bad.safetensors"
    _relabel(exported, eps_file, prediction="eps")
    _relabel(exported, bad, prediction="score")
    outs = []
    for weights in (exported, eps_file):
        out = tmp_path / f"{weights.stem}.npz"
        assert torch_sample.main(["--weights", str(weights), "--out", str(out), "--noise", str(noise_file),
                                  "--bn-stats", "running"]) == 0
        outs.append(np.load(out)["samples"])
    assert np.abs(outs[0] - outs[1]).max() > 0.1
    capsys.readouterr()
    for weights, argv, says in ((exported, ["--sampler", "chapter"], "the chapter's printed loop reads a noise (eps) "
                                                                      "model; --weights"),
                                (bad, [], "bad metadata (prediction must be one of eps, x0, v, got 'score')")):
        with pytest.raises(SystemExit) as e:
            torch_sample.main(["--weights", str(weights), "--out", str(tmp_path / "x.png"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and says in err[-1], err
    assert not (tmp_path / "x.png").exists()
