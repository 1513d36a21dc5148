"""jax_ddpm.models: the sinusoidal embedding and TorchBatchNorm vs float64 oracles; UNet input checks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ddpm.models import SinusoidalPositionEmbeddings, TorchBatchNorm, UNet
from parity_tests import oracle
from parity_tests.variants import VARIANT_IDS, VARIANTS


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dim", [16, 32, 128])
def test_embedding_matches_oracle(variant, dim):
    t = np.arange(1000)
    emb = SinusoidalPositionEmbeddings(dim)
    got = np.asarray(variant(lambda t: emb.apply({}, t))(jnp.asarray(t)))
    assert got.shape == (1000, dim) and got.dtype == np.float32
    # sin/cos of the fp32 argument the chapter's formula forms: measured 3.2e-8
    np.testing.assert_allclose(got, oracle.sinusoidal_embedding(t, dim, float32_argument=True), rtol=0, atol=1e-6)
    # the exact argument: fp32 rounding of t * f_k <= T 2^-24 (2 + 2/e) = 1.6e-4; measured 5e-5
    np.testing.assert_allclose(got, oracle.sinusoidal_embedding(t, dim), rtol=0, atol=1.7e-4)


def _bn_input(seed: int, shape=(4, 5, 6, 3)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * rng.uniform(0.5, 3, shape[-1]) + rng.uniform(-2, 2, shape[-1])).astype(
        np.float32)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_torch_batchnorm_train_mode_matches_oracle(variant):
    bn = TorchBatchNorm()
    x1, x2 = _bn_input(0), _bn_input(1)
    variables = bn.init(jax.random.key(0), jnp.asarray(x1), True)
    assert int(variables["batch_stats"]["num_batches_tracked"]) == 0  # init does not count
    scale = np.array([0.5, 1.0, 2.0], np.float32)
    bias = np.array([0.1, -0.2, 0.3], np.float32)
    params = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}
    step = variant(lambda v, x: bn.apply(v, x, True, mutable=["batch_stats"]))
    stats = variables["batch_stats"]
    r_mean, r_var = np.zeros(3), np.ones(3)
    for k, x in enumerate((x1, x2), start=1):
        y, mutated = step({"params": params, "batch_stats": stats}, jnp.asarray(x))
        stats = mutated["batch_stats"]
        o_y, r_mean, r_var = oracle.batchnorm_train(x, r_mean, r_var, scale, bias, momentum=0.1, eps=1e-5)
        np.testing.assert_allclose(np.asarray(y), o_y, rtol=0, atol=2e-6)  # |y| <= 10; measured 5e-7
        # running var uses the UNBIASED batch variance (n/(n-1), n = 120): 0.8% away from biased
        np.testing.assert_allclose(np.asarray(stats["mean"]), r_mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(stats["var"]), r_var, rtol=1e-6)
        assert int(stats["num_batches_tracked"]) == k
        assert stats["mean"].dtype == jnp.float32 and stats["num_batches_tracked"].dtype == jnp.int32


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_torch_batchnorm_eval_mode_uses_running_stats(variant):
    bn = TorchBatchNorm()
    x = _bn_input(2)
    mean = np.array([0.5, -1.0, 2.0], np.float32)
    var = np.array([0.25, 4.0, 1.5], np.float32)
    variables = {"params": {"scale": jnp.full(3, 2.0), "bias": jnp.full(3, 0.5)},
                 "batch_stats": {"mean": jnp.asarray(mean), "var": jnp.asarray(var),
                                 "num_batches_tracked": jnp.asarray(7, jnp.int32)}}
    y = variant(lambda v, x: bn.apply(v, x, False))(variables, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), oracle.batchnorm_eval(x, mean, var, 2.0, 0.5), rtol=0, atol=2e-6)


@pytest.fixture(scope="module")
def tiny_unet():
    """The model and its variables' shapes: the checks below run at trace time (eval_shape, no compile)."""
    model = UNet(img_channels=1, time_emb_dim=8, features=(4, 4, 4, 4))
    return model, jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                                                    jnp.zeros((1,), jnp.int32)))


@pytest.mark.parametrize("hw", [(12, 16), (16, 20), (4, 4), (9, 8)])
def test_unet_rejects_sizes_not_divisible_by_8(tiny_unet, hw):
    model, variables = tiny_unet
    with pytest.raises(ValueError, match="divisible by 8"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, *hw, 1)), jnp.zeros((1,), jnp.int32))


def test_unet_rejects_wrong_channel_count(tiny_unet):
    model, variables = tiny_unet
    with pytest.raises(ValueError, match="expected 1 channels, got 3"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32))


@pytest.mark.parametrize("train", [False, True])
def test_unet_output_shape_and_dtype(tiny_unet, train):
    model, variables = tiny_unet
    out = jax.eval_shape(lambda v, x, t: model.apply(v, x, t, train=train, mutable=["batch_stats"])[0],
                         variables, jnp.ones((2, 16, 8, 1)), jnp.array([0, 5]))
    assert out.shape == (2, 16, 8, 1) and out.dtype == jnp.float32
