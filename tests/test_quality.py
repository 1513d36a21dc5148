"""jax_ddpm.quality: the Fréchet distance against closed forms, the metrics on known cases
(real vs real, noise, one class, a classifier that learned nothing), determinism, the cache,
and the enlarged sample grids of jax_ddpm.images.

The classifier is the default one at 8x8 (a few seconds), trained once per session into a
cache under pytest's session folder (``tests/test_cli_eval.py`` points XDG_CACHE_HOME there
and reuses it)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from jax_ddpm import quality
from jax_ddpm.images import MIN_IMAGE_PX, grid_scale, make_grid, save_grid
from jax_ddpm.quality import cache as qcache
from jax_ddpm.quality.metrics import class_stats, quality_metrics

SIZE = 8


def quality_cache_root(tmp_path_factory) -> str:
    """The session's XDG_CACHE_HOME (shared with tests/test_cli_eval.py)."""
    return str(tmp_path_factory.getbasetemp() / "xdg_cache")


@pytest.fixture(scope="session")
def ref(tmp_path_factory):
    root = qcache.cache_dir({"XDG_CACHE_HOME": quality_cache_root(tmp_path_factory)})
    return quality.digits_reference(SIZE, cache_root=root)


def _draw(images, n, seed):
    return images[np.random.default_rng(seed).permutation(images.shape[0])[:n]]


# ----------------------------------------------------------------------------- Fréchet distance
def _diag_closed_form(mu1, var1, mu2, var2):
    """W2^2 between diagonal Gaussians: |mu1 - mu2|^2 + sum (sqrt(var1) - sqrt(var2))^2 (float64)."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2))


@pytest.mark.parametrize("dim", [1, 5, 64])
def test_frechet_matches_the_diagonal_closed_form(dim):
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    var1, var2 = rng.uniform(0.01, 4, dim), rng.uniform(0.01, 4, dim)
    got = quality.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(_diag_closed_form(mu1, var1, mu2, var2), rel=1e-10, abs=1e-10)


def test_frechet_matches_scipy_sqrtm_on_full_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 12)), rng.normal(size=(12, 12))
    s1, s2 = a @ a.T + 0.1 * np.eye(12), b @ b.T + 0.1 * np.eye(12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean))
    assert quality.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_of_identical_sets_is_zero_and_symmetric():
    rng = np.random.default_rng(1)
    f, g = rng.normal(size=(300, 16)), rng.normal(size=(200, 16)) + 0.3
    assert quality.feature_frechet_distance(f, f) < 1e-8
    assert quality.feature_frechet_distance(f, g) == pytest.approx(quality.feature_frechet_distance(g, f), rel=1e-9)


def test_frechet_with_singular_covariances_is_finite():
    rng = np.random.default_rng(2)
    f = np.concatenate([rng.normal(size=(10, 3)), np.zeros((10, 61))], axis=1)  # rank 3 of 64, N < D
    d = quality.feature_frechet_distance(f, f + 1.0)
    assert np.isfinite(d) and d == pytest.approx(64.0, rel=1e-6)  # a pure shift by 1 in 64 dims


def test_gaussian_stats_refuses_one_row():
    with pytest.raises(ValueError, match="N >= 2"):
        quality.gaussian_stats(np.zeros((1, 4)))


# ----------------------------------------------------------------------------- class statistics, the split
def test_class_stats_on_known_probabilities():
    probs = np.full((100, 10), 0.01)
    probs[np.arange(100), np.arange(100) % 4] = 0.91  # classes 0-3, 25 each, all confident
    probs[:10] = 0.1  # 10 unsure rows (argmax 0): class 0 has 22 + 10 rows
    s = class_stats(probs)
    assert s["confident"] == pytest.approx(0.9) and s["coverage"] == 4
    assert s["largest_class_share"] == pytest.approx(0.32) and s["class_counts"][:4] == [32, 22, 23, 23]
    assert s["confident_class_counts"][:4] == [22, 22, 23, 23]


def test_one_stray_confident_image_does_not_cover_a_class():
    probs = np.zeros((200, 10))
    probs[:, 0] = 1.0
    probs[0] = np.eye(10)[7]  # 0.5% of the images: under COVERAGE_MIN_SHARE
    assert class_stats(probs)["coverage"] == 1


def test_digits_split_is_fixed_balanced_and_disjoint():
    labels = quality.digits.digits_labels()
    train, held = quality.digits_split(labels)
    assert train.size == 1297 and held.size == 500 and not set(train) & set(held)
    assert np.bincount(labels[held]).tolist() == [50] * 10
    again = quality.digits_split(labels)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], held)


# ----------------------------------------------------------------------------- the metrics on known cases
def test_the_classifier_is_a_feature_extractor_and_accurate(ref):
    assert isinstance(ref.extractor, quality.FeatureExtractor)
    feats, probs = ref.extractor.features(ref.sets.heldout), ref.extractor.probs(ref.sets.heldout)
    assert feats.shape == (500, 64) and feats.dtype == np.float64
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == ref.sets.heldout_labels).mean() > 0.95


def test_real_vs_real_is_near_the_floor(ref):
    m = quality_metrics(_draw(ref.sets.train, 400, seed=5), ref.extractor, ref.sets, seed=0)
    assert m["classifier_ok"] and m["classifier_accuracy"] > 0.95
    assert 0.6 < m["fid_ratio"] < 1.5, m
    assert m["coverage"] == 10 and m["real_coverage"] == 10 and m["largest_class_share"] < 0.15
    assert m["real_confident"] > 0.8


def test_noise_scores_badly(ref):
    noise = np.clip(np.random.default_rng(0).normal(size=(400, SIZE, SIZE, 1)), -1, 1).astype(np.float32)
    m = quality_metrics(noise, ref.extractor, ref.sets, seed=0)
    assert m["fid"] > 20 * m["fid_floor"], m
    assert m["confident"] < 0.5 * m["real_confident"] and m["coverage"] < 10


def test_one_class_scores_badly(ref):
    threes = ref.sets.train[ref.sets.train_labels == 3][:120]
    m = quality_metrics(threes, ref.extractor, ref.sets, seed=0)
    assert m["fid"] > 10 * m["fid_floor"], m
    assert m["coverage"] == 1 and m["largest_class_share"] > 0.9


def test_a_shuffled_label_classifier_is_caught_by_its_accuracy(ref):
    settings = quality.ClassifierSettings(SIZE, shuffle_labels=True)
    bad = quality.load_or_train_classifier(settings, ref.sets, use_cache=False)
    m = quality_metrics(_draw(ref.sets.train, 200, 1), bad, ref.sets)
    assert m["classifier_accuracy"] < 0.3 and not m["classifier_ok"]


def test_same_seed_same_numbers_other_seed_other_floor(ref):
    x = _draw(ref.sets.train, 100, seed=3)
    a, b = (quality_metrics(x, ref.extractor, ref.sets, seed=4) for _ in range(2))
    assert a == b
    assert quality_metrics(x, ref.extractor, ref.sets, seed=5)["fid_floor"] != a["fid_floor"]


def test_rgb_images_are_read_as_gray(ref):
    x = _draw(ref.sets.heldout, 20, 0)
    assert np.allclose(ref.extractor.probs(np.repeat(x, 3, axis=-1)), ref.extractor.probs(x))


def test_wrong_sizes_and_other_data_are_refused(ref):
    with pytest.raises(quality.QualityError, match=r"\[N, 8, 8, 1 or 3\]"):
        quality_metrics(np.zeros((10, 16, 16, 1), np.float32), ref.extractor, ref.sets)
    with pytest.raises(quality.QualityError, match="N >= 2"):
        quality_metrics(ref.sets.train[:1], ref.extractor, ref.sets)
    with pytest.raises(quality.QualityError, match="no extractor for other data exists yet"):
        quality.reference_for("/data/faces", SIZE)


# ----------------------------------------------------------------------------- the cache
def test_cache_dir_follows_xdg_and_ignores_a_relative_one():
    assert qcache.cache_dir({"XDG_CACHE_HOME": "/x/c"}) == "/x/c/jax-ddpm/quality"
    home = os.path.join(os.path.expanduser("~"), ".cache", "jax-ddpm", "quality")
    assert qcache.cache_dir({"XDG_CACHE_HOME": "rel"}) == home and qcache.cache_dir({}) == home


def test_cache_is_reused_and_a_damaged_entry_rebuilt(ref, tmp_path):
    """A rebuilt entry gives the same numbers as the first: training is deterministic by seed."""
    settings = quality.ClassifierSettings(SIZE, seed=11)  # shapes as the fixture's: no new compile
    first = quality.load_or_train_classifier(settings, ref.sets, root=str(tmp_path))
    path = qcache.cache_path(first.key, str(tmp_path))
    assert first.source == "trained" and os.path.isfile(path) and path.endswith(".safetensors")
    second = quality.load_or_train_classifier(settings, ref.sets, root=str(tmp_path))
    assert second.source == "cache" and second.key == first.key
    x = ref.sets.heldout[:50]
    assert np.array_equal(second.probs(x), first.probs(x))
    raw = bytearray(open(path, "rb").read())
    for damage in (lambda b: b[: len(b) // 2], lambda b: b[:-8] + bytes(8 * [0x55])):  # truncated, bytes flipped
        open(path, "wb").write(bytes(damage(raw)))
        again = quality.load_or_train_classifier(settings, ref.sets, root=str(tmp_path))
        assert again.source == "rebuilt" and np.array_equal(again.probs(x), first.probs(x))
        assert quality.load_or_train_classifier(settings, ref.sets, root=str(tmp_path)).source == "cache"


def test_cache_key_changes_with_what_decides_the_classifier(ref):
    base = qcache.cache_key(quality.ClassifierSettings(SIZE), ref.sets)
    for other in (quality.ClassifierSettings(SIZE, seed=1), quality.ClassifierSettings(SIZE, epochs=39),
                  quality.ClassifierSettings(SIZE, hidden=(128, 64))):
        assert qcache.cache_key(other, ref.sets) != base
    assert qcache.cache_key(quality.ClassifierSettings(SIZE), ref.sets) == base


# ----------------------------------------------------------------------------- enlarged grids
def test_grid_scale_enlarges_small_images_to_min_image_px():
    assert MIN_IMAGE_PX == 64
    assert grid_scale(16, 16, ncols=8) == 4 and grid_scale(8, 8, ncols=4) == 8
    assert grid_scale(64, 64, ncols=8) == 1 and grid_scale(16, 16, ncols=8, min_image_px=0) == 2  # the old rule


def test_make_grid_scale_parameter():
    imgs = np.random.default_rng(0).integers(0, 255, (16, 16, 16, 1), dtype=np.uint8)
    assert make_grid(imgs).shape == (4 * (64 + 1) + 1,) * 2
    raw = make_grid(imgs, scale=1)
    assert raw.shape == (4 * 17 + 1,) * 2 and np.array_equal(raw[1:17, 1:17], imgs[0, ..., 0])
    big = make_grid(imgs, scale=3)
    assert np.array_equal(big[1:49:3, 1:49:3], imgs[0, ..., 0])  # nearest neighbour
    with pytest.raises(ValueError, match="positive integer"):
        make_grid(imgs, scale=0)


def test_save_grid_writes_the_enlarged_png(tmp_path):
    from PIL import Image

    x = np.zeros((64, 16, 16, 1), np.float32)
    save_grid(str(tmp_path / "g.png"), x)
    save_grid(str(tmp_path / "raw.png"), x, scale=1)
    with Image.open(tmp_path / "g.png") as g, Image.open(tmp_path / "raw.png") as r:
        assert g.size == (8 * 65 + 1,) * 2 and r.size == (8 * 17 + 1,) * 2
