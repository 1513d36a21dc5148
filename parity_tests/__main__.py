"""``python -m parity_tests [--device ...] [--json FILE] [--full] [--only TEXT]``: the same as ``jax-ddpm parity``."""
from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
