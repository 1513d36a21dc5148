"""jax_ddpm.xla_flags and `--xla-flags`: which XLA flags a run adds to XLA_FLAGS, and when.

The check itself starts JAX in a subprocess (~2 s); the other rules are decided without one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from cli_util import shared_run
from jax_ddpm import xla_flags
from jax_ddpm.cli import main

BOGUS = "--xla_jax_ddpm_no_such_flag=1"


def _jaxlib_accepts(flags: str) -> bool:
    """Independently of the module: does a fresh JAX start with these XLA flags?"""
    done = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"],
                          env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
                          capture_output=True, timeout=120)
    return done.returncode == 0


def test_rules_that_need_no_subprocess(monkeypatch):
    jnp.zeros(1).block_until_ready()  # JAX has started in this process
    assert xla_flags.jax_started()
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert xla_flags.resolve("none") == ("", None)
    assert xla_flags.resolve("auto", cpu=False) == ("", None)  # a run that is not on the CPU
    assert xla_flags.resolve("auto") == ("", None)  # too late in this process: nothing, no note
    with pytest.raises(xla_flags.XlaFlagsError, match="JAX has already started"):
        xla_flags.apply(xla_flags.CPU_XLA_FLAGS)
    xla_flags.apply("")  # nothing to add is not an error


def test_auto_keeps_the_callers_own_setting(monkeypatch):
    monkeypatch.setattr(xla_flags, "jax_started", lambda: False)
    monkeypatch.setattr(xla_flags, "check", lambda flags: pytest.fail("no check expected"))
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_convolution")
    assert xla_flags.resolve("auto") == ("", None)


def test_auto_adds_the_cpu_flag_where_this_jaxlib_accepts_it(monkeypatch):
    monkeypatch.setattr(xla_flags, "jax_started", lambda: False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    flags, note = xla_flags.resolve("auto")
    if _jaxlib_accepts(xla_flags.CPU_XLA_FLAGS):
        assert (flags, note) == (xla_flags.CPU_XLA_FLAGS, None)
    else:
        assert flags == "" and note.startswith(f"not using {xla_flags.CPU_XLA_FLAGS}: this jaxlib rejects")
    monkeypatch.setenv("XLA_FLAGS", "")
    xla_flags.apply(xla_flags.CPU_XLA_FLAGS)
    xla_flags.apply("--xla_dump_to=/tmp/x")
    assert os.environ["XLA_FLAGS"] == f"{xla_flags.CPU_XLA_FLAGS} --xla_dump_to=/tmp/x"


def test_the_flag_is_known_to_the_jaxlib_this_project_is_developed_with():
    # guards the test above against passing vacuously here: jaxlib 0.10 knows the flag
    if not jax.__version__.startswith("0.10."):
        pytest.skip(f"jax {jax.__version__}: whether it knows the flag is what the test above checks")
    assert _jaxlib_accepts(xla_flags.CPU_XLA_FLAGS)
    assert not _jaxlib_accepts(BOGUS)


@pytest.mark.parametrize("command", ["train", "sample"])
def test_cli_rejects_flags_this_jaxlib_does_not_know(command, tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("keep me")
    argv = [command, "--workdir", str(workdir), f"--xla-flags={BOGUS}"]
    if command == "sample":
        argv += ["--out", str(tmp_path / "s.png")]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"jax-ddpm: error: --xla-flags: this jaxlib rejects XLA flags '{BOGUS}'"), err
    assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "s.png").exists()


def test_a_trained_run_records_the_xla_flags_it_ran_with(tmp_path_factory):
    # the session's tiny run, `jax-ddpm train` in a fresh process with the default --xla-flags auto
    config = json.load(open(shared_run(tmp_path_factory) / "config.json"))
    assert (xla_flags.CPU_XLA_FLAGS in config["xla_flags"]) == _jaxlib_accepts(xla_flags.CPU_XLA_FLAGS)
