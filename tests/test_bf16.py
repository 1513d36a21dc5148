"""bfloat16 mixed precision: bf16 compute, float32 parameters, optimizer state, BN stats, loss.

``--dtype bfloat16`` builds ``UNet(dtype=jnp.bfloat16)``: activations and matmuls/convs run
in bf16; parameters stay float32 (``param_dtype``), ``TorchBatchNorm`` normalises and keeps
its statistics in float32, the network output and the MSE are float32, so gradients, Adam
moments and the EMA are float32 as well.

Deviation from the float32 step (same parameters, batch, key; the tiny UNet of
``test_parallel``: features (8, 16, 32, 64), 16x16x3 images, batch 8, Adam lr 1e-3), measured
on jax 0.10.2 CPU. The two steps run in ``test_parallel``'s subprocess (which compiles the
float32 step anyway), through :func:`measure_bf16` below:
  loss, relative                              8.5e-6    bound 1e-4
  gradient, ||g_bf16 - g_32|| / ||g_32||      0.19      bound 0.3
  update,   ||u_bf16 - u_32|| / ||u_32||      0.58      bound 0.8
  BN running stats, max abs                   2.3e-4    bound 1e-3
The loss hardly moves because a freshly initialised net predicts eps ~ 0, so the MSE is
dominated by ||eps||^2, which is float32. The gradient error is not accumulation: XLA
accumulates bf16 convolutions in float32 (a bf16 conv's kernel gradient equals the float32
one on bf16-rounded inputs, bit for bit, checked on CPU). It is the 2^-8 rounding of
activations and cotangents, growing layer by layer as backprop goes deeper, with the big
jumps across BatchNorm's backward (which subtracts the mean and x_hat components of the
cotangent, so cancellation magnifies its rounding): 0.3 % at ``outc``, 1-10 % in ``up3``, 20-45 % in ``down3``/``up1`` (gradient
cosine 0.91-0.99 per tensor, 0.98 overall). The update bound is loose on purpose: Adam's
first step is lr * g / (|g| + 1e-8) ~ lr * sign(g), so each element whose gradient sign
bf16 flips moves by 2 lr.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ddpm import parallel
from test_parallel import GLOBAL_BATCH, sharded_worker_result, tiny_batch, tiny_train_state

LOSS_RTOL = 1e-4
GRAD_RTOL = 0.3
UPDATE_RTOL = 0.8
BN_ATOL = 1e-3


def _tree_rel(a, b) -> float:
    """||a - b|| / ||b|| over all leaves (float64)."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)) for x, y in zip(la, lb))
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in lb)
    return float(np.sqrt(num / den))


def measure_bf16(x, key, state32, out32, metrics32) -> dict:
    """Runs one bfloat16 step from ``state32``'s parameters; measures it against the float32 one.

    Args:
      x: [B, H, W, C] batch; key: the step key; state32: the float32 TrainState before the
        step (built by ``tiny_train_state``); out32, metrics32: its float32 step's outputs.

    Returns:
      JSON-able dict: relative loss/gradient/update deviations, BN stats max abs deviation,
      the dtypes of every state part and metric, and ``check_float32_state``'s verdict.
    """
    from jax_ddpm.training import train_step
    state16 = tiny_train_state(dtype=parallel.compute_dtype("bfloat16"))
    assert _tree_rel(state16.params, state32.params) == 0.0  # same starting point
    out16, metrics16 = jax.device_get(jax.jit(train_step)(state16, jnp.asarray(x), key))
    delta = lambda out: jax.tree_util.tree_map(np.subtract, out.params, jax.device_get(state32.params))  # noqa: E731
    try:
        parallel.check_float32_state(out16)
        verdict = "ok"
    except TypeError as e:
        verdict = str(e)
    return {
        "loss_rel": abs(float(metrics16["loss"]) - float(metrics32["loss"])) / float(metrics32["loss"]),
        "grad_rel": _tree_rel(out16.opt_state[0].mu, out32.opt_state[0].mu),  # mu = 0.1 g after step 1
        "update_rel": _tree_rel(delta(out16), delta(out32)),
        "bn_abs": max(float(np.max(np.abs(a - b))) for a, b in
                      zip(jax.tree_util.tree_leaves(out16.batch_stats), jax.tree_util.tree_leaves(out32.batch_stats))),
        "dtypes": {part: sorted({str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(getattr(out16, part))})
                   for part in ("params", "opt_state", "ema_params", "batch_stats")},
        "metric_dtypes": {k: str(v.dtype) for k, v in metrics16.items()},
        "check_float32_state": verdict,
    }


@pytest.fixture(scope="module")
def bf16() -> dict:
    return sharded_worker_result()["bf16"]


def test_compute_dtype_names():
    assert parallel.compute_dtype("float32") == jnp.float32
    assert parallel.compute_dtype("bfloat16") == jnp.bfloat16
    with pytest.raises(ValueError, match=r"--dtype must be one of \('float32', 'bfloat16'\), got 'float16'"):
        parallel.compute_dtype("float16")


def test_bf16_model_computes_in_bf16():
    state = tiny_train_state(dtype=jnp.bfloat16)
    x = jnp.asarray(tiny_batch(GLOBAL_BATCH))
    jaxpr = str(jax.make_jaxpr(lambda v: state.apply_fn(v, x, jnp.zeros((x.shape[0],), jnp.int32), train=True,
                                                        mutable=["batch_stats"]))(state.variables))
    convs = [line for line in jaxpr.splitlines() if "= conv_general_dilated[" in line or "= dot_general[" in line]
    # inc, outc, conv1/conv2/transform of six blocks, six time_mlp Dense; on CPU conv_impl='auto'
    # writes some convolutions as several convs or a matmul (jax_ddpm/models/convolutions.py)
    assert len(convs) >= 2 + 3 * 6 + 6
    assert all(":bf16[" in line.split("=")[0] for line in convs), convs


def test_bf16_state_stays_float32(bf16):
    assert bf16["check_float32_state"] == "ok"
    assert bf16["dtypes"] == {"params": ["float32"], "opt_state": ["float32", "int32"], "ema_params": ["float32"],
                              "batch_stats": ["float32", "int32"]}
    assert bf16["metric_dtypes"] == {"loss": "float32", "grad_norm": "float32"}


def test_check_float32_state_catches_bf16_params():
    state = tiny_train_state()
    params = jax.tree_util.tree_map(lambda p: p, state.params)
    params["inc"]["kernel"] = params["inc"]["kernel"].astype(jnp.bfloat16)
    with pytest.raises(TypeError, match=r"params\['inc'\]\['kernel'\] is bfloat16, expected float32"):
        parallel.check_float32_state(state.replace(params=params))


def test_bf16_step_deviation_from_fp32_is_bounded(bf16):
    print(f"bf16 vs fp32: {bf16}")
    assert bf16["loss_rel"] <= LOSS_RTOL
    assert bf16["grad_rel"] <= GRAD_RTOL
    assert bf16["update_rel"] <= UPDATE_RTOL
    assert bf16["bn_abs"] <= BN_ATOL
    assert bf16["grad_rel"] > 1e-3  # bf16 really ran: float32 rounding alone gives ~1e-7
