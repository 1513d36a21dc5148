"""jax_ddpm.convert: the weight table, exact round trips, errors naming the tensor, safetensors."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ddpm import convert
from jax_ddpm.models import UNet

FEATURES = (4, 8, 8, 16)


@pytest.fixture(scope="module")
def variables():
    """Random params, BN statistics and counts (NumPy leaves) in the model's tree (eval_shape: no compile)."""
    model = UNet(img_channels=3, time_emb_dim=8, features=FEATURES)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                                               jnp.zeros((1,), jnp.int32), train=False))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if leaf.dtype == jnp.int32:
            return np.asarray(rng.integers(1, 100), np.int32)
        values = rng.standard_normal(leaf.shape).astype(np.float32)
        return np.abs(values) if "var" in jax.tree_util.keystr(path) else values  # a variance is >= 0

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_weight_table_covers_every_variable(variables):
    table_paths = {"".join(f"['{k}']" for k in path) for _, path, _ in convert.weight_table()}
    assert table_paths == set(_flat(variables))
    torch_names = [name for name, _, _ in convert.weight_table()]
    assert len(torch_names) == len(set(torch_names)) == 82


def test_round_trip_flax_torch_flax_is_exact(variables):
    sd = convert.to_torch_state_dict(variables)
    assert sd["inc.weight"].shape == (FEATURES[0], 3, 3, 3)                    # OIHW
    assert sd["up1.transform.weight"].shape == (FEATURES[2], FEATURES[2], 4, 4)  # IOHW (ConvTranspose2d)
    assert sd["down1.time_mlp.weight"].shape == (FEATURES[1], 8)                # [out, in]
    assert sd["down1.bnorm.num_batches_tracked"].dtype == np.int64
    back = _flat(convert.from_torch_state_dict(sd, like=variables))
    for name, a in _flat(variables).items():
        assert back[name].dtype == a.dtype and np.array_equal(back[name], a), name


def test_round_trip_torch_flax_torch_is_exact(variables):
    sd = convert.to_torch_state_dict(variables)
    again = convert.to_torch_state_dict(convert.from_torch_state_dict(sd))
    assert sorted(again) == sorted(sd)
    for k in sd:
        assert again[k].dtype == sd[k].dtype and np.array_equal(again[k], sd[k]), k


def test_from_torch_never_aliases_the_input(variables):
    sd = convert.to_torch_state_dict(variables)
    out = convert.from_torch_state_dict(sd)
    sd["outc.bias"][...] = 123.0
    assert not np.any(np.asarray(out["params"]["outc"]["bias"]) == 123.0)


def _conv_transpose_reference(x: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """torch.nn.ConvTranspose2d(k=4, stride=2, padding=1) by its definition (scatter-add), NHWC x, IOHW w."""
    b, h, wd, _ = x.shape
    k = w.shape[2]
    full = np.zeros((b, 2 * h + k - 2, 2 * wd + k - 2, w.shape[1]))
    for i in range(h):
        for j in range(wd):
            full[:, 2 * i:2 * i + k, 2 * j:2 * j + k, :] += np.einsum("bc,cokl->bklo", x[:, i, j, :], w)
    return full[:, 1:1 + 2 * h, 1:1 + 2 * wd, :] + bias  # crop padding = 1 on each side


def test_conv_transpose_layout_matches_its_definition():
    """The flip in the table: torch's IOHW ConvTranspose2d weight run by Flax as a dilated conv."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)        # NHWC
    w = rng.standard_normal((6, 7, 4, 4)).astype(np.float32)        # IOHW
    bias = rng.standard_normal(7).astype(np.float32)
    conv = nn.Conv(7, (4, 4), padding=((2, 2), (2, 2)), input_dilation=(2, 2))  # as Block(up=True)
    kernel = convert._from_torch(w, "conv_transpose")
    y = conv.apply({"params": {"kernel": kernel, "bias": bias}}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), _conv_transpose_reference(x, w, bias), rtol=0, atol=1e-5)


def test_missing_tensor_is_named(variables):
    sd = convert.to_torch_state_dict(variables)
    del sd["up2.conv1.bias"]
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): up2\.conv1\.bias"):
        convert.from_torch_state_dict(sd)


def test_unexpected_tensor_is_named(variables):
    sd = convert.to_torch_state_dict(variables)
    sd["bottleneck.conv1.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(ValueError, match=r"unexpected 1: bottleneck\.conv1\.weight"):
        convert.from_torch_state_dict(sd)


def test_wrong_rank_tensor_is_named(variables):
    sd = convert.to_torch_state_dict(variables)
    sd["down1.conv2.weight"] = sd["down1.conv2.weight"][0]
    with pytest.raises(ValueError, match=r"tensor down1\.conv2\.weight has shape \(8, 3, 3\)"):
        convert.from_torch_state_dict(sd)


def test_wrong_shape_tensor_is_named_against_the_model(variables):
    sd = convert.to_torch_state_dict(variables)
    sd["outc.weight"] = np.zeros((3, 5, 3, 3), np.float32)  # the model has 4 input channels
    with pytest.raises(ValueError, match=r"tensor outc\.weight has shape \(3, 5, 3, 3\), the model needs "
                                         r"\(3, 4, 3, 3\)"):
        convert.from_torch_state_dict(sd, like=variables)


def test_safetensors_round_trip(tmp_path, variables):
    sd = convert.to_torch_state_dict(variables)
    meta = convert.metadata_for(3, 8, FEATURES, 100, "cosine")
    path = tmp_path / "unet.safetensors"
    convert.save_safetensors(path, sd, meta)
    loaded, loaded_meta = convert.load_safetensors(path)
    assert loaded_meta == {"arch": "chapter", "img_channels": "3", "time_emb_dim": "8", "features": "4,8,8,16",
                           "timesteps": "100", "schedule": "cosine"}
    assert sorted(loaded) == sorted(sd)
    for k in sd:
        assert loaded[k].dtype == sd[k].dtype and np.array_equal(loaded[k], sd[k]), k


def test_save_requires_model_metadata(tmp_path, variables):
    path = tmp_path / "unet.safetensors"
    with pytest.raises(ValueError, match="metadata lacks timesteps, schedule"):
        convert.save_safetensors(path, convert.to_torch_state_dict(variables),
                                 {"img_channels": "3", "time_emb_dim": "8", "features": "4,8,8,16"})
    assert not path.exists()


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\xff" * 64])
def test_load_rejects_non_safetensors(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        convert.load_safetensors(path)


def test_load_missing_file_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        convert.load_safetensors(tmp_path / "absent.safetensors")
