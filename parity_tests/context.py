"""The device both frameworks run on, and a per-run cache (``Context``).

Precision: fp32 everywhere; torch with TF32 off (matmul and cuDNN), JAX with
``jax.default_matmul_precision('highest')``. On ``--device cuda`` torch runs on 'cuda' and
JAX on its GPU backend; ``cpu`` pins both to the CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

try:  # the parity suite needs torch; jax_ddpm itself never imports it
    import torch
except ImportError as _e:  # pragma: no cover - exercised only without the extra
    torch = None
    _TORCH_IMPORT_ERROR = str(_e)
else:
    _TORCH_IMPORT_ERROR = ""

import jax

DEVICES = ("auto", "cpu", "cuda")


class DeviceUnavailable(ValueError):
    """The requested device cannot run both frameworks."""


def _jax_gpus() -> list:
    try:
        return list(jax.devices("gpu"))
    except RuntimeError:
        return []


def cuda_unavailable_reason() -> str | None:
    """None when torch and JAX both see a CUDA GPU, else why not (one line)."""
    if torch is None or not torch.cuda.is_available():
        return "torch sees no CUDA device (torch.cuda.is_available() is False)"
    if not _jax_gpus():
        return f"JAX has no GPU backend (jax.devices() = {[d.platform for d in jax.devices()]}); install jax[cuda12]"
    return None


def resolve_device(requested: str) -> str:
    """'auto' -> 'cuda' when both frameworks see a GPU, else 'cpu'. Raises DeviceUnavailable."""
    if requested not in DEVICES:
        raise DeviceUnavailable(f"--device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "auto":
        return "cpu" if cuda_unavailable_reason() else "cuda"
    if requested == "cuda":
        reason = cuda_unavailable_reason()
        if reason:
            raise DeviceUnavailable(f"--device cuda: {reason}")
    return requested


def set_fp32_precision() -> None:
    """TF32 off in torch (matmul and cuDNN convolutions); the JAX side uses ``Context.scope``.

    Only the two flags (not also ``fp32_precision`` / ``set_float32_matmul_precision``):
    torch >= 2.9 refuses to mix its legacy and new precision APIs in one process.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@contextlib.contextmanager
def _highest_matmul_precision():
    """``jax.default_matmul_precision('highest')``, or the same config set and restored if that alias is gone."""
    if hasattr(jax, "default_matmul_precision"):
        with jax.default_matmul_precision("highest"):
            yield
        return
    before = jax.config.jax_default_matmul_precision  # pragma: no cover - a newer jax
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        yield
    finally:
        jax.config.update("jax_default_matmul_precision", before)


@dataclasses.dataclass
class Context:
    """The device both frameworks run on, and a cache of built models and compiled functions.

    ``device`` is 'cpu' or 'cuda' (the tolerance table's column); the cache is shared by
    every check and reference of one run (keys name their owner: ``('torch_ref', ...)``).
    """

    device: str
    torch_device: Any
    jax_device: Any
    cache: dict = dataclasses.field(default_factory=dict)

    @contextlib.contextmanager
    def scope(self, dtype: str = "float32"):
        """JAX on ``jax_device`` with full-precision matmuls/convolutions; torch on one CPU thread.

        One torch thread: these are tiny ops, and OpenMP threads spinning on a shared CPU
        made the torch side 10x slower (a 100-step chain: 6 s -> 0.5 s). ``dtype`` 'float64'
        (a case's compute dtype) also enables JAX's x64 mode, so float64 arrays stay float64.
        """
        threads = torch.get_num_threads()
        if self.device == "cpu":
            torch.set_num_threads(1)
        x64 = jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
        try:
            with jax.default_device(self.jax_device), _highest_matmul_precision(), x64:
                yield
        finally:
            torch.set_num_threads(threads)

    def memo(self, key, build: Callable[[], Any]):
        """``cache[key]``, built by ``build()`` the first time."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]


def make_context(device: str = "auto") -> Context:
    """Builds the context for ``device`` in DEVICES. Raises DeviceUnavailable."""
    if torch is None:
        raise DeviceUnavailable(f"the parity suite needs torch ({_TORCH_IMPORT_ERROR}); pip install 'jax-ddpm[torch]'")
    device = resolve_device(device)
    set_fp32_precision()
    if device == "cuda":
        return Context("cuda", torch.device("cuda"), _jax_gpus()[0])
    return Context("cpu", torch.device("cpu"), jax.devices("cpu")[0])


__all__ = ["Context", "DEVICES", "DeviceUnavailable", "cuda_unavailable_reason", "make_context", "resolve_device",
           "set_fp32_precision"]
