"""jax_ddpm.samplers (ddpm respaced, ddim, dpmpp_2m), their grids and jax_ddpm.parameterization.

Grids against diffusers' own ``set_timesteps`` (skipped without diffusers), the ValueErrors the
command turns into exit-2 lines, the DDIM paper-vs-diffusers difference, one compile per
(shape, num_steps), the parameterization round trips, the prediction-type loss, and identities
between samplers. The chains against the float64 oracle and diffusers are parity rows
(parity_tests/test_samplers.py).
"""
from __future__ import annotations

import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ddpm import diffusion, parameterization, sampling, samplers, schedules, training
from jax_ddpm.samplers import grids

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None and importlib.util.find_spec("torch") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers (and torch) not installed: "
                                                               "pip install 'jax-ddpm[diffusers]'")

T = 20
SHAPE = (2, 4, 4, 1)  # [B, H, W, C]


def model_fn(x, t):
    """A smooth stand-in denoiser: its output is 0.3 x + t / T (read as eps, x0 or v)."""
    return 0.3 * x + (t.astype(x.dtype) / T)[:, None, None, None]


@pytest.fixture(scope="module")
def sched():
    return schedules.make_schedule(T, "cosine")


@pytest.fixture(scope="module")
def x_T():
    return jnp.asarray(np.random.default_rng(0).standard_normal(SHAPE), jnp.float32)


_JITTED: dict = {}


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def zeros_noise(n, shape=SHAPE):
    """Pre-drawn (zero) noise [n, *shape]: a program fed a key compiles threefry too (~6x the time)."""
    return jnp.zeros((n,) + tuple(shape), jnp.float32)


def run(name, schedule, x, noise, **settings):
    """``get_sampler(name)`` jitted once per settings (and shapes), shared by the tests below."""
    key = (name, tuple(sorted(settings.items())))
    if key not in _JITTED:
        fn = samplers.get_sampler(name)
        _JITTED[key] = jax.jit(lambda s, x, n: fn(model_fn, s, x, n, **settings))
    return np.asarray(_JITTED[key](schedule, x, noise))


# ----------------------------------------------------------------------------- grids


GRID_CASES = [(T_, n, sp, off) for T_, n in ((1000, 50), (1000, 13), (100, 7), (100, 100), (50, 1), (17, 7))
              for sp in grids.SPACINGS for off in ((0, 1) if sp == "leading" else (0,)) if not (off and n == T_)]


@needs_diffusers
@pytest.mark.parametrize("T_, n, spacing, offset", GRID_CASES)
def test_grids_are_diffusers_timesteps(T_, n, spacing, offset):
    """timestep_grid == DDPMScheduler's and DDIMScheduler's timesteps, dpm_solver_grid ==
    DPMSolverMultistepScheduler's; except where diffusers' trailing ``arange`` makes n + 1 points
    (T = 17, n = 7), whose first n are the grid and whose extra one is -1."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    kw = dict(num_train_timesteps=T_, timestep_spacing=spacing, steps_offset=offset)
    for cls, grid in ((DDPMScheduler, grids.timestep_grid), (DDIMScheduler, grids.timestep_grid),
                      (DPMSolverMultistepScheduler, grids.dpm_solver_grid)):
        if grid is grids.dpm_solver_grid and n == T_ and spacing != "trailing":  # n + 1 > T points: repeats
            with pytest.raises(ValueError, match="repeats timesteps"):
                grid(T_, n, spacing, offset)
            continue
        ours = grid(T_, n, spacing, offset)
        s = cls(**kw)
        s.set_timesteps(n)
        theirs = s.timesteps.numpy()
        if len(theirs) == n + 1:  # diffusers' trailing quirk
            assert spacing == "trailing" and theirs[-1] == -1, theirs
            theirs = theirs[:n]
        np.testing.assert_array_equal(ours, np.sort(theirs), err_msg=f"{cls.__name__} {kw} n={n}")
        assert len(ours) == n and np.all(np.diff(ours) > 0)


def test_full_grid_is_every_timestep_for_every_spacing():
    for spacing in grids.SPACINGS:
        np.testing.assert_array_equal(grids.timestep_grid(T, None, spacing), np.arange(T))
        np.testing.assert_array_equal(grids.timestep_grid(T, T, spacing), np.arange(T))
    assert grids.is_full(np.arange(T), T) and not grids.is_full(np.arange(1, T + 1) - 1, T + 1)


def test_respaced_schedule_matches_float64_and_full_grid_is_the_schedule(sched):
    assert grids.respaced_schedule(sched, np.arange(T)) is sched
    g = grids.timestep_grid(T, 6, "trailing")
    got = grids.respaced_schedule(sched, g)
    abar = schedules.schedule_arrays(schedules.cosine_beta_schedule(T))["alphas_cumprod"][g]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    want = schedules.schedule_arrays(1 - abar / abar_prev)  # the grid's own chain, float64
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance", "posterior_mean_coef1",
                 "posterior_mean_coef2", "sqrt_recip_alphas_cumprod"):
        a, b = np.asarray(getattr(got, name), np.float64), want[name]
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=0, err_msg=name)


def test_one_minus_ratio_keeps_relative_accuracy_at_both_ends():
    """1 - abar_t / abar_s near abar = 1 (t small) and near abar = 0 (linear T = 1000's top)."""
    s = schedules.make_schedule(1000, "linear")
    abar64 = schedules.schedule_arrays(schedules.linear_beta_schedule(1000))["alphas_cumprod"]
    for t, u in ((1, 0), (21, 1), (980, 960), (999, 979)):
        g = np.array([u, t])
        abar, om, abar_prev, om_prev = grids.grid_abar(s, g)
        got = float(grids.one_minus_ratio(abar, om, abar_prev, om_prev)[1])
        want = 1 - abar64[t] / abar64[u]
        assert abs(got - want) <= 4e-7 * want, (t, u, got, want)


# ----------------------------------------------------------------------------- validation


BAD = [
    ("ddim", dict(num_steps=T + 1), r"num_steps must be an integer from 1 to the schedule's T = 20, got 21"),
    ("ddpm", dict(num_steps=0), r"num_steps must be an integer from 1 to the schedule's T = 20, got 0"),
    ("dpmpp_2m", dict(num_steps=2.5), r"num_steps must be an integer from 1 .* got 2.5"),
    ("ddim", dict(eta=-0.1), r"eta must be a finite number >= 0, got -0.1"),
    ("ddim", dict(eta=float("nan")), r"eta must be a finite number >= 0, got nan"),
    ("ddim", dict(timestep_spacing="uniform"),
     r"timestep_spacing must be one of \('leading', 'trailing', 'linspace'\), got 'uniform'"),
    ("dpmpp_2m", dict(eta=0.0), r"sampler 'dpmpp_2m' has no option 'eta' \(its options: timestep_spacing, "),
    ("dpmpp_2m", dict(clip_denoised="yes"), r"clip_denoised must be True or False, got 'yes'"),
    ("dpmpp_2m", dict(variance="beta"), r"sampler 'dpmpp_2m' has no option 'variance'"),
    ("ddpm", dict(eta=1.0), r"sampler 'ddpm' has no option 'eta'"),
    ("chapter", dict(num_steps=5), r"the chapter sampler runs all T = 20 steps, got num_steps=5"),
    ("chapter", dict(variance="beta"), r"sampler 'chapter' has no option 'variance' \(it has none\)"),
    ("ddpm", dict(variance="learned"), r"variance must be one of \('beta', 'beta_tilde'\), got 'learned'"),
    ("ddim", dict(prediction="sample"), r"prediction must be one of \('eps', 'x0', 'v'\), got 'sample'"),
    ("ddim", dict(steps_offset=1, timestep_spacing="trailing"), r"steps_offset applies to timestep_spacing "
                                                                 r"'leading' only"),
    ("ddim", dict(steps_offset=-1), r"steps_offset must be a non-negative integer, got -1"),
    ("ddpm", dict(num_steps=T, steps_offset=1), r"reaches timestep 20, beyond the schedule's T - 1 = 19"),
    ("dpmpp_2m", dict(num_steps=T), r"repeats timesteps"),
    ("dpmpp_2m", dict(final_sigmas_type="sigma_max"), r"final_sigmas_type must be one of \('zero', 'sigma_min'\)"),
    ("ddim", dict(clip_denoised="yes"), r"clip_denoised must be True or False, got 'yes'"),
]


@pytest.mark.parametrize("name, settings, message", BAD, ids=[f"{b[0]}-{next(iter(b[1]))}" for b in BAD])
def test_bad_settings_raise_one_sentence(sched, x_T, name, settings, message):
    """Each raises ValueError (one line) from check_options and from the sampler itself, before
    anything is traced -- what the command turns into an exit-2 line."""
    with pytest.raises(ValueError, match=message) as e:
        samplers.check_options(name, T, **settings)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=message):
        samplers.get_sampler(name)(model_fn, sched, x_T, jax.random.key(0), **settings)


def test_noise_of_the_wrong_shape_names_num_steps(sched, x_T):
    with pytest.raises(ValueError, match=r"noise must be a key or an array of shape \(7, 2, 4, 4, 1\)"):
        samplers.ddim_sample(model_fn, sched, x_T, jnp.zeros((T,) + SHAPE), num_steps=7)


def test_unknown_sampler_and_registry():
    assert samplers.SAMPLERS == ("ddpm", "ddim", "dpmpp_2m", "chapter") and sampling.SAMPLERS is samplers.SAMPLERS
    with pytest.raises(ValueError, match="sampler must be one of"):
        samplers.get_sampler("euler")
    np.testing.assert_array_equal(samplers.sampler_grid("ddim", 100, num_steps=4), [0, 25, 50, 75])
    np.testing.assert_array_equal(samplers.sampler_grid("dpmpp_2m", 100, num_steps=4), [25, 50, 74, 99])


# ----------------------------------------------------------------------------- DDIM: paper vs diffusers


def _ddim_f64(abar, steps, model, x, eta=0.0, noise=None):
    """DDIM (eq. 12) in float64 over (t, s) pairs, s = -1 meaning abar = 1."""
    for k, (t, s) in enumerate(steps):
        ab_t, ab_s = abar[t], (abar[s] if s >= 0 else 1.0)
        eps = model(x, t)
        x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
        x = math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s - sigma ** 2) * eps + (sigma * noise[k] if eta else 0)
    return x


@needs_diffusers
def test_ddim_follows_the_paper_where_diffusers_skips_off_the_grid():
    """linspace, T = 100, n = 13: DDIMScheduler steps from t to t - T // n = t - 7, which for 12 of
    the 13 steps is not the next grid point (the grid is round(linspace(0, 99, 13)), spacing
    8.25; the 13th goes from 0 to abar = 1 as the paper's does). jax_ddpm's ddim steps to the
    next grid point (Song et al. 2021, section 4.2), so the two chains differ by ~0.1; each
    matches its own rule written out in float64."""
    from diffusers import DDIMScheduler
    import torch

    T_, n = 100, 13
    s = schedules.make_schedule(T_, "linear")
    abar = schedules.schedule_arrays(schedules.linear_beta_schedule(T_))["alphas_cumprod"]
    g = grids.timestep_grid(T_, n, "linspace")
    theirs_prev = g - T_ // n
    off_grid = [int(t) for t, p in zip(g, theirs_prev) if p >= 0 and p not in set(g)]
    assert len(off_grid) == 12, off_grid
    rng = np.random.default_rng(4)
    x_T = rng.standard_normal(SHAPE)

    def eps_np(x, t):
        return 0.3 * x + t / T_

    paper = _ddim_f64(abar, [(int(g[i]), int(g[i - 1]) if i else -1) for i in range(n - 1, -1, -1)], eps_np, x_T)
    skipping = _ddim_f64(abar, [(int(t), int(t) - T_ // n) for t in g[::-1]], eps_np, x_T)
    ours = np.asarray(samplers.ddim_sample(lambda x, t: 0.3 * x + (t / T_).astype(x.dtype)[:, None, None, None],
                                           s, jnp.asarray(x_T, jnp.float32), zeros_noise(n), num_steps=n,
                                           timestep_spacing="linspace"))
    d = DDIMScheduler(num_train_timesteps=T_, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                      clip_sample=False, set_alpha_to_one=True, timestep_spacing="linspace")
    d.set_timesteps(n)
    x = torch.from_numpy(x_T.astype(np.float32))
    for t in d.timesteps:
        x = d.step(0.3 * x + int(t) / T_, t, x).prev_sample
    theirs = np.clip(x.numpy(), -1, 1)
    np.testing.assert_allclose(ours, np.clip(paper, -1, 1), rtol=0, atol=1e-5)
    np.testing.assert_allclose(theirs, np.clip(skipping, -1, 1), rtol=0, atol=1e-4)
    assert np.abs(ours - theirs).max() > 1e-2
    # leading spacing: t - T // n is the next grid point, and the two agree
    d = DDIMScheduler(num_train_timesteps=T_, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                      clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
    d.set_timesteps(n)
    np.testing.assert_array_equal(np.sort(d.timesteps.numpy()), grids.timestep_grid(T_, n, "leading"))


# ----------------------------------------------------------------------------- one program per (shape, num_steps)


class _CountingModel:
    """Stands in for a Flax module in make_sample_fn; counts how often it is traced."""

    traces = 0

    def apply(self, variables, x, t, train):
        _CountingModel.traces += 1
        return variables["w"] * x


def test_compiles_once_per_shape_and_num_steps(sched):
    name, settings = "ddim", {"num_steps": 5, "eta": 0.5, "prediction": "v"}
    model = _CountingModel()
    sample = sampling.make_sample_fn(model, name, **settings)
    v = {"w": jnp.float32(0.3)}
    start = _CountingModel.traces
    for seed in range(3):  # new x_T and noise, same shapes: no new trace
        x = normal(seed, SHAPE)
        sample(v, sched, x, zeros_noise(5) + seed)
    assert _CountingModel.traces - start == 1  # the scan body is traced once, not once per step
    sample(v, sched, jnp.zeros((3,) + SHAPE[1:]), zeros_noise(5, (3,) + SHAPE[1:]))  # a new shape: one more
    assert _CountingModel.traces - start == 2
    sampling.make_sample_fn(model, name, **dict(settings, num_steps=6))(v, sched, jnp.zeros(SHAPE), zeros_noise(6))
    assert _CountingModel.traces - start == 3
    # num_steps reached the sampler: pre-drawn noise has its rows, not T
    with pytest.raises(ValueError, match=r"noise must be a key or an array of shape \(5, 2, 4, 4, 1\)"):
        sample(v, sched, jnp.zeros(SHAPE), jnp.zeros((T,) + SHAPE))
    with pytest.raises(ValueError, match="prediction must be one of"):
        sampling.make_sample_fn(model, name, prediction="epsilon")


# ----------------------------------------------------------------------------- samplers: identities and conventions


def test_ddpm_num_steps_T_is_the_full_chain_bit_for_bit(sched, x_T):
    """num_steps = T is the T-step chain, the program of num_steps None (every spacing gives the full
    grid: test_full_grid_is_every_timestep_for_every_spacing)."""
    noise = normal(1, (T,) + SHAPE)
    np.testing.assert_array_equal(run("ddpm", sched, x_T, noise, num_steps=T, timestep_spacing="trailing"),
                                  run("ddpm", sched, x_T, noise))


def test_key_noise_is_fold_in_of_the_grid_row(sched, x_T):
    """For a respaced grid too, a key means row i = normal(fold_in(key, i)), i the ascending grid index."""
    key, n = jax.random.key(3), 6  # the settings of the next test: its pre-drawn program is shared
    drawn = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), SHAPE) for i in range(n)])
    a = run("ddim", sched, x_T, key, num_steps=n, eta=1.0, timestep_spacing="trailing")
    b = run("ddim", sched, x_T, drawn, num_steps=n, eta=1.0, timestep_spacing="trailing")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_ddim_eta_one_is_ddpm_beta_tilde_on_the_same_grid(sched, x_T):
    """Song et al. 2021, eq. 16: eta = 1 is the DDPM posterior (and the same noise row per step)."""
    noise = normal(5, (6,) + SHAPE)
    a = run("ddim", sched, x_T, noise, num_steps=6, eta=1.0, timestep_spacing="trailing")
    b = run("ddpm", sched, x_T, noise, num_steps=6, timestep_spacing="trailing")
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)


def test_dpmpp_2m_with_first_order_steps_only_is_ddim(sched, x_T):
    """Two steps of DPM-Solver++(2M) are both first order (the first, and the last to sigma = 0):
    DDIM with eta 0 on the same (trailing) grid (Lu et al. 2022, section 3.3)."""
    a = run("dpmpp_2m", sched, x_T, zeros_noise(2), num_steps=2, timestep_spacing="trailing")
    b = run("ddim", sched, x_T, zeros_noise(2), num_steps=2, timestep_spacing="trailing")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert samplers.dpmpp_2m.second_order_steps(2).tolist() == [False, False]
    assert samplers.dpmpp_2m.second_order_steps(5).tolist() == [False, True, True, True, False]
    assert samplers.dpmpp_2m.second_order_steps(5, True, "sigma_min").tolist() == [False, True, True, True, False]
    assert samplers.dpmpp_2m.second_order_steps(5, False, "sigma_min").tolist() == [True, True, True, True, False]
    assert samplers.dpmpp_2m.second_order_steps(15, True, "sigma_min")[0]  # diffusers: only below 15 steps


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_a_model_of_another_prediction_type_samples_the_same_chain(sched, x_T, prediction):
    """model_fn re-expressed as an x0 or v model (parameterization.from_x0 of its x0) gives the same
    DDIM chain: every sampler reads outputs through parameterization."""
    def as_pred(x, t):
        a, s = parameterization.alpha_sigma(sched, t, x)
        return parameterization.from_x0(x, parameterization.to_x0(x, model_fn(x, t), a, s, "eps"), a, s, prediction)

    f = samplers.get_sampler("ddim")
    want = run("ddim", sched, x_T, zeros_noise(5), num_steps=5, eta=0.0)
    got = np.asarray(jax.jit(lambda s, x: f(as_pred, s, x, zeros_noise(5), num_steps=5, prediction=prediction))(
        sched, x_T))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)


# ----------------------------------------------------------------------------- parameterization and the loss


@pytest.mark.parametrize("prediction", parameterization.PREDICTIONS)
def test_parameterization_round_trips(prediction):
    rng = np.random.default_rng(7)
    abar = rng.uniform(0.01, 0.99, (5, 1, 1, 1))
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    x0, eps = rng.standard_normal((5, 3, 3, 2)), rng.standard_normal((5, 3, 3, 2))
    with jax.enable_x64(True):
        x_t = alpha * x0 + sigma * eps
        out = parameterization.target(jnp.asarray(x0), jnp.asarray(eps), alpha, sigma, prediction)
        for got, want in ((parameterization.to_x0(x_t, out, alpha, sigma, prediction), x0),
                          (parameterization.to_eps(x_t, out, alpha, sigma, prediction), eps),
                          (parameterization.from_x0(x_t, x0, alpha, sigma, prediction), out)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-12)
    if prediction == "v":  # Salimans & Ho 2022: v = alpha eps - sigma x0
        np.testing.assert_allclose(np.asarray(out), alpha * eps - sigma * x0, atol=1e-12)
    assert parameterization.DIFFUSERS_PREDICTION_TYPES[prediction] in ("epsilon", "sample", "v_prediction")


def test_parameterization_refuses_unknown_predictions():
    for bad in ("epsilon", "sample", None):
        with pytest.raises(ValueError, match=r"prediction must be one of \('eps', 'x0', 'v'\)"):
            parameterization.check_prediction(bad)


def test_prediction_loss_regresses_each_target(sched):
    rng = np.random.default_rng(8)
    x0, noise, out = (jnp.asarray(rng.standard_normal(SHAPE), jnp.float32) for _ in range(3))
    t = jnp.array([0, T - 1])
    assert parameterization.training_target(sched, x0, t, noise, "eps") is noise  # no arithmetic at all
    a, s = parameterization.alpha_sigma(sched, t, x0)
    for prediction, target in (("eps", noise), ("x0", x0), ("v", a * noise - s * x0)):
        got = diffusion.prediction_loss(out, sched, x0, t, noise, prediction)
        np.testing.assert_allclose(float(got), float(jnp.mean((out - target) ** 2)), rtol=1e-6)
    assert float(diffusion.prediction_loss(out, sched, x0, t, noise)) == float(diffusion.eps_mse_loss(out, noise))
    with pytest.raises(ValueError, match="prediction must be one of"):
        diffusion.prediction_loss(out, sched, x0, t, noise, "score")


def test_train_state_with_a_prediction_type_trains_on_its_target(sched):
    """TrainState(prediction='v'): train_step_with_noise's loss is the v-MSE; the default is eps."""
    apply = lambda v, x, t, train=True, rngs=None: v["params"]["w"] * x  # noqa: E731
    variables = {"params": {"w": jnp.float32(0.5)}}
    tx = training.make_optimizer(1e-3)
    rng = np.random.default_rng(9)
    x0, noise = (jnp.asarray(rng.standard_normal(SHAPE), jnp.float32) for _ in range(2))
    t = jnp.array([3, 17])
    x_t = diffusion.q_sample(sched, x0, t, noise)
    a, s = parameterization.alpha_sigma(sched, t, x0)
    for prediction, target in (("eps", noise), ("v", a * noise - s * x0)):  # (x0: test_prediction_loss_...)
        state = training.train_state_from_variables(variables, apply, tx, sched, prediction=prediction)
        assert state.prediction == prediction
        _, metrics = training.train_step_with_noise(state, x0, t, noise)
        np.testing.assert_allclose(float(metrics["loss"]), float(jnp.mean((0.5 * x_t - target) ** 2)), rtol=1e-6)
    assert training.train_state_from_variables(variables, apply, tx, sched).prediction == "eps"
    with pytest.raises(ValueError, match="prediction must be one of"):
        training.train_state_from_variables(variables, apply, tx, sched, prediction="epsilon")
