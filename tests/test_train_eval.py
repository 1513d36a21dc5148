"""``jax-ddpm train --eval-every N``: quality lines in metrics.jsonl and quality.png, beside a
training that ends with the same bits as without them.

Default suite, one process: the session's tiny run (tests/cli_util.py, trained without
evaluations) is copied, its last checkpoint (60) removed, two quality lines written into its
metrics.jsonl (step 40, before the checkpoint it resumes from, and 55, after it), and it is
resumed to step 60 with ``--eval-every 5`` (a free setting on resume): step 50 is scored first
(due, and without a line), then 55 and 60. Checkpoint 60 must equal the shared run's bit for
bit, the losses line by line; line 40 is kept, the stale 55 replaced, quality.png redrawn from
all of them; and ``jax-ddpm eval`` in the same process scores checkpoints 50 and 60 to the same
numbers as their lines. ``-m slow``: a run trained from step 0 with evaluations, over a resume.

The classifier is the 8x8 one tests/test_quality.py caches (the same XDG_CACHE_HOME; on another
worker it is trained once, a few seconds).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from cli_util import SHARED_STEPS, TINY, cli_env, shared_run, train_cmd
from jax_ddpm import checkpoint as ckpt
from jax_ddpm.app import cli
from jax_ddpm.app.config import DEFAULT_EVAL_NUM, TrainConfig, identity, train_config_from_identity
from jax_ddpm.app.workdir import eval_rows, loss_rows, read_metrics, trim_metrics
from jax_ddpm.images import plot_steps, save_quality_plot

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

NUM = TINY[TINY.index("--num-samples") + 1]  # the grids' N: the quality samples reuse their compiled chain
LOSS_KEYS = ("step", "loss", "grad_norm", "lr", "epoch")  # what a loss line computes (not its wall time)
NUMBERS = ("fid", "fid_floor", "fid_floor_std", "confident", "coverage", "largest_class_share", "class_counts")


def quality_cache_root(tmp_path_factory) -> str:
    """The XDG_CACHE_HOME tests/test_quality.py and tests/test_cli_eval.py use (this worker's)."""
    return str(tmp_path_factory.getbasetemp() / "xdg_cache")


def _env(tmp_path_factory) -> dict:
    return cli_env(tmp_path_factory, XDG_CACHE_HOME=quality_cache_root(tmp_path_factory))


def _tree(workdir, step) -> dict:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as reader:
        tree = reader.restore(os.path.join(ckpt.checkpoint_dir(str(workdir)), str(step), ckpt.STATE_ITEM))
    return jax.tree_util.tree_map(np.asarray, tree)


def _same_bits(a, b, step=SHARED_STEPS) -> None:
    want, got = _tree(a, step), _tree(b, step)
    flat_w, flat_g = jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves_with_path(got)
    assert [p for p, _ in flat_w] == [p for p, _ in flat_g] and {"params", "ema_params", "rng"} <= set(want)
    for (path, w), (_, g) in zip(flat_w, flat_g):
        assert w.dtype == g.dtype and np.array_equal(w, g), f"{jax.tree_util.keystr(path)} differs"


def _losses(workdir) -> list[list]:
    return [[r[k] for k in LOSS_KEYS] for r in loss_rows(read_metrics(str(workdir / "metrics.jsonl")))]


def _old_line(step: int, fid: float) -> dict:
    return {"step": step, "kind": "eval", "fid": fid, "fid_floor": 20.0, "confident": 0.5, "real_confident": 0.95,
            "num_samples": int(NUM)}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """(the shared run, the resumed copy, eval's results for checkpoints 50 and 60)."""
    plain = shared_run(tmp_path_factory)
    root = tmp_path_factory.mktemp("train_eval")
    workdir = root / "run"
    shutil.copytree(plain, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(SHARED_STEPS))
    rows = read_metrics(str(workdir / "metrics.jsonl")) + [_old_line(40, 123.0), _old_line(55, 99.0)]
    rows.sort(key=lambda r: r["step"])  # in step order, each after the loss line of its step
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    argv = train_cmd(workdir, "--eval-every", "5", "--eval-num", NUM)[3:]  # the shared run's XLA flags (auto)
    evals = {step: str(root / f"eval{step}.json") for step in (50, SHARED_STEPS)}
    script = "; ".join(["import sys", "from jax_ddpm.cli import main", f"rc = main({argv!r})"] + [
        f"rc = rc or main(['eval', '--workdir', {str(workdir)!r}, '--checkpoint-step', '{step}', '--num', "
        f"'{NUM}', '--json', {path!r}])" for step, path in evals.items()] + ["sys.exit(rc)"])
    done = subprocess.run([sys.executable, "-c", script], env=_env(tmp_path_factory), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return plain, workdir, {s: json.loads(open(p).read()) for s, p in evals.items()}


def test_evaluations_leave_the_trained_bits_unchanged(resumed):
    plain, workdir, _ = resumed
    _same_bits(plain, workdir)
    assert _losses(workdir) == _losses(plain)


def test_quality_lines_over_a_resume(resumed):
    _, workdir, _ = resumed
    rows = read_metrics(str(workdir / "metrics.jsonl"))
    lines = eval_rows(rows)
    assert [r["step"] for r in lines] == [40, 50, 55, 60]  # 50: due at the start and had no line
    assert lines[0] == _old_line(40, 123.0)  # kept as it was; the stale 55 (after checkpoint 50) replaced
    assert plot_steps(str(workdir / "quality.png")) == [40, 50, 55, 60]  # redrawn from every line
    for row in lines[1:]:
        assert "loss" not in row and row["num_samples"] == int(NUM) and row["classifier_ok"]
        assert row["fid"] > row["fid_floor"] > 0 and 0 <= row["confident"] <= 1 and row["fid"] != 99.0
        assert row["sampling"] == {"arch": "chapter", "batch_size": None, "bn_stats": "batch", "clip_denoised": True,
                                   "num": int(NUM), "sampler": "ddpm", "schedule": "cosine", "seed": 0,
                                   "timesteps": 10, "variance": "beta_tilde"}
    assert len({r["fid"] for r in lines[1:]}) == 3  # three models, three numbers
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)  # in step order


def test_a_quality_line_is_what_eval_scores(resumed):
    _, workdir, evals = resumed
    lines = {r["step"]: r for r in eval_rows(read_metrics(str(workdir / "metrics.jsonl")))}
    for step, result in evals.items():  # 50: the restored state; 60: the live one, scored after its save
        assert result["sampling"]["checkpoint_step"] == step
        assert {k: v for k, v in result["sampling"].items() if k != "checkpoint_step"} == lines[step]["sampling"]
        assert {k: result[k] for k in NUMBERS} == {k: lines[step][k] for k in NUMBERS}


def test_record_evaluation_appends_a_line_redraws_the_plot_and_says_it(tmp_path):
    import io

    from jax_ddpm.app.console import Progress
    from jax_ddpm.app.train_outputs import record_evaluation
    from jax_ddpm.app.workdir import RunFiles

    def evaluator(state, step):
        return {**_old_line(step, 50.0 - step), "fid_floor_std": 1.0, "fid_ratio": (50.0 - step) / 20.0,
                "coverage": 9, "num_classes": 10, "largest_class_share": 0.2, "classifier_accuracy": 0.98,
                "classifier_ok": True, "wall_s": {"sampling": 1.5, "metrics": 0.25}}

    files, rows, out = RunFiles(str(tmp_path)), [_old_line(10, 60.0)], io.StringIO()
    record_evaluation(evaluator, files, rows, None, 20, Progress(100, quiet=False, stream=out))
    assert [r["step"] for r in read_metrics(files.metrics)] == [20] and [r["step"] for r in rows] == [10, 20]
    assert plot_steps(files.quality_plot) == [10, 20]
    assert out.getvalue() == ("step 20: FID 30.00 (floor 20.00+-1.00, 1.5x) | confident 50.0% (real 95.0%) | "
                              "classes 9/10, largest 20.0% | classifier acc 98.0% | 16 samples in 1.8s\n")


@pytest.mark.slow  # two more processes (~40 s on the shared CPU)
def test_a_run_trained_with_evaluations_from_the_start(tmp_path, tmp_path_factory):
    """Steps 1-30 with --eval-every 20 (lines at 20 and the last step, 30), the line of 30 deleted
    (a run killed while scoring its last checkpoint), then steps 31-60 with --eval-every 30: it
    scores 30 again, to the same numbers, then 60; the bits are the shared run's."""
    workdir = tmp_path / "run"
    for every, steps in (("20", 30), ("30", SHARED_STEPS)):
        if steps == SHARED_STEPS:
            first = read_metrics(str(workdir / "metrics.jsonl"))
            lost = [r for r in first if r.get("kind") == "eval" and r["step"] == 30]
            (workdir / "metrics.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in first
                                                           if r not in lost))
        done = subprocess.run(train_cmd(workdir, "--eval-every", every, "--eval-num", NUM, steps=steps),
                              env=_env(tmp_path_factory), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    lines = eval_rows(read_metrics(str(workdir / "metrics.jsonl")))
    assert [r["step"] for r in eval_rows(first)] == [20, 30] and [r["step"] for r in lines] == [20, 30, 60]
    assert lines[0] == eval_rows(first)[0] and {k: lines[1][k] for k in NUMBERS} == {k: lost[0][k] for k in NUMBERS}
    assert plot_steps(str(workdir / "quality.png")) == [20, 30, 60]
    plain = shared_run(tmp_path_factory)
    _same_bits(plain, workdir)
    assert _losses(workdir) == _losses(plain)


def test_eval_every_on_data_without_an_extractor_is_refused_before_anything(tmp_path, capsys):
    data = tmp_path / "faces.npz"
    np.savez(data, images=np.zeros((20, 8, 8, 1), np.uint8))
    workdir = tmp_path / "run"
    assert cli.main(["train", "--workdir", str(workdir), "--data", str(data), "--eval-every", "10",
                     "--xla-flags", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("jax-ddpm: error: --eval-every: the quality metrics need a feature extractor") and \
        f"got --data {data}" in err and "none exists for other data yet" in err
    assert not workdir.exists()


@pytest.mark.parametrize("option, value, needle", [
    ("--eval-num", "1", "--eval-num must be an integer of at least 2, got 1"),
    ("--eval-every", "-1", "--eval-every must be 0 or a positive integer, got -1"),
])
def test_bad_eval_options_are_one_line(tmp_path, capsys, option, value, needle):
    assert cli.main(["train", "--workdir", str(tmp_path / "run"), option, value, "--xla-flags", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "run").exists()


def test_eval_settings_are_free_not_identity():
    args = cli.build_parser().parse_args(["train", "--workdir", "w"])
    assert (args.eval_every, args.eval_num) == (0, DEFAULT_EVAL_NUM)  # off by default
    config = TrainConfig(workdir="w")
    assert (config.eval_every, config.eval_num) == (0, DEFAULT_EVAL_NUM)
    assert not any("eval" in key for key in identity(config))  # a resume may change them
    assert train_config_from_identity("w", identity(config)).eval_every == 0  # older runs: off


def test_readers_tell_loss_lines_from_quality_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 5, "loss": 0.9}, {"step": 10, "loss": 0.8}, {"step": 10, "kind": "eval", "fid": 300.0},
             {"step": 15, "loss": 0.7}, {"step": 20, "kind": "eval", "fid": 200.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 25, "lo')  # a torn last line
    rows = read_metrics(str(path))
    assert [r["step"] for r in loss_rows(rows)] == [5, 10, 15] and [r["fid"] for r in eval_rows(rows)] == [300, 200]
    kept = trim_metrics(str(path), 12)  # a resume from checkpoint 12 drops both kinds past it
    assert [(r["step"], r.get("kind")) for r in kept] == [(5, None), (10, None), (10, "eval")]
    assert read_metrics(str(path)) == kept


def test_quality_plot_records_the_steps_it_draws(tmp_path):
    rows = [{"step": s, "fid": 400.0 / s, "fid_floor": 5.0, "confident": s / 100, "real_confident": 0.95,
             "num_samples": 256} for s in (30, 10, 20)]
    path = str(tmp_path / "quality.png")
    save_quality_plot(path, rows)
    assert plot_steps(path) == [10, 20, 30]  # sorted by step
    rows.append({**rows[0], "step": 40, "fid_floor": 1.7, "num_samples": 1000})  # N changed on a resume
    save_quality_plot(path, rows)
    assert plot_steps(path) == [10, 20, 30, 40] and plot_steps(str(tmp_path / "none.png")) is None
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] >= 500 and im.size[1] >= 400
