"""Issue 18 with real processes: while a trainer runs, a second trainer on its folder is refused
naming its PID and readers (`convert`) get the newest complete checkpoint although every save
prunes the one before; SIGTERM saves a checkpoint like the first Ctrl-C (one line, exit status
143), and a second signal during that save waits for it (no temporary folder left).

``-m slow``: the same in a two-process (--distributed) run, where SIGTERM reaches one process.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from cli_util import cli_env, train_cmd
from jax_ddpm import checkpoint as ckpt
from jax_ddpm.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

TESTS = os.path.dirname(os.path.abspath(__file__))

# tests/train_runner.py, plus: when the loop saves the checkpoint it stops at (a signal was
# seen), the process sends itself SECOND_SIGNAL while that checkpoint is being written.
RUNNER = f"""
import os, signal, sys
sys.path.insert(0, {TESTS!r})
import jax_ddpm.app.train as train_mod
from jax_ddpm import checkpoint as ckpt
from train_runner import run

stopping, real_save, real_ckpt_save = [], train_mod._save, ckpt.save
second = getattr(signal, os.environ.get("SECOND_SIGNAL", "SIGINT"))

def _save(loop, interrupt=None):
    if interrupt is not None and interrupt.raised:
        stopping.append(loop.step)
    return real_save(loop, interrupt)

def save(manager, step, tree, meta):
    if stopping and stopping[-1] == step:
        stopping.clear()
        os.kill(os.getpid(), second)
        print(f"runner: sent {{second.name}} during the save of checkpoint {{step}}", file=sys.stderr, flush=True)
    return real_ckpt_save(manager, step, tree, meta)

train_mod._save, ckpt.save = _save, save
sys.exit(run(sys.argv[1:]))
"""


def _runner(cmd: list[str], step_delay: float) -> list[str]:
    return [sys.executable, "-c", RUNNER, "--step-delay", str(step_delay), *cmd[3:]]


def _wait_for_checkpoint(proc, workdir, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    folder = ckpt.checkpoint_dir(str(workdir))
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}): {proc.stderr.read().decode()[-1500:]}")
        if os.path.isdir(folder) and any(n.isdigit() for n in os.listdir(folder)):
            return
        time.sleep(0.05)
    pytest.fail("no checkpoint appeared in time")


def _jax_ddpm_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if not line.startswith("runner:")]


def test_sigterm_saves_while_a_second_trainer_is_refused_and_readers_are_served(tmp_path, tmp_path_factory, capsys):
    workdir = tmp_path / "run"
    cmd = train_cmd(workdir, "--keep-checkpoints", "1", steps=10_000, every=2)  # every save prunes the last one
    proc = subprocess.Popen(_runner(cmd, step_delay=0.05), env=cli_env(tmp_path_factory, SECOND_SIGNAL="SIGINT"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_checkpoint(proc, workdir)
        # A second trainer on the folder: refused in one line naming the first one's PID, nothing changed.
        assert main(train_cmd(workdir, "--xla-flags", "none", "--keep-checkpoints", "1", steps=10_000,
                              every=2)[3:]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"another jax-ddpm process (PID {proc.pid}) is writing to it" in err
        # Readers while checkpoints are pruned under them: the newest complete one, every time.
        read = []
        for i in range(2):
            assert main(["convert", "--workdir", str(workdir), "--out", str(tmp_path / f"m{i}.safetensors")]) == 0
            captured = capsys.readouterr()
            assert captured.err == "", captured.err
            read.append(int(captured.out.split("step ")[1].split(")")[0]))
        assert read == sorted(read) and all(step % 2 == 0 for step in read)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    lines = _jax_ddpm_lines(err)
    assert status == 143, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("jax-ddpm: terminated (SIGTERM); saved checkpoint ")
    saved = int(lines[0].split("saved checkpoint ")[1].split()[0])
    assert f"runner: sent SIGINT during the save of checkpoint {saved}" in err  # the second signal waited for it
    assert ckpt.complete_steps(str(workdir)) == [saved] and saved >= max(read)
    assert not [n for n in os.listdir(ckpt.checkpoint_dir(str(workdir))) if not n.isdigit()]  # no temporary folder
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps == sorted(set(steps))


# ----------------------------------------------------------------------------- -m slow
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_one_process_of_a_distributed_run_stops_both_with_a_checkpoint(tmp_path, tmp_path_factory):
    workdir, port = tmp_path / "two", _free_port()
    cmd = [a for a in train_cmd(workdir, "--distributed", steps=400, every=5) if a != "--quiet"]
    procs = []
    for i in range(2):
        env = cli_env(tmp_path_factory, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2,
                      JAX_PROCESS_ID=i, SECOND_SIGNAL="SIGTERM")
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
        procs.append(subprocess.Popen(_runner(cmd, step_delay=0.1), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    try:
        deadline = time.monotonic() + 900
        while 10 not in ckpt.complete_steps(str(workdir)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint in time"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)  # what a scheduler sends; here to one process only
        results = [(p.wait(timeout=900), p.communicate()[1].decode()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [rc for rc, _ in results] == [143, 143], results[0][1][-3000:] + results[1][1][-3000:]
    assert "Traceback" not in results[0][1] + results[1][1]
    saved = int(results[0][1].split("terminated (SIGTERM); saved checkpoint ")[1].split()[0])
    assert saved >= 10 and saved % 5 == 0 and max(ckpt.complete_steps(str(workdir))) == saved
