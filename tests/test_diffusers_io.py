"""jax_ddpm.diffusers_io: diffusers folders in and out (json + safetensors), checked against
diffusers itself where it is installed (every test that needs torch/diffusers skips without).

Folders are written by diffusers' own ``save_pretrained`` from random tiny models into tmp
folders (no hub download), read with ``load_diffusers``, written with ``save_diffusers`` and
read back by ``DDPMPipeline.from_pretrained``.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from jax_ddpm import convert
from jax_ddpm import diffusers_io as dio
from jax_ddpm.diffusers_io import DiffusersFormatError
from jax_ddpm.models import unet2d
from jax_ddpm.models.arch import ArchConfigError
from jax_ddpm.models.chapter_unet import ChapterUNetConfig
from test_unet2d import PARITY_CONFIGS, _inputs, _torch, diffusers_model, rel_err, state_dict_numpy, torch_forward

CONFIG = PARITY_CONFIGS["ddpm_like"]  # attention (old and new names), 3 channels, two levels


def _equal_variables(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
            and all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y) for x, y in zip(la, lb)))


@pytest.fixture(scope="module")
def torch_unet():
    return diffusers_model(CONFIG, seed=4)


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory, torch_unet):
    """``UNet2DModel.save_pretrained``: config.json + diffusion_pytorch_model.safetensors."""
    folder = tmp_path_factory.mktemp("unet")
    torch_unet.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory, torch_unet):
    """``DDPMPipeline(unet, DDPMScheduler(...)).save_pretrained``."""
    _torch()
    from diffusers import DDPMPipeline, DDPMScheduler

    folder = tmp_path_factory.mktemp("pipeline")
    scheduler = DDPMScheduler(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2", variance_type="fixed_large",
                              clip_sample=False, prediction_type="v_prediction")
    DDPMPipeline(unet=torch_unet, scheduler=scheduler).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- configs
def test_config_round_trips_through_diffusers_json(unet_folder):
    raw = json.loads((unet_folder / "config.json").read_text())
    assert dio.config_from_diffusers(raw) == CONFIG
    written = dio.config_to_diffusers(CONFIG)
    assert written["_class_name"] == "UNet2DModel" and dio.config_from_diffusers(written) == CONFIG
    assert {k: v for k, v in written.items() if not k.startswith("_")} == \
        {k: v for k, v in raw.items() if not k.startswith("_")}  # every argument, as diffusers writes them
    _torch()
    from diffusers import UNet2DModel

    assert dio.config_from_diffusers(dict(UNet2DModel.from_config(written).config)) == CONFIG


def test_config_bookkeeping_keys_are_ignored_and_use_default_values_applied():
    raw = dio.config_to_diffusers(CONFIG)
    raw.update(_name_or_path="somewhere", _commit_hash="abc", _diffusers_version="0.0.4", _future_private=1)
    assert dio.config_from_diffusers(raw) == CONFIG
    # diffusers drops the keys _use_default_values lists, so their class defaults apply
    raw["_use_default_values"] = ["norm_eps"]
    assert dio.config_from_diffusers(raw) == dataclasses.replace(CONFIG, norm_eps=1e-5)
    assert set(dio.BOOKKEEPING_KEYS) >= {"_class_name", "_diffusers_version", "_use_default_values"}


@pytest.mark.parametrize("key, value, field", [
    ("resnet_skip_time_act", True, "resnet_skip_time_act"),          # not a UNet2DModel argument
    ("quantization_config", {"load_in_8bit": True}, "quantization_config"),
    ("_class_name", "UNet2DConditionModel", "_class_name"),
    ("time_embedding_type", "fourier", "time_embedding_type"),
    ("num_class_embeds", 10, "num_class_embeds"),
])
def test_config_refuses_keys_that_change_the_maths(key, value, field):
    with pytest.raises(ArchConfigError) as info:
        dio.config_from_diffusers({**dio.config_to_diffusers(CONFIG), key: value})
    assert info.value.field == field and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- load
def test_load_unet_folder(unet_folder, torch_unet):
    model, variables, info = dio.load_diffusers(unet_folder)
    assert info["kind"] == "unet" and "schedule" not in info and info["config"] == CONFIG
    assert info["attention_names"] == "current" and info["weights_dtypes"] == ["float32"]
    want = convert.from_torch_state_dict(state_dict_numpy(torch_unet), table=unet2d.weight_table(CONFIG))
    assert _equal_variables(variables, want)
    assert model == unet2d.build(CONFIG)


def test_load_pipeline_folder_runs_like_diffusers(pipeline_folder, torch_unet):
    model, variables, info = dio.load_diffusers(pipeline_folder, conv_impl="xla")
    assert info["kind"] == "pipeline" and info["pipeline_class"] == "DDPMPipeline"
    assert info["scheduler_class"] == "DDPMScheduler"
    assert info["schedule"] == {"num_train_timesteps": 200, "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001,
                                "beta_end": 0.02, "prediction_type": "v_prediction", "variance_type": "fixed_large",
                                "clip_sample": False, "trained_betas": None}
    x, t = _inputs(CONFIG)
    err = rel_err(jax.jit(model.apply)(variables, x, t), torch_forward(torch_unet, x, t))
    assert err <= 1e-5  # measured 6e-7, as test_unet2d's forward parity


def test_load_unet_at_the_pipeline_root(tmp_path, unet_folder, pipeline_folder):
    """The google/ddpm-* layout: model_index.json, config.json, weights and scheduler_config.json at the root."""
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (tmp_path / name).write_bytes((unet_folder / name).read_bytes())
    (tmp_path / "model_index.json").write_bytes((pipeline_folder / "model_index.json").read_bytes())
    (tmp_path / "scheduler_config.json").write_bytes(
        (pipeline_folder / "scheduler" / "scheduler_config.json").read_bytes())
    _, variables, info = dio.load_diffusers(tmp_path)
    assert info["unet_folder"] == str(tmp_path) and info["schedule"]["num_train_timesteps"] == 200
    assert _equal_variables(variables, dio.load_diffusers(unet_folder)[1])


def test_old_attention_names_load(tmp_path, unet_folder):
    """``query/key/value/proj_attn`` (older uploads): renamed as diffusers renames them; diffusers
    itself loads the same file to the same weights."""
    from safetensors.numpy import load_file, save_file

    sd = load_file(unet_folder / "diffusion_pytorch_model.safetensors")
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in sd.items():
        for new, name in new_to_old.items():
            k = k.replace(f".{new}.", f".{name}.")
        old[k] = v
    assert any(".proj_attn." in k for k in old) and not any(".to_q." in k for k in old)
    save_file(old, tmp_path / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_bytes((unet_folder / "config.json").read_bytes())
    _, variables, info = dio.load_diffusers(tmp_path)
    assert info["attention_names"] == "old"
    assert _equal_variables(variables, dio.load_diffusers(unet_folder)[1])
    _torch()
    from diffusers import UNet2DModel

    theirs = state_dict_numpy(UNet2DModel.from_pretrained(tmp_path))
    assert all(np.array_equal(theirs[k], v) for k, v in sd.items())


def test_sharded_fp16_and_bf16_weights_load(tmp_path, torch_unet):
    """A sharded file, a ``fp16`` variant, a bfloat16 file: widened to float32 exactly."""
    torch = _torch()
    torch_unet.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    want = dio.load_diffusers(tmp_path / "sharded")[1]
    assert _equal_variables(want, convert.from_torch_state_dict(state_dict_numpy(torch_unet),
                                                                table=unet2d.weight_table(CONFIG)))
    for dtype, variant in ((torch.float16, "fp16"), (torch.bfloat16, None)):
        folder = tmp_path / str(dtype)
        low = diffusers_model(CONFIG, seed=4).to(dtype)
        low.save_pretrained(folder, variant=variant)
        if variant:
            with pytest.raises(DiffusersFormatError, match="pass variant"):
                dio.load_diffusers(folder)
        _, variables, info = dio.load_diffusers(folder, variant=variant)
        assert info["weights_dtypes"] == [str(dtype).split(".")[1]]
        widened = {k: v.float().numpy() for k, v in low.state_dict().items()}
        assert _equal_variables(variables, convert.from_torch_state_dict(widened, table=unet2d.weight_table(CONFIG)))


def test_pickle_only_folder_is_refused(tmp_path, torch_unet):
    torch_unet.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(DiffusersFormatError) as info:
        dio.load_diffusers(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "diffusion_pytorch_model.bin" in msg and "pickle" in msg
    assert "safe_serialization=True" in msg


def _folder_with(tmp_path, unet_folder, edit_sd=None, edit_config=None):
    from safetensors.numpy import load_file, save_file

    sd = load_file(unet_folder / "diffusion_pytorch_model.safetensors")
    config = json.loads((unet_folder / "config.json").read_text())
    if edit_sd:
        edit_sd(sd)
    if edit_config:
        edit_config(config)
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("edit_sd, edit_config, pattern", [
    (lambda sd: sd.pop("mid_block.attentions.0.to_v.bias"), None,
     r"diffusion_pytorch_model\.safetensors: missing 1 tensor\(s\): mid_block\.attentions\.0\.to_v\.bias"),
    (lambda sd: sd.update(extra=np.zeros(3, np.float32)), None, r"unexpected 1: extra"),
    (lambda sd: sd.update({"conv_in.weight": np.zeros((16, 3, 3, 4), np.float32)}), None,
     r"misshaped tensor\(s\) for the config in .*config\.json: "
     r"conv_in\.weight \(16, 3, 3, 4\) \(expected \(16, 3, 3, 3\)\)"),
    (lambda sd: sd.update({"conv_in.bias": np.zeros(16, np.int64)}), None, r"conv_in\.bias is int64"),
    (None, lambda c: c.update(block_out_channels=[16, 48]), r"misshaped tensor\(s\) for the config in .*config\.json"),
    (None, lambda c: c.update(act_fn="gelu"), r"config\.json: act_fn: only silu"),
    (None, lambda c: c.update(cross_attention_dim=8), r"config\.json: cross_attention_dim: "),
])
def test_bad_folders_are_refused_naming_the_file(tmp_path, unet_folder, edit_sd, edit_config, pattern):
    folder = _folder_with(tmp_path, unet_folder, edit_sd, edit_config)
    with pytest.raises(DiffusersFormatError, match=pattern) as info:
        dio.load_diffusers(folder)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)


def test_unreadable_inputs_are_refused(tmp_path):
    with pytest.raises(DiffusersFormatError, match="not a folder"):
        dio.load_diffusers(tmp_path / "nope")
    with pytest.raises(DiffusersFormatError, match="neither model_index.json"):
        dio.load_diffusers(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DiffusersFormatError, match=r"config\.json: not a readable JSON file"):
        dio.load_diffusers(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dio.config_to_diffusers(CONFIG)))
    with pytest.raises(DiffusersFormatError, match=r"diffusion_pytorch_model\.safetensors: not found"):
        dio.load_diffusers(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DiffusersFormatError, match="not a readable safetensors file"):
        dio.load_diffusers(tmp_path)


# ----------------------------------------------------------------------------- save
def test_save_loads_in_ddpm_pipeline_bit_exact_and_runs(tmp_path, unet_folder):
    """diffusers -> jax -> diffusers: the weights bit for bit, the scheduler as asked, one call runs."""
    torch = _torch()
    from diffusers import DDPMPipeline

    _, variables, info = dio.load_diffusers(unet_folder)
    settings = {"num_train_timesteps": 50, "beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_large",
                "clip_sample": False}
    out = dio.save_diffusers(tmp_path / "pipe", info["config"], variables, schedule_settings=settings)
    pipe = DDPMPipeline.from_pretrained(out)
    from safetensors.numpy import load_file

    theirs = state_dict_numpy(pipe.unet)
    original = load_file(unet_folder / "diffusion_pytorch_model.safetensors")
    assert set(theirs) == set(original) and all(np.array_equal(theirs[k], original[k]) for k in original)
    assert all(theirs[k].dtype == np.float32 for k in theirs)
    for key, value in settings.items():
        assert pipe.scheduler.config[key] == value
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    # and back again: the folder we wrote loads to the same variables
    _, again, info2 = dio.load_diffusers(out)
    assert _equal_variables(again, variables) and info2["schedule"]["variance_type"] == "fixed_large"


def test_save_refuses_to_overwrite_and_bad_inputs(tmp_path, unet_folder):
    _, variables, _ = dio.load_diffusers(unet_folder)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(DiffusersFormatError, match="not an empty folder; refusing to overwrite"):
        dio.save_diffusers(full, CONFIG, variables)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    dio.save_diffusers(tmp_path / "empty", CONFIG, variables)  # an empty folder is fine
    assert (tmp_path / "empty" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    cases = [
        (dict(model_config=ChapterUNetConfig()), "needs a UNet2DConfig"),
        (dict(model_config=dataclasses.replace(CONFIG, sample_size=None)), "no sample_size"),
        (dict(model_config=dataclasses.replace(CONFIG, block_out_channels=(16, 48))), "lack|misshaped"),
        (dict(model_config=dataclasses.replace(CONFIG, layers_per_block=1)), "does not have: params/down_blocks_0/"),
        (dict(model_config=dataclasses.replace(CONFIG, layers_per_block=3)), "lack"),
        (dict(schedule_settings={"beta_schedule": "cosine"}), "squaredcos_cap_v2"),
        (dict(schedule_settings={"timesteps": 10}), "unknown key 'timesteps'"),
        (dict(schedule_settings={"num_train_timesteps": 0}), "num_train_timesteps must be"),
    ]
    for i, (kwargs, pattern) in enumerate(cases):
        args = {"model_config": CONFIG, "variables": variables, **kwargs}
        with pytest.raises(DiffusersFormatError, match=pattern):
            dio.save_diffusers(tmp_path / f"bad{i}", **args)
        assert not (tmp_path / f"bad{i}").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]  # no temporary folder left


def test_scheduler_config_defaults_are_ddpm_schedulers():
    """Every DDPMScheduler argument is written, with the installed diffusers' defaults."""
    _torch()
    import inspect

    from diffusers import DDPMScheduler

    written = dio.scheduler_config()
    params = {k: p.default for k, p in inspect.signature(DDPMScheduler.__init__).parameters.items() if k != "self"}
    assert {k: v for k, v in written.items() if not k.startswith("_")} == params
