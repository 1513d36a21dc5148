"""The architecture registry: name -> :class:`~jax_ddpm.models.arch.Architecture`.

Everything that builds a model (the command's train, sample and convert, the parity suite,
the benchmarks) looks its architecture up here. A new architecture is one module that
defines an ``ARCH`` entry, and its name in ``_ENTRIES`` below.
"""
from __future__ import annotations

from typing import Any

from . import chapter_unet, unet2d
from .arch import Architecture

_ENTRIES: tuple[Architecture, ...] = (chapter_unet.ARCH, unet2d.ARCH)
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in _ENTRIES}
ARCH_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)
DEFAULT_ARCH = "chapter"  # what a work folder or safetensors file without an ``arch`` field holds


def get_arch(name: str) -> Architecture:
    """The entry for ``name``. Raises ValueError naming the known architectures."""
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise ValueError(f"arch must be one of {', '.join(ARCH_NAMES)}, got {name!r}") from None


def build_model(arch: str, config: Any, *, dtype: Any = None, conv_impl: str = "auto"):
    """``get_arch(arch).build(config, ...)`` (``dtype`` None = float32)."""
    import jax.numpy as jnp

    return get_arch(arch).build(config, dtype=jnp.float32 if dtype is None else dtype, conv_impl=conv_impl)


__all__ = ["ARCHITECTURES", "ARCH_NAMES", "DEFAULT_ARCH", "build_model", "get_arch"]
