"""`--timestep-draw`: per-image (Ho et al.'s Algorithm 1, every run before the option) or per-batch
(one t for the whole batch, as a sampling batch is); the default by architecture; old folders."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fake_network import scale_network
from jax_ddpm import training

T, B, STEPS = 10, 8, 2000


@pytest.fixture(scope="module")
def draws():
    key = jax.random.key(3)
    x0 = jnp.zeros((B, 4, 4, 1))

    @jax.jit
    def both(step):
        return (training.draw_t_and_noise(key, step, x0, T, "per-image"),
                training.draw_t_and_noise(key, step, x0, T, "per-batch"))

    out = [both(jnp.asarray(s)) for s in range(STEPS)]
    return ({"t": np.stack([np.asarray(o[0][0]) for o in out]), "noise": [np.asarray(o[0][1]) for o in out[:3]]},
            {"t": np.stack([np.asarray(o[1][0]) for o in out]), "noise": [np.asarray(o[1][1]) for o in out[:3]]})


def test_per_batch_gives_every_image_one_t_uniform_over_the_steps(draws):
    per_image, per_batch = draws
    t = per_batch["t"]
    assert t.shape == (STEPS, B) and (t == t[:, :1]).all()
    counts = np.bincount(t[:, 0], minlength=T)
    # U{0..T-1}: 200 expected per value, binomial sd 13.4; 150..250 is 3.7 sd each side
    assert counts.shape == (T,) and 150 <= counts.min() and counts.max() <= 250, counts
    np.testing.assert_array_equal(t[:, 0], per_image["t"][:, 0])  # the same key: the first image's t
    for a, b in zip(per_image["noise"], per_batch["noise"]):
        np.testing.assert_array_equal(a, b)  # the noise does not depend on the draw


def test_per_image_still_draws_a_t_for_each_image(draws):
    t = draws[0]["t"]
    assert (t != t[:, :1]).any(axis=1).mean() > 0.9  # 8 draws of 10 values all equal: 1e-7 per step
    key = jax.random.key(3)
    k_t, _ = jax.random.split(jax.random.fold_in(key, 5))  # Ho et al.'s per-image draw, as before the option
    np.testing.assert_array_equal(t[5], np.asarray(jax.random.randint(k_t, (B,), 0, T, jnp.int32)))


def test_an_unknown_draw_is_refused():
    with pytest.raises(ValueError, match="timestep_draw must be one of"):
        training.draw_t_and_noise(jax.random.key(0), 0, jnp.zeros((2, 4, 4, 1)), T, "per-pixel")


def test_train_step_uses_the_states_draw():
    """Two states that differ only in timestep_draw take different steps from the same batch and key;
    the per-batch state's loss is the float64 oracle's eps-MSE of the network's output at the one t
    the draw gives, the per-image state's at the t of each image."""
    from jax_ddpm.schedules import make_schedule
    from parity_tests.references import oracle

    w = 0.7
    schedule = make_schedule(T, "cosine")
    x0 = jax.random.uniform(jax.random.key(1), (B, 4, 4, 1), minval=-1, maxval=1)
    key = jax.random.key(2)
    step = jax.jit(training.train_step)
    loss = {}
    for d in training.TIMESTEP_DRAWS:
        state = training.train_state_from_variables({"params": {"w": jnp.float32(w)}}, scale_network,
                                                    training.make_optimizer(1e-3), schedule).replace(timestep_draw=d)
        assert state.timestep_draw == d
        _, m = step(state, x0, key)
        t, noise = training.draw_t_and_noise(key, 0, x0, T, d)
        x_t = oracle.q_sample(oracle.schedule("cosine", T), np.asarray(x0, np.float64), np.asarray(t),
                              np.asarray(noise, np.float64))
        assert float(m["loss"]) == pytest.approx(float(np.mean((w * x_t - np.asarray(noise)) ** 2)), rel=2e-6), d
        loss[d] = float(m["loss"])
    assert loss["per-batch"] != pytest.approx(loss["per-image"], rel=1e-3)


def _config(argv):
    from jax_ddpm.app.cli import build_parser
    from jax_ddpm.app.config import train_config_from_args

    return train_config_from_args(build_parser().parse_args(["train", "--workdir", "/tmp/x", *argv]))


def test_the_default_follows_the_architecture():
    assert _config([]).diffusion.timestep_draw == "per-batch"  # the chapter's U-Net: batch statistics
    assert _config(["--arch", "unet2d"]).diffusion.timestep_draw == "per-image"  # GroupNorm
    assert _config(["--timestep-draw", "per-image"]).diffusion.timestep_draw == "per-image"
    assert _config(["--arch", "unet2d", "--timestep-draw", "per-batch"]).diffusion.timestep_draw == "per-batch"


def test_a_folder_saved_before_the_option_is_per_image():
    from jax_ddpm.app.config import complete_identity, identity

    saved = identity(_config([]))
    assert saved["diffusion.timestep_draw"] == "per-batch"
    del saved["diffusion.timestep_draw"]
    assert complete_identity(saved)["diffusion.timestep_draw"] == "per-image"
