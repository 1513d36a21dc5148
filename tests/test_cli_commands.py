"""``jax-ddpm parity`` / ``bench``: entry points of the group ``jax_ddpm.commands``, looked up by
name (jax_ddpm never imports them); a missing or broken one is one line, exit status 2."""
from __future__ import annotations

import pytest

from jax_ddpm.app import cli


class _Entry:
    def __init__(self, name, load):
        self.name, self.load = name, load


def _fails(argv, capsys, prefix) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith(prefix), err
    return err


def test_pyproject_registers_parity_and_bench():
    from importlib import metadata

    names = {ep.name: ep.value for ep in metadata.entry_points(group=cli.COMMAND_GROUP)}
    assert names.get("parity") == "parity_tests.cli:main" and names.get("bench") == "benchmarks.__main__:main"


@pytest.mark.parametrize("command", ["parity", "bench"])
def test_no_entry_point_is_one_line_exit_2(monkeypatch, capsys, command):
    monkeypatch.setattr(cli.metadata, "entry_points", lambda group: [])
    err = _fails([command, "--help"], capsys, f"jax-ddpm {command}: error:")
    assert "no '" + command + "' command is installed" in err and "pip install -e '.[test]'" in err


def test_entry_point_that_cannot_import_is_one_line_exit_2(monkeypatch, capsys):
    def load():
        raise ModuleNotFoundError("No module named 'torch'")

    monkeypatch.setattr(cli.metadata, "entry_points", lambda group: [_Entry("bench", load)])
    err = _fails(["bench", "--quick"], capsys, "jax-ddpm bench: error:")
    assert "cannot import what it needs (No module named 'torch')" in err and "pip install -e '.[test]'" in err


def test_entry_point_gets_the_rest_of_argv_and_gives_the_status(monkeypatch):
    seen = []

    def command_main(argv):
        seen.append(argv)
        return 1

    monkeypatch.setattr(cli.metadata, "entry_points",
                        lambda group: [_Entry("parity", lambda: command_main)] if group == cli.COMMAND_GROUP else [])
    assert cli.main(["parity", "--device", "cpu"]) == 1
    assert seen == [["--device", "cpu"]]


def test_unknown_command_is_argparses_error(capsys):
    err = _fails(["frobnicate"], capsys, "jax-ddpm: error:")
    assert "invalid choice: 'frobnicate'" in err
