"""Files written by jax-ddpm 0.1.0, before the architecture registry, still work (tests/data/legacy-0.1.0/).

The work folder stops at step 4; ``step6_uninterrupted.safetensors`` is what that old code
computed training the same run to step 6 without stopping (README.md beside the files says
how both were made). Resuming the old folder with today's code, with the old command (no
``--prediction``: the folder's eps is taken, not today's default), must give those tensors: bit
for bit on the CPU that made the files, to float32 rounding on another one (XLA:CPU picks other
kernels for another instruction set, so steps 5 and 6 round otherwise). The commands run in a fresh process, as a
user runs them, so that the XLA flags the command adds (``--xla-flags auto``) are the ones the
old files were made with.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jax_ddpm.convert import load_safetensors

LEGACY = Path(__file__).resolve().parent / "data" / "legacy-0.1.0"
TRAIN = ["--features", "4,8,8,8", "--image-size", "8", "--steps", "6", "--checkpoint-every", "2", "--batch-size", "8",
         "--num-samples", "4", "--timesteps", "10", "--log-every", "1", "--quiet", "--bn-stats", "running"]

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jax_ddpm.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """The old folder resumed to step 6 and exported, sampled and re-imported, by today's code."""
    root = tmp_path_factory.mktemp("legacy")
    workdir = root / "workdir"
    shutil.copytree(LEGACY / "workdir", workdir)
    script = "; ".join([
        "import sys",
        "from jax_ddpm.cli import main",
        f"rc = main(['train', '--workdir', {str(workdir)!r}] + {TRAIN!r})",
        f"rc = rc or main(['convert', '--workdir', {str(workdir)!r}, '--out', {str(root / 'step6.safetensors')!r}])",
        f"rc = rc or main(['sample', '--workdir', {str(workdir)!r}, '--num', '4', '--bn-stats', 'running', "
        f"'--out', {str(root / 'samples.npz')!r}])",
        f"rc = rc or main(['convert', '--workdir', {str(root / 'imported')!r}, '--from-torch', "
        f"{str(LEGACY / 'model.safetensors')!r}])",
        f"rc = rc or main(['convert', '--workdir', {str(root / 'imported')!r}, '--out', "
        f"{str(root / 'reexported.safetensors')!r}])",
        "sys.exit(rc)",
    ])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


# The resumed step 6 vs the old code's (max over tensors of max|a - b| / max|b|): 0 on the CPU that
# made the files; 1.5e-4 (up1.bnorm.running_mean; 31 of 82 tensors not bit-equal) on an AVX-512/AMX
# Xeon. Steps 5 and 6 themselves move the tensors by up to 0.51 on this measure (step 4's file vs
# step 6's), so a resume that loses, repeats or mis-reads a step is far outside it.
OTHER_CPU_REL = 1e-3


def test_old_work_folder_resumes_to_the_same_bits(resumed):
    root, _ = resumed
    got, meta = load_safetensors(root / "step6.safetensors")
    old, _ = load_safetensors(LEGACY / "step6_uninterrupted.safetensors")
    step4, _ = load_safetensors(LEGACY / "model.safetensors")
    assert meta["step"] == "6"
    assert sorted(got) == sorted(old)
    assert all(got[k].dtype == old[k].dtype for k in old)

    def worst(a):
        rel = {k: float(np.abs(a[k].astype(np.float64) - old[k]).max() / max(float(np.abs(old[k]).max()), 1e-30))
               for k in old}
        k = max(rel, key=rel.get)
        return k, rel[k], sum(not np.array_equal(a[k], old[k]) for k in old)

    name, rel, differ = worst(got)
    print(f"resumed step 6 vs the old code's: {differ} of {len(old)} tensors not bit-equal, worst {name} {rel:.2e}")
    assert rel <= OTHER_CPU_REL, f"{name}: max rel {rel:.2e} from the old code's uninterrupted run ({differ} differ)"
    assert worst(step4)[1] > 100 * OTHER_CPU_REL  # two steps of training are far outside the tolerance


def test_old_work_folder_resumed_from_its_checkpoint(resumed):
    """Resumed, not retrained: the old metrics lines of steps 1-4 are kept as they were, 5 and 6 appended."""
    import json

    root, _ = resumed
    assert (root / "workdir" / "checkpoints" / "6").is_dir()
    old = (LEGACY / "workdir" / "metrics.jsonl").read_text().splitlines()
    new = (root / "workdir" / "metrics.jsonl").read_text().splitlines()
    assert new[:4] == old and [json.loads(line)["step"] for line in new] == [1, 2, 3, 4, 5, 6]


def test_old_work_folder_samples(resumed):
    root, _ = resumed
    with np.load(root / "samples.npz") as f:
        samples = f["samples"]
    assert samples.shape == (4, 8, 8, 1) and np.all(np.abs(samples) <= 1) and np.isfinite(samples).all()


def test_old_safetensors_file_imports_and_exports_the_same_tensors(resumed):
    root, _ = resumed
    got, meta = load_safetensors(root / "reexported.safetensors")
    want, old_meta = load_safetensors(LEGACY / "model.safetensors")
    assert "arch" not in old_meta and meta["arch"] == "chapter"
    assert {k: meta[k] for k in old_meta if k != "step"} == {k: v for k, v in old_meta.items() if k != "step"}
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k


def test_fixture_is_what_the_readme_says():
    """Guards the fixture itself: step 4 only, and an identity without the newer ``model.arch`` field."""
    import json

    steps = sorted(int(p.name) for p in (LEGACY / "workdir" / "checkpoints").iterdir())
    assert steps == [4]
    meta = json.loads((LEGACY / "workdir" / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert "model.arch" not in meta["identity"] and meta["identity"]["model.features"] == [4, 8, 8, 8]
