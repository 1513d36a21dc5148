"""``app.console.Progress`` (issue 16, item 6): on a terminal a tqdm bar with done/total, rate,
ETA and the last loss; elsewhere the plain lines it always printed, at the logging points only;
nothing with ``quiet``; messages on lines of their own. ``sample`` reports each chunk of images
on stderr (a bar on a terminal, a line per chunk otherwise) and keeps stdout to its one line.
"""
from __future__ import annotations

import io
import re
import sys
import time

import numpy as np
import pytest

from cli_util import shared_run
from jax_ddpm.app.console import Progress, is_terminal
from jax_ddpm.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

BAR = re.compile(r"(\d+)/(\d+) \[(\d\d:\d\d)<(\d\d:\d\d), +([\d.]+)(\w+)/s")  # n/total [elapsed<ETA, rate unit/s


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drive(progress: Progress) -> None:
    """What train does: messages, a step at a time, a logging point, the end."""
    progress.message("1 cpu device")
    for step in range(41, 46):  # resumed from step 40
        progress.update(step)
    time.sleep(0.01)  # elapsed > 0, so the bar has a rate
    progress.log(45, 0.123456, 1234.5)
    progress.message("saved checkpoint 45")
    progress.update(50)
    progress.log(50, 0.1, 99.0)
    progress.close()
    progress.message("sampled 16 images in 0.1s")


def _last_draw(text: str) -> str:
    """The bar's last drawing before ``close`` (tqdm redraws the line after a ``\\r``)."""
    return text.split("\r")[-1]


def test_plain_lines_off_a_terminal_are_the_old_ones():
    stream = io.StringIO()
    _drive(Progress(100, quiet=False, stream=stream))
    assert stream.getvalue() == ("1 cpu device\n"
                                 "step 45/100  loss 0.1235  1,234 img/s\n"
                                 "saved checkpoint 45\n"
                                 "step 50/100  loss 0.1000  99 img/s\n"
                                 "sampled 16 images in 0.1s\n")


@pytest.mark.parametrize("stream", [io.StringIO(), FakeTTY()], ids=["pipe", "terminal"])
def test_quiet_prints_nothing(stream):
    _drive(Progress(100, quiet=True, stream=stream))
    assert stream.getvalue() == ""


def test_a_terminal_gets_a_bar_with_total_rate_eta_and_loss():
    stream = FakeTTY()
    _drive(Progress(100, quiet=False, stream=stream))
    text = stream.getvalue()
    assert text.startswith("1 cpu device\n") and "step 45/100" not in text  # no plain lines
    draws = [d for d in text.split("\r") if BAR.search(d)]
    at_45 = next(d for d in draws if "loss 0.1235" in d)
    n, total, _, _, rate, unit = BAR.search(at_45).groups()
    assert (n, total, unit) == ("45", "100", "step") and float(rate) > 0
    assert "1,234 img/s" in at_45 and "%|" in at_45  # train's img/s beside tqdm's step/s; the bar
    assert "saved checkpoint 45\n" in text  # a message on its own line, the bar redrawn below it
    final = text[text.index("saved checkpoint 45\n"):]
    assert BAR.search(_last_draw(final.rsplit("\n", 2)[0])).group(1) == "50" and "loss 0.1000, 99 img/s" in final
    assert text.endswith("\nsampled 16 images in 0.1s\n")  # after close: below the bar's last line


def test_is_terminal():
    assert is_terminal(FakeTTY()) and not is_terminal(io.StringIO()) and not is_terminal(object())
    closed = io.StringIO()
    closed.close()
    assert not is_terminal(closed)


# ----------------------------------------------------------------------------- sample, in chunks
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return shared_run(tmp_path_factory)


@pytest.fixture
def quick_chain(monkeypatch):
    """The sampler's compiled chain replaced by a trivial one, and the memory estimate by a
    constant (what is tested is the reporting around the chunks, not the chain:
    tests/test_cli_samplers.py runs the real ones)."""
    import jax.numpy as jnp

    from jax_ddpm.app import sample as sample_module

    monkeypatch.setattr(sample_module, "_cached_sample_fn", lambda *args: lambda v, s, x, key: jnp.tanh(x))
    monkeypatch.setattr(sample_module, "forward_bytes_per_image", lambda *args: (4 * 8 * 8, 4 * 8 * 8))  # not traced


def _sample(trained, out, *more) -> list[str]:
    return ["sample", "--workdir", str(trained), "--out", str(out), "--num", "5", "--batch-size", "2",
            "--bn-stats", "running", "--xla-flags", "none", *more]


def test_sample_reports_each_chunk_on_stderr(trained, quick_chain, tmp_path, capsys, monkeypatch):
    assert main(_sample(trained, tmp_path / "a.npz")) == 0
    captured = capsys.readouterr()
    assert captured.out == f"wrote 5 samples from step 60 to {tmp_path / 'a.npz'}\n"  # stdout unchanged
    assert [re.sub(r" in [\d.]+s$", "", line) for line in captured.err.splitlines()] == [
        "sampled 2/5 images", "sampled 4/5 images", "sampled 5/5 images"], captured.err
    # one chunk says nothing off a terminal: sample's stderr is what it was
    assert main(_sample(trained, tmp_path / "one.npz", "--batch-size", "5")) == 0
    assert capsys.readouterr().err == ""
    # on a terminal: a bar of images, 0/5 before the first chunk, then each chunk
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(_sample(trained, tmp_path / "b.npz")) == 0
    text = tty.getvalue()
    assert text.startswith("\rsampling:   0%|") and " 0/5 [00:00<?, ?img/s]" in text.split("\r")[1]
    draws = [BAR.search(d) for d in text.split("\r") if BAR.search(d)]
    assert {"2", "4", "5"} <= {m.group(1) for m in draws}
    assert all(m.group(2) == "5" and m.group(6) == "img" for m in draws)
    assert text.endswith("\n") and "sampled 2/5" not in text
    assert capsys.readouterr().out.startswith("wrote 5 samples")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["samples"], np.load(tmp_path / "b.npz")["samples"])
