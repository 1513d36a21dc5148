"""``jax-ddpm eval`` on the session's tiny trained run (tests/cli_util.py, copied: eval writes
eval.json) and on an .npz from ``jax-ddpm sample --out``; bad input is one line, exit 2, and
nothing is overwritten. In-process (``cli.main``), with XDG_CACHE_HOME at the session's cache
(tests/test_quality.py trains the 8x8 classifier there; on the same pytest worker, whichever
runs first pays for it)."""
from __future__ import annotations

import dataclasses
import io
import json
import shutil
import sys

import numpy as np
import pytest

from jax_ddpm.app import cli
from jax_ddpm.app import workdir as workdir_module
from jax_ddpm.app.config import DataConfig

from cli_util import shared_run

NUM = "32"
NO_FLAGS = ["--xla-flags", "none"]  # in-process: JAX has started already


def quality_cache_root(tmp_path_factory) -> str:
    """The session's XDG_CACHE_HOME: the folder tests/test_quality.py trains its classifier into."""
    return str(tmp_path_factory.getbasetemp() / "xdg_cache")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", quality_cache_root(tmp_path_factory))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    dst = tmp_path_factory.mktemp("eval") / "run"
    shutil.copytree(shared_run(tmp_path_factory), dst)
    return dst


@pytest.fixture(scope="module")
def evaluated(run_dir, tmp_path_factory):
    """``eval --workdir --num 32`` once: (stdout, eval.json)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", quality_cache_root(tmp_path_factory))
    out = io.StringIO()
    mp.setattr(sys, "stdout", out)
    try:
        assert cli.main(["eval", "--workdir", str(run_dir), "--num", NUM, *NO_FLAGS]) == 0
    finally:
        mp.undo()
    return out.getvalue(), json.loads((run_dir / "eval.json").read_text())


def _numbers(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("wall_s", "sampling", "workdir", "classifier")}


def _bad(argv, capsys, match: str) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and match in err, err
    return err


def test_eval_workdir_writes_eval_json_and_one_line(evaluated):
    out, result = evaluated
    assert out.count("\n") == 1 and out.startswith("FID ") and "floor" in out and "eval.json" in out
    assert result["num_samples"] == 32 and result["num_heldout"] == 500 and result["feature_dim"] == 64
    assert result["sampling"] == {"arch": "chapter", "batch_size": None, "bn_stats": "batch", "checkpoint_step": 60,
                                  "clip_denoised": True, "num": 32, "sampler": "ddpm", "schedule": "cosine", "seed": 0,
                                  "timesteps": 10, "variance": "beta_tilde"}
    assert result["fid"] > 0 and result["fid_floor"] > 0 and result["classifier_ok"]
    assert 0 <= result["confident"] <= 1 and 0 < result["largest_class_share"] <= 1
    assert set(result["wall_s"]) == {"load_and_classifier", "sampling", "metrics", "total"}
    assert result["classifier"]["image_size"] == 8


def test_eval_of_sample_npz_scores_the_same_samples(run_dir, evaluated, tmp_path, capsys):
    npz, out = tmp_path / "x.npz", tmp_path / "r.json"
    assert cli.main(["sample", "--workdir", str(run_dir), "--num", NUM, "--out", str(npz), *NO_FLAGS]) == 0
    assert cli.main(["eval", "--samples", str(npz), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["sampling"] == {"samples_file": str(npz)} and result["workdir"] is None
    assert _numbers(result) == _numbers(evaluated[1])  # eval draws what sample draws: reproducible, same numbers
    capsys.readouterr()
    assert cli.main(["eval", "--samples", str(npz)]) == 0  # no --json, no work folder: stdout only
    assert capsys.readouterr().out.startswith("FID ") and sorted(p.name for p in tmp_path.iterdir()) == ["r.json",
                                                                                                        "x.npz"]


def test_eval_reads_the_uint8_images_of_an_npz(run_dir, tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "u.npz", images=images)
    assert cli.main(["eval", "--samples", str(tmp_path / "u.npz")]) == 0


@pytest.mark.parametrize("argv, match", [
    (["eval"], "eval needs --workdir DIR"),
    (["eval", "--samples", "/nonexistent.npz"], "--samples /nonexistent.npz: no such file"),
    (["eval", "--workdir", "/nonexistent-dir"], "--workdir /nonexistent-dir: no such folder"),
    (["eval", "--workdir", "/tmp", "--json", "/tmp/x.txt"], "--json /tmp/x.txt: must end in .json"),
    (["eval", "--workdir", "/tmp", "--num", "0"], "--num must be a positive integer"),
    (["eval", "--workdir", "/tmp", "--seed", "-1"], "--seed must be an integer in"),
])
def test_eval_bad_options_are_one_line(argv, match, capsys):
    _bad(argv, capsys, match)


def test_eval_bad_samples_files(run_dir, tmp_path, capsys):
    np.savez(tmp_path / "none.npz", x=np.zeros(3))
    _bad(["eval", "--samples", str(tmp_path / "none.npz")], capsys, "holds neither 'samples' nor 'images'")
    np.savez(tmp_path / "shape.npz", samples=np.zeros((4, 8, 6, 1), np.float32))
    _bad(["eval", "--samples", str(tmp_path / "shape.npz")], capsys, "expected [N, S, S, 1 or 3]")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    _bad(["eval", "--samples", str(tmp_path / "junk.npz")], capsys, "not a readable .npz file")
    np.savez(tmp_path / "s.npz", samples=np.zeros((4, 8, 8, 1), np.float32))
    _bad(["eval", "--samples", str(tmp_path / "s.npz"), "--sampler", "ddpm"], capsys,
         "--sampler: --samples FILE already holds the samples")
    np.savez(tmp_path / "big.npz", samples=np.zeros((4, 16, 16, 1), np.float32))
    _bad(["eval", "--samples", str(tmp_path / "big.npz"), "--workdir", str(run_dir), *NO_FLAGS], capsys,
         "16px images, but --workdir")


def test_eval_bad_input_overwrites_nothing(run_dir, evaluated, capsys):
    before = (run_dir / "eval.json").read_bytes()
    _bad(["eval", "--workdir", str(run_dir), "--checkpoint-step", "7", *NO_FLAGS], capsys, "--checkpoint-step 7")
    _bad(["eval", "--workdir", str(run_dir), "--sampler", "chapter", "--variance", "beta", *NO_FLAGS], capsys,
         "--variance: --sampler chapter has no such setting")
    assert (run_dir / "eval.json").read_bytes() == before


def test_eval_refuses_data_without_an_extractor(run_dir, monkeypatch, capsys):
    real = workdir_module.load_run

    def other_data(workdir, step=None):
        run = real(workdir, step)
        return dataclasses.replace(run, config=dataclasses.replace(run.config, data=DataConfig(source="/data/faces")))

    monkeypatch.setattr(workdir_module, "load_run", other_data)
    err = _bad(["eval", "--workdir", str(run_dir), *NO_FLAGS], capsys, "trained on --data /data/faces")
    assert "none exists for other data yet" in err


def test_eval_help_explains_every_option(capsys):
    assert cli.main(["eval", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for option in ("--workdir", "--samples", "--json", "--num", "--seed", "--sampler", "--checkpoint-step",
                   "--batch-size", "--clip-denoised", "--no-clip-denoised", "--variance", "--bn-stats", "--xla-flags"):
        assert option in out


@pytest.mark.slow  # compiles another sampler's chain (~15 s on the shared CPU)
def test_eval_passes_the_sampler_options_on(run_dir, tmp_path, capsys):
    out = tmp_path / "ddim.json"
    assert cli.main(["eval", "--workdir", str(run_dir), "--num", "16", "--sampler", "ddim", "--num-steps", "5",
                     "--json", str(out), *NO_FLAGS]) == 0
    assert "ddim 5/10 steps" in capsys.readouterr().out
    sampling = json.loads(out.read_text())["sampling"]
    assert sampling["sampler"] == "ddim" and sampling["num_steps"] == 5 and sampling["clip_denoised"] is True


def test_eval_checks_the_sampler_options_before_sampling(run_dir, capsys):
    _bad(["eval", "--workdir", str(run_dir), "--eta", "0.5", *NO_FLAGS], capsys,
         "--eta: --sampler ddpm has no such setting")
    _bad(["eval", "--workdir", str(run_dir), "--num-steps", "11", *NO_FLAGS], capsys, "--num-steps")
