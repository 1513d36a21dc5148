"""The command's sampler options: which ones each sampler takes, checked and spelled as flags.

``sample`` (``--num-steps``, ``--eta``, ...), ``eval`` (the same) and ``train`` (``--sample-*``,
for its grids) read them here; the samplers themselves check the values
(``samplers.check_options``), and their one-sentence ValueErrors come back as one line naming
the flag.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping

from ..samplers import SAMPLERS, SPACINGS, check_options, get_sampler
from .checks import ConfigError, choice as _choice, finite_float as _finite_float, non_negative as _non_negative
from .checks import positive as _positive

SAMPLER_OPTION_NAMES = ("num_steps", "eta", "timestep_spacing", "steps_offset", "variance", "clip_denoised")


def sampler_option_names(sampler: str) -> tuple[str, ...]:
    """The options sampler ``sampler`` takes: ``num_steps`` (every sampler) and its module's ``OPTIONS``."""
    return ("num_steps",) + tuple(getattr(sys.modules[get_sampler(sampler).__module__], "OPTIONS", ()))


def _option_error(message: str, flag) -> str:
    """A sampler's ValueError with the option it names spelled as the command's flag."""
    for name in SAMPLER_OPTION_NAMES:
        if message.startswith(name + " "):
            return flag(name) + message[len(name):]
    found = sorted((message.find(name), name) for name in SAMPLER_OPTION_NAMES if name in message)
    return f"{flag(found[0][1] if found else 'sampler')}: {message}"


def sampler_settings(sampler: str, given: Mapping[str, Any], run_sampling: Mapping[str, Any],
                     timesteps: int | None = None, *, prediction: str = "eps", prefix: str = "--") -> dict[str, Any]:
    """The library options of ``sampler`` (``make_sample_fn(model, sampler, ..., **settings)``):
    the options ``given`` (``SAMPLER_OPTION_NAMES``; None = not given), and the run's
    ``variance`` / ``clip_denoised`` (``run_sampling``) where the sampler has them and they are not
    given; everything else at the sampler's own default. With ``timesteps`` (T), the result is
    checked by ``samplers.check_options`` (nothing is built or run).

    ``prefix`` spells the options in messages: ``--`` (``sample --eta``), ``--sample-``
    (``train --sample-eta``); the sampler itself is ``{prefix}sampler``.

    Raises:
      ConfigError: one line naming the option: one the sampler does not have, or a value it refuses.
    """
    def flag(name: str) -> str:
        return prefix + name.replace("_", "-")

    have = sampler_option_names(sampler)
    for name in SAMPLER_OPTION_NAMES:
        if given.get(name) is not None and name not in have:
            others = [s for s in SAMPLERS if name in sampler_option_names(s)]
            names = others[0] if len(others) == 1 else f"{', '.join(others[:-1])} and {others[-1]}"
            which = f" ({flag('sampler')} {names} {'has' if len(others) == 1 else 'have'})" if others else ""
            raise ConfigError(f"{flag(name)}: {flag('sampler')} {sampler} has no such setting{which}")
    settings = {k: v for k, v in given.items() if v is not None}
    for name in ("variance", "clip_denoised"):
        if name in have and name not in settings:
            settings[name] = run_sampling[name]
    if timesteps is not None:
        try:
            check_options(sampler, timesteps, prediction=prediction, **settings)
        except ValueError as e:
            raise ConfigError(_option_error(" ".join(str(e).split()), flag)) from None
    return settings


def given_sampler_options(config: Any) -> dict[str, Any]:
    """The sampler options a ``SampleConfig`` was given (``SAMPLER_OPTION_NAMES``; None = not given)."""
    return {name: getattr(config, name) for name in SAMPLER_OPTION_NAMES}


def sampler_options_from_args(args: Any, prefix: str = "") -> dict[str, Any]:
    """``--[sample-]num-steps``, ``--[sample-]eta``, ``--[sample-]timestep-spacing`` and
    ``--[sample-]steps-offset`` from a namespace (None = not given), each checked on its own."""
    flag = "--" + prefix.replace("_", "-")
    num_steps, eta, spacing, offset = (getattr(args, prefix + name, None)
                                       for name in ("num_steps", "eta", "timestep_spacing", "steps_offset"))
    return {"num_steps": None if num_steps is None else _positive(flag + "num-steps", num_steps),
            "eta": None if eta is None else _finite_float(flag + "eta", eta, 0.0),
            "timestep_spacing": None if spacing is None else _choice(flag + "timestep-spacing", spacing, SPACINGS),
            "steps_offset": None if offset is None else _non_negative(flag + "steps-offset", offset)}


__all__ = ["SAMPLER_OPTION_NAMES", "given_sampler_options", "sampler_option_names", "sampler_options_from_args",
           "sampler_settings"]
