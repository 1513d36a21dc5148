"""The architecture registry, and a model without BatchNorm through state, loss, step, checkpoint and convert.

Each registered architecture is checked against itself only where nothing else can be
(its table covers exactly its variables; its metadata round-trips; its size multiple is
enforced). ``GroupNormNet`` is a test-only architecture with no ``batch_stats``: it goes
through the same train-step, checkpoint and convert code as the chapter's U-Net, and its
gradient step is compared with optax applied by hand.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_ddpm import checkpoint as ckpt
from jax_ddpm import convert, training
from jax_ddpm.models import registry
from jax_ddpm.models.arch import ArchConfigError, Architecture
from jax_ddpm.models.chapter_unet import ChapterUNetConfig
from jax_ddpm.schedules import make_schedule

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

SMALL_FIELDS = {"chapter": {"features": (4, 8, 8, 8), "time_emb_dim": 8}, "unet2d": {"arch_config": ""}}


def _small_config(arch: Architecture):
    """A config small enough to compile in a second or two (the unet2d default is the digits model)."""
    if arch.name == "unet2d":
        return arch.config_cls(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                               down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                               up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
                               attention_head_dim=4)
    return arch.config_from_fields(1, **SMALL_FIELDS[arch.name])


def _paths(tree) -> set[tuple[str, ...]]:
    return {tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module", params=registry.ARCH_NAMES)
def built(request):
    arch = registry.get_arch(request.param)
    config = _small_config(arch)
    model = arch.build(config)
    size = arch.size_multiple(config)
    # shapes only (jax.eval_shape): the table, the collections and the size check need no compiled model
    variables = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, size, size, 1)), jnp.zeros((1,), jnp.int32),
                                                    train=True), jax.random.key(0))
    return arch, config, model, variables


def test_every_arch_builds_its_config_from_the_fields_it_names():
    assert set(SMALL_FIELDS) == set(registry.ARCH_NAMES)
    for name in registry.ARCH_NAMES:
        arch = registry.get_arch(name)
        assert set(SMALL_FIELDS[name]) == set(arch.fields)
        config = arch.config_from_fields(3, **SMALL_FIELDS[name])
        assert isinstance(config, arch.config_cls) and arch.from_metadata(arch.to_metadata(config)) == config


def test_weight_table_covers_exactly_the_variables(built):
    arch, config, _, variables = built
    table = arch.weight_table(config)
    assert {path for _, path, _ in table} == _paths(variables)
    assert len({name for name, _, _ in table}) == len(table)  # torch names are unique


def test_has_batch_stats_matches_the_module(built):
    arch, _, _, variables = built
    assert ("batch_stats" in variables) == arch.has_batch_stats


def test_metadata_round_trips(built):
    arch, config, _, _ = built
    meta = arch.to_metadata(config)
    assert meta["arch"] == arch.name and all(isinstance(v, str) for v in meta.values())
    assert arch.from_metadata(meta) == config
    assert convert.arch_from_metadata(meta) == (arch.name, config)


def test_size_multiple_is_enforced(built):
    arch, config, model, variables = built
    size = arch.size_multiple(config)
    with pytest.raises(ValueError, match="divisible"):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, size + size // 2, size, 1)), jnp.zeros((1,), jnp.int32)),
                       variables)


def test_unknown_arch_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"arch must be one of chapter, unet2d, got 'nope'"):
        registry.get_arch("nope")


@pytest.mark.parametrize("fields, field", [
    ({"features": (4, 8, 8), "time_emb_dim": 8}, "features"),
    ({"features": (4, 8, 0, 8), "time_emb_dim": 8}, "features"),
    ({"features": (4, 8, 8, 8), "time_emb_dim": 7}, "time_emb_dim"),
])
def test_chapter_config_refuses_what_it_does_not_implement(fields, field):
    with pytest.raises(ArchConfigError) as info:
        registry.get_arch("chapter").config_from_fields(1, **fields)
    assert info.value.field == field and "\n" not in str(info.value)


def test_metadata_without_arch_is_the_chapter():
    """Files written before the registry have no ``arch`` key."""
    meta = {"img_channels": "3", "time_emb_dim": "8", "features": "4,8,8,16", "timesteps": "10", "schedule": "linear"}
    assert convert.arch_from_metadata(meta) == ("chapter", ChapterUNetConfig(3, 8, (4, 8, 8, 16)))
    with pytest.raises(ValueError, match="metadata lacks features"):
        convert.arch_from_metadata({k: v for k, v in meta.items() if k != "features"})


# ----------------------------------------------------------------------------- a model without BatchNorm
class GroupNormNet(nn.Module):
    """conv -> GroupNorm -> SiLU (+ a time bias) -> conv: no batch_stats collection."""

    channels: int = 1

    @nn.compact
    def __call__(self, x, t, train: bool = False):
        h = nn.Conv(8, (3, 3), name="conv_in")(x)                    # [B, H, W, 8]
        h = nn.silu(nn.GroupNorm(num_groups=2, name="norm")(h))
        h = h + nn.Dense(8, name="time")(t.astype(jnp.float32)[:, None] / 10.0)[:, None, None, :]
        return nn.Conv(self.channels, (3, 3), name="conv_out")(h)    # [B, H, W, C]


def _gn_table(config=None):
    rows = [(f"{m}.weight", ("params", m, "kernel"), "conv") for m in ("conv_in", "conv_out")]
    rows += [(f"{m}.bias", ("params", m, "bias"), "same") for m in ("conv_in", "conv_out", "time")]
    rows += [("time.weight", ("params", "time", "kernel"), "dense"),
             ("norm.weight", ("params", "norm", "scale"), "same"), ("norm.bias", ("params", "norm", "bias"), "same")]
    return rows


@dataclasses.dataclass(frozen=True)
class _GNConfig:
    channels: int = 1


GN_ARCH = Architecture(name="groupnorm_test", config_cls=_GNConfig, build=lambda c, **kw: GroupNormNet(c.channels),
                       weight_table=_gn_table, has_batch_stats=False, size_multiple=lambda c: 1,
                       config_from_fields=lambda channels: _GNConfig(channels), fields=(),
                       to_metadata=lambda c: {"arch": "groupnorm_test", "channels": str(c.channels)},
                       from_metadata=lambda m: _GNConfig(int(m["channels"])))


@pytest.fixture(scope="module")
def gn_state():
    model = GN_ARCH.build(_GNConfig(1))
    tx = training.make_optimizer(1e-2, grad_clip=1.0)
    return training.create_train_state(model, jax.random.key(0), (8, 8, 1), make_schedule(10, "linear"), tx,
                                       ema_decay=0.9)


def test_state_without_batch_stats(gn_state):
    assert gn_state.batch_stats is None
    assert set(gn_state.variables) == {"params"} and set(gn_state.ema_variables) == {"params"}


def test_train_step_without_batch_stats_is_optax_applied_by_hand(gn_state):
    batch = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
    t = jnp.asarray([0, 3, 6, 9], jnp.int32)
    noise = jnp.asarray(np.random.default_rng(1).normal(size=batch.shape), jnp.float32)
    new, metrics = jax.jit(training.train_step_with_noise)(gn_state, batch, t, noise)
    assert new.batch_stats is None and int(new.step) == 1

    def loss(params):  # the same loss written out, independent of training.loss_fn
        s = gn_state.schedule
        x_t = s.sqrt_alphas_cumprod[t][:, None, None, None] * batch + \
            s.sqrt_one_minus_alphas_cumprod[t][:, None, None, None] * noise
        return jnp.mean((gn_state.apply_fn({"params": params}, x_t, t, train=True) - noise) ** 2)

    value, grads = jax.value_and_grad(loss)(gn_state.params)
    updates, _ = gn_state.tx.update(grads, gn_state.opt_state, gn_state.params)
    want = optax.apply_updates(gn_state.params, updates)
    np.testing.assert_allclose(float(metrics["loss"]), float(value), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_checkpoint_without_batch_stats_round_trips(tmp_path, gn_state):
    tree = ckpt.state_to_tree(gn_state, jax.random.key(5))
    assert "batch_stats" not in tree
    manager = ckpt.make_manager(str(tmp_path))
    ckpt.save(manager, 1, tree, {"identity": {}})
    restored = ckpt.restore(manager, 1, jax.tree_util.tree_map(np.asarray, tree))
    manager.close()
    state, key = ckpt.tree_to_state(gn_state, restored)
    assert state.batch_stats is None
    for a, b in zip(jax.tree_util.tree_leaves((state.params, state.opt_state, state.ema_params)),
                    jax.tree_util.tree_leaves((gn_state.params, gn_state.opt_state, gn_state.ema_params))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(5)))


def test_convert_without_batch_stats_round_trips(gn_state):
    table = GN_ARCH.weight_table(None)
    assert {path for _, path, _ in table} == _paths(gn_state.variables)
    sd = convert.to_torch_state_dict(jax.device_get(gn_state.variables), table=table)
    assert sd["conv_in.weight"].shape == (8, 1, 3, 3) and sd["time.weight"].shape == (8, 1)  # torch layouts
    back = convert.from_torch_state_dict(sd, like=jax.device_get(gn_state.variables), table=table)
    assert set(back) == {"params"}
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(gn_state.variables)):
        assert np.array_equal(a, np.asarray(b))
