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


def _bn_objective_oracle(x, scale, bias, g, c_mean, c_var):
    """sum(g * y) + sum(c_mean * new running mean) + sum(c_var * new running var), float64."""
    y, r_mean, r_var = oracle.batchnorm_train(x, np.zeros(3), np.ones(3), scale, bias, momentum=0.1, eps=1e-5)
    return float(np.sum(g * y) + np.sum(c_mean * r_mean) + np.sum(c_var * r_var))


def _central_difference(f, args, i, h=1e-5):
    """d f / d args[i] by central differences, float64, element by element."""
    args = [np.asarray(a, np.float64).copy() for a in args]
    grad = np.zeros_like(args[i])
    for idx in np.ndindex(grad.shape):
        v = args[i][idx]
        args[i][idx] = v + h
        up = f(*args)
        args[i][idx] = v - h
        down = f(*args)
        args[i][idx] = v
        grad[idx] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_torch_batchnorm_train_mode_gradient_matches_finite_differences(variant):
    """The closed-form backward (layers.batch_norm_train's custom_vjp) against float64 central
    differences of the oracle's forward: gradients wrt x, scale and bias, through the output
    and through the running statistics (the cotangents of the batch mean and variance)."""
    bn = TorchBatchNorm()
    x = _bn_input(3)
    rng = np.random.default_rng(4)
    scale = rng.uniform(0.5, 2, 3).astype(np.float32)
    bias = rng.uniform(-1, 1, 3).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    c_mean, c_var = rng.standard_normal(3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    stats = {"mean": jnp.zeros(3), "var": jnp.ones(3), "num_batches_tracked": jnp.zeros((), jnp.int32)}

    def objective(x, scale, bias):
        y, mutated = bn.apply({"params": {"scale": scale, "bias": bias}, "batch_stats": stats}, x, True,
                              mutable=["batch_stats"])
        new = mutated["batch_stats"]
        return jnp.sum(g * y) + jnp.sum(c_mean * new["mean"]) + jnp.sum(c_var * new["var"])

    got = variant(jax.grad(objective, argnums=(0, 1, 2)))(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    f = lambda x, s, b: _bn_objective_oracle(x, s, b, g, c_mean, c_var)  # noqa: E731
    for i, name in enumerate(("x", "scale", "bias")):
        want = _central_difference(f, (x, scale, bias), i)
        err = np.max(np.abs(np.asarray(got[i], np.float64) - want)) / np.max(np.abs(want))
        # fp32 gradient vs float64 differences (truncation error ~h^2, rounding ~1e-16/h):
        # measured up to 2.3e-7 (x), 2.2e-7 (scale), 1.7e-7 (bias); dropping either the
        # x-hat * d-scale term or the variance-cotangent term of the backward fails here
        assert err < 1e-6, f"d/d{name}: max error {err:.2e} of max |grad|"


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
