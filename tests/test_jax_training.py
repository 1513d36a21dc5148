"""jax_ddpm.training: the random draws, the optimiser vs a float64 Adam oracle, the state, and
the donated jit step fitting a fixed batch."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_ddpm import UNet, make_schedule, parallel, training
from parity_tests.variants import VARIANT_IDS, VARIANTS


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_draw_t_and_noise(variant):
    x0 = jnp.zeros((64, 4, 4, 1))
    draw = variant(training.draw_t_and_noise, static_argnums=(3,))
    key = jax.random.key(0)
    t1, n1 = draw(key, jnp.asarray(3), x0, 10)
    t2, n2 = draw(key, jnp.asarray(3), x0, 10)
    t3, n3 = draw(key, jnp.asarray(4), x0, 10)
    assert t1.dtype == jnp.int32 and t1.shape == (64,) and n1.shape == x0.shape and n1.dtype == jnp.float32
    assert int(t1.min()) >= 0 and int(t1.max()) <= 9 and len(np.unique(np.asarray(t1))) > 5
    np.testing.assert_array_equal(np.asarray(t1), np.asarray(t2))  # same (key, step): same draws
    np.testing.assert_array_equal(np.asarray(n1), np.asarray(n2))
    assert not np.array_equal(np.asarray(n1), np.asarray(n3))       # the step is folded in


def _adam_oracle(grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.Adam's update in float64 (Kingma & Ba 2015, Alg. 1): the parameter after each step."""
    p = np.zeros_like(grads[0], np.float64)
    m, v, out = np.zeros_like(p), np.zeros_like(p), []
    for k, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** k)) / (np.sqrt(v / (1 - b2 ** k)) + eps)
        out.append(p.copy())
    return out


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_make_optimizer_is_torch_adam(variant):
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(50) * 10.0 ** rng.uniform(-9, -1, 50) for _ in range(6)]  # |g| from eps up
    tx = training.make_optimizer(1e-3)
    update = variant(lambda g, s, p: tx.update(g, s, p))
    p = jnp.zeros(50)
    state = tx.init(p)
    for k, (g, want) in enumerate(zip(grads, _adam_oracle(grads, 1e-3)), start=1):
        u, state = update(jnp.asarray(g, jnp.float32), state, p)
        p = optax.apply_updates(p, u)
        # optax's bias correction 1 - b2**t is float32 while its moment update uses (1 - b2)
        # in float64: nu_hat 1.3e-5 high, every update 6.4e-6 small; k updates of <= lr each
        # drift by <= 6.4e-6 k lr (measured 7.6e-6 relative to p)
        np.testing.assert_allclose(np.asarray(p), want, rtol=0, atol=1e-5 * 1e-3 * k)


def test_make_optimizer_clips_the_global_norm():
    g = {"a": jnp.full(4, 3.0), "b": jnp.full(9, 4.0 / 3)}  # global norm sqrt(36 + 16) = 7.2
    clipped = training.make_optimizer(1e-3, grad_clip=1.0)
    plain = training.make_optimizer(1e-3)
    scale = 1.0 / np.sqrt(52.0)
    u1, _ = clipped.update(g, clipped.init(g), g)
    u2, _ = plain.update(jax.tree_util.tree_map(lambda x: x * scale, g), plain.init(g), g)
    for k in g:
        np.testing.assert_allclose(np.asarray(u1[k]), np.asarray(u2[k]), rtol=1e-6)


MODEL = UNet(img_channels=1, time_emb_dim=8, features=(4, 8, 8, 8))
IMAGE = (8, 8, 1)


def test_create_train_state_structure():
    """Traced only (eval_shape): the state's tree, dtypes and static fields, no compile."""
    schedule = make_schedule(10, "cosine")
    tx = training.make_optimizer(1e-3)
    state = jax.eval_shape(lambda k: training.create_train_state(MODEL, k, IMAGE, schedule, tx), jax.random.key(0))
    model_vars = jax.eval_shape(lambda: MODEL.init(jax.random.key(0), jnp.zeros((1, *IMAGE)),
                                                   jnp.zeros((1,), jnp.int32), train=True))
    assert jax.tree_util.tree_structure(state.params) == jax.tree_util.tree_structure(model_vars["params"])
    assert jax.tree_util.tree_structure(state.batch_stats) == jax.tree_util.tree_structure(
        model_vars["batch_stats"])
    assert state.step.shape == () and state.step.dtype == jnp.int32
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    assert state.tx is tx and state.ema_decay == 0.0 and state.schedule.betas.shape == (10,)


def _numpy_state(seed: int = 0) -> training.TrainState:
    """A TrainState with the model's tree filled from NumPy (no init compile)."""
    shapes = jax.eval_shape(lambda: MODEL.init(jax.random.key(0), jnp.zeros((1, *IMAGE)),
                                               jnp.zeros((1,), jnp.int32), train=True))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.dtype == jnp.int32:
            return jnp.zeros((), jnp.int32)
        if "'var'" in name or "'scale'" in name:
            return jnp.ones(leaf.shape)
        bound = 1 / np.sqrt(np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 8)
        return jnp.asarray(rng.uniform(-bound, bound, leaf.shape).astype(np.float32))

    v = jax.tree_util.tree_map_with_path(fill, shapes)
    tx = training.make_optimizer(3e-3)
    return training.train_state_from_variables(v, MODEL.apply, tx, make_schedule(100, "cosine"))


def test_jit_train_step_donates_and_fits_a_fixed_batch():
    """The command's step (parallel.make_sharded_train_step on a one-device mesh, the state donated):
    40 Adam(3e-3) steps on one batch (t and noise drawn per step) lower the loss, and the step
    compiles once (the state placed by shard_state has the types of the step's own outputs;
    before, an equivalent single-device sharding made the second call compile it again)."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    step_fn = parallel.make_sharded_train_step(mesh)
    state = parallel.shard_state(_numpy_state(), mesh)
    batch = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (8, *IMAGE)).astype(np.float32))
    key = jax.random.key(2)
    losses = []
    for i in range(40):
        old = state
        state, metrics = step_fn(state, batch, key)
        losses.append(float(metrics["loss"]))
        if i == 0:
            assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(old.params))  # donated
            assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    assert int(state.step) == 40 and int(state.batch_stats["down1"]["bnorm"]["num_batches_tracked"]) == 80
    assert step_fn.jitted._cache_size() == 1  # one compiled program for all 40 steps
    assert np.all(np.isfinite(losses))
    # measured on this batch: 1.00 -> 0.49 (mean of the first / last 8 steps)
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses
