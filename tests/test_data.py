"""jax_ddpm.data: loaders (digits, folders, arrays), their errors, and the deterministic batch order."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jax_ddpm.data import (BatchIterator, DataError, DataPosition, array_images, digits_images, epoch_order,
                           fingerprint, folder_images, infer_layout, load_images, next_batch_indices)


# ----------------------------------------------------------------------------- digits
def test_digits_shape_range_and_content():
    x = digits_images(16)
    assert x.shape == (1797, 16, 16, 1) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() <= 1.0 and x.max() > 0.9
    # Independent check of the resize: the 2x bilinear (half-pixel) upsampling keeps each
    # image's mean within the interpolation's edge effect of the 8x8 original's mean.
    from sklearn.datasets import load_digits

    raw = load_digits().images / 16.0 * 2 - 1  # [N, 8, 8]
    assert np.abs(x.mean(axis=(1, 2, 3)) - raw.mean(axis=(1, 2))).max() < 0.08


def test_digits_native_size_is_exact():
    from sklearn.datasets import load_digits

    x = digits_images(8, channels=3)
    np.testing.assert_array_equal(x[..., 0], (load_digits().images / 16.0 * 2 - 1).astype(np.float32))
    np.testing.assert_array_equal(x[..., 0], x[..., 2])


# ----------------------------------------------------------------------------- folders
def _write_png(path, array):
    Image.fromarray(array).save(path)


def test_folder_gray_and_rgb_center_crop(tmp_path):
    # A 20x10 (W x H) RGB image: left half red, right half blue; a square crop of the resized
    # 16x8 -> 8x8... the shorter side (10) becomes 8, the width 16, and the center crop keeps
    # 4 columns of each color.
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, :10, 0] = 255
    img[:, 10:, 2] = 255
    _write_png(tmp_path / "b.png", img)
    _write_png(tmp_path / "a.jpg", np.full((8, 8), 255, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    rgb = folder_images(str(tmp_path), 8, 3)
    assert rgb.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(rgb[0], 1.0, atol=2 / 127.5)  # a.jpg (sorted first): white, JPEG-lossy
    assert (rgb[1, :, :3, 0] > 0.9).all() and (rgb[1, :, 5:, 2] > 0.9).all()
    assert (rgb[1, :, :3, 2] < -0.9).all()
    gray = folder_images(str(tmp_path), 8, 1)
    assert gray.shape == (2, 8, 8, 1)


def test_folder_empty_and_missing(tmp_path):
    with pytest.raises(DataError, match="no png/jpg/jpeg images"):
        folder_images(str(tmp_path), 8, 1)
    with pytest.raises(DataError, match="no such file"):
        load_images(str(tmp_path / "nope"), 8, 1)


def test_folder_corrupt_image_names_the_file(tmp_path):
    _write_png(tmp_path / "good.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="bad.png: cannot read image"):
        folder_images(str(tmp_path), 8, 1)


def test_folder_truncated_image(tmp_path):
    path = tmp_path / "t.png"
    _write_png(path, np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.png"):
        folder_images(str(tmp_path), 8, 1)


# ----------------------------------------------------------------------------- arrays
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_array_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    stored = nhwc if layout == "nhwc" else nhwc.transpose(0, 3, 1, 2)
    path = tmp_path / "x.npz"
    np.savez(path, images=stored, labels=np.arange(5))
    for given in ("auto", layout):
        x = array_images(str(path), 8, 3, given)
        np.testing.assert_array_equal(x, nhwc.astype(np.float32) / 127.5 - 1)


def test_array_rank3_npy_and_channel_conversion(tmp_path):
    gray = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
    np.save(tmp_path / "g.npy", gray)
    x = array_images(str(tmp_path / "g.npy"), 8, 3)
    assert x.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(x[..., 1], gray.astype(np.float32) / 127.5 - 1)
    y = array_images(str(tmp_path / "g.npy"), 16, 1)  # resized
    assert y.shape == (4, 16, 16, 1)


@pytest.mark.parametrize("shape,expected", [((2, 8, 8, 1), "nhwc"), ((2, 3, 8, 8), "nchw"), ((2, 1, 5, 5), "nchw")])
def test_infer_layout(shape, expected):
    assert infer_layout(shape) == expected


@pytest.mark.parametrize("shape", [(2, 3, 8, 3), (2, 1, 4, 1), (2, 5, 5, 5)])
def test_infer_layout_refuses_to_guess(shape):
    with pytest.raises(DataError):
        infer_layout(shape)


def test_array_errors(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 8, 8, 1), np.float64))
    with pytest.raises(DataError, match="must be uint8, got float64"):
        array_images(str(tmp_path / "f.npz"), 8, 1)
    np.save(tmp_path / "r.npy", np.zeros((2, 8), np.uint8))
    with pytest.raises(DataError, match="rank 4"):
        array_images(str(tmp_path / "r.npy"), 8, 1)
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="without pickles"):
        array_images(str(tmp_path / "o.npy"), 8, 1)
    np.savez(tmp_path / "two.npz", a=np.zeros((1, 8, 8, 1), np.uint8), b=np.zeros((1, 8, 8, 1), np.uint8))
    with pytest.raises(DataError, match="name the images array"):
        array_images(str(tmp_path / "two.npz"), 8, 1)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        array_images(str(tmp_path / "junk.npz"), 8, 1)


# ----------------------------------------------------------------------------- batching
def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = epoch_order(100, seed=3, epoch=2)
    np.testing.assert_array_equal(a, epoch_order(100, seed=3, epoch=2))
    assert sorted(a) == list(range(100))
    assert not np.array_equal(a, epoch_order(100, seed=3, epoch=3))
    assert not np.array_equal(a, epoch_order(100, seed=4, epoch=2))


def test_iterator_covers_each_epoch_and_drops_the_tail():
    images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    it = BatchIterator(images, 3, seed=0)
    epoch0 = np.concatenate([next(it) for _ in range(3)]).ravel()
    assert len(set(epoch0)) == 9  # 3 batches of 3, the 10th image dropped
    np.testing.assert_array_equal(epoch0, epoch_order(10, 0, 0)[:9])
    first_of_epoch1 = next(it).ravel()
    np.testing.assert_array_equal(first_of_epoch1, epoch_order(10, 0, 1)[:3])
    assert it.position == DataPosition(1, 3)


def test_iterator_resumes_from_a_position():
    images = np.random.default_rng(1).normal(size=(17, 2, 2, 1)).astype(np.float32)
    it = BatchIterator(images, 4, seed=5)
    stream = [next(it) for _ in range(11)]
    it2 = BatchIterator(images, 4, seed=5)
    for _ in range(6):
        next(it2)
    resumed = BatchIterator(images, 4, seed=5, position=it2.position)
    for expected in stream[6:]:
        np.testing.assert_array_equal(next(resumed), expected)


def test_next_batch_indices_matches_iterator():
    images = np.arange(7, dtype=np.float32).reshape(7, 1, 1, 1)
    it = BatchIterator(images, 2, seed=9)
    pos = DataPosition(0, 0)
    for _ in range(8):
        idx, pos = next_batch_indices(7, 2, 9, pos)
        np.testing.assert_array_equal(next(it).ravel(), idx.astype(np.float32))
        assert it.position == pos


def test_next_indices_is_next_without_the_images():
    images = np.arange(7, dtype=np.float32).reshape(7, 1, 1, 1)
    a, b = BatchIterator(images, 2, seed=4), BatchIterator(images, 2, seed=4)
    for _ in range(8):  # across epochs
        idx = a.next_indices()
        np.testing.assert_array_equal(images[idx], next(b))
        assert a.position == b.position


def test_batch_larger_than_data_is_refused():
    with pytest.raises(DataError, match="--batch-size 5 exceeds the 4 images"):
        BatchIterator(np.zeros((4, 1, 1, 1), np.float32), 5, seed=0)


def test_fingerprint_sees_content():
    x = np.zeros((3, 2, 2, 1), np.float32)
    y = x.copy()
    y[1, 0, 0, 0] = 1e-7
    assert fingerprint(x) == fingerprint(x.copy()) != fingerprint(y)
