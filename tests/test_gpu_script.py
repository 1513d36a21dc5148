"""benchmarks/gpu.sh's control flow, on any machine: stages, their order and arguments, time limits.

No GPU is needed: ``PYTHON`` points gpu.sh at a stand-in interpreter (a small bash script) that
logs each call and behaves as the real stage would (writes the parity table, a benchmark JSON,
renders it, or hangs until stopped). What gpu.sh itself does is real: its budget arithmetic,
``timeout`` limits, exit status and the render pass over the JSONs it finds. Each test takes a
few seconds.
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
  *"jax_ddpm.cli parity"*)
    [ -n "${FAKE_PARITY_SLEEP:-}" ] && exec sleep "$FAKE_PARITY_SLEEP"
    echo "| parity row | pass |"; exit "${FAKE_PARITY_RC:-0}" ;;
  *"--render"*) json="${@: -1}"; echo rendered >"${json%.json}.md"; exit 0 ;;
  *"-m benchmarks"*)
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


def run_gpu_sh(tmp_path, **env):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    calls = tmp_path / "calls.txt"
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
    proc, calls, out, log, _ = run_gpu_sh(tmp_path)
    assert proc.returncode == 0, (proc.stdout, proc.stderr, log)
    assert calls[0] == "-"  # the environment report
    stamp = calls[1].split("parity-cuda-")[1].removesuffix(".json")
    assert calls[1] == f"-m jax_ddpm.cli parity --device cuda --json {out}/parity-cuda-{stamp}.json"
    assert calls[2] == f"-m benchmarks --device cuda --torch-compile off --out {out} --tag gpu"
    assert calls[3] == (f"-m benchmarks --device cuda --sizes digits --tasks train --torch-compile on "
                        f"--out {out} --tag gpu-compile")
    # both JSONs lacked their Markdown, so each is rendered once, and nothing else is called
    assert sorted(calls[4:]) == sorted(f"-m benchmarks --render {out}/bench-cuda-20990101-000000-{tag}.json"
                                       for tag in ("gpu", "gpu-compile"))
    assert (out / f"parity-cuda-{stamp}.md").read_text() == "| parity row | pass |\n"
    assert (out / "bench-cuda-20990101-000000-gpu.md").read_text() == "rendered\n"
    assert "parity: all checks passed" in log and "done, status 0" in log


def test_gpu_sh_stops_a_stage_at_its_limit_and_goes_on(tmp_path):
    # parity hangs: stopped at PARITY_S; the benchmarks still run; the exit status is parity's 124
    proc, calls, out, log, elapsed = run_gpu_sh(tmp_path, TOTAL_S=90, PARITY_S=6, FAKE_PARITY_SLEEP=300)
    assert proc.returncode == 124, (proc.stdout, proc.stderr, log)
    assert 5 < elapsed < 30  # stopped by its 6 s limit (a limit under 5 s would skip the stage instead)
    assert "skipped" not in log
    assert "parity (1 = a check failed, 124/130 = time limit) exited with status 124" in log
    assert any("--tag gpu" in c and "--torch-compile off" in c for c in calls)
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
    # TOTAL_S=50: after parity (which fails, 1) less than the benchmark's 70 s reserve and less
    # than a minute are left, so both benchmarks are skipped; the exit status stays parity's
    proc, calls, out, log, _ = run_gpu_sh(tmp_path, TOTAL_S=50, FAKE_PARITY_RC=1)
    assert proc.returncode == 1, (proc.stdout, proc.stderr, log)
    assert "parity (1 = a check failed, 124/130 = time limit) exited with status 1" in log
    assert not any(c.startswith("-m benchmarks") for c in calls)
    assert "skipped (no time left)" in log
    assert "skipped the torch.compile benchmark" in log
    assert "done, status 1" in log
