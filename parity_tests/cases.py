"""The case list: every (check, parameters, reference, tolerance key) the suite runs, as data.

``CASES`` is built once at import; ``cases()`` selects (by group, slow or not, name) and
leaves out cases whose reference does not support the component; ``pytest_params()``
gives pytest parameters (slow cases marked ``slow``, unsupported ones skipped). Tolerances
are not here: ``Case.tolerance(device)`` looks them up in ``tolerances.py`` by
(key, reference, dtype, device).

A row's name is unique and says what it compares (``... vs oracle``, ``... vs torch``
where a component runs against more than one reference); the list's order is the
table's order.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from jax_ddpm import schedules

from .checks.closed_forms import check_embedding, check_posterior_step, check_q_sample, check_schedule
from .checks.convert import check_round_trip
from .checks.forward import check_bn_stats, check_forward
from .checks.loss_weights import check_loss_weights, check_weighted_loss
from .checks.samplers import check_sampler_chain
from .checks.sampling import check_chain, check_sampler_step
from .checks.training import check_adam_same_grads, check_grads, check_loss, check_lr_schedule, check_train_steps
from .core import Case, Measure
from .inputs import CHAPTER, SAMPLER_NET, Net, UNet2DNet
from .references import SAMPLER_CHAIN
from .references.oracle_samplers import ChainSpec


def _case(group: str, component: str, fn: Callable[..., Measure], metric: str, key: str | None = None,
          ref: str = "torch", slow: bool = False, dtype: str = "float32", **params) -> Case:
    """A case; ``key`` (the tolerance table's component) defaults to ``group``."""
    return Case(group, component, fn, tuple(params.items()), metric, key or group, ref, dtype, slow)


def _closed_forms() -> list[Case]:
    cases: list[Case] = []
    for kind in schedules.SCHEDULES:
        for T in (10, 100, 1000):
            for ref in ("oracle", "torch"):
                cases.append(_case("schedule", f"schedule {kind} T={T} vs {ref}", check_schedule, "rel", ref=ref,
                                   kind=kind, timesteps=T))
    for kind in schedules.SCHEDULES:
        for at in ("0", "T-1", "random"):
            for ref in ("oracle", "torch"):
                cases.append(_case("q_sample", f"q_sample {kind} T=1000 t={at} vs {ref}", check_q_sample, "abs",
                                   ref=ref, kind=kind, timesteps=1000, at=at))
    for ref in ("torch", "oracle"):
        cases.append(_case("embedding", f"embedding dim=32 t<1000 vs {ref}", check_embedding, "abs", ref=ref,
                           dim=32, timesteps=1000))
    cases.append(_case("embedding", "embedding dim=32 t<1000 vs exact (fp32 argument)", check_embedding, "abs",
                       "embedding_exact", ref="oracle", dim=32, timesteps=1000, exact_argument=True))
    for kind in schedules.SCHEDULES:
        for variance, clip in (("beta_tilde", False), ("beta", False), ("beta_tilde", True)):
            cases.append(_case("posterior", f"reverse-step mean/var {kind} T=100 {variance}"
                                            f"{' clip' if clip else ''} vs oracle", check_posterior_step, "rel",
                               ref="oracle", kind=kind, timesteps=100, variance=variance, clip=clip))
    return cases


def _network() -> list[Case]:
    cases: list[Case] = []
    for net in (Net(1, 16, 4), Net(3, 32, 2), Net(1, 64, 2)):
        for mode in ("train", "eval"):
            cases.append(_case("forward", f"unet forward {mode} {net.label}", check_forward, "rel",
                               slow=(net.size == 64 and mode == "eval"), net=net, mode=mode))
    full = Net(3, 32, 2, CHAPTER)
    cases.append(_case("forward", f"unet forward train {full.label}", check_forward, "rel", net=full, mode="train"))
    cases.append(_case("forward", f"unet forward eval {full.label}", check_forward, "rel", slow=True,
                       net=full, mode="eval"))
    cases.append(_case("forward", "unet forward train 3ch 64px b2 chapter width", check_forward, "rel", slow=True,
                       net=Net(3, 64, 2, CHAPTER), mode="train"))
    for net in (Net(3, 32, 2), Net(1, 16, 4)):
        cases.append(_case("bn_stats", f"bn running stats 3 train fwd {net.label}", check_bn_stats, "rel", net=net))
    cases.append(_case("bn_stats", f"bn running stats 3 train fwd {full.label}", check_bn_stats, "rel", slow=True,
                       net=full))

    for net, kind, T, slow in ((Net(3, 16, 4), "linear", 1000, False), (Net(1, 32, 2), "cosine", 100, True)):
        cases.append(_case("loss", f"loss {kind} T={T} {net.label}", check_loss, "rel", slow=slow,
                           net=net, kind=kind, timesteps=T))
        cases.append(_case("grads", f"grad every param {kind} T={T} {net.label}", check_grads, "rel", slow=slow,
                           net=net, kind=kind, timesteps=T))
    cases.append(_case("grads", f"grad every param linear T=1000 {full.label}", check_grads, "rel", slow=True,
                       net=full, kind="linear", timesteps=1000))
    return cases


def _training() -> list[Case]:
    cases: list[Case] = []
    net = SAMPLER_NET
    for part, metric, key in (("loss", "rel", "loss"), ("params", "frac", "adam_step_params"),
                              ("batch_stats", "rel", "bn_stats")):
        cases.append(_case("train", f"adam 10 steps, each from torch's state: {part} {net.label}",
                           check_train_steps, metric, key, net=net, part=part))
    cases.append(_case("train", f"adam 10 steps, torch's grads -> optax: params {net.label}",
                       check_adam_same_grads, "rel", "adam_same_grads", net=net))
    # a cosine decay over the 10 steps: update 9 at the end value (torch's rate rises after T_max = 9);
    # slow (10 s): the rates themselves are the default rows below
    cases.append(_case("train", f"adam 10 steps, cosine lr to 0.1x, torch's grads -> optax: params {net.label}",
                       check_adam_same_grads, "rel", "adam_same_grads", slow=True, net=net,
                       lr_schedule=("cosine", 9, 0.1)))
    # the rates alone over a default run's length (4,500 updates): the float64 closed form (and
    # the hold after the decay), torch_ref's CosineAnnealingLR, diffusers' cosine (it ends at 0)
    for ref, end, steps in (("oracle", 0.1, 4550), ("oracle", 0.0, 4501), ("torch", 0.1, 4501),
                            ("diffusers", 0.0, 4501)):
        held = ", then held" if steps > 4501 else ""
        cases.append(_case("lr_schedule", f"lr cosine 4500 updates to {end:g}x{held} vs {ref}", check_lr_schedule,
                           "rel", ref=ref, lr=1e-3, decay_steps=4500, end_factor=end, steps=steps))
    cases.append(_case("train", f"sgd(0.1) 10 steps free-running: update {net.label}", check_train_steps,
                       "rel", "sgd_update", slow=True, net=net, part="update", optimizer="sgd", mode="free", lr=0.1))
    cases.append(_case("train", f"sgd(0.1) 10 steps free-running: loss {net.label}", check_train_steps,
                       "rel", "sgd_loss", slow=True, net=net, part="loss", optimizer="sgd", mode="free", lr=0.1))
    return cases


def _loss_weights() -> list[Case]:
    """min-SNR-5 (the chapter U-Net's default): the weight of every t of the default schedule (cosine
    T = 200) and of Ho et al.'s (linear T = 1000) for each prediction, and the weighted loss of given
    outputs. torch_ref trains eps models only; diffusers' rows skip without diffusers."""
    cases: list[Case] = []
    refs = {"eps": ("oracle", "torch", "diffusers"), "x0": ("oracle", "torch", "diffusers"),
            "v": ("oracle", "torch", "diffusers")}
    for kind, T in (("cosine", 200), ("linear", 1000)):
        for prediction, names in refs.items():
            for ref in names:
                cases.append(_case("loss_weights", f"min-SNR 5 weights {prediction} {kind} T={T} vs {ref}",
                                   check_loss_weights, "rel", ref=ref, kind=kind, timesteps=T, gamma=5.0,
                                   prediction=prediction))
    for prediction, ref in (("x0", "oracle"), ("eps", "oracle"), ("v", "oracle"), ("eps", "torch"),
                            ("x0", "diffusers"), ("v", "diffusers")):
        cases.append(_case("weighted_loss", f"min-SNR 5 loss of given outputs {prediction} cosine T=200 vs {ref}",
                           check_weighted_loss, "rel", ref=ref, kind="cosine", timesteps=200, gamma=5.0,
                           prediction=prediction))
    return cases


def _sampling() -> list[Case]:
    cases: list[Case] = []
    for step in (99, 50, 0):
        cases.append(_case("sampler", f"ddpm step i={step} beta_tilde", check_sampler_step, "abs",
                           step=step, variance="beta_tilde", clip=False))
    cases.append(_case("sampler", "ddpm step i=99 beta", check_sampler_step, "abs", slow=True, step=99,
                       variance="beta", clip=False))
    cases.append(_case("sampler", "ddpm step i=50 beta_tilde clip", check_sampler_step, "abs", step=50,
                       variance="beta_tilde", clip=True))
    # (sampler, variance, clip, schedule, T, trained, slow[, prediction]): an x0 or v row reads the same
    # eps-trained U-Net's output as that type (torch_ref's X1 against jax_ddpm's parameterization)
    chains = [("ddpm", "beta_tilde", False, "cosine", 100, True, False),
              ("ddpm", "beta_tilde", True, "cosine", 100, True, False, "x0"),
              ("ddpm", "beta_tilde", True, "cosine", 100, True, False, "v"),
              ("ddpm", "beta_tilde", False, "linear", 100, True, True, "x0"),
              ("ddpm", "beta", False, "cosine", 100, True, True, "v"),
              ("ddpm", "beta", False, "cosine", 100, True, True),
              ("ddpm", "beta_tilde", True, "cosine", 100, True, False),
              ("chapter", "beta_tilde", False, "cosine", 100, True, False),
              ("ddpm", "beta_tilde", False, "linear", 100, True, False),  # stays within |x| ~ 5: x_0 not all clamped
              ("ddpm", "beta_tilde", False, "cosine", 100, False, True),
              ("ddpm", "beta_tilde", False, "linear", 1000, True, True)]
    for sampler, variance, clip, kind, T, trained, slow, *pred in chains:
        prediction = pred[0] if pred else "eps"
        label = "chapter_sample" if sampler == "chapter" else f"ddpm {variance}{' clip' if clip else ''}"
        label = f"chain {T} steps {label} {kind}{'' if trained else ' random-init'}"
        label += "" if prediction == "eps" else f" read as {prediction}"
        extra = {} if prediction == "eps" else {"prediction": prediction}
        for part, metric in (("x0", "abs"), ("trajectory", "rel")):
            cases.append(_case("sampler", f"{label}: {part}", check_chain, metric, f"chain_{part}", slow=slow,
                               part=part, sampler=sampler, variance=variance, clip=clip, kind=kind, timesteps=T,
                               trained=trained, **extra))
    return cases


def _weights() -> list[Case]:
    return [_case("round_trip", f"weights torch->flax->torch {net.label}", check_round_trip, "abs", net=net)
            for net in (Net(1, 16, 2), Net(3, 32, 2, CHAPTER))]


# ----------------------------------------------------------------------------- unet2d vs diffusers

D, AD, U, AU = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"


def _unet2d(name: str, size: int, batch: int, **settings) -> UNet2DNet:
    return UNet2DNet(name, tuple(settings.items()), size, batch)


# Between them: one head and several (head_dim 4 over 16/32 channels; 3 and 6 heads), padding
# 0 and 1, flip_sin_to_cos both ways, freq_shift 0 and 1, eps 1e-6 and 1e-5, 8, 4 and 3 (odd)
# groups, 3 and 1 channels, 32, 12 and 24 px (12 and 24: not powers of two), attention at
# 16x16 in the second down block (ddpm-cifar10's AttnDownBlock2D), in up blocks and the mid block.
CIFAR_LIKE = _unet2d(  # google/ddpm-cifar10-32's architecture at 1/8 width (128, 256, 256, 256 there)
    "cifar10-arch/8", 32, 2, sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32, 32),
    layers_per_block=2, down_block_types=(D, AD, D, D), up_block_types=(U, U, AU, U), attention_head_dim=None,
    norm_num_groups=8, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, dropout=0.0)
HEADS = _unet2d(  # diffusers' defaults for eps, padding, flip and shift; 4 and 8 heads; 12 px
    "heads", 12, 4, sample_size=12, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=(AD, D), up_block_types=(U, AU), attention_head_dim=4, norm_num_groups=4, norm_eps=1e-5,
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0)
ODD_GROUPS = _unet2d(  # 3 groups, 3 and 6 heads, three levels with padding 0 at 24 -> 12 -> 6 px
    "odd-groups", 24, 2, sample_size=24, in_channels=3, out_channels=3, block_out_channels=(12, 24, 24),
    layers_per_block=1, down_block_types=(D, AD, D), up_block_types=(U, AU, U), attention_head_dim=4,
    norm_num_groups=3, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=True, freq_shift=1)
UNET2D_NETS = (CIFAR_LIKE, HEADS, ODD_GROUPS)


def _f64(net: UNet2DNet) -> UNet2DNet:
    return dataclasses.replace(net, dtype="float64")


def _d(group: str, component: str, fn: Callable[..., Measure], metric: str, key: str | None = None,
       slow: bool = False, net: UNet2DNet | None = None, **params) -> Case:
    """A case against diffusers at ``net``'s dtype."""
    extra = {} if net is None else {"net": net}
    return _case(group, f"{component} vs diffusers", fn, metric, key, ref="diffusers", slow=slow,
                 dtype=net.dtype if net is not None else "float32", **extra, **params)


def _diffusers() -> list[Case]:
    cases: list[Case] = []
    for kind in schedules.SCHEDULES:
        for T in (20, 1000):
            cases.append(_d("schedule", f"schedule {kind} T={T}", check_schedule, "rel", kind=kind, timesteps=T))
    for kind in schedules.SCHEDULES:
        for at in ("0", "T-1", "random"):
            cases.append(_d("q_sample", f"q_sample {kind} T=1000 t={at}", check_q_sample, "abs", kind=kind,
                            timesteps=1000, at=at))
    # forward: (net, mode, slow); float32 every net in eval and train (dropout 0) mode, float64
    # every net in eval mode and one in train mode; by default every net once, two in float64
    forwards = [(n, m, m == "train" and n is not HEADS) for n in UNET2D_NETS for m in ("eval", "train")]
    forwards += [(_f64(n), "eval", n is ODD_GROUPS) for n in UNET2D_NETS] + [(_f64(HEADS), "train", True)]
    for net, mode, slow in forwards:
        cases.append(_d("unet2d", f"unet2d forward {mode} {net.label}", check_forward, "rel", "forward", slow=slow,
                        net=net, mode=mode))
    for net, slow in ((HEADS, False), (_f64(HEADS), False), (ODD_GROUPS, True), (_f64(ODD_GROUPS), True),
                      (CIFAR_LIKE, True), (_f64(CIFAR_LIKE), True)):
        for key, fn in (("loss", check_loss), ("grads", check_grads)):
            what = "loss" if key == "loss" else "grad every param"
            cases.append(_d("unet2d", f"unet2d {what} linear T=1000 {net.label}", fn, "rel", key, slow=slow,
                            net=net, kind="linear", timesteps=1000))
    for net, slow in ((HEADS, False), (ODD_GROUPS, True)):
        # the 10-step runs cost ~13 s each: --full / -m slow only; one Adam step fed diffusers' grads stays default
        for part, metric, key in (("loss", "rel", "loss"), ("params", "frac", "adam_step_params")):
            cases.append(_d("unet2d", f"unet2d adam 10 steps, each from diffusers' state: {part} {net.label}",
                            check_train_steps, metric, key, slow=True, net=net, part=part))
        cases.append(_d("unet2d", f"unet2d adam 10 steps, diffusers' grads -> optax: params {net.label}",
                        check_adam_same_grads, "rel", "adam_same_grads", slow=slow, net=net))
    # chains: DDPMScheduler fixed_small (= beta_tilde), clip_sample = clip_denoised; random-init U-Net
    for net, kind, clip, slow in ((HEADS, "cosine", True, False), (HEADS, "linear", False, True),
                                  (HEADS, "linear", True, True), (ODD_GROUPS, "cosine", True, True)):
        label = f"unet2d chain 20 steps ddpm beta_tilde{' clip' if clip else ''} {kind} {net.label}"
        for part, metric in (("x0", "abs"), ("trajectory", "rel")):
            cases.append(_d("unet2d", f"{label}: {part}", check_chain, metric, f"chain_{part}", slow=slow, net=net,
                            part=part, sampler="ddpm", variance="beta_tilde", clip=clip, kind=kind, timesteps=20,
                            trained=False))
    for net, slow in ((CIFAR_LIKE, False), (ODD_GROUPS, True)):
        cases.append(_d("unet2d", f"unet2d weights diffusers->flax->diffusers {net.label}", check_round_trip, "abs",
                        "round_trip", slow=slow, net=net))
    return cases


# ----------------------------------------------------------------------------- the samplers (analytic denoiser)


def _spec(sampler: str, kind: str, T: int, n: int | None, prediction: str = "eps", dtype: str = "float32",
          **options) -> ChainSpec:
    return ChainSpec(sampler, kind, T, n, prediction, tuple(options.items()), dtype=dtype)


def chain_key(spec: ChainSpec) -> str:
    """The tolerance component of a chain: the sampler's, or ``chain_cosine_eps`` for an eps model on
    the cosine schedule whose grid starts at T - 1 (the float32 floor: see tolerances.py)."""
    top = max(_oracle_grid(spec)) == spec.timesteps - 1
    if spec.sampler != "chapter" and spec.kind == "cosine" and spec.prediction == "eps" and top:
        return "chain_cosine_eps"
    return SAMPLER_CHAIN[spec.sampler]


def _oracle_grid(spec: ChainSpec) -> list[int]:
    from .references.oracle_samplers import grid

    o = spec.opts
    return grid(spec.sampler, spec.timesteps, spec.num_steps, o.get("timestep_spacing"), o.get("steps_offset", 0))


def diffusers_agrees(spec: ChainSpec) -> bool:
    """Whether diffusers' scheduler implements the same chain (else there is no diffusers row).

    Not: DDIM with linspace, or trailing with n not dividing T (its prev_t = t - T // n is not the
    next grid point: the paper-vs-diffusers difference, tests/test_samplers.py); DDPM with
    variance beta on a grid whose lowest point is above 0 (DDPMScheduler adds noise at every
    t > 0, so at its last step too); a trailing grid where diffusers' ``arange`` makes n + 1
    points (jax_ddpm.samplers.grids._trailing); dtype float64 (diffusers' schedulers step in
    float32); the chapter's loop (not in diffusers); the T-step DDPM chain (step()'s float32 beta at
    small t: the unet2d chain rows above compare it, at their tolerance).
    """
    import numpy as np

    o, T, n = spec.opts, spec.timesteps, spec.n
    spacing = o.get("timestep_spacing", "linspace" if spec.sampler == "dpmpp_2m" else "leading")
    if spec.dtype != "float32" or spec.sampler == "chapter":
        return False
    if spacing == "trailing" and len(np.arange(T, 0, -T / n)) != n:
        return False
    if spec.sampler == "ddim" and (spacing == "linspace" or (spacing == "trailing" and T % n)):
        return False
    if spec.sampler == "ddpm" and o.get("variance") == "beta" and min(_oracle_grid(spec)) > 0:
        return False
    return not (spec.sampler == "ddpm" and spec.num_steps is None)  # the T-step chain: the unet2d chain rows


# the default rows (cheap: ~0.4 s each, one compiled program per spec shared by its oracle and
# diffusers rows): each sampler, prediction type, schedule, spacing and most options once, T = 100,
# num_steps not dividing T, eta 0 / 0.5 / 1; the rest of the grid is full_chains() (slow)
DEFAULT_CHAINS = [
    _spec("ddpm", "linear", 100, 13),
    _spec("ddpm", "cosine", 100, 13, "v", variance="beta", clip_denoised=True),
    _spec("ddim", "linear", 100, 13, timestep_spacing="linspace"),
    _spec("ddim", "cosine", 100, 20, eta=1.0, timestep_spacing="trailing"),
    _spec("ddim", "linear", 100, 10, "v", eta=0.5, steps_offset=1, clip_denoised=True),
    _spec("dpmpp_2m", "linear", 100, 13),
    _spec("dpmpp_2m", "cosine", 100, 10, "x0", timestep_spacing="trailing", final_sigmas_type="sigma_min",
          lower_order_final=False),
    _spec("dpmpp_2m", "linear", 100, 20, clip_denoised=True),
]
DEFAULT_F64_CHAINS = [
    _spec("ddim", "cosine", 100, 13, "eps", "float64", eta=1.0, timestep_spacing="linspace"),
    _spec("dpmpp_2m", "cosine", 100, 13, "v", "float64", timestep_spacing="leading"),
]


def full_chains() -> list[ChainSpec]:
    """The slow grid: every option set of each sampler x each prediction x both schedules, with (T, n)
    cycling through T = 100 and 1000 and n dividing T or not; every cell also in float64 once."""
    option_sets = {
        "ddpm": [{}, {"variance": "beta"}, {"clip_denoised": True}, {"variance": "beta", "clip_denoised": True},
                 {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"}, {"steps_offset": 1},
                 {"timestep_spacing": "linspace", "variance": "beta", "clip_denoised": True}],
        "ddim": [{"eta": e, "timestep_spacing": sp} for e in (0.0, 0.5, 1.0)
                 for sp in ("leading", "trailing", "linspace")]
        + [{"clip_denoised": True}, {"eta": 1.0, "clip_denoised": True, "timestep_spacing": "trailing"},
           {"eta": 0.3, "steps_offset": 1}],
        "dpmpp_2m": [{"timestep_spacing": sp, "final_sigmas_type": f} for sp in ("linspace", "leading", "trailing")
                     for f in ("zero", "sigma_min")]
        + [{"clip_denoised": True}, {"clip_denoised": True, "final_sigmas_type": "sigma_min"},
           {"final_sigmas_type": "sigma_min", "lower_order_final": False},
           {"final_sigmas_type": "sigma_min", "lower_order_final": False, "timestep_spacing": "trailing"}],
    }
    sizes = [(100, 7), (100, 20), (1000, 50), (100, 13), (1000, 13), (100, 50), (1000, 20), (100, 10), (1000, 50)]
    specs, k = [], 0
    for sampler, sets in option_sets.items():
        for opts in sets:
            for prediction in ("eps", "x0", "v"):
                for kind in ("linear", "cosine"):
                    T, n = sizes[k % len(sizes)]
                    k += 1
                    specs.append(_spec(sampler, kind, T, n, prediction, **opts))
    for prediction in ("eps", "x0", "v"):
        for kind in ("linear", "cosine"):
            specs.append(_spec("ddpm", kind, 100, None, prediction))  # the T-step chain
            specs.append(_spec("chapter", kind, 50, None, prediction))
    specs += [dataclasses.replace(s, dtype="float64") for s in specs if s.timesteps <= 100]
    return [s for s in specs if s not in DEFAULT_CHAINS and s not in DEFAULT_F64_CHAINS]


def _chain_case(spec: ChainSpec, ref: str, slow: bool) -> Case:
    return _case("samplers", f"chain {spec.label} vs {ref}", check_sampler_chain, "abs", chain_key(spec), ref=ref,
                 slow=slow, dtype=spec.dtype, spec=spec)


def _samplers() -> list[Case]:
    cases: list[Case] = []
    for specs, slow in ((DEFAULT_CHAINS + DEFAULT_F64_CHAINS, False), (full_chains(), True)):
        for spec in specs:
            cases.append(_chain_case(spec, "oracle", slow))
            if diffusers_agrees(spec):
                cases.append(_chain_case(spec, "diffusers", slow))
    return cases


CASES: list[Case] = _closed_forms() + _network() + _training() + _loss_weights() + _sampling() + _weights() + _diffusers() + _samplers()
GROUPS = tuple(dict.fromkeys(c.group for c in CASES))


def cases(group: str | None = None, full: bool = True, only: str | None = None,
          unavailable: bool = False) -> list[Case]:
    """The supported cases of ``group`` (all when None); without ``full`` the slow ones are left out.

    ``unavailable``: also the cases whose reference cannot run here (``run_case`` gives them
    a skipped row naming why), in their place in the list.
    """
    return [c for c in CASES if (group is None or c.group == group) and (full or not c.slow)
            and (only is None or only in c.component) and (c.supported() or (unavailable and c.unavailable()))]


def find_case(component: str) -> Case:
    """The case named ``component`` exactly."""
    for c in CASES:
        if c.component == component:
            return c
    raise KeyError(component)


def pytest_params(*groups: str) -> list:
    """``CASES`` of ``groups`` as ``pytest.param``s with ids; slow cases get ``@pytest.mark.slow``,
    cases whose reference does not support the component are skipped."""
    import pytest

    params = []
    for c in (c for g in groups for c in CASES if c.group == g):
        marks = [pytest.mark.slow] if c.slow else []
        if c.unavailable():
            marks.append(pytest.mark.skip(reason=f"reference {c.reference!r} unavailable: {c.unavailable()}"))
        elif not c.supported():
            marks.append(pytest.mark.skip(reason=f"reference {c.reference!r} does not support {c.key!r}"))
        params.append(pytest.param(c, id=c.id, marks=marks))
    return params


__all__ = ["CASES", "CIFAR_LIKE", "DEFAULT_CHAINS", "DEFAULT_F64_CHAINS", "GROUPS", "HEADS", "ODD_GROUPS",
           "UNET2D_NETS", "cases", "chain_key", "diffusers_agrees", "find_case", "full_chains", "pytest_params"]
