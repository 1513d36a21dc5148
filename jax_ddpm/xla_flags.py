"""XLA flags for speed on CPU, set before JAX starts, and only where this jaxlib accepts them.

XLA reads ``XLA_FLAGS`` once, when the first backend starts, and a flag it does not know
aborts the process. So a flag is checked by starting JAX once in a subprocess with it
(CPU backend only; a few seconds) before it is added to this process's ``XLA_FLAGS``.

``CPU_XLA_FLAGS`` keeps XLA:CPU's single convolutions on its Eigen path instead of YNNPACK's
(jaxlib 0.10): the U-Net's train step on CPU runs faster with it (measured in
benchmarks/README.md, "CPU gap", item 2). It only concerns the CPU backend. ``jax-ddpm
train`` and ``sample`` and ``python -m benchmarks`` add it by default (``--xla-flags auto``).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


class XlaFlagsError(ValueError):
    """Flags this jaxlib rejects, or that come too late (one-line message)."""


def jax_started() -> bool:
    """Whether a JAX backend has started in this process (XLA_FLAGS can no longer change)."""
    mod = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(mod, "_backends", None))


def check(flags: str, timeout: float = 120.0) -> None:
    """Starts JAX's CPU backend once in a subprocess with ``XLA_FLAGS=flags`` (only those, so
    that a failure is theirs, not that of flags the caller had already set).

    Raises:
        XlaFlagsError: the subprocess failed (an unknown flag aborts XLA) or timed out.
    """
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    try:
        out = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(2).block_until_ready()"],
                             env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise XlaFlagsError(f"JAX did not start within {timeout:.0f} s with XLA flags {flags!r}") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["(no message)"])[-1]
        last = re.sub(r"^[FEWI]\d{4} [\d:.]+\s+\d+ \S+\] ", "", last)  # absl's log prefix
        raise XlaFlagsError(f"this jaxlib rejects XLA flags {flags!r}: {last[:200]}")


def resolve(request: str, cpu: bool = True) -> tuple[str, str | None]:
    """``(flags to add, note)`` for an ``--xla-flags`` value.

    ``'auto'``: ``CPU_XLA_FLAGS`` when ``cpu`` (the run may use the CPU backend), XLA_FLAGS
    does not already set that option, JAX has not started in this process yet, and this jaxlib
    accepts it; else nothing, with a note saying why when this jaxlib rejected it.
    ``'none'``: nothing. Anything else: those flags, checked.

    Raises:
        XlaFlagsError: explicit flags this jaxlib rejects.
    """
    request = request.strip()
    if request == "none":
        return "", None
    if request != "auto":
        check(request)
        return request, None
    option = CPU_XLA_FLAGS.split("=")[0]
    if not cpu or option in os.environ.get("XLA_FLAGS", "") or jax_started():
        return "", None  # not for this run, the caller's own setting, or too late to matter
    try:
        check(CPU_XLA_FLAGS)
    except XlaFlagsError as exc:
        return "", f"not using {CPU_XLA_FLAGS}: {exc}"
    return CPU_XLA_FLAGS, None


def apply(flags: str) -> None:
    """Appends ``flags`` to ``os.environ['XLA_FLAGS']`` (nothing to do for an empty string).

    Raises:
        XlaFlagsError: JAX has already started in this process, so they would be ignored.
    """
    if not flags:
        return
    if jax_started():
        raise XlaFlagsError(f"JAX has already started in this process; XLA flags {flags!r} cannot take effect")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


def setup(request: str, cpu: bool = True) -> str | None:
    """:func:`resolve` then :func:`apply`: what ``--xla-flags`` does. Returns the note, if any.

    Raises:
        XlaFlagsError: explicit flags this jaxlib rejects, or flags that come too late.
    """
    flags, note = resolve(request, cpu)
    apply(flags)
    return note
