"""The ``jax-ddpm`` command: thin parse -> validate -> call."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "parity":
        from parity_tests.report import main as parity_main  # needs torch; jax_ddpm itself does not
        return parity_main(argv[1:])
    if argv and argv[0] == "bench":
        from benchmarks.__main__ import main as bench_main
        return bench_main(argv[1:])
    print("usage: jax-ddpm {train,sample,convert,parity,bench} ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
