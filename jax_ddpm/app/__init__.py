"""The ``jax-ddpm`` application: config (frozen dataclasses, validation, identity), factories,
the work folder, console, devices, and the train / sample / convert commands and their CLI.

Modules import downward: ``cli`` -> ``train``, ``sample``, ``convert`` -> ``workdir``,
``devices``, ``console`` -> ``factories`` -> ``config`` -> the library. Nothing in the
library imports ``app``.
"""
