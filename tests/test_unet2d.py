"""jax_ddpm.models.unet2d: diffusers' UNet2DModel in Flax, checked live against diffusers.

The same random weights (torch's init, GroupNorm affines perturbed so their mapping is
exercised) and the same inputs go through diffusers 0.42.1 and this port, for tiny configs
that between them cover several heads and one head, ``downsample_padding`` 0 and 1,
``flip_sin_to_cos`` both ways, ``freq_shift`` 0 and 1, norm eps 1e-5 and 1e-6, odd group
counts, 1 and 3 channels, attention or none, ``layers_per_block`` 1 and 2, a separate mid
attention group count, ``center_input_sample``, ``mid_block_scale_factor`` != 1, a custom
``time_embedding_dim``, no mid block and a single level. Error = max|ours - diffusers| /
max|diffusers| over the batch; measured on the 2-core development CPU (jax 0.10.2, torch
2.13.0) and written beside each bound.

Tests that need torch and diffusers skip without them (``pytest.importorskip``); the weight
table and the train step do not need them. The config's checks and the registry entry are in
tests/test_unet2d_config.py.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ddpm import convert, training
from jax_ddpm.models import unet2d
from jax_ddpm.models.unet2d import UNet2DConfig
from jax_ddpm.schedules import make_schedule

# ----------------------------------------------------------------------------- configs
D, AD, U, AU = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"
PARITY_CONFIGS = {
    # Ho et al.'s settings (google/ddpm-*): one head, eps 1e-6, padding 0, sin first, shift 1; 3 channels
    "ddpm_like": UNet2DConfig(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                              layers_per_block=2, down_block_types=(D, AD), up_block_types=(AU, U),
                              attention_head_dim=None, norm_num_groups=8, norm_eps=1e-6, downsample_padding=0,
                              flip_sin_to_cos=False, freq_shift=1),
    # diffusers' defaults (eps 1e-5, padding 1, cos first, shift 0), 4 heads of 4, three levels, 1 channel
    "heads_defaults": UNet2DConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 16, 32),
                                   layers_per_block=1, down_block_types=(AD, D, AD), up_block_types=(AU, U, AU),
                                   attention_head_dim=4, norm_num_groups=4),
    # odd group count (3), no attention anywhere, center_input_sample, mid scale sqrt(2), time_embedding_dim 40
    "odd_groups_no_attention": UNet2DConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(12, 24),
                                            layers_per_block=1, down_block_types=(D, D), up_block_types=(U, U),
                                            add_attention=False, norm_num_groups=3, downsample_padding=0,
                                            center_input_sample=True, mid_block_scale_factor=math.sqrt(2),
                                            time_embedding_dim=40, freq_shift=1),
    # attention everywhere (2 heads), 3 in / 6 out channels, 2 layers, mid attention with its own 4 groups
    "attention_everywhere": UNet2DConfig(sample_size=8, in_channels=3, out_channels=6, block_out_channels=(8, 16),
                                         layers_per_block=2, down_block_types=(AD, AD), up_block_types=(AU, AU),
                                         attention_head_dim=8, norm_num_groups=2, attn_norm_num_groups=4,
                                         norm_eps=1e-6, flip_sin_to_cos=False, dropout=0.1),
    # one level (no resampling), no mid block, 5 groups
    "single_level_no_mid": UNet2DConfig(sample_size=4, in_channels=1, out_channels=1, block_out_channels=(10,),
                                        layers_per_block=2, down_block_types=(AD,), up_block_types=(AU,),
                                        mid_block_type=None, attention_head_dim=5, norm_num_groups=5),
}
# Measured rel error, batch of 4 at t = 0, 1, 500, 999 (bounds: float32 1e-5, float64 1e-8):
#   config                    float32   float64   float64, diffusers fed our sinusoids
#   ddpm_like                 6.2e-7    1.8e-9    1.5e-15
#   heads_defaults            5.9e-7    2.8e-9    9.8e-16
#   odd_groups_no_attention   6.2e-7    3.0e-9    1.0e-15
#   attention_everywhere      4.8e-7    4.2e-9    1.3e-15
#   single_level_no_mid       6.2e-7    3.1e-9    1.4e-15
# float32: summation order (convolutions, GroupNorm and attention reductions). float64: the
# time embedding's sinusoids are float32 in both (diffusers computes them so for a float64
# model), and XLA's float32 sin/cos differ from torch's by 1 ulp in ~10% of the entries
# (test_timestep_embedding_matches_diffusers); fed the same sinusoids, the two float64
# networks agree to 1e-15 (FLOAT64_SAME_EMBEDDING_RTOL).
FLOAT32_RTOL = 1e-5
FLOAT64_RTOL = 1e-8
FLOAT64_SAME_EMBEDDING_RTOL = 1e-13
BATCH_T = np.array([0, 1, 500, 999])


def _torch():
    torch = pytest.importorskip("torch", reason="the diffusers comparison needs torch")
    pytest.importorskip("diffusers", reason="the diffusers comparison needs diffusers")
    return torch


def diffusers_model(config: UNet2DConfig, seed: int = 0):
    """A diffusers UNet2DModel of ``config`` with torch's init, GroupNorm affines perturbed."""
    torch = _torch()
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(**config.to_dict()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # torch inits them to ones / zeros: make the mapping matter
                p.add_(0.2 * torch.randn_like(p))
    return model


def state_dict_numpy(torch_model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _inputs(config: UNet2DConfig, dtype=np.float32):
    rng = np.random.default_rng(1)
    size = max(config.sample_size, unet2d.size_multiple(config))
    x = rng.standard_normal((len(BATCH_T), size, size, config.in_channels)).astype(dtype)  # [B, H, W, C]
    return x, BATCH_T


def torch_forward(torch_model, x_nhwc: np.ndarray, t: np.ndarray) -> np.ndarray:
    torch = _torch()
    with torch.no_grad():
        out = torch_model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))),
                          torch.from_numpy(t)).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=sorted(PARITY_CONFIGS))
def parity_case(request):
    """(name, config, diffusers model, its state dict as NumPy)."""
    config = PARITY_CONFIGS[request.param]
    torch_model = diffusers_model(config)
    return request.param, config, torch_model, state_dict_numpy(torch_model)


# ----------------------------------------------------------------------------- the weight table
@pytest.fixture(scope="module")
def digits():
    """The registry's digits-sized default and its variables' shapes (16x16x1; traced, not compiled)."""
    config = unet2d.default_config(1)
    model = unet2d.build(config)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)),
                                                  jnp.zeros((1,), jnp.int32), train=True))
    return config, model, variables


def test_weight_table_covers_exactly_the_variables(digits):
    config, _, variables = digits
    table = unet2d.weight_table(config)
    paths = {tuple(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(variables)}
    assert {path for _, path, _ in table} == paths and set(variables) == {"params"}
    assert len({name for name, _, _ in table}) == len(table)
    n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(variables))
    assert 1_100_000 < n < 1_120_000  # the digits default: 1.11 M parameters


def test_size_multiple_and_channels_are_enforced(digits):
    _, model, variables = digits
    t = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="divisible by 4, got 6x8"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 6, 8, 1)), t)
    with pytest.raises(ValueError, match="expected 1 channels, got 3"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 8, 8, 3)), t)


def test_weight_table_names_and_shapes_are_diffusers(parity_case):
    _, config, _, sd = parity_case
    table = unet2d.weight_table(config)
    assert [name for name, _, _ in table] and {name for name, _, _ in table} == set(sd)
    variables = convert.from_torch_state_dict(sd, table=table)
    model = unet2d.build(config)
    size = unet2d.size_multiple(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, config.in_channels)),
                                               jnp.zeros((1,), jnp.int32)))
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(variables)
    for want, got in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(variables)):
        assert want.shape == got.shape


def test_weight_round_trip_is_bit_exact(parity_case):
    """diffusers state dict -> Flax variables -> diffusers state dict: every tensor bit-identical."""
    _, config, _, sd = parity_case
    table = unet2d.weight_table(config)
    back = convert.to_torch_state_dict(convert.from_torch_state_dict(sd, table=table), table=table)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k


# ----------------------------------------------------------------------------- forward parity
def test_timestep_frequencies_are_within_one_ulp_of_torch():
    """The frequency table is a constant: float32 exponent as torch forms it, exp in float64
    rounded once. torch's float32 exp (MKL/SLEEF, platform-dependent) is not correctly rounded:
    measured here, 932 of 89,698 entries (dims 4..598, shifts 0 and 1) are 1 ulp off ours, none
    more; the dims the parity configs use (8..32) agree exactly. A 1-ulp table entry f moves
    sin(t f) by up to t * ulp(f) (3e-5 at t = 999 for f ~ 0.42, dim 64 shift 0)."""
    torch = _torch()
    for dim in list(range(4, 130, 2)) + [160, 224, 256, 512]:
        for shift in (0, 1):
            half = dim // 2
            ref = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / (half - shift)).numpy()
            ours = unet2d.timestep_frequencies(dim, shift)
            ulps = np.abs(ours.view(np.int32).astype(np.int64) - ref.view(np.int32).astype(np.int64))
            assert ulps.max() <= 1, (dim, shift)
            if dim in (8, 10, 12, 16, 32):
                assert ulps.max() == 0, (dim, shift)


@pytest.mark.parametrize("dim, flip, shift", [(16, True, 0), (16, False, 1), (32, False, 1), (12, True, 1),
                                              (33, True, 0)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    """Same table (dims chosen where it agrees exactly); the rest is XLA's float32 sin/cos vs
    torch's: measured 6.0e-8 max (1 ulp of values <= 1)."""
    torch = _torch()
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.arange(1000)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
    got = np.asarray(jax.jit(unet2d.timestep_embedding, static_argnums=(1, 2, 3))(jnp.asarray(t), dim, flip, shift))
    assert got.shape == ref.shape == (1000, dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=2.4e-7)


def test_forward_float32_matches_diffusers(parity_case):
    name, config, torch_model, sd = parity_case
    x, t = _inputs(config)
    ref = torch_forward(torch_model, x, t)
    model = unet2d.build(config, conv_impl="xla")  # 'decomposed': test_forward_with_real_timesteps_...
    variables = convert.from_torch_state_dict(sd, table=unet2d.weight_table(config))
    got = np.asarray(jax.jit(model.apply)(variables, x, t))
    assert got.shape == ref.shape and got.dtype == np.float32
    err = rel_err(got, ref)
    print(f"\n{name} float32 rel err {err:.2g}")
    assert err <= FLOAT32_RTOL, (name, err)


def test_forward_float64_matches_diffusers(parity_case, monkeypatch):
    """``model.double()`` against a float64 model (params and activations float64; the
    sinusoids float32 in both, as diffusers computes them); then diffusers fed our sinusoids."""
    torch = _torch()
    name, config, torch_model, sd = parity_case
    x, t = _inputs(config, np.float64)
    torch_model.double()
    ref = torch_forward(torch_model, x, t)
    sd64 = {k: v.astype(np.float64) for k, v in sd.items()}
    with jax.enable_x64(True):
        model = unet2d.build(config, dtype=jnp.float64, conv_impl="xla")
        variables = convert.from_torch_state_dict(sd64, table=unet2d.weight_table(config))
        got = np.asarray(jax.jit(model.apply)(variables, x, t))
    emb = np.array(unet2d.timestep_embedding(jnp.asarray(t), config.block_out_channels[0], config.flip_sin_to_cos,
                                             config.freq_shift))
    monkeypatch.setattr(torch_model.time_proj, "forward", lambda timesteps: torch.from_numpy(emb))
    ref_same_embedding = torch_forward(torch_model, x, t)
    monkeypatch.undo()
    torch_model.float()  # the fixture is shared
    assert got.dtype == np.float64
    err, err_same = rel_err(got, ref), rel_err(got, ref_same_embedding)
    print(f"\n{name} float64 rel err {err:.2g}, with the same sinusoids {err_same:.2g}")
    assert err <= FLOAT64_RTOL, (name, err)
    assert err_same <= FLOAT64_SAME_EMBEDDING_RTOL, (name, err_same)


def test_forward_with_real_timesteps_and_decomposed_convolutions():
    """Fractional t (as DDIM/DPM grids can give) and conv_impl='decomposed' (what 'auto'
    picks on CPU: im2col for the convolutions on maps no larger than their kernel): measured 7.8e-7."""
    config = PARITY_CONFIGS["heads_defaults"]
    torch_model = diffusers_model(config, seed=3)
    x, _ = _inputs(config)
    t = np.array([0.5, 17.25, 333.0, 998.9], np.float32)
    ref = torch_forward(torch_model, x, t)
    model = unet2d.build(config, conv_impl="decomposed")
    variables = convert.from_torch_state_dict(state_dict_numpy(torch_model), table=unet2d.weight_table(config))
    err = rel_err(jax.jit(model.apply)(variables, x, t), ref)
    print(f"\nreal t, decomposed rel err {err:.2g}")
    assert err <= FLOAT32_RTOL


# two levels (down- and upsampling), attention in a down block, an up block and the mid block,
# 2 heads, one resnet per level: the gradient of every kind of tensor, at half ddpm_like's compile time
GRAD_CONFIG = UNet2DConfig(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                           layers_per_block=1, down_block_types=(AD, D), up_block_types=(U, AU),
                           attention_head_dim=4, norm_num_groups=4, norm_eps=1e-6, downsample_padding=0,
                           flip_sin_to_cos=False, freq_shift=1)


@pytest.mark.slow  # 10 s; the default parity rows compare every gradient with diffusers
def test_gradients_match_torch_autograd():
    """d/dparams sum(out * g), float64 both sides: per tensor max|ours - torch| / max|torch|
    measured <= 3.5e-8 (bound 1e-7; the float32 sinusoids again, as in the forward pass).
    ``to_k.bias`` is left out of the ratio: softmax ignores a shift of every key by the same
    vector, so its gradient is 0 up to rounding on both sides (measured |grad| <= 6.4e-16 with
    the largest gradient 31; bound 1e-12 times the largest)."""
    torch = _torch()
    config = GRAD_CONFIG
    torch_model = diffusers_model(config, seed=1).double()
    x, t = _inputs(config, np.float64)
    g = np.random.default_rng(2).standard_normal((*x.shape[:3], config.out_channels))
    out = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t)).sample
    (out * torch.from_numpy(g.transpose(0, 3, 1, 2).copy())).sum().backward()
    ref = {k: p.grad.numpy() for k, p in torch_model.named_parameters()}
    table = unet2d.weight_table(config)
    with jax.enable_x64(True):
        model = unet2d.build(config, dtype=jnp.float64, conv_impl="xla")
        variables = convert.from_torch_state_dict(state_dict_numpy(torch_model), table=table)

        def objective(params):
            return jnp.sum(model.apply({"params": params}, x, t) * g)

        grads = jax.jit(jax.grad(objective))(variables["params"])
    got = convert.to_torch_state_dict({"params": jax.device_get(grads)}, table=table)
    assert set(got) == set(ref)
    worst = max((rel_err(got[k], ref[k]), k) for k in ref if not k.endswith("to_k.bias"))
    scale = max(float(np.max(np.abs(v))) for v in ref.values())
    key_bias = max(float(np.max(np.abs(v))) for k, d in ((k, (got, ref)) for k in ref if k.endswith("to_k.bias"))
                   for v in (d[0][k], d[1][k]))
    print(f"\ngradient worst rel err {worst[0]:.2g} ({worst[1]}); to_k.bias |grad| {key_bias:.2g} of {scale:.2g}")
    assert worst[0] <= 1e-7, worst
    assert key_bias <= 1e-12 * scale


# ----------------------------------------------------------------------------- dtypes, training
def _random_variables(model, x, t, seed=0):
    """Random parameters of ``model``'s shapes, without compiling ``init`` (tens of seconds on
    this CPU for a few hundred random initialisers)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t))
    return jax.tree_util.tree_map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def test_bfloat16_compute_keeps_float32_params_and_output():
    """bf16 activations, float32 parameters, statistics and output; vs the float32 model:
    measured rel 1.0e-2 (bf16 keeps 8 bits of mantissa; 2.3e-2 for heads_defaults)."""
    config = PARITY_CONFIGS["single_level_no_mid"]
    x, t = _inputs(config)
    model32 = unet2d.build(config, conv_impl="xla")
    model16 = unet2d.build(config, dtype=jnp.bfloat16, conv_impl="xla")
    variables = _random_variables(model32, x, t)
    y32 = jax.jit(model32.apply)(variables, x, t)
    y16 = jax.jit(model16.apply)(variables, x, t)
    assert y16.dtype == jnp.float32
    err = rel_err(y16, y32)
    print(f"\nbf16 vs float32 rel err {err:.2g}")
    assert err < 5e-2


# A minimal GroupNorm U-Net (one level, no attention, no mid block): create_train_state compiles
# its init and the step compiles its gradient, which costs 10 s here for these 44 tensors and
# 20-40 s (under load) for a two-level model with attention; the forward and gradient parity
# tests cover the rest.
TRAIN_CONFIG = UNet2DConfig(sample_size=4, in_channels=1, out_channels=1, block_out_channels=(4,),
                            layers_per_block=1, down_block_types=(D,), up_block_types=(U,), mid_block_type=None,
                            norm_num_groups=2)


def test_train_state_has_no_batch_stats_and_a_step_runs():
    model = unet2d.build(TRAIN_CONFIG)
    tx = training.make_optimizer(1e-3)
    state = training.create_train_state(model, jax.random.key(0), (4, 4, 1), make_schedule(10, "linear"), tx,
                                        ema_decay=0.9)
    assert state.batch_stats is None and set(state.variables) == {"params"}
    assert {p for _, p, _ in unet2d.weight_table(TRAIN_CONFIG)} == {
        ("params",) + tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(state.params)}
    batch = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 4, 4, 1)), jnp.float32)
    new, metrics = jax.jit(training.train_step)(state, batch, jax.random.key(1))
    assert new.batch_stats is None and int(new.step) == 1 and np.isfinite(float(metrics["loss"]))
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(new.params),
                                                       jax.tree_util.tree_leaves(state.params))]
    assert all(moved)


def test_dropout_needs_a_key_in_training_only():
    """Init and evaluation need no dropout key; train=True with dropout > 0 takes
    ``rngs={'dropout': key}`` and differs from evaluation."""
    import flax.errors

    config = dataclasses.replace(TRAIN_CONFIG, dropout=0.5)
    model = unet2d.build(config, conv_impl="xla")
    x, t = _inputs(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, train=True))  # no dropout key
    variables = _random_variables(model, x, t)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(variables)
    apply = jax.jit(model.apply, static_argnames="train")
    ev = apply(variables, x, t, train=False)
    tr = apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(ev, tr)
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        jax.eval_shape(lambda v: model.apply(v, x, t, train=True), variables)


def test_train_step_with_dropout_draws_a_dropout_key_per_step():
    """train_step feeds dropout its own key stream (training.dropout_key_at): the step's loss
    equals loss_fn with that key written out, differs with another key, and the same step
    repeated gives the same bits (exact resume)."""
    config = dataclasses.replace(TRAIN_CONFIG, dropout=0.3)
    model = unet2d.build(config, conv_impl="xla")
    x, _ = _inputs(config)
    tx = training.make_optimizer(1e-3)
    state = training.create_train_state(model, jax.random.key(0), x.shape[1:], make_schedule(10, "linear"), tx)
    key = jax.random.key(3)
    step = jax.jit(training.train_step)
    _, m1 = step(state, x, key)
    _, m2 = step(state, x, key)
    t, noise = training.draw_t_and_noise(key, state.step, x, 10)

    def loss(dropout_key):
        return training.loss_fn(state.params, None, model.apply, state.schedule, x, t, noise, dropout_key)[0]

    loss = jax.jit(loss)
    assert float(m1["loss"]) == float(m2["loss"])
    np.testing.assert_allclose(float(m1["loss"]), float(loss(training.dropout_key_at(key, state.step))), rtol=1e-6)
    assert abs(float(m1["loss"]) - float(loss(jax.random.key(99)))) > 1e-6  # the key matters
    assert abs(float(m1["loss"]) - float(jax.jit(lambda: training.loss_fn(
        state.params, None, lambda v, *a, train, rngs=None: model.apply(v, *a, train=False), state.schedule, x, t,
        noise)[0])())) > 1e-6  # dropout was on


def test_dropout_key_stream_leaves_t_and_noise_alone():
    """Runs written before dropout existed resume to the same bits: t and the noise are drawn
    as before, from fold_in(key, step) split in two."""
    key, step = jax.random.key(7), jnp.asarray(5, jnp.int32)
    x = jnp.zeros((4, 4, 4, 1))
    t, noise = training.draw_t_and_noise(key, step, x, 10)
    k_t, k_n = jax.random.split(jax.random.fold_in(key, step))
    assert np.array_equal(t, jax.random.randint(k_t, (4,), 0, 10, jnp.int32))
    assert np.array_equal(noise, jax.random.normal(k_n, x.shape, jnp.float32))
    d = jax.random.key_data(training.dropout_key_at(key, step))
    assert not any(np.array_equal(d, jax.random.key_data(k)) for k in (k_t, k_n, jax.random.fold_in(key, step)))


# ----------------------------------------------------------------------------- full size (slow)
CIFAR10_CONFIG = UNet2DConfig(  # google/ddpm-cifar10-32 as diffusers loads it (diffusers.md), 35.7 M parameters
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=(D, AD, D, D), up_block_types=(U, U, AU, U), attention_head_dim=None, norm_num_groups=32,
    norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)


@pytest.mark.slow
def test_forward_float32_matches_diffusers_cifar10_size():
    """Ho et al.'s CIFAR-10 model (random weights), batch 2 at 32x32: measured rel 1.4e-6."""
    torch_model = diffusers_model(CIFAR10_CONFIG)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    t = np.array([10, 999])
    ref = torch_forward(torch_model, x, t)
    model = unet2d.build(CIFAR10_CONFIG)
    variables = convert.from_torch_state_dict(state_dict_numpy(torch_model), table=unet2d.weight_table(CIFAR10_CONFIG))
    err = rel_err(jax.jit(model.apply)(variables, x, t), ref)
    print(f"\ncifar10 float32 rel err {err:.2g}")
    assert err <= FLOAT32_RTOL
