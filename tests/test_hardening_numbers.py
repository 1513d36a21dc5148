"""Issue 18, numbers and memory: imports refuse NaN/inf tensors and negative running variances
(one line, the torch name), ``sample`` and ``convert`` end with exit status 3 on a checkpoint
with NaN weights, the data stays uint8 (or the digits' 8x8 source) in memory and decodes to the
same float32 batches, and requests that cannot fit in memory are refused in one line.

``-m slow``: the samples do not depend on ``--batch-size`` when the BatchNorm statistics do
not depend on the batch, and one chunk of ``--bn-stats batch`` gives this command's old numbers.
"""
from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from cli_util import SHARED_STEPS, shared_run, train_cmd
from jax_ddpm import checkpoint as ckpt
from jax_ddpm import data
from jax_ddpm.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _fails(argv, capsys, status=2) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == status, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("jax-ddpm"), err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("hardening_export") / "model.safetensors"
    assert main(["convert", "--workdir", str(trained), "--out", str(out)]) == 0
    return out


def _edited(src, dst, name, edit):
    with safe_open(str(src), framework="numpy") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    tensors[name] = edit(tensors[name].copy())
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _set(value):
    def edit(a):
        a.reshape(-1)[3] = value
        return a
    return edit


# ----------------------------------------------------------------------------- item 7: imports
@pytest.mark.parametrize("name,edit,needle", [
    ("down1.conv1.weight", _set(np.nan), "tensor down1.conv1.weight holds NaN (1 of"),
    ("up2.transform.weight", _set(-np.inf), "tensor up2.transform.weight holds inf (1 of"),
    ("down2.bnorm.running_var", _set(-0.5), "tensor down2.bnorm.running_var (a BatchNorm running variance) has "
                                            "negative entries (min -0.5)"),
])
def test_import_refuses_impossible_tensors_by_torch_name(exported, tmp_path, capsys, name, edit, needle):
    bad = _edited(exported, tmp_path / "bad.safetensors", name, edit)
    err = _fails(["convert", "--from-torch", str(bad), "--workdir", str(tmp_path / "new")], capsys)
    assert f"--from-torch {bad}: {needle}" in err
    assert not (tmp_path / "new").exists()
    from jax_ddpm import from_torch_state_dict  # the library loader refuses it too

    with pytest.raises(ValueError, match=needle.split(" (")[0]):
        from_torch_state_dict(load_file(str(bad)))


def test_import_names_a_wrong_dtype_by_its_torch_name(exported, tmp_path, capsys):
    bad = _edited(exported, tmp_path / "f64.safetensors", "down1.conv1.bias", lambda a: a.astype(np.float64))
    err = _fails(["convert", "--from-torch", str(bad), "--workdir", str(tmp_path / "new")], capsys)
    assert "tensor down1.conv1.bias is float64, expected float32" in err


def test_diffusers_import_refuses_nan_weights(tmp_path, capsys):
    from jax_ddpm import UNet2DConfig, load_diffusers, save_diffusers
    from jax_ddpm.diffusers_io import DiffusersFormatError, WEIGHTS_NAME, expected_torch_shapes

    config = UNet2DConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                          down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                          norm_num_groups=4, add_attention=False)
    from jax_ddpm.models.unet2d import weight_table

    rng = np.random.default_rng(0)
    shapes = expected_torch_shapes(config)
    variables: dict = {}
    for name, path, layout in weight_table(config):
        shape = shapes[name]
        flax_shape = (shape[2], shape[3], shape[1], shape[0]) if layout == "conv" else \
            tuple(reversed(shape)) if layout == "dense" else shape
        node = variables
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = rng.standard_normal(flax_shape).astype(np.float32) * 0.1
    folder = save_diffusers(tmp_path / "pipe", config, variables, {"num_train_timesteps": 10})
    weights = folder / "unet" / WEIGHTS_NAME
    tensors = load_file(str(weights))
    tensors["conv_in.weight"].reshape(-1)[0] = np.nan
    save_file(tensors, str(weights), metadata={"format": "pt"})
    err = _fails(["convert", "--from-diffusers", str(folder), "--workdir", str(tmp_path / "new")], capsys)
    assert f"{weights}: tensor conv_in.weight holds NaN (1 of" in err
    with pytest.raises(DiffusersFormatError, match="tensor conv_in.weight holds NaN"):
        load_diffusers(folder)


# ----------------------------------------------------------------------------- item 7: NaN weights in a checkpoint
def test_nan_weights_in_a_checkpoint_end_sample_and_convert_with_status_3(trained, tmp_path, capsys):
    from jax_ddpm.app.workdir import load_run

    wd = tmp_path / "nan"
    shutil.copytree(trained, wd)
    run = load_run(str(wd))
    ema = jax.tree_util.tree_map(np.array, jax.device_get(run.state.ema_params))
    ema["down1"]["conv1"]["kernel"][0, 0, 0, 0] = np.nan
    state = run.state.replace(ema_params=ema)
    manager = ckpt.make_manager(str(wd), keep=5)
    try:
        ckpt.save(manager, SHARED_STEPS + 1, ckpt.state_to_tree(state, jax.random.key(0)), dict(run.meta))
    finally:
        manager.close()
    for command, out in (("sample", "x.png"), ("convert", "m.safetensors")):
        err = _fails([command, "--workdir", str(wd), "--out", str(tmp_path / out)], capsys, status=3)
        assert f"checkpoint {SHARED_STEPS + 1}: tensor down1.conv1.weight holds NaN (1 of" in err
        assert "nothing written" in err and not (tmp_path / out).exists()


def test_non_finite_samples_are_not_written(tmp_path):
    from jax_ddpm.app.console import NonFiniteError
    from jax_ddpm.app.sample import _finite

    class Run:
        step, config = 7, type("C", (), {"workdir": str(tmp_path)})

    samples = np.zeros((3, 2, 2, 1), np.float32)
    assert _finite(samples, 0, Run) is samples
    samples[1, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteError, match=r"sampling checkpoint 7 gave NaN/inf \(image 5 first\)"):
        _finite(samples, 4, Run)


# ----------------------------------------------------------------------------- item 8: data in memory
def test_images_stay_uint8_and_decode_to_the_same_batches(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=pixels)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(pixels[:9]):
        Image.fromarray(im).save(folder / f"{i}.png")
    index = np.array([4, 0, 7, 7, 2])
    for source, size, channels in ((str(tmp_path / "x.npz"), 12, 3), (str(tmp_path / "x.npz"), 8, 1),
                                   (str(folder), 8, 3), ("digits", 8, 1), ("digits", 24, 3)):
        full = data.load_images(source, size, channels)  # the float32 set (what training held before)
        kept = data.load_image_set(source, size, channels)
        assert kept.shape == full.shape and data.fingerprint(kept) == data.fingerprint(full)
        np.testing.assert_array_equal(kept[index], full[index])  # bit for bit, batch by batch
        if source != "digits":
            assert kept.codes.dtype == np.uint8 and kept.codes.nbytes == full.nbytes // 4
    assert data.load_image_set("digits", 64, 1).nbytes == 1797 * 8 * 8 * 4  # the 8x8 source, whatever the size


def test_data_that_cannot_fit_in_memory_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "x.npz", images=np.zeros((50, 8, 8, 1), np.uint8))
    with pytest.raises(data.DataError, match=r"x.npz: the 50 images of 64x64x1 as uint8 need about 204.8 KB of "
                                             r"memory, more than the 1.0 KB available"):
        data.load_image_set(str(tmp_path / "x.npz"), 64, 1, available=1000)
    monkeypatch.setattr(data, "available_memory", lambda: 1000)
    err = _fails(train_cmd(tmp_path / "w", "--xla-flags", "none", "--data", str(tmp_path / "x.npz"))[3:], capsys)
    assert "need about 3.2 KB of memory, more than the 1.0 KB available" in err
    assert not (tmp_path / "w").exists()


def test_sampling_more_than_fits_is_refused_before_computing(trained, tmp_path, capsys):
    err = _fails(["sample", "--workdir", str(trained), "--out", str(tmp_path / "x.npz"), "--num", str(10 ** 12)],
                 capsys)
    assert f"--num {10 ** 12}: {10 ** 12} images of 8x8x1 need about" in err and "more than the" in err
    assert not os.listdir(tmp_path)


def test_the_default_chunk_fits_the_memory_and_a_chunk_that_cannot_is_refused(trained):
    from jax_ddpm.app.config import ConfigError, SampleConfig
    from jax_ddpm.app.sample import chunk_size, forward_bytes_per_image
    from jax_ddpm.app.workdir import load_run

    run = load_run(str(trained))
    upper, lower = forward_bytes_per_image(run.config.model, run.state.ema_variables, (8, 8, 1))
    assert 8 * 8 * 4 <= lower <= upper
    config = SampleConfig(workdir=str(trained), out="x.png")
    assert chunk_size(config, 100, (upper, lower), False, None) == 100
    assert chunk_size(config, 100_000, (upper, lower), False, None) == 1024  # MAX_DEFAULT_CHUNK
    assert chunk_size(config, 100, (upper, lower), False, 10 * upper) == 5  # half the memory
    assert chunk_size(config, 100, (upper, lower), True, 10 * upper) == 5
    given = SampleConfig(workdir=str(trained), out="x.png", batch_size=5000)
    assert chunk_size(given, 5000, (upper, lower), False, 5000 * lower) == 5000
    with pytest.raises(ConfigError, match=r"--batch-size 5000: 5000 images at once need at least .* of memory, "
                                          r"more than the .* available; use a smaller --batch-size"):
        chunk_size(given, 5000, (upper, lower), False, 5000 * lower - 1)


# ----------------------------------------------------------------------------- -m slow: chunking
@pytest.mark.slow
def test_samples_do_not_depend_on_the_chunking_without_batch_statistics(trained, tmp_path, capsys):
    outs = []
    for i, batch in enumerate((None, "7", "20")):
        out = tmp_path / f"s{i}.npz"
        argv = ["sample", "--workdir", str(trained), "--out", str(out), "--num", "20", "--bn-stats", "running"]
        assert main(argv + ([] if batch is None else ["--batch-size", batch])) == 0, capsys.readouterr().err
        outs.append(np.load(out)["samples"])
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


@pytest.mark.slow
def test_one_chunk_of_batch_statistics_gives_the_old_numbers(trained, tmp_path, capsys):
    from jax_ddpm.app.factories import build_model_from
    from jax_ddpm.app.workdir import load_run
    from jax_ddpm.sampling import make_sample_fn

    run = load_run(str(trained))
    key = jax.random.key(3)
    x_T = jax.random.normal(jax.random.fold_in(key, 0), (20, 8, 8, 1))
    old = make_sample_fn(build_model_from(run.config.model), "ddpm", bn_stats="batch", variance="beta_tilde",
                         clip_denoised=True)(run.state.ema_variables, run.state.schedule, x_T, jax.random.fold_in(key, 1))
    assert main(["sample", "--workdir", str(trained), "--out", str(tmp_path / "s.npz"), "--num", "20",
                 "--seed", "3"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["samples"], np.asarray(old))
