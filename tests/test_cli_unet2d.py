"""`jax-ddpm train --arch unet2d` with the guarantees the chapter's U-Net has: every config
field reachable (options or --unet2d-config), exact resume after SIGKILL, EMA, bfloat16,
2 devices = 1 device, export to diffusers (DDPMPipeline loads it bit for bit and runs) and a
fine-tune of the re-imported export; bad options are one line, exit status 2, nothing written.

Every training run is a subprocess (`python -m jax_ddpm.cli`) sharing the persistent XLA
compilation cache of ``cli_util``, on one tiny unet2d (8,16 channels, attention at 4x4 and
in the mid block, dropout 0.1 so that the dropout keys are part of what resumes exactly).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cli_util import cli_env, runner_cmd
from jax_ddpm import checkpoint as ckpt
from jax_ddpm.app import config as cfg
from jax_ddpm.cli import main
from jax_ddpm.models import unet2d
from test_cli_parallel import _tree as _tree_on_one_device
from test_cli_resume import _final_tree, _kill_when

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

TINY_UNET = ["--arch", "unet2d", "--block-out-channels", "8,16", "--attention-levels", "none", "--norm-num-groups", "4",
             "--attention-head-dim", "8",
             "--dropout", "0.1", "--image-size", "8", "--timesteps", "10", "--batch-size", "16", "--ema-decay", "0.9",
             "--num-samples", "4", "--log-every", "1", "--quiet", "--xla-flags", "none"]
STEPS = 3
EMA = 0.9


def unet_cmd(workdir, *more, steps: int = STEPS, every: int = 1) -> list[str]:
    return [sys.executable, "-m", "jax_ddpm.cli", "train", "--workdir", str(workdir), *TINY_UNET,
            "--steps", str(steps), "--checkpoint-every", str(every), *more]


def _train(cmd, env) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return time.perf_counter() - t0


def _metrics(workdir) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted tiny run: 3 steps, a checkpoint every step (XLA_FLAGS as they are: the flag
    check of ``--xla-flags auto`` costs 2 s a run and has its own tests)."""
    workdir = tmp_path_factory.mktemp("unet2d") / "reference"
    wall = _train(unet_cmd(workdir), cli_env(tmp_path_factory))
    print(f"tiny unet2d reference run: {wall:.1f} s wall")
    return workdir


# ----------------------------------------------------------------------------- train
def test_the_options_reach_the_config(reference):
    saved = json.load(open(reference / "config.json"))
    got = unet2d.config_from_dict(json.loads(saved["model"]["arch_config"]))
    assert got.block_out_channels == (8, 16) and got.norm_num_groups == 4 and got.attention_head_dim == 8
    assert got.dropout == 0.1 and got.sample_size == 8 and got.in_channels == got.out_channels == 1
    assert got.down_block_types == ("DownBlock2D",) * 2 and got.up_block_types == ("UpBlock2D",) * 2
    assert got.add_attention  # the mid block's attention
    assert saved["sampling"] == {"variance": "beta_tilde", "clip_denoised": True}
    assert ckpt.complete_steps(str(reference)) == [1, 2, 3]
    tree = _final_tree(reference, STEPS)
    assert "batch_stats" not in tree or not jax.tree_util.tree_leaves(tree["batch_stats"])
    assert (reference / "samples.png").exists() and sorted(_metrics(reference)) == list(range(1, STEPS + 1))


def test_ema_follows_its_recurrence(reference):
    """ema_3 = d ema_2 + (1 - d) params_3, for every parameter (float32 rounding apart)."""
    prev, last = _final_tree(reference, 2), _final_tree(reference, 3)
    leaves = (jax.tree_util.tree_leaves(t) for t in (prev["ema_params"], last["params"]))
    for (path, e_last), e_prev, p_last in zip(jax.tree_util.tree_leaves_with_path(last["ema_params"]), *leaves):
        np.testing.assert_allclose(e_last, EMA * e_prev + (1 - EMA) * p_last, rtol=1e-6, atol=1e-8,
                                   err_msg=jax.tree_util.keystr(path))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(last["ema_params"]),
                                                         jax.tree_util.tree_leaves(last["params"])))


def _assert_same_final_state(workdir, reference) -> None:
    expected, got = _final_tree(reference, STEPS), _final_tree(workdir, STEPS)
    flat_e, flat_g = (jax.tree_util.tree_leaves_with_path(t) for t in (expected, got))
    assert [p for p, _ in flat_e] == [p for p, _ in flat_g] and {"params", "ema_params", "opt_state"} <= set(expected)
    for (path, e), (_, g) in zip(flat_e, flat_g):
        assert e.dtype == g.dtype and np.array_equal(e, g), f"{jax.tree_util.keystr(path)} differs"
    assert _metrics(workdir)[STEPS]["loss"] == _metrics(reference)[STEPS]["loss"]


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path, tmp_path_factory, reference):
    """The reference's checkpoint 1 resumed to step 3 (dropout keys, data order and EMA included)."""
    workdir = tmp_path / "resumed"
    shutil.copytree(reference, workdir)
    for step in (2, 3):
        shutil.rmtree(workdir / "checkpoints" / str(step))
    _train(unet_cmd(workdir), cli_env(tmp_path_factory))
    _assert_same_final_state(workdir, reference)


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tmp_path, tmp_path_factory, reference):
    workdir = tmp_path / "killed"
    env = cli_env(tmp_path_factory)
    proc = subprocess.Popen(runner_cmd(unet_cmd(workdir), step_delay=0.5), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    seen = _kill_when(proc, workdir, 1, 0.0)
    assert proc.returncode == -signal.SIGKILL and STEPS not in seen
    _train(unet_cmd(workdir), env)
    _assert_same_final_state(workdir, reference)


def test_resume_with_another_unet2d_setting_is_refused(tmp_path, reference, capsys):
    workdir = tmp_path / "copy"
    shutil.copytree(reference, workdir)
    before = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(workdir) for p in fs}
    assert main(unet_cmd(workdir, "--dropout", "0.2", steps=STEPS + 2)[3:]) == 2
    assert "(--dropout was 0.1, now 0.2)" in _one_line(capsys)
    assert main(unet_cmd(workdir, "--block-out-channels", "8,8", steps=STEPS + 2)[3:]) == 2
    assert "(--block-out-channels was 8,16, now 8,8)" in _one_line(capsys)
    after = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(workdir) for p in fs}
    assert after == before


def test_a_unet2d_identity_written_before_arch_config_resumes_as_the_default():
    """Folders of the previous release (``--arch unet2d``, no arch_config) hold the default config."""
    from jax_ddpm.app.cli import build_parser

    for size in ("16", "8"):
        args = build_parser().parse_args(["train", "--workdir", "w", "--arch", "unet2d", "--image-size", size])
        now = cfg.identity(cfg.train_config_from_args(args))
        old = {k: v for k, v in now.items() if k != "model.arch_config"}
        assert cfg.identity_mismatch(old, now) is None and cfg.identity_mismatch(now, old) is None
        other = cfg.identity(cfg.train_config_from_args(build_parser().parse_args(
            ["train", "--workdir", "w", "--arch", "unet2d", "--image-size", size, "--layers-per-block", "2"])))
        assert cfg.identity_mismatch(old, other) == "--layers-per-block was 1, now 2"


# ----------------------------------------------------------------------------- bfloat16, devices
@pytest.mark.slow
def test_bfloat16_runs(tmp_path, tmp_path_factory, reference):
    workdir = tmp_path / "bf16"
    _train(unet_cmd(workdir, "--dtype", "bfloat16", steps=2, every=2), cli_env(tmp_path_factory))
    tree = _final_tree(workdir, 2)
    for part in ("params", "ema_params", "opt_state"):  # bfloat16 is compute only
        assert {str(x.dtype) for x in jax.tree_util.tree_leaves(tree[part]) if x.dtype.kind == "f"} == {"float32"}
    got, want = _metrics(workdir), _metrics(reference)
    for step in (1, 2):
        rel = abs(got[step]["loss"] - want[step]["loss"]) / want[step]["loss"]
        print(f"bf16 vs fp32 loss at step {step}: {rel:.1e} relative")
        assert 0 < rel < 5e-3  # measured 2.7e-5 (step 1) and 3.9e-4 (step 2)
    assert (workdir / "samples.png").exists()


@pytest.mark.slow
def test_two_devices_match_one_device(tmp_path, tmp_path_factory, reference):
    workdir = tmp_path / "two"
    env = cli_env(tmp_path_factory)
    env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    _train(unet_cmd(workdir), env)
    assert json.load(open(workdir / "config.json"))["parallel"]["num_devices"] == 2
    got, want = _metrics(workdir), _metrics(reference)
    rel = {s: abs(got[s]["loss"] - want[s]["loss"]) / want[s]["loss"] for s in want}
    print("2 devices vs 1, relative loss difference per step:", {s: f"{r:.1e}" for s, r in rel.items()})
    assert max(rel.values()) < 1e-5
    # Measured (3 steps): loss within 3.4e-7 relative; params max abs 3.4e-5, relative L2 2.1e-6 (Adam turns a
    # rounding-level change of a tiny gradient component into a move of up to lr: tests/test_cli_parallel.py).
    got_p, want_p = (np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(t["params"])])
                     for t in (_tree_on_one_device(workdir, STEPS), _tree_on_one_device(reference, STEPS)))
    print(f"params: max abs {np.abs(got_p - want_p).max():.1e}, "
          f"relative L2 {np.linalg.norm(got_p - want_p) / np.linalg.norm(want_p):.1e}")
    assert np.abs(got_p - want_p).max() < 2e-4 and np.linalg.norm(got_p - want_p) < 1e-4 * np.linalg.norm(want_p)


# ----------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("options, needle", [
    (["--arch", "unet2d", "--features", "8,16,32,64"], "--features: --arch unet2d has no such setting"),
    (["--block-out-channels", "8,16"], "--block-out-channels: --arch chapter has no such setting (it is an --arch "
                                       "unet2d option)"),
    (["--arch", "unet2d", "--block-out-channels", "8,16", "--norm-num-groups", "3"],
     "--norm-num-groups: 3 groups do not divide the 8 channels of "),
    (["--arch", "unet2d", "--image-size", "6"], "--image-size must be a positive multiple of 4 for --arch unet2d"),
    (["--arch", "unet2d", "--block-out-channels", "8,8,8,8", "--norm-num-groups", "4", "--attention-head-dim", "8",
      "--image-size", "12"],
     "--image-size must be a positive multiple of 8 for --arch unet2d, got 12"),
    (["--arch", "unet2d", "--attention-levels", "3"], "--attention-levels: level 3 does not exist; the model has 3 levels"),
    (["--arch", "unet2d", "--attention-head-dim", "5"], "--attention-head-dim: does not divide the 64 channels of "),
    (["--arch", "unet2d", "--dropout", "1.5"], "--dropout: must be in [0, 1), got 1.5"),
    (["--arch", "unet2d", "--layers-per-block", "0"], "--layers-per-block: must be a positive integer, got 0"),
    (["--arch", "unet2d", "--block-out-channels", "8,x"], "--block-out-channels must be comma-separated positive"),
    (["--schedule", "cosine", "--beta-start", "0.001"], "--beta-start: only --schedule linear has betas to set"),
    (["--schedule", "linear", "--beta-end", "1.5"], "--beta-end must be in (0, 1), got 1.5"),
])
def test_bad_unet2d_options_are_one_line(tmp_path, capsys, options, needle):
    workdir = tmp_path / "run"
    assert main(["train", "--workdir", str(workdir), "--steps", "1", *options]) == 2
    assert _one_line(capsys).startswith("jax-ddpm: error: " + needle)
    assert not workdir.exists()


@pytest.mark.parametrize("content, channels, needle", [
    ({"act_fn": "gelu"}, "1", "act_fn: only silu (swish) is implemented, got 'gelu'"),
    ({"_class_name": "UNet2DConditionModel"}, "1", "_class_name: only UNet2DModel is implemented"),
    ({"resnet_skip_time_act": True}, "1", "resnet_skip_time_act: "),
    ({"in_channels": 3, "out_channels": 3}, "1", "in_channels is 3, but --channels is 1 (give --channels 3)"),
    ({"in_channels": 3, "out_channels": 6}, "3", "out_channels is 6, but --channels is 3"),
    ("{not json", "1", "not a readable JSON file"),
])
def test_bad_unet2d_config_files_are_one_line(tmp_path, capsys, content, channels, needle):
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps({"in_channels": 1, "out_channels": 1,
                                                                          **content}))
    workdir = tmp_path / "run"
    assert main(["train", "--workdir", str(workdir), "--arch", "unet2d", "--unet2d-config", str(path),
                 "--channels", channels, "--steps", "1"]) == 2
    err = _one_line(capsys)
    assert err.startswith(f"jax-ddpm: error: --unet2d-config {path}: ") and needle in err, err
    assert not workdir.exists()


def _unet2d_config(*options):
    from jax_ddpm.app.cli import build_parser

    args = build_parser().parse_args(["train", "--workdir", "w", "--arch", "unet2d", *options])
    return cfg.arch_config(cfg.train_config_from_args(args).model)[1]


def test_attention_levels():
    D, AD, U, AU = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"
    default = _unet2d_config()
    assert default == unet2d.default_config(1).__class__(**{**unet2d.default_config(1).to_dict(), "sample_size": 16})
    two = _unet2d_config("--block-out-channels", "8,16")  # another level count: attention at the lowest level
    assert two.down_block_types == (D, AD) and two.up_block_types == (AU, U)
    same = _unet2d_config("--block-out-channels", "16,16,32")  # the same count: the default's blocks
    assert same.down_block_types == default.down_block_types and same.up_block_types == default.up_block_types
    some = _unet2d_config("--attention-levels", "0,1", "--attention-head-dim", "none")
    assert some.down_block_types == (AD, AD, D) and some.up_block_types == (U, AU, AU)
    assert some.attention_head_dim is None


def test_a_unet2d_config_file_sets_any_field(tmp_path):
    from jax_ddpm.app.cli import build_parser

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"_class_name": "UNet2DModel", "_diffusers_version": "0.42.1", "in_channels": 3,
                                "out_channels": 3, "block_out_channels": [16, 32], "norm_eps": 1e-6,
                                "down_block_types": ["AttnDownBlock2D", "DownBlock2D"], "freq_shift": 1,
                                "up_block_types": ["UpBlock2D", "AttnUpBlock2D"], "add_attention": False,
                                "sample_size": 32, "norm_num_groups": 32}))  # 32 groups: the option below fixes it
    args = build_parser().parse_args(["train", "--workdir", "w", "--arch", "unet2d", "--unet2d-config", str(path),
                                      "--channels", "3", "--image-size", "8", "--dropout", "0.1",
                                      "--norm-num-groups", "8"])
    got = cfg.arch_config(cfg.train_config_from_args(args).model)[1]
    assert got.block_out_channels == (16, 32) and got.norm_eps == 1e-6 and got.freq_shift == 1
    assert got.down_block_types == ("AttnDownBlock2D", "DownBlock2D") and not got.add_attention  # the file's blocks
    assert got.dropout == 0.1 and got.norm_num_groups == 8 and got.sample_size == 8  # options on top


# ----------------------------------------------------------------------------- diffusers
@pytest.fixture(scope="module")
def exported(reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("to_diffusers") / "pipeline"
    assert main(["convert", "--workdir", str(reference), "--to-diffusers", str(out)]) == 0
    return out


def test_export_loads_in_ddpm_pipeline_bit_for_bit_and_runs(exported, reference):
    pytest.importorskip("torch", reason="needs torch and diffusers")
    pytest.importorskip("diffusers", reason="needs diffusers")
    from diffusers import DDPMPipeline

    from jax_ddpm.convert import to_torch_state_dict

    pipe = DDPMPipeline.from_pretrained(str(exported))
    ema = _final_tree(reference, STEPS)["ema_params"]
    config = cfg.arch_config(cfg.train_config_from_identity("w", json.load(open(
        os.path.join(ckpt.checkpoint_dir(str(reference)), str(STEPS), "meta", "metadata")))["identity"]).model)[1]
    want = to_torch_state_dict({"params": ema}, table=unet2d.weight_table(config))
    got = {k: v.detach().numpy() for k, v in pipe.unet.state_dict().items()}
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    s = pipe.scheduler.config
    assert (s.num_train_timesteps, s.beta_schedule, s.variance_type, s.clip_sample, s.prediction_type) == (
        10, "squaredcos_cap_v2", "fixed_small", True, "sample")  # the run is at today's default, --prediction x0
    import torch

    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (1, 8, 8, 1) and np.isfinite(images).all()


def test_torch_named_safetensors_round_trip(reference, tmp_path):
    """convert --out of a unet2d run, then --from-torch: the same model config and EMA weights."""
    from jax_ddpm.app.workdir import load_run

    out = tmp_path / "unet2d.safetensors"
    assert main(["convert", "--workdir", str(reference), "--out", str(out)]) == 0
    assert main(["convert", "--workdir", str(tmp_path / "back"), "--from-torch", str(out)]) == 0
    run, back = load_run(str(reference)), load_run(str(tmp_path / "back"))
    assert back.config.model == run.config.model and back.config.diffusion == run.config.diffusion
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(back.state.params),
                                                    jax.tree_util.tree_leaves(run.state.ema_params)))


def test_export_refuses_a_non_empty_folder_and_the_chapter(exported, reference, tmp_path, capsys):
    assert main(["convert", "--workdir", str(reference), "--to-diffusers", str(tmp_path / "early"),
                 "--checkpoint-step", "2"]) == 0
    assert "(EMA weights, step 2;" in capsys.readouterr().out
    before = sorted(os.listdir(exported))
    assert main(["convert", "--workdir", str(reference), "--to-diffusers", str(exported)]) == 2
    assert "already exists and is not an empty folder; refusing to overwrite it" in _one_line(capsys)
    assert sorted(os.listdir(exported)) == before
    chapter = tmp_path / "chapter"
    legacy = os.path.join(os.path.dirname(__file__), "data", "legacy-0.1.0", "model.safetensors")
    assert main(["convert", "--workdir", str(chapter), "--from-torch", legacy]) == 0
    capsys.readouterr()
    assert main(["convert", "--workdir", str(chapter), "--to-diffusers", str(tmp_path / "out")]) == 2
    assert "holds --arch chapter, which diffusers has no model for" in _one_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # 13 s; the default tests import and resume unet2d runs
def test_the_reimported_export_fine_tunes(exported, tmp_path, tmp_path_factory, capsys):
    """convert --from-diffusers, then the train command it prints (other lr and seed: allowed)."""
    workdir = tmp_path / "imported"
    assert main(["convert", "--from-diffusers", str(exported), "--workdir", str(workdir)]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    options = printed.split(" train ", 1)[1].split(" --data ")[0].split()
    imported = _final_tree(workdir, 0)["params"]
    bad = [o if o != "10" else "20" for o in options]  # the model and diffusion must stay the import's
    assert main(["train", *bad, "--steps", "3"]) == 2
    assert "holds weights imported from" in _one_line(capsys) and ckpt.complete_steps(str(workdir)) == [0]
    # the reference's optimizer (its compiled step is in the cache), another seed: allowed
    cmd = [sys.executable, "-m", "jax_ddpm.cli", "train", *options, "--steps", "1", "--seed", "3",
           "--batch-size", "16", "--ema-decay", "0.9", "--num-samples", "4", "--quiet", "--xla-flags", "none"]
    _train(cmd, cli_env(tmp_path_factory))
    assert ckpt.complete_steps(str(workdir)) == [0, 1]
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree_util.tree_leaves(_final_tree(workdir, 1)["params"]),
                                                  jax.tree_util.tree_leaves(imported))]
    assert 0 < max(moved) <= 1.001e-3  # one Adam step from the imported weights moves each by at most lr
    meta = json.load(open(os.path.join(ckpt.checkpoint_dir(str(workdir)), "1", "meta", "metadata")))
    assert meta["identity"]["seed"] == 3 and meta["sampling"] == {"variance": "beta_tilde", "clip_denoised": True}


@pytest.mark.slow
def test_a_fine_tune_killed_after_its_first_checkpoint_resumes_bit_identical(exported, tmp_path, tmp_path_factory,
                                                                             capsys):
    """Two imports of the same export: one fine-tuned 3 steps straight, one SIGKILLed once its
    first fine-tuning checkpoint (step 1, after the imported step 0) is complete, then resumed.
    Params, EMA, Adam moments and the loss of step 3 must be the same bits (dropout 0.1: its
    keys resume too)."""
    env = cli_env(tmp_path_factory)
    cmds = {}
    for name in ("whole", "killed"):
        workdir = tmp_path / name
        assert main(["convert", "--from-diffusers", str(exported), "--workdir", str(workdir)]) == 0
        options = capsys.readouterr().out.splitlines()[-1].split(" train ", 1)[1].split(" --data ")[0].split()
        cmds[name] = [sys.executable, "-m", "jax_ddpm.cli", "train", *options, "--steps", str(STEPS),
                      "--checkpoint-every", "1", "--batch-size", "16", "--ema-decay", "0.9", "--num-samples", "4",
                      "--quiet", "--xla-flags", "none"]
    assert json.loads(json.load(open(tmp_path / "whole" / "config.json"))["model"]["arch_config"])["dropout"] == 0.1
    _train(cmds["whole"], env)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(runner_cmd(cmds["killed"], step_delay=0.5), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    seen = _kill_when(proc, killed, 2, 0.0)  # steps 0 (the import) and 1
    assert proc.returncode == -signal.SIGKILL and STEPS not in seen
    _train(cmds["killed"], env)
    _assert_same_final_state(killed, tmp_path / "whole")


@pytest.mark.slow
def test_a_fine_tune_in_two_processes_matches_one_device(exported, tmp_path, tmp_path_factory, capsys):
    """An imported folder fine-tuned by two processes (``--distributed``, 2 CPU devices each:
    the global batch of 16 split over 4 devices) against the same fine-tune on one device."""
    from test_cli_parallel import _free_port

    cmds = {}
    for name in ("one", "two"):
        workdir = tmp_path / name
        assert main(["convert", "--from-diffusers", str(exported), "--workdir", str(workdir)]) == 0
        options = capsys.readouterr().out.splitlines()[-1].split(" train ", 1)[1].split(" --data ")[0].split()
        cmds[name] = [sys.executable, "-m", "jax_ddpm.cli", "train", *options, "--steps", str(STEPS),
                      "--checkpoint-every", str(STEPS), "--batch-size", "16", "--ema-decay", "0.9",
                      "--num-samples", "4", "--log-every", "1", "--quiet", "--xla-flags", "none"]
    env = cli_env(tmp_path_factory)
    _train(cmds["one"], env)
    port, flags = _free_port(), (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen(cmds["two"] + ["--distributed"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, "XLA_FLAGS": flags.strip(), "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                                   "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    results = [(p.wait(timeout=900), p.communicate()[1].decode()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    parallel = json.load(open(tmp_path / "two" / "config.json"))["parallel"]
    assert (parallel["num_devices"], parallel["num_processes"]) == (4, 2)
    assert ckpt.complete_steps(str(tmp_path / "two")) == [0, STEPS]
    got, want = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    rel = {s: abs(got[s]["loss"] - want[s]["loss"]) / want[s]["loss"] for s in want}
    print("two processes vs one device, relative loss difference per step:", {s: f"{r:.1e}" for s, r in rel.items()})
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1)) and max(rel.values()) < 1e-5
