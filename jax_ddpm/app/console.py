"""What the command says: exit statuses, one-line errors and warnings, the progress display,
and Ctrl-C / SIGTERM as a flag the train loop checks between steps."""
from __future__ import annotations

import signal
import sys
import time
from typing import TextIO

from ..errors import one_line

PROG = "jax-ddpm"
EXIT_OK, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_INTERRUPTED = 0, 2, 3, 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: SIGTERM (SLURM, Kubernetes, preemptible VMs), handled like Ctrl-C
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum: int) -> int:
    """The exit status after stopping on signal ``signum``: 130 (SIGINT), 143 (SIGTERM)."""
    return EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class NonFiniteError(RuntimeError):
    """Numbers became NaN/inf (a loss, weights, samples): one line, exit status 3, nothing bad written."""


class StopAgain(KeyboardInterrupt):
    """A second SIGINT/SIGTERM after the first one asked the loop to stop: leave now."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


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
    """Turns the first SIGINT or SIGTERM into a flag the loop checks between steps (``signum``:
    the signal); a second one raises :class:`StopAgain` (a KeyboardInterrupt).

    Inside :meth:`shield` (a checkpoint save) a second signal is only recorded (``again``):
    the save finishes, and the loop stops right after it; a third one raises there too.
    """

    def __init__(self):
        self.signum: int | None = None
        self.again = 0
        self._shielded = False
        self._previous: dict[int, object] = {}

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def _handler(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            return
        self.again += 1
        if not self._shielded or self.again >= 2:
            raise StopAgain(signum)

    def shield(self):
        """A context in which a second signal waits for the block to finish (see the class)."""
        flag = self

        class _Shield:
            def __enter__(self):
                flag._shielded = True
                return flag

            def __exit__(self, *exc):
                flag._shielded = False
                return False

        return _Shield()

    def __enter__(self):
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handler)
            except ValueError:  # not the main thread: no handler, signals act as usual
                break
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        return False


__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "EXIT_NONFINITE", "EXIT_OK", "EXIT_TERMINATED", "InterruptFlag", "NonFiniteError",
           "PROG", "Progress", "STOP_SIGNALS", "StopAgain", "error", "exit_status", "note", "signal_name", "warning"]
