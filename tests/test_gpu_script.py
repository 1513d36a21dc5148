"""benchmarks/gpu.sh's control flow, on any machine: stages, their order and arguments, time limits.

No GPU is needed: ``PYTHON`` points gpu.sh at a stand-in interpreter (a small bash script) that
logs each call and behaves as the real stage would (writes the parity table, a benchmark JSON,
renders it, installs carried wheels, or hangs until stopped). What gpu.sh itself does is real:
its budget arithmetic, ``timeout`` limits, the wheel folder and PYTHONPATH, exit status and the
render pass over the JSONs it finds. Each test takes a few seconds.
"""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_SH = REPO / "benchmarks" / "gpu.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="gpu.sh needs bash and coreutils' timeout")

# Stands in for python3. Every call is appended to $FAKE_CALLS. A benchmark JSON is dated 5 s
# ahead so that gpu.sh's "newer than the start of this run" test holds within the same second.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >>"$FAKE_CALLS"
case "$*" in
  -) cat >/dev/null; echo "python (stand-in)"; exit 0 ;;
  *"-m pip install"*) echo "PYTHONPATH=$PYTHONPATH" >>"$FAKE_CALLS"; exit "${FAKE_PIP_RC:-0}" ;;
  *"jax_ddpm.cli parity"*)
    [ -n "${FAKE_PARITY_SLEEP:-}" ] && exec sleep "$FAKE_PARITY_SLEEP"
    echo "| parity row | pass |"; exit "${FAKE_PARITY_RC:-0}" ;;
  *"--render"*) json="${@: -1}"; echo rendered >"${json%.json}.md"; exit 0 ;;
  *"-m benchmarks"*)
    echo "PYTHONPATH=$PYTHONPATH" >>"$FAKE_CALLS"
    out=""; tag=""; prev=""
    for a in "$@"; do
      [ "$prev" = "--out" ] && out="$a"; [ "$prev" = "--tag" ] && tag="$a"; prev="$a"
    done
    json="$out/bench-cuda-20990101-000000-$tag.json"
    echo '{}' >"$json"; touch -d "@$(( $(date +%s) + 5 ))" "$json"
    exit "${FAKE_BENCH_RC:-0}" ;;
esac
echo "stand-in python: unexpected call: $*" >&2
exit 99
"""


def _stage_calls(lines):
    """The stand-in's calls without the PYTHONPATH lines it logs after pip and benchmark calls."""
    return [c for c in lines if not c.startswith("PYTHONPATH=")]


def run_gpu_sh(tmp_path, **env):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    calls = tmp_path / "calls.txt"
    env.setdefault("WHEELS", str(tmp_path / "no-wheels"))
    full_env = {**os.environ, "PYTHON": str(fake), "FAKE_CALLS": str(calls),
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"), **{k: str(v) for k, v in env.items()}}
    start = time.monotonic()
    proc = subprocess.run(["bash", str(GPU_SH), str(out)], env=full_env, capture_output=True,
                          text=True, timeout=120)
    elapsed = time.monotonic() - start
    lines = calls.read_text().splitlines() if calls.exists() else []
    logs = list(out.glob("gpu-*.log"))
    assert len(logs) == 1, (proc.stdout, proc.stderr)
    return proc, lines, out, logs[0].read_text(), elapsed


def test_gpu_sh_runs_every_stage_in_order(tmp_path):
    proc, lines, out, log, _ = run_gpu_sh(tmp_path)
    calls = _stage_calls(lines)
    assert proc.returncode == 0, (proc.stdout, proc.stderr, log)
    assert calls[0] == "-"  # the environment report
    stamp = calls[1].split("parity-cuda-")[1].removesuffix(".json")
    assert calls[1] == f"-m jax_ddpm.cli parity --device cuda --json {out}/parity-cuda-{stamp}.json"
    # the unet2d sizes first (jax_ddpm vs diffusers), then the chapter's, in one benchmark
    assert calls[2] == (f"-m benchmarks --device cuda --sizes unet2d-digits,unet2d-cifar10,digits,chapter "
                        f"--torch-compile off --reps 5 --sample-reps 2 --out {out} --tag gpu")
    assert calls[3] == (f"-m benchmarks --device cuda --sizes digits,unet2d-digits --tasks train --torch-compile on "
                        f"--out {out} --tag gpu-compile")
    # both JSONs lacked their Markdown, so each is rendered once, and nothing else is called
    assert sorted(calls[4:]) == sorted(f"-m benchmarks --render {out}/bench-cuda-20990101-000000-{tag}.json"
                                       for tag in ("gpu", "gpu-compile"))
    assert (out / f"parity-cuda-{stamp}.md").read_text() == "| parity row | pass |\n"
    assert (out / "bench-cuda-20990101-000000-gpu.md").read_text() == "rendered\n"
    assert "parity: all checks passed" in log and "done, status 0" in log
    assert "wheels: none in" in log and not any("pip" in c for c in calls)


def test_gpu_sh_installs_carried_wheels_and_puts_them_on_the_path(tmp_path):
    # a .whl folder (diffusers carried as the device README says): pip --no-index into a
    # temporary folder, which every later stage finds on PYTHONPATH after the repository
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("diffusers-0.42.1-py3-none-any.whl", "importlib_metadata-8.7.0-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")
    proc, lines, out, log, _ = run_gpu_sh(tmp_path, WHEELS=wheels)
    assert proc.returncode == 0, (proc.stdout, proc.stderr, log)
    pip = next(c for c in lines if "-m pip install" in c)
    site = pip.split("--target ")[1].split()[0]
    assert pip == (f"-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target {site} "
                   f"{wheels}/diffusers-0.42.1-py3-none-any.whl {wheels}/importlib_metadata-8.7.0-py3-none-any.whl")
    bench_paths = [lines[i + 1] for i, c in enumerate(lines) if c.startswith("-m benchmarks --device")]
    assert len(bench_paths) == 2 and all(p.startswith(f"PYTHONPATH={REPO}") and p.endswith(f":{site}")
                                         for p in bench_paths)
    assert "wheels: installing 2 from" in log


def test_gpu_sh_goes_on_without_the_wheels_when_pip_fails(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"")
    proc, lines, out, log, _ = run_gpu_sh(tmp_path, WHEELS=wheels, FAKE_PIP_RC=1)
    assert proc.returncode == 1, (proc.stdout, proc.stderr, log)
    assert "wheel install exited with status 1" in log
    bench_paths = [lines[i + 1] for i, c in enumerate(lines) if c.startswith("-m benchmarks --device")]
    assert bench_paths and all("site" not in p.split(":", 1)[-1] for p in bench_paths)
    assert "done, status 1" in log


def test_gpu_sh_stops_a_stage_at_its_limit_and_goes_on(tmp_path):
    # parity hangs: stopped at PARITY_S; the benchmarks still run; the exit status is parity's 124
    proc, calls, out, log, elapsed = run_gpu_sh(tmp_path, TOTAL_S=90, PARITY_S=6, FAKE_PARITY_SLEEP=300)
    assert proc.returncode == 124, (proc.stdout, proc.stderr, log)
    assert 5 < elapsed < 30  # stopped by its 6 s limit (a limit under 5 s would skip the stage instead)
    assert "skipped" not in log
    assert "parity (1 = a check failed, 124/130 = time limit) exited with status 124" in log
    assert any("--tag gpu" in c and "--torch-compile off" in c for c in _stage_calls(calls))
    assert "done, status 124" in log


def test_gpu_sh_exits_with_the_first_failure_and_still_runs_the_later_stages(tmp_path):
    # the benchmark fails (3, through gpu.sh's "| tee"); the torch.compile stage still runs and
    # fails too; the exit status is the first failure's
    proc, calls, out, log, _ = run_gpu_sh(tmp_path, FAKE_BENCH_RC=3)
    assert proc.returncode == 3, (proc.stdout, proc.stderr, log)
    assert "benchmark exited with status 3" in log
    assert "benchmark with torch.compile exited with status 3" in log
    assert any("--tag gpu-compile" in c for c in calls)
    assert "done, status 3" in log


def test_gpu_sh_skips_what_its_budget_cannot_fit(tmp_path):
    # TOTAL_S=30: after parity (which fails, 1) less than the benchmark's 40 s reserve plus 5 s
    # and less than 40 s are left, so both benchmarks are skipped; the exit status stays parity's
    proc, calls, out, log, _ = run_gpu_sh(tmp_path, TOTAL_S=30, FAKE_PARITY_RC=1)
    assert proc.returncode == 1, (proc.stdout, proc.stderr, log)
    assert "parity (1 = a check failed, 124/130 = time limit) exited with status 1" in log
    assert not any(c.startswith("-m benchmarks") for c in calls)
    assert "skipped (no time left)" in log
    assert "skipped the torch.compile benchmark" in log
    assert "done, status 1" in log
