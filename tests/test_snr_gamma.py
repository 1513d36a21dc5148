"""`--snr-gamma`: the min-SNR-gamma loss weighting; its default per architecture, refusals, old
folders (unweighted), a resume taking the run's value, and the train step computing the weighted
loss of the network's own output.

The weights and the weighted loss of given outputs are checked against a float64 oracle,
torch_ref and diffusers' training scripts in parity_tests ("min-SNR" rows); here the oracle is
the yardstick for what the train step computes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fake_network import scale_network
from jax_ddpm import training
from jax_ddpm.app.config import ConfigError
from parity_tests.references import oracle


def _config(argv):
    from jax_ddpm.app.cli import build_parser
    from jax_ddpm.app.config import train_config_from_args

    return train_config_from_args(build_parser().parse_args(["train", "--workdir", "/tmp/x", *argv]))


def test_the_default_follows_the_architecture():
    assert _config([]).diffusion.snr_gamma == 5.0  # the chapter's U-Net: measured (docs/quality.md)
    assert _config(["--arch", "unet2d"]).diffusion.snr_gamma == 0.0  # not measured there: unweighted
    assert _config(["--snr-gamma", "0"]).diffusion.snr_gamma == 0.0
    assert _config(["--arch", "unet2d", "--snr-gamma", "2.5"]).diffusion.snr_gamma == 2.5


@pytest.mark.parametrize("value,needle", [("-1", "--snr-gamma must be in [0, inf), got -1.0"),
                                          ("nan", "--snr-gamma must be in [0, inf), got nan"),
                                          ("inf", "--snr-gamma must be in [0, inf), got inf"),
                                          ("1e-9", "--snr-gamma must be 0 (no weighting) or at least 1e-6")])
def test_bad_values_are_refused(value, needle):
    with pytest.raises(ConfigError) as e:
        _config(["--snr-gamma", value])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_cli_refuses_in_one_line(tmp_path, capsys):
    from jax_ddpm.cli import main

    assert main(["train", "--workdir", str(tmp_path / "w"), "--snr-gamma", "-2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--snr-gamma must be in [0, inf)" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_the_library_refuses_a_bad_gamma():
    with pytest.raises(ValueError, match="snr_gamma must be 0"):
        training.check_snr_gamma(-1.0)
    from jax_ddpm.diffusion import min_snr_weights
    from jax_ddpm.schedules import make_schedule

    with pytest.raises(ValueError, match="gamma must be > 0"):
        min_snr_weights(make_schedule(10, "cosine"), 0.0, "x0")


def test_a_folder_saved_before_the_option_is_unweighted_and_resumes_so(monkeypatch):
    """An identity without the field reads as 0; a bare resume takes it (the default is 5 now),
    a resume that gives --snr-gamma keeps the value given (check_resume then compares it)."""
    from jax_ddpm.app import resume_settings
    from jax_ddpm.app.config import complete_identity, identity

    saved = identity(_config([]))
    assert saved["diffusion.snr_gamma"] == 5.0
    del saved["diffusion.snr_gamma"]
    old = complete_identity(saved)
    assert old["diffusion.snr_gamma"] == 0.0
    monkeypatch.setattr(resume_settings, "saved_run", lambda workdir: (old, False))
    config, taken = resume_settings.with_run_settings(_config([]), given=[])
    assert config.diffusion.snr_gamma == 0.0 and taken == {"diffusion.snr_gamma": 0.0}
    assert resume_settings.describe(taken) == "--snr-gamma 0.0"
    config, taken = resume_settings.with_run_settings(_config(["--snr-gamma", "5"]), given=["snr_gamma"])
    assert config.diffusion.snr_gamma == 5.0 and taken == {}


T, B = 20, 6


def test_the_train_step_weights_each_images_loss():
    """The state's snr_gamma reaches the loss: the train step's loss is the float64 oracle's
    min-SNR-weighted loss of the network's output at one t per image (t = 0 and T - 1 included);
    the unweighted state's is the plain MSE of the same output."""
    from jax_ddpm.schedules import make_schedule

    schedule = make_schedule(T, "cosine")
    w = 0.7
    gen = np.random.default_rng(0)
    x0 = gen.uniform(-1, 1, (B, 4, 4, 1)).astype(np.float32)
    noise = gen.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, T - 1, 3, 7, 11, 15])
    out = w * oracle.q_sample(oracle.schedule("cosine", T), x0, t, noise)  # the network's output, float64
    step = jax.jit(training.train_step_with_noise)
    for gamma in (5.0, 0.0):
        state = training.train_state_from_variables({"params": {"w": jnp.float32(w)}}, scale_network,
                                                    training.make_optimizer(1e-3), schedule, prediction="x0",
                                                    snr_gamma=gamma)
        assert state.snr_gamma == gamma
        _, metrics = step(state, jnp.asarray(x0), jnp.asarray(t, jnp.int32), jnp.asarray(noise))
        if gamma:
            expect = oracle.weighted_loss("cosine", T, gamma, "x0", out, x0, t, noise)
        else:
            expect = float(np.mean((out - x0) ** 2))
        assert float(metrics["loss"]) == pytest.approx(expect, rel=2e-6)
    unweighted = expect
    assert oracle.weighted_loss("cosine", T, 5.0, "x0", out, x0, t, noise) != pytest.approx(unweighted, rel=1e-2)
