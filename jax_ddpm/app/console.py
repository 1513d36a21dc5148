"""What the command says: exit statuses, one-line errors and warnings, the progress display,
and Ctrl-C as a flag the train loop checks between steps."""
from __future__ import annotations

import signal
import sys
import time
from typing import TextIO

from ..errors import one_line

PROG = "jax-ddpm"
EXIT_OK, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_INTERRUPTED = 0, 2, 3, 130


def error(message: object, status: int = EXIT_BAD_INPUT, prog: str = PROG) -> int:
    """Prints ``prog: error: message`` (one line, no length cut) on stderr; returns ``status``."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status


def warning(message: str, prog: str = PROG) -> None:
    """``prog: warning: message`` on stderr, one line."""
    print(f"{prog}: warning: {one_line(message, limit=10_000)}", file=sys.stderr)


def note(message: str, prog: str = PROG) -> None:
    """``prog: note: message`` on stderr."""
    print(f"{prog}: note: {message}", file=sys.stderr)


class Progress:
    """A one-line progress display on stderr (``\\r``) when it is a terminal; plain lines at
    logging points otherwise; nothing with ``quiet``."""

    def __init__(self, total: int, quiet: bool, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.total = total
        self.quiet = quiet
        self.live = (not quiet) and getattr(self.stream, "isatty", lambda: False)()
        self.loss = float("nan")
        self.rate = float("nan")
        self._last_draw = 0.0

    def update(self, step: int, force: bool = False) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.2:
            return
        self._last_draw = now
        width = 24
        done = int(width * step / max(self.total, 1))
        bar = "#" * done + "-" * (width - done)
        self.stream.write(f"\r[{bar}] step {step}/{self.total}  loss {self.loss:.4f}  {self.rate:,.0f} img/s ")
        self.stream.flush()

    def log(self, step: int, loss: float, rate: float) -> None:
        self.loss, self.rate = loss, rate
        if self.live:
            self.update(step, force=True)
        elif not self.quiet:
            self.stream.write(f"step {step}/{self.total}  loss {loss:.4f}  {rate:,.0f} img/s\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self.live:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


class InterruptFlag:
    """Turns the first SIGINT into a flag the loop checks between steps; a second one raises."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            self.raised = True
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: no handler, Ctrl-C raises as usual
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "EXIT_NONFINITE", "EXIT_OK", "InterruptFlag", "PROG", "Progress",
           "error", "note", "warning"]
