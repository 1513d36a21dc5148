"""Parity between torch_ref (the reference), jax_ddpm and float64 NumPy oracles.

``report`` holds every check (shared by ``pytest parity_tests`` and ``jax-ddpm parity``);
``oracle`` holds the float64 closed forms (NumPy only); ``variants`` runs a function with
and without ``jax.jit``. Importing this package imports neither framework.
"""
