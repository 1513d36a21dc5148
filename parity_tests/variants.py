"""Run a function with and without ``jax.jit`` (a chex-free ``chex.variants``).

Usage in a test::

    @pytest.mark.parametrize("variant", VARIANTS)
    def test_q_sample(variant):
        f = variant(jax_ddpm.q_sample)            # plain, or jax.jit(q_sample)
        ...

``with_jit(fn, static_argnames=...)`` jits with the given static arguments;
``without_jit(fn)`` returns ``fn`` under ``jax.disable_jit()`` so nested jits (inside the
library) run op by op too.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax


def with_jit(fn: Callable, static_argnums: Sequence[int] = (), static_argnames: Sequence[str] = ()) -> Callable:
    """``jax.jit(fn)`` with the given static arguments."""
    return jax.jit(fn, static_argnums=tuple(static_argnums), static_argnames=tuple(static_argnames))


def without_jit(fn: Callable, static_argnums: Sequence[int] = (), static_argnames: Sequence[str] = ()) -> Callable:
    """``fn`` run eagerly, with every nested ``jax.jit`` disabled."""
    del static_argnums, static_argnames

    @functools.wraps(fn)
    def eager(*args, **kwargs):
        with jax.disable_jit():
            return fn(*args, **kwargs)

    return eager


with_jit.__name__ = "jit"
without_jit.__name__ = "nojit"

#: pass to ``pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)``
VARIANTS = (with_jit, without_jit)
VARIANT_IDS = ("jit", "nojit")
