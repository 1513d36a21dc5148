"""jax_ddpm.checkpoint: round trip of a TrainState-like tree, finalized steps only, bad checkpoints."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_ddpm import checkpoint as ckpt
from jax_ddpm.training import TrainState

# orbax leaves tensorstore objects for the garbage collector; pytest reports them as unraisable.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(seed: int, ema: bool = True) -> TrainState:
    """A small TrainState with the real optimizer-state structure (chain of clip + Adam)."""
    rng = np.random.default_rng(seed)
    params = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
                       "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    opt_state = tx.init(params)
    grads = jax.tree_util.tree_map(lambda p: p * 0.5, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-zero moments and count
    return TrainState(step=jnp.asarray(7, jnp.int32), params=params,
                      batch_stats={"bn": {"mean": jnp.ones((4,)), "num_batches_tracked": jnp.asarray(3, jnp.int32)}},
                      opt_state=opt_state, ema_params=jax.tree_util.tree_map(lambda p: p + 1, params) if ema else None,
                      schedule=None, apply_fn=None, tx=tx, ema_decay=0.9 if ema else 0.0)


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) and
                                      np.asarray(x).dtype == np.asarray(y).dtype for x, y in zip(la, lb))


@pytest.mark.parametrize("ema", [True, False])
def test_round_trip_is_exact(tmp_path, ema):
    state, key = _state(0, ema), jax.random.key(42)
    manager = ckpt.make_manager(str(tmp_path), keep=2)
    assert ckpt.save(manager, 7, ckpt.state_to_tree(state, key), {"data_position": [2, 96]})
    manager.close()
    assert ckpt.complete_steps(str(tmp_path)) == [7]

    template = _state(1, ema)  # other values, same structure
    reader = ckpt.make_manager(str(tmp_path), read_only=True)
    tree = ckpt.restore(reader, 7, ckpt.state_to_tree(template, jax.random.key(0)))
    meta = ckpt.restore_meta(reader, 7)
    restored, restored_key = ckpt.tree_to_state(template, tree)
    assert _leaves_equal(restored.params, state.params) and _leaves_equal(restored.opt_state, state.opt_state)
    assert _leaves_equal(restored.batch_stats, state.batch_stats) and int(restored.step) == 7
    assert (restored.ema_params is None) == (not ema)
    if ema:
        assert _leaves_equal(restored.ema_params, state.ema_params)
    assert tree["rng"].dtype == np.uint32
    np.testing.assert_array_equal(jax.random.key_data(restored_key), jax.random.key_data(key))
    assert meta["data_position"] == [2, 96] and meta["step"] == 7


def test_keeps_the_last_few_and_never_overwrites(tmp_path):
    manager = ckpt.make_manager(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        assert ckpt.save(manager, step, ckpt.state_to_tree(_state(step), jax.random.key(0)), {})
    assert not ckpt.save(manager, 3, ckpt.state_to_tree(_state(9), jax.random.key(0)), {})
    manager.close()
    assert ckpt.complete_steps(str(tmp_path)) == [2, 3]
    reader = ckpt.make_manager(str(tmp_path), read_only=True)
    tree = ckpt.restore(reader, 3, ckpt.state_to_tree(_state(0), jax.random.key(0)))
    assert _leaves_equal(tree["params"], _state(3).params)  # the first save of step 3 stayed


def test_unfinalized_folders_are_not_checkpoints(tmp_path):
    manager = ckpt.make_manager(str(tmp_path))
    ckpt.save(manager, 1, ckpt.state_to_tree(_state(0), jax.random.key(0)), {})
    manager.close()
    # What a process killed mid-save leaves behind: orbax's temporary folder for step 2.
    tmp_dir = os.path.join(ckpt.checkpoint_dir(str(tmp_path)), "2.orbax-checkpoint-tmp-1234567")
    os.makedirs(os.path.join(tmp_dir, "state"))
    assert ckpt.complete_steps(str(tmp_path)) == [1]
    manager = ckpt.make_manager(str(tmp_path))  # a writable manager removes the leftover (before saving)
    ckpt.save(manager, 3, ckpt.state_to_tree(_state(3), jax.random.key(0)), {})
    manager.close()
    assert not os.path.exists(tmp_dir)
    assert ckpt.complete_steps(str(tmp_path)) == [1, 3]


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    manager = ckpt.make_manager(str(tmp_path))
    ckpt.save(manager, 5, ckpt.state_to_tree(_state(0), jax.random.key(0)), {})
    manager.close()
    state_dir = os.path.join(ckpt.checkpoint_dir(str(tmp_path)), "5", "state")
    for root, _, files in os.walk(state_dir):  # truncate every data file
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 3)
    reader = ckpt.make_manager(str(tmp_path), read_only=True)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoints/5: checkpoint is incomplete, corrupt") as e:
        ckpt.restore(reader, 5, ckpt.state_to_tree(_state(0), jax.random.key(0)))
    assert "\n" not in str(e.value)


def test_shape_mismatch_is_refused(tmp_path):
    manager = ckpt.make_manager(str(tmp_path))
    ckpt.save(manager, 1, ckpt.state_to_tree(_state(0), jax.random.key(0)), {})
    manager.close()
    other = _state(0)
    other = other.replace(params={"conv": {"kernel": jnp.zeros((3, 3, 2, 8)), "bias": jnp.zeros((8,))}})
    reader = ckpt.make_manager(str(tmp_path), read_only=True)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.restore(reader, 1, ckpt.state_to_tree(other, jax.random.key(0)))
