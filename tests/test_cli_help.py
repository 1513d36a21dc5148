"""`jax-ddpm --help` and every sub-command's --help explain every option."""
from __future__ import annotations

import argparse

import pytest

from jax_ddpm.cli import build_parser, main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no sub-commands")


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "sample", "convert", "parity", "bench"):
        assert f"    {command}" in out


@pytest.mark.parametrize("command", ["train", "sample", "convert"])
def test_every_option_is_explained(command, capsys):
    parser = _subparsers(build_parser())[command]
    assert main([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    options = [a for a in parser._actions if a.option_strings and "-h" not in a.option_strings]
    assert len(options) >= 4
    for action in options:
        assert action.help and len(action.help) > 15, action.option_strings
        assert action.option_strings[-1] in out


def test_train_has_the_issue_options():
    parser = _subparsers(build_parser())["train"]
    have = {s for a in parser._actions for s in a.option_strings}
    wanted = {"--data", "--image-size", "--channels", "--features", "--timesteps", "--schedule", "--batch-size",
              "--steps", "--lr", "--ema-decay", "--grad-clip", "--seed", "--checkpoint-every", "--sample-every",
              "--workdir", "--dtype", "--layout", "--quiet", "--distributed"}
    assert wanted <= have
