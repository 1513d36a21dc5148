"""Image data sets -> deterministic NumPy batch iterators (NHWC float32 in [-1, 1]).

:func:`load_image_set` keeps a set compact in memory (:class:`ImageSet`: uint8 pixels, or the
digits' 8x8 source) and decodes each batch to float32 when it is drawn, bit for bit what the
float32 arrays of :func:`load_images` hold; it refuses, in one line, a set whose uint8 pixels
would not fit in the memory available (:func:`available_memory`).

Sources:

* ``digits``: scikit-learn's bundled handwritten digits (1,797 8x8 images, shipped in the
  wheel, no download), resized with Pillow's bilinear filter.
* a folder of PNG/JPEG images (Pillow): the files named ``*.png``, ``*.jpg``, ``*.jpeg``
  (any case) directly in the folder, sorted by name; subfolders and other files (webp, bmp,
  gif, tif, ...) are ignored. Each is EXIF-rotated, converted to gray (``L``) or ``RGB``
  (an alpha channel is dropped, palettes expanded), its shorter side resized to
  ``image_size`` (Lanczos), then center-cropped; 16-bit and float images are refused.
* an ``.npz``/``.npy`` file of uint8 images, ``[N, H, W, C]``, ``[N, C, H, W]`` or
  ``[N, H, W]``; loaded with ``allow_pickle=False``. ``layout='auto'`` infers the channel
  axis only when exactly one of axis 1 and axis 3 has 1 or 3 entries.

Batch order is a pure function of ``(seed, epoch)``: epoch ``e`` visits the images in the
order ``default_rng([seed, e]).permutation(N)``, in batches of ``batch_size``, dropping the
last incomplete batch. The position ``(epoch, index)`` of the next batch is all a
checkpoint needs to replay the same batches after a resume.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Iterator, NamedTuple

import numpy as np

from .errors import one_line

ERROR_DETAIL_LIMIT = 160  # a library's error text inside a message that already names the file
LAYOUTS = ("auto", "nhwc", "nchw")  # axis order of an .npz/.npy file
CHANNELS = (1, 3)  # images are converted to grayscale or RGB

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", b"PK"  # the first bytes of an .npy file and of an .npz (zip) file
DECODE_CHUNK_BYTES = 64 << 20  # decoded float32 images per pass when hashing a whole set


class DataError(ValueError):
    """Unusable data; the message is one line that names the file."""


class DataPosition(NamedTuple):
    """Where the next batch starts: epoch number and offset into that epoch's order."""

    epoch: int
    index: int


# ----------------------------------------------------------------------------- loading
def to_unit_range(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return (images_uint8.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def digits_source() -> np.ndarray:
    """scikit-learn's digits as float32 [1797, 8, 8] in [0, 1] (what :func:`digits_images` resizes)."""
    from sklearn.datasets import load_digits

    return load_digits().images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]


def decode_digits(raw: np.ndarray, image_size: int, channels: int = 1) -> np.ndarray:
    """[n, 8, 8] digits in [0, 1] (rows of :func:`digits_source`) -> float32 [n, S, S, channels]
    in [-1, 1]; image by image, so any subset gives the rows of the whole set bit for bit."""
    from PIL import Image

    if image_size != raw.shape[1]:
        raw = np.stack([np.asarray(Image.fromarray(im, mode="F").resize((image_size, image_size),
                                                                         Image.Resampling.BILINEAR))
                        for im in raw])  # [N, S, S]
    x = np.clip(raw, 0.0, 1.0) * 2.0 - 1.0
    return np.repeat(x[..., None], channels, axis=-1).astype(np.float32)  # [N, S, S, C]


def digits_images(image_size: int, channels: int = 1) -> np.ndarray:
    """scikit-learn's digits as float32 [1797, S, S, channels] in [-1, 1]."""
    return decode_digits(digits_source(), image_size, channels)


def resize_center_crop(image, size: int):
    """A PIL image -> ``size`` x ``size``: shorter side resized to ``size``, then center-cropped."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def folder_image_names(folder: str) -> list[str]:
    """The files :func:`folder_images` reads: ``IMAGE_SUFFIXES`` (any case), directly in ``folder``, sorted."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES)
                   and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise DataError(f"--data {folder}: no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images in this folder")
    return names


def folder_images(folder: str, image_size: int, channels: int) -> np.ndarray:
    """Every PNG/JPEG in ``folder`` (sorted by name, not recursive) as float32 [N, S, S, C]."""
    return to_unit_range(folder_pixels(folder, image_size, channels))


def folder_pixels(folder: str, image_size: int, channels: int, available: int | None = None) -> np.ndarray:
    """:func:`folder_images` as uint8 [N, S, S, C] (checked against ``available`` bytes first)."""
    from PIL import Image, ImageOps

    names = folder_image_names(folder)
    if available is not None:
        check_fits(f"--data {folder}", len(names) * image_size * image_size * channels, available,
                   f"{len(names)} images of {image_size}x{image_size}x{channels} as uint8")
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(names), image_size, image_size, channels), np.uint8)
    for i, name in enumerate(names):
        path = os.path.join(folder, name)
        try:
            with Image.open(path) as im:
                im.load()  # decode now: truncated or corrupt files fail here
                im = ImageOps.exif_transpose(im)
                if im.mode in ("I;16", "I", "F"):
                    raise DataError(f"--data {path}: {im.mode} (16-bit or float) images are not supported")
                arr = np.asarray(resize_center_crop(im.convert(mode), image_size))
        except DataError:
            raise
        except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, ...)
            raise DataError(f"--data {path}: cannot read image ({one_line(e, ERROR_DETAIL_LIMIT)})") from None
        out[i] = arr.reshape(image_size, image_size, channels)
    return out


def infer_layout(shape: tuple[int, ...]) -> str:
    """``'nhwc'`` or ``'nchw'`` for a rank-4 shape, when unambiguous; raises DataError otherwise."""
    last, second = shape[3] in (1, 3), shape[1] in (1, 3)
    if last and not second:
        return "nhwc"
    if second and not last:
        return "nchw"
    if last and second:
        raise DataError(f"cannot tell the channel axis of shape {tuple(shape)}; pass --layout nhwc or nchw")
    raise DataError(f"shape {tuple(shape)} has no channel axis of size 1 or 3 (axis 1 or 3)")


def _load_array(path: str, mmap: bool = False) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
    except OSError as e:
        raise DataError(f"--data {path}: cannot read ({e.strerror or e})") from None
    if not (head.startswith(NPY_MAGIC) or head.startswith(ZIP_MAGIC)):  # np.load would try unpickling it
        raise DataError(f"--data {path}: not a .npy/.npz file (it starts with neither NumPy's nor zip's header)")
    try:
        loaded = np.load(path, allow_pickle=False, mmap_mode="r" if mmap and head.startswith(NPY_MAGIC) else None)
    except ValueError as e:  # object arrays need pickles: refused
        if "pickle" in str(e).lower() or "python objects" in str(e).lower():
            raise DataError(f"--data {path}: holds Python objects, which cannot load without pickles "
                            "(never unpickled; save uint8 images)") from None
        raise DataError(f"--data {path}: not a readable .npy/.npz file ({one_line(e, ERROR_DETAIL_LIMIT)})") from None
    except Exception as e:
        raise DataError(f"--data {path}: not a readable .npy/.npz file ({one_line(e, ERROR_DETAIL_LIMIT)})") from None
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        keys = list(loaded.keys())
        if "images" in keys:
            key = "images"
        elif len(keys) == 1:
            key = keys[0]
        else:
            raise DataError(f"--data {path}: holds {len(keys)} arrays ({', '.join(keys[:6])}); "
                            "name the images array 'images'")
        try:
            return loaded[key]
        except Exception as e:
            raise DataError(f"--data {path}: cannot read array {key!r} ({one_line(e, ERROR_DETAIL_LIMIT)})") from None


def array_images(path: str, image_size: int, channels: int, layout: str = "auto") -> np.ndarray:
    """uint8 images from an ``.npz``/``.npy`` file as float32 [N, S, S, C] in [-1, 1]."""
    return to_unit_range(array_pixels(path, image_size, channels, layout))


def array_pixels(path: str, image_size: int, channels: int, layout: str = "auto",
                 available: int | None = None) -> np.ndarray:
    """:func:`array_images` as uint8 [N, S, S, C] (checked against ``available`` bytes first;
    an ``.npy`` is memory-mapped while it is resized)."""
    from PIL import Image

    arr = _load_array(path, mmap=available is not None)
    if arr.dtype != np.uint8:
        raise DataError(f"--data {path}: images must be uint8, got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]  # [N, H, W] -> [N, H, W, 1]
        layout = "nhwc"
    elif arr.ndim != 4:
        raise DataError(f"--data {path}: images must have rank 4 ([N, H, W, C] or [N, C, H, W]) or 3 "
                        f"([N, H, W]), got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or min(arr.shape[1:]) == 0:
        raise DataError(f"--data {path}: no images (shape {tuple(arr.shape)})")
    if layout == "auto":
        try:
            layout = infer_layout(arr.shape)
        except DataError as e:
            raise DataError(f"--data {path}: {e}") from None
    if layout == "nchw":
        arr = arr.transpose(0, 2, 3, 1)  # [N, H, W, C]
    c = arr.shape[-1]
    if c not in (1, 3):
        raise DataError(f"--data {path}: images must have 1 or 3 channels, got {c} (shape {tuple(arr.shape)}, "
                        f"layout {layout})")
    if available is not None:
        check_fits(f"--data {path}", arr.shape[0] * image_size * image_size * channels, available,
                   f"{arr.shape[0]} images of {image_size}x{image_size}x{channels} as uint8")
    if c == channels and arr.shape[1:3] == (image_size, image_size):
        return np.array(arr, order="C") if isinstance(arr, np.memmap) else np.ascontiguousarray(arr)
    mode_in = "L" if c == 1 else "RGB"
    mode_out = "L" if channels == 1 else "RGB"
    out = np.empty((arr.shape[0], image_size, image_size, channels), np.uint8)
    for i, im in enumerate(arr):
        pil = Image.fromarray(im[..., 0] if c == 1 else im, mode=mode_in).convert(mode_out)
        out[i] = np.asarray(resize_center_crop(pil, image_size)).reshape(image_size, image_size, channels)
    return out


def load_images(source: str, image_size: int, channels: int, layout: str = "auto") -> np.ndarray:
    """Any source -> float32 [N, S, S, C] in [-1, 1]. Raises DataError (one line)."""
    if source == "digits":
        return digits_images(image_size, channels)
    if os.path.isdir(source):
        return folder_images(source, image_size, channels)
    if not os.path.exists(source):
        raise DataError(f"--data {source}: no such file or directory")
    return array_images(source, image_size, channels, layout)


# ----------------------------------------------------------------------------- compact sets, memory
def available_memory() -> int | None:
    """Bytes of memory this process may still use: the smaller of the machine's available
    memory (``MemAvailable``) and the room left under a cgroup limit; None if unknown."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            found.append(max(int(limit) - usage, 0))
        break
    return min(found) if found else None


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_fits(what: str, nbytes: int, available: int | None, description: str) -> None:
    """Raises DataError ``what: ... need about X, Y available`` when ``nbytes`` exceed ``available``."""
    if available is not None and nbytes > available:
        raise DataError(f"{what}: the {description} need about {format_bytes(nbytes)} of memory, more than the "
                        f"{format_bytes(available)} available")


class ImageSet:
    """N images kept compactly, decoded per batch into float32 [B, S, S, C] in [-1, 1].

    ``codes`` is what is held (uint8 pixels [N, S, S, C], or the digits' 8x8 source [N, 8, 8]),
    ``decode`` turns rows of it into float32 images. Indexing (``images[indices]``) decodes
    only those rows, and gives the same bits as indexing the float32 array of
    :func:`load_images`; ``shape`` is that array's shape.
    """

    def __init__(self, codes: np.ndarray, decode: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]):
        self.codes, self._decode, self.shape = codes, decode, tuple(shape)
        self.dtype = np.dtype(np.float32)

    @classmethod
    def of_pixels(cls, pixels: np.ndarray) -> "ImageSet":
        """uint8 [N, S, S, C] -> float32 per batch (:func:`to_unit_range`)."""
        return cls(pixels, to_unit_range, pixels.shape)

    @classmethod
    def of_digits(cls, raw: np.ndarray, image_size: int, channels: int) -> "ImageSet":
        """The digits' 8x8 source -> float32 [B, S, S, C] per batch (:func:`decode_digits`)."""
        return cls(raw, lambda rows: decode_digits(rows, image_size, channels),
                   (raw.shape[0], image_size, image_size, channels))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held (the compact codes, not the float32 images)."""
        return int(self.codes.nbytes)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self._decode(self.codes[index:index + 1 if index != -1 else None])[0]
        return self._decode(self.codes[index])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def chunks(self, max_bytes: int = DECODE_CHUNK_BYTES) -> Iterator[np.ndarray]:
        """The decoded images in order, a few at a time (at most ``max_bytes`` of float32 each)."""
        per_image = 4 * int(np.prod(self.shape[1:]))
        step = max(1, max_bytes // max(per_image, 1))
        for start in range(0, self.shape[0], step):
            yield self[start:start + step]


def load_image_set(source: str, image_size: int, channels: int, layout: str = "auto",
                   available: int | None = None) -> ImageSet:
    """Any source as an :class:`ImageSet` (uint8 pixels, or the digits' source), decoded per batch.

    ``available``: bytes of memory to fit in (default :func:`available_memory`).

    Raises:
      DataError: one line, as :func:`load_images`; or the uint8 pixels would not fit in memory.
    """
    available = available_memory() if available is None else available
    if source == "digits":
        return ImageSet.of_digits(digits_source(), image_size, channels)
    if os.path.isdir(source):
        return ImageSet.of_pixels(folder_pixels(source, image_size, channels, available))
    if not os.path.exists(source):
        raise DataError(f"--data {source}: no such file or directory")
    return ImageSet.of_pixels(array_pixels(source, image_size, channels, layout, available))


def fingerprint(images: np.ndarray | ImageSet) -> str:
    """A short content hash of the prepared images (shape and bytes of the float32 set; an
    :class:`ImageSet` is hashed chunk by chunk, to the same value as its float32 array)."""
    h = hashlib.sha256(repr((tuple(images.shape), str(images.dtype))).encode())
    if isinstance(images, ImageSet):
        for chunk in images.chunks():
            h.update(np.ascontiguousarray(chunk).tobytes())
    else:
        h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- batching
def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: a permutation of ``range(num_images)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def next_batch_indices(num_images: int, batch_size: int, seed: int,
                       position: DataPosition) -> tuple[np.ndarray, DataPosition]:
    """Indices of the batch at ``position`` and the position after it (pure).

    Raises:
      ValueError: if ``batch_size`` exceeds ``num_images``.
    """
    if batch_size > num_images:
        raise ValueError(f"batch size {batch_size} exceeds the {num_images} images")
    epoch, index = position
    if index + batch_size > num_images:  # drop the incomplete tail
        epoch, index = epoch + 1, 0
    indices = epoch_order(num_images, seed, epoch)[index:index + batch_size]
    return indices, DataPosition(epoch, index + batch_size)


class BatchIterator:
    """Endless batches of ``images`` in the order fixed by ``seed``, from ``position``.

    ``iterator.position`` is where the next batch starts; save it, and a new iterator
    built with it yields the same batches as the old one would have.
    """

    def __init__(self, images: np.ndarray, batch_size: int, seed: int,
                 position: DataPosition = DataPosition(0, 0)):
        if batch_size > images.shape[0]:
            raise DataError(f"--batch-size {batch_size} exceeds the {images.shape[0]} images in the data set")
        self.images = images
        self.batch_size = batch_size
        self.seed = seed
        self.position = DataPosition(int(position[0]), int(position[1]))
        self._order_epoch, self._order = -1, None

    def __iter__(self):
        return self

    def next_indices(self) -> np.ndarray:
        """Advances by one batch and returns its [B] indices into ``images`` (no image is copied).

        A multi-process run calls this on every process (same seed, same position: same
        indices) and keeps its own rows (``parallel.host_local_batch_indices``).
        """
        n, b = self.images.shape[0], self.batch_size
        epoch, index = self.position
        if index + b > n:
            epoch, index = epoch + 1, 0
        if epoch != self._order_epoch:  # one permutation per epoch, as next_batch_indices draws it
            self._order_epoch, self._order = epoch, epoch_order(n, self.seed, epoch)
        self.position = DataPosition(epoch, index + b)
        return self._order[index:index + b]

    def __next__(self) -> np.ndarray:
        return self.images[self.next_indices()]  # [B, H, W, C]


__all__ = [
    "BatchIterator", "DataError", "DataPosition", "IMAGE_SUFFIXES", "ImageSet", "array_images", "array_pixels",
    "available_memory", "check_fits", "decode_digits", "digits_images", "digits_source", "epoch_order", "fingerprint",
    "folder_image_names", "folder_images", "folder_pixels", "format_bytes", "infer_layout", "load_image_set",
    "load_images", "next_batch_indices", "resize_center_crop", "to_unit_range",
]
