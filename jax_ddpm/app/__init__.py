"""The ``jax-ddpm`` application: config (frozen dataclasses, validation, identity), factories,
the work folder (and its lock), console, devices, and the train / sample / convert / eval
commands and their CLI.

Modules import downward: ``cli`` (with ``options``) -> ``train`` (with ``resume`` and
``train_outputs``), ``sample``, ``convert``, ``eval`` -> ``workdir``, ``lock``, ``devices``,
``console`` -> ``factories`` -> ``config`` -> the library. Nothing in the library imports ``app``.
"""
