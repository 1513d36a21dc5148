"""``jax-ddpm parity`` (also ``python -m parity_tests``): run the cases on one device, print the table.

Exit status: 0 every row passed, 1 a row failed, 2 bad options or an unavailable device.
Rows whose reference is not installed here (diffusers is optional) are listed as skipped,
naming why; they neither pass nor fail. Progress goes to stderr; stdout is exactly the
Markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Sequence

PROG = "jax-ddpm parity"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump; main() turns it into exit 2
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Run every parity check (jax_ddpm vs torch_ref, diffusers and a float64 "
                                       "oracle) on one device and print the table. Exit 1 if any fails.")
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda}",
                   help="where both frameworks run (default auto: cuda when torch and JAX both see a GPU)")
    p.add_argument("--json", metavar="FILE", help="also write the rows and versions to FILE (must not exist)")
    p.add_argument("--full", action="store_true", help="include the slow checks (pytest -m slow)")
    p.add_argument("--only", metavar="TEXT", help="run only checks whose component contains TEXT")
    return p


def _check_json_path(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path):
        raise _UsageError(f"--json {path}: file exists; refusing to overwrite it")
    if not os.path.isdir(parent):
        raise _UsageError(f"--json {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise _UsageError(f"--json {path}: folder {parent} is not writable")


def _write_json(path: str, payload: dict) -> None:
    """Written to a temporary name, then renamed: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """``jax-ddpm parity [--device cpu|cuda] [--json FILE] [--full] [--only TEXT]`` -> 0, 1 (a check failed) or 2."""
    # imported when run: loading this entry point (jax_ddpm.cli's command table) imports no framework
    from .cases import cases
    from .context import DEVICES, DeviceUnavailable, make_context
    from .core import run_case
    from .render import device_names, render_markdown, versions

    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.device not in DEVICES:
            raise _UsageError(f"--device must be one of {', '.join(DEVICES)}, got {args.device!r}")
        if args.json:
            _check_json_path(args.json)
        selected = cases(full=args.full, only=args.only, unavailable=True)
        if not selected:
            raise _UsageError(f"--only {args.only!r} matches no check")
        ctx = make_context(args.device)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (_UsageError, DeviceUnavailable) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = []
    for i, case in enumerate(selected, 1):
        row = run_case(ctx, case)
        rows.append(row)
        verdict = "skip" if row.skipped else "ok  " if row.passed else "FAIL"
        print(f"[{i}/{len(selected)}] {verdict} {row.component} ({row.seconds:.1f} s)", file=sys.stderr, flush=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": ctx.device, "devices": device_names(ctx), "versions": versions(), "full": bool(args.full),
            "only": args.only, "wall_s": time.perf_counter() - t0}
    print(render_markdown(meta, rows), end="")
    passed = all(r.passed or r.skipped for r in rows)
    if args.json:
        _write_json(args.json, dict(meta, passed=passed, skipped=sum(r.skipped for r in rows),
                                    rows=[r.as_dict() for r in rows]))
    return 0 if passed else 1


__all__ = ["PROG", "main"]
