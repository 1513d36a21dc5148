"""What the command says: exit statuses, one-line errors and warnings, the progress display,
and Ctrl-C / SIGTERM as a flag the train loop checks between steps."""
from __future__ import annotations

import os
import signal
import sys
from typing import TextIO

from tqdm import tqdm

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


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (``isatty()``; a stream without it is not)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


def _screen(stream) -> tuple[int, int]:
    """(columns, rows) for the bar: the terminal's, less a column (no wrap); 79 x 24 where it
    does not say (an unsized pseudo-terminal says 0 x 0; tqdm would then draw nothing)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return 79, 24
    return (size.columns - 1 if size.columns > 1 else 79), (size.lines or 24)


class _Bar(tqdm):
    monitor_interval = 0  # no monitor thread: the bar is redrawn only when the loop reports

    def __init__(self, *args, file: TextIO, **kwargs):
        columns, rows = _screen(file)
        super().__init__(*args, file=file, ncols=columns, nrows=rows, **kwargs)
        self.dynamic_ncols = _screen  # asked before each drawing: follows a resized terminal


class Progress:
    """Progress on ``stream`` (stderr): on a terminal a tqdm bar (done/total, rate, ETA and the
    last logged numbers); otherwise plain lines at the logging points (:meth:`log`,
    :meth:`report`); nothing with ``quiet``. ``unit``: what is counted (train: steps; sample:
    images); ``desc``: the bar's label."""

    def __init__(self, total: int, quiet: bool, stream: TextIO | None = None, *, unit: str = "step",
                 desc: str | None = None):
        self.stream = stream or sys.stderr
        self.total = total
        self.quiet = quiet
        self.unit, self.desc = unit, desc
        self.live = (not quiet) and is_terminal(self.stream)
        self.loss = float("nan")
        self.rate = float("nan")
        self._bar: tqdm | None = None

    def _draw_at(self, n: int, postfix: str | None = None, force: bool = False) -> None:
        """Moves the bar to ``n`` (with ``postfix``), drawn if 0.2 s have passed since the last
        drawing or ``force``. Made on first use, starting at ``n`` (a resumed run's rate counts
        only the steps it runs)."""
        bar = self._bar
        if bar is None:  # drawn as it is made
            self._bar = _Bar(total=self.total, initial=n, file=self.stream, unit=self.unit, desc=self.desc,
                             postfix=postfix, mininterval=0.2, leave=True)
            return
        if postfix is not None:
            bar.set_postfix_str(postfix, refresh=False)
        drawn = bar.last_print_t
        if n != bar.n:
            bar.update(n - bar.n)  # tqdm draws (and updates its rate) when mininterval has passed
        if force and bar.last_print_t == drawn:
            bar.refresh()

    def update(self, step: int, force: bool = False) -> None:
        """``step`` of ``total`` done: the bar (redrawn at most every 0.2 s unless ``force``)."""
        if self.live:
            self._draw_at(step, force=force)

    def report(self, n: int, line: str, postfix: str | None = None) -> None:
        """A logging point, ``n`` of ``total`` done: on a terminal the bar, drawn now (with
        ``postfix``); otherwise ``line`` on a line of its own."""
        if self.live:
            self._draw_at(n, postfix, force=True)
        elif not self.quiet:
            self.stream.write(line + "\n")
            self.stream.flush()

    def log(self, step: int, loss: float, rate: float) -> None:
        """Train's logging point: the mean ``loss`` since the last one and ``rate`` (img/s)."""
        self.loss, self.rate = loss, rate
        self.report(step, f"step {step}/{self.total}  loss {loss:.4f}  {rate:,.0f} img/s",
                    postfix=f"loss {loss:.4f}, {rate:,.0f} img/s")

    def message(self, text: str) -> None:
        """``text`` on a line of its own (above the bar, which is redrawn below it)."""
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.clear()
        self.stream.write(text + "\n")
        self.stream.flush()
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        """Leaves the bar's last state on its line; later messages print below it."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


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


__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "EXIT_NONFINITE", "EXIT_OK", "EXIT_TERMINATED", "InterruptFlag",
           "NonFiniteError", "PROG", "Progress", "STOP_SIGNALS", "StopAgain", "error", "exit_status", "is_terminal",
           "note", "signal_name", "warning"]
