"""``jax-ddpm parity`` and ``python -m parity_tests``: options, exit codes (0 pass, 1 a check
failed, 2 bad input), JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jax_ddpm import cli, schedules
from parity_tests import cli as parity_cli
from parity_tests.cases import CASES, GROUPS, cases, pytest_params
from parity_tests.context import cuda_unavailable_reason
from parity_tests.references import diffusers as diffusers_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parity(*args: str) -> int:
    return cli.main(["parity", *args])


@pytest.mark.parametrize("args, needle", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--device", "tpu"], "--device must be one of auto, cpu, cuda, got 'tpu'"),
    (["--only", "no such check"], "--only 'no such check' matches no check"),
    (["--full", "extra"], "unrecognized arguments: extra"),
])
def test_bad_options_exit_2_with_one_line(capsys, args, needle):
    assert _parity(*args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and err.startswith("jax-ddpm parity: error:"), err


@pytest.mark.skipif(cuda_unavailable_reason() is None, reason="a GPU is present")
def test_cuda_without_gpu_exit_2(capsys):
    assert _parity("--device", "cuda") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda:" in err, err


def test_json_never_overwrites(tmp_path, capsys):
    out = tmp_path / "run.json"
    out.write_text("precious")
    assert _parity("--device", "cpu", "--json", str(out), "--only", "schedule linear T=10 vs oracle") == 2
    assert out.read_text() == "precious"
    assert "file exists" in capsys.readouterr().err


def test_json_missing_folder_exit_2(tmp_path, capsys):
    assert _parity("--json", str(tmp_path / "nope" / "run.json")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_passing_run_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert _parity("--device", "cpu", "--json", str(out), "--only", "schedule linear T=10 ") == 0
    table = capsys.readouterr().out
    assert "| component | max abs err | max rel err | tol | pass | note |" in table
    assert "| schedule linear T=10 vs oracle |" in table and "jaxlib" in table
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["device"] == "cpu"
    assert [r["component"] for r in data["rows"]] == ["schedule linear T=10 vs oracle", "schedule linear T=10 vs torch"]
    assert {"jax", "jaxlib", "flax", "optax", "torch", "python", "platform"} <= set(data["versions"])


def test_failing_check_exits_1(monkeypatch, capsys):
    real = schedules.schedule_arrays
    monkeypatch.setattr(schedules, "schedule_arrays", lambda b: {**real(b), "betas": real(b)["betas"] * 1.001})
    assert _parity("--device", "cpu", "--only", "schedule linear T=10 vs torch") == 1
    assert "**NO**" in capsys.readouterr().out


def test_every_case_has_a_tolerance_for_every_device():
    for case in CASES:
        assert set(case.tol) == {"cpu", "cuda"} and case.metric in ("abs", "rel", "frac"), case.component
    assert len({c.component for c in CASES}) == len(CASES)  # names are unique


def test_the_package_entry_point_is_the_same_command(tmp_path, capsys):
    """``parity_tests.cli.main`` (the ``jax_ddpm.commands`` entry point) behaves as ``jax-ddpm parity``."""
    assert parity_cli.main(["--bogus"]) == 2
    assert capsys.readouterr().err == "jax-ddpm parity: error: unrecognized arguments: --bogus\n"
    out = tmp_path / "run.json"
    assert parity_cli.main(["--device", "cpu", "--json", str(out), "--only", "schedule linear T=10 vs oracle"]) == 0
    assert "| schedule linear T=10 vs oracle |" in capsys.readouterr().out
    assert [r["component"] for r in json.loads(out.read_text())["rows"]] == ["schedule linear T=10 vs oracle"]


def test_python_m_parity_tests_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "parity_tests", "--device", "tpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == "jax-ddpm parity: error: --device must be one of auto, cpu, cuda, got 'tpu'"


def test_without_diffusers_its_rows_are_skipped_not_failed(monkeypatch, capsys):
    """diffusers not installed: the adapter supports nothing and says why; pytest skips its
    cases with that reason; ``jax-ddpm parity`` lists them as skipped rows and exits 0."""
    real = diffusers_ref._find_spec
    monkeypatch.setattr(diffusers_ref, "_find_spec", lambda name: None if name == "diffusers" else real(name))
    ours = [c for c in CASES if c.reference == "diffusers"]
    assert ours and not any(c.supported() for c in ours)
    assert all(c.unavailable() == "diffusers not installed (pip install 'jax-ddpm[diffusers]')" for c in ours)
    assert not [c for c in cases() if c.reference == "diffusers"]
    assert not [c for c in CASES if not c.supported() and not c.unavailable()]  # none silently dropped
    marks = [p.marks for p in pytest_params(*GROUPS) if p.values[0].reference == "diffusers"]
    assert len(marks) == len(ours) and all(
        any(m.name == "skip" and "unavailable: diffusers not installed" in m.kwargs["reason"] for m in ms)
        for ms in marks)
    assert parity_cli.main(["--device", "cpu", "--only", "vs diffusers"]) == 0
    out = capsys.readouterr().out
    n = len([c for c in ours if not c.slow])
    assert out.count("| skipped | diffusers not installed") == n and "**NO**" not in out
    assert f"0/{n} passed, {n} skipped (reference not installed)" in out


def test_every_group_runs_under_pytest():
    """Each group of CASES is parametrized by some parity_tests/test_*.py (pytest_params("group"))."""
    import pathlib

    sources = "".join(p.read_text() for p in pathlib.Path(__file__).parent.glob("test_*.py"))
    calls = [call.split(")", 1)[0] for call in sources.split("pytest_params(")[1:]]  # each call's arguments
    missing = [g for g in GROUPS if not any(f'"{g}"' in args for args in calls)]
    assert not missing, f"groups no test file runs: {missing}"
