"""tfds loaders (asoftmax/data/tfds_data.py), offline: `tfds.testing.mock_data` for prepared `mnist` and
`eurosat/rgb`, and real builds from tiny generated files (an idx split for `asoftmax_mnist`, a PNG folder for
`tfds.folder_dataset.ImageFolder`) compared array-for-array with the idx and PIL readers.

tensorflow is imported only inside these tests (a few seconds once per worker); other test files do not pay it.
"""

import os

import numpy as np
import pytest
from PIL import Image

from asoftmax.data import eurosat, mnist, tfds_data

tfds = pytest.importorskip("tensorflow_datasets")


def _png_folder(root, n_per_class=4, classes=("River", "Forest", "AnnualCrop"), size=64):
  rng = np.random.default_rng(1)
  for c in classes:
    os.makedirs(os.path.join(root, c), exist_ok=True)
    for i in range(n_per_class):
      Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(root, c, f"{c}_{i}.png"))


def _idx_split(root, n_train=12, n_test=5):
  rng = np.random.default_rng(2)
  os.makedirs(root, exist_ok=True)
  arrs = {"train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
          "train_labels": rng.integers(0, 10, n_train).astype(np.uint8),
          "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
          "test_labels": rng.integers(0, 10, n_test).astype(np.uint8)}
  for k, f in mnist.IDX_FILES.items():
    mnist.write_idx(os.path.join(root, f + ".gz"), arrs[k])
  return arrs


def test_mock_data_prepared_mnist_and_eurosat(tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    m = tfds_data.load_prepared("mnist", str(tmp_path))
    e = tfds_data.load_prepared("eurosat/rgb", str(tmp_path))
  assert m.x_train.shape == (6, 28, 28) and m.x_train.dtype == np.uint8 and m.y_train.dtype == np.int32
  assert m.x_test.shape == (6, 28, 28) and len(m.class_names) == 10
  assert e.x_train.shape == (6, 64, 64, 3) and e.class_names[0] == "AnnualCrop" and len(e.class_names) == 10
  assert ((0 <= e.y_train) & (e.y_train < 10)).all()


def test_mock_data_through_the_public_loaders(tmp_path):
  # No idx files / image folder: the loaders read the (mocked) prepared tfds datasets in tfds_dir.
  with tfds.testing.mock_data(num_examples=10):
    m = mnist.load_mnist(str(tmp_path / "none"), str(tmp_path), loader="tfds")
    e = eurosat.load_eurosat("", loader="tfds", tfds_dir=str(tmp_path), test_fraction=0.5)
  assert m.x_train.shape == (10, 28, 28) and m.source.startswith("tfds mnist")
  assert len(e.y_train) + len(e.y_test) == 10 and e.source.startswith("tfds eurosat/rgb")


def test_mock_data_serves_the_local_mnist_builder(tmp_path):
  _idx_split(str(tmp_path / "mnist"), n_train=3, n_test=2)  # the loader checks the files exist; mock_data
  with tfds.testing.mock_data(num_examples=7):              # then replaces prepare + read by random examples
    s = tfds_data.load_mnist_tfds(str(tmp_path), str(tmp_path / "tfds"))
  assert s.x_train.shape == (7, 28, 28) and s.x_test.shape == (7, 28, 28) and s.y_train.dtype == np.int32
  assert not os.path.exists(tmp_path / "tfds" / "asoftmax_mnist")  # nothing was prepared


def test_image_folder_build_equals_pil_reader(tmp_path):
  data = tmp_path / "data"
  _png_folder(str(data / "eurosat" / "2750"))
  x, y, classes = tfds_data.read_image_folder_tfds(str(data / "eurosat" / "2750"))
  x_pil, y_pil, classes_pil = eurosat.read_image_folder(str(data / "eurosat" / "2750"))
  assert classes == classes_pil == ("AnnualCrop", "Forest", "River")
  np.testing.assert_array_equal(y, y_pil)
  np.testing.assert_array_equal(x, x_pil)  # PNG is lossless: TF and PIL decode the same pixels
  a = eurosat.load_eurosat(str(data), loader="tfds", test_fraction=0.25, seed=3)
  b = eurosat.load_eurosat(str(data), loader="folder", test_fraction=0.25, seed=3)
  for u, v in zip(a[:4], b[:4]):
    np.testing.assert_array_equal(u, v)  # same split of the same files
  assert a.source.startswith("tfds ImageFolder") and b.source.startswith("image folder")


def test_image_cache_checksum_and_loader(tmp_path):
  data = tmp_path / "data"
  _png_folder(str(data / "2750"), n_per_class=2)
  cache = str(tmp_path / "c.npz")
  a = eurosat.load_eurosat(str(data), loader="folder", test_fraction=0.5, cache_path=cache)
  with pytest.warns(UserWarning, match="holds 'folder' images"):  # made by another loader: rebuilt
    b = eurosat.load_eurosat(str(data), loader="tfds", test_fraction=0.5, cache_path=cache)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  with np.load(cache) as z:  # a cache whose pixels do not match its checksum is named and rebuilt
    d = {k: z[k] for k in z.files}
  d["x"] = d["x"].copy()
  d["x"][0, 0, 0, 0] ^= 1
  np.savez(cache, **d)
  with pytest.warns(UserWarning, match=r"c\.npz fails its sha256"):
    c = eurosat.load_eurosat(str(data), loader="tfds", test_fraction=0.5, cache_path=cache)
  np.testing.assert_array_equal(c.x_train, a.x_train)


def test_mnist_builder_prepares_from_idx_files(tmp_path):
  arrs = _idx_split(str(tmp_path / "raw" / "mnist"))
  tfds_dir = str(tmp_path / "tfds")
  s = mnist.load_mnist(str(tmp_path / "raw"), tfds_dir, loader="tfds")
  np.testing.assert_array_equal(s.x_train, arrs["train_images"])
  np.testing.assert_array_equal(s.y_train, arrs["train_labels"])
  np.testing.assert_array_equal(s.x_test, arrs["test_images"])
  np.testing.assert_array_equal(s.y_test, arrs["test_labels"])
  assert os.path.isdir(os.path.join(tfds_dir, "asoftmax_mnist", "1.0.0")) and s.source.startswith("tfds asoftmax_mnist")
  s2 = mnist.load_mnist(str(tmp_path / "raw"), tfds_dir, loader="tfds")  # prepared once, read back
  np.testing.assert_array_equal(s2.x_train, s.x_train)


def test_bad_input_names_the_argument(tmp_path):
  with pytest.raises(ValueError, match="loader must be one of"):
    mnist.load_mnist(str(tmp_path), loader="folder")
  with pytest.raises(ValueError, match="loader must be one of"):
    eurosat.load_eurosat(str(tmp_path), loader="idx")
  with pytest.raises(ValueError, match="tfds_dir = .*no prepared mnist"):  # no idx files, nothing prepared
    mnist.load_mnist(str(tmp_path / "nowhere"), str(tmp_path / "tfds"), loader="tfds")
  with pytest.raises(ValueError, match="data_dir = .*nowhere"):
    tfds_data.load_mnist_tfds(str(tmp_path / "nowhere"), str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="data_dir = .*nowhere"):
    mnist.load_mnist(str(tmp_path / "nowhere"), loader="idx")
  with pytest.raises(ValueError, match="data_dir = .*nowhere"):
    eurosat.load_eurosat(str(tmp_path / "nowhere"), loader="tfds")
  with pytest.raises(ValueError, match="tfds_dir"):
    tfds_data.load_mnist_tfds(str(tmp_path), "")
  with pytest.raises(ValueError, match="folder = "):
    tfds_data.read_image_folder_tfds(str(tmp_path / "nowhere"))


def test_prepared_mnist_is_keyed_by_its_idx_files(tmp_path):
  """Before: the prepared `asoftmax_mnist` was built once and served for ever: after the idx files changed, the old
  images came back with a `source` naming the new files. The prepared dir is now keyed by a digest of the idx files
  (name, size, sha256) and rebuilt when they change."""
  raw, tfds_dir = str(tmp_path / "raw" / "mnist"), str(tmp_path / "tfds")
  _idx_split(raw, n_train=6, n_test=3)
  first = mnist.load_mnist(str(tmp_path / "raw"), tfds_dir, loader="tfds")
  rng = np.random.default_rng(9)
  new = {"train_images": rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
         "train_labels": rng.integers(0, 10, 8).astype(np.uint8),
         "test_images": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
         "test_labels": rng.integers(0, 10, 4).astype(np.uint8)}
  for k, f in mnist.IDX_FILES.items():
    mnist.write_idx(os.path.join(raw, f + ".gz"), new[k])
  s = mnist.load_mnist(str(tmp_path / "raw"), tfds_dir, loader="tfds")
  assert first.x_train.shape[0] == 6
  np.testing.assert_array_equal(s.x_train, new["train_images"])
  np.testing.assert_array_equal(s.y_test, new["test_labels"])


def test_corrupt_prepared_tfrecords_are_rebuilt_or_named(tmp_path):
  """Before: flipped bytes in a prepared tfrecord surfaced as a raw TensorFlow DataLossError. The loader that owns
  the sources rebuilds (with a warning naming the file); `load_prepared`, which has no sources, raises a ValueError
  naming the file."""
  raw, tfds_dir = str(tmp_path / "raw" / "mnist"), str(tmp_path / "tfds")
  arrs = _idx_split(raw, n_train=6, n_test=3)
  mnist.load_mnist(str(tmp_path / "raw"), tfds_dir, loader="tfds")
  vdir = os.path.join(tfds_dir, "asoftmax_mnist", "1.0.0")
  (rec,) = [f for f in os.listdir(vdir) if "train.tfrecord" in f]
  path = os.path.join(vdir, rec)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF  # inside a record's payload: its CRC no longer matches
  open(path, "wb").write(bytes(data))
  with pytest.raises(ValueError, match=rec):
    tfds_data.load_prepared("asoftmax_mnist", tfds_dir)
  with pytest.warns(UserWarning, match=rec):
    s = mnist.load_mnist(str(tmp_path / "raw"), tfds_dir, loader="tfds")
  np.testing.assert_array_equal(s.x_train, arrs["train_images"])


def test_auto_loader_with_a_missing_tfds_dir_names_it(tmp_path):
  """Before: loader "auto" with no idx files and a tfds_dir holding nothing ended in tfds' raw AssertionError."""
  with pytest.raises(tfds_data.DataNotFoundError, match="tfds_dir = .*missing_tfds"):
    mnist.load_mnist(str(tmp_path / "none"), str(tmp_path / "missing_tfds"), loader="auto")
