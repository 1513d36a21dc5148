"""What the registry knows about an architecture (``Architecture``), and the weight-table row type.

An architecture is a Flax module plus everything the rest of jax_ddpm needs to use it
without knowing which one it is: a frozen config dataclass (validated in its
``__post_init__``, raising :class:`ArchConfigError` naming the field), a builder, the table
that maps its variables to a flat torch-named dict (``jax_ddpm.convert``), whether it keeps
BatchNorm statistics, the multiple its image sides must be, and the safetensors metadata
that describes it. See ``registry.py``; a new architecture is one module and one entry there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

# (torch name, flax variable path, layout); layouts are converted by jax_ddpm.convert:
#   conv (HWIO <-> OIHW), conv_transpose (flipped HWIO <-> IOHW), dense ([in, out] <-> [out, in]),
#   count (int32 <-> int64 scalar), same (unchanged).
WeightRow = tuple[str, tuple[str, ...], str]
WEIGHT_LAYOUTS = ("conv", "conv_transpose", "dense", "count", "same")


class ArchConfigError(ValueError):
    """A config value the architecture does not implement; ``field`` names the config field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Architecture:
    """One registry entry. Every callable takes the architecture's own config object.

    Attributes:
      name: the registry key (``ModelConfig.arch``, the ``arch`` safetensors metadata).
      config_cls: frozen dataclass of the architecture's hyperparameters.
      build: ``build(config, *, dtype, conv_impl) -> flax.linen.Module``; the module is
        called as ``apply(variables, x [B, H, W, C], t [B], train=...)`` and returns
        [B, H, W, C_out] float32.
      weight_table: ``weight_table(config) -> list[WeightRow]`` covering every variable.
      has_batch_stats: whether the variables hold a ``batch_stats`` collection.
      size_multiple: ``size_multiple(config) -> int``: image height and width must be
        positive multiples of it.
      config_from_fields: ``config_from_fields(channels, **fields) -> config``: the config
        from the image channel count and the ``ModelConfig`` fields named in ``fields``.
      fields: the ``ModelConfig`` field names ``config_from_fields`` reads.
      to_metadata: ``to_metadata(config) -> {str: str}`` for a safetensors file.
      from_metadata: ``from_metadata(meta) -> config``; raises ValueError (missing or bad keys).
      description: one line for ``--help``.
    """

    name: str
    config_cls: type
    build: Callable[..., Any]
    weight_table: Callable[[Any], list[WeightRow]]
    has_batch_stats: bool
    size_multiple: Callable[[Any], int]
    config_from_fields: Callable[..., Any]
    fields: tuple[str, ...]
    to_metadata: Callable[[Any], dict[str, str]]
    from_metadata: Callable[[Mapping[str, str]], Any]
    description: str = ""


__all__ = ["ArchConfigError", "Architecture", "WEIGHT_LAYOUTS", "WeightRow"]
