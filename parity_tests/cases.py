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

from typing import Callable

from jax_ddpm import schedules

from .checks.closed_forms import check_embedding, check_posterior_step, check_q_sample, check_schedule
from .checks.convert import check_round_trip
from .checks.forward import check_bn_stats, check_forward
from .checks.sampling import check_chain, check_sampler_step
from .checks.training import check_adam_same_grads, check_grads, check_loss, check_train_steps
from .core import Case, Measure
from .inputs import CHAPTER, SAMPLER_NET, Net


def _case(group: str, component: str, fn: Callable[..., Measure], metric: str, key: str | None = None,
          ref: str = "torch", slow: bool = False, **params) -> Case:
    """A case; ``key`` (the tolerance table's component) defaults to ``group``."""
    return Case(group, component, fn, tuple(params.items()), metric, key or group, ref, "float32", slow)


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
    cases.append(_case("train", f"sgd(0.1) 10 steps free-running: update {net.label}", check_train_steps,
                       "rel", "sgd_update", slow=True, net=net, part="update", optimizer="sgd", mode="free", lr=0.1))
    cases.append(_case("train", f"sgd(0.1) 10 steps free-running: loss {net.label}", check_train_steps,
                       "rel", "sgd_loss", slow=True, net=net, part="loss", optimizer="sgd", mode="free", lr=0.1))
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
    # (sampler, variance, clip, schedule, T, trained, slow)
    chains = [("ddpm", "beta_tilde", False, "cosine", 100, True, False),
              ("ddpm", "beta", False, "cosine", 100, True, True),
              ("ddpm", "beta_tilde", True, "cosine", 100, True, False),
              ("chapter", "beta_tilde", False, "cosine", 100, True, False),
              ("ddpm", "beta_tilde", False, "linear", 100, True, False),  # stays within |x| ~ 5: x_0 not all clamped
              ("ddpm", "beta_tilde", False, "cosine", 100, False, True),
              ("ddpm", "beta_tilde", False, "linear", 1000, True, True)]
    for sampler, variance, clip, kind, T, trained, slow in chains:
        label = "chapter_sample" if sampler == "chapter" else f"ddpm {variance}{' clip' if clip else ''}"
        label = f"chain {T} steps {label} {kind}{'' if trained else ' random-init'}"
        for part, metric in (("x0", "abs"), ("trajectory", "rel")):
            cases.append(_case("sampler", f"{label}: {part}", check_chain, metric, f"chain_{part}", slow=slow,
                               part=part, sampler=sampler, variance=variance, clip=clip, kind=kind, timesteps=T,
                               trained=trained))
    return cases


def _weights() -> list[Case]:
    return [_case("round_trip", f"weights torch->flax->torch {net.label}", check_round_trip, "abs", net=net)
            for net in (Net(1, 16, 2), Net(3, 32, 2, CHAPTER))]


CASES: list[Case] = _closed_forms() + _network() + _training() + _sampling() + _weights()
GROUPS = tuple(dict.fromkeys(c.group for c in CASES))


def cases(group: str | None = None, full: bool = True, only: str | None = None) -> list[Case]:
    """The supported cases of ``group`` (all when None); without ``full`` the slow ones are left out."""
    return [c for c in CASES if (group is None or c.group == group) and (full or not c.slow)
            and (only is None or only in c.component) and c.supported()]


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
        if not c.supported():
            marks.append(pytest.mark.skip(reason=f"reference {c.reference!r} does not support {c.key!r}"))
        params.append(pytest.param(c, id=c.id, marks=marks))
    return params


__all__ = ["CASES", "GROUPS", "cases", "find_case", "pytest_params"]
