"""Kept for imports written before ``jax_ddpm.app``: the run configurations live in
:mod:`jax_ddpm.app.config`."""
from .app.config import *  # noqa: F401,F403
from .app.config import __all__  # noqa: F401
from .models.chapter_unet import DOWNSAMPLINGS  # noqa: F401  (public here before the registry)
