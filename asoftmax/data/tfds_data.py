"""tensorflow-datasets (tfds) loaders for MNIST and EuroSAT, prepared offline from the local files.

Nothing is downloaded:

- MNIST: `AsoftmaxMnist`, a small `tfds.core.GeneratorBasedBuilder` whose *manual dir* holds the four idx files
  (`train-images-idx3-ubyte[.gz]`, ...). `download_and_prepare` writes a tfds dataset (`asoftmax_mnist/1.0.0`)
  into `tfds_dir` once; later calls read it back. The prepared dir is keyed by a digest of the idx files (name,
  size, sha256; `tfds_dir/asoftmax_mnist/source.json`): when they change it is rebuilt, and prepared tfrecords that
  fail their CRC are rebuilt with a warning naming the file.
- EuroSAT: `tfds.folder_dataset.ImageFolder` over the standard `2750/<Class>/*.jpg` folder (the folder name is
  the tfds split, the class folders are the labels). Images are decoded by TensorFlow; the seeded stratified
  split is the same as the PIL image-folder loader's (`asoftmax.data.eurosat`), so both loaders give the same
  train/test images.
- `load_prepared(name, tfds_dir)`: any dataset already prepared in a tfds data dir (e.g. `mnist`,
  `eurosat/rgb`), read with `tfds.load(..., download=False)`; this is the path `tfds.testing.mock_data` mocks.
  It has no sources to rebuild from: corrupt tfrecords raise `CorruptDataError` (a ValueError) naming the files.

tensorflow and tensorflow_datasets are imported inside the functions (importing them takes seconds), so
importing this module is free. Install with `pip install asoftmax[tfds]` (`make` does).

Example (prepares into /tmp/tfds once, then reads it):

    splits = load_mnist_tfds("/work/shared/data/mnist", "/tmp/tfds")
    splits.x_train.shape   # (60000, 28, 28) uint8
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import shutil
import warnings

import numpy as np

from asoftmax import results
from asoftmax.data.mnist import IDX_FILES, ImageSplits, find_idx_dir, read_idx, stratified_split

LOADERS = ("idx", "folder", "tfds")


class DataNotFoundError(FileNotFoundError, ValueError):
  """A data directory given by the user does not hold the data (a ValueError naming the argument, and a
  FileNotFoundError so that experiments turn it into "not run: ..." rows)."""


class CorruptDataError(ValueError):
  """Prepared tfds files that cannot be read (a tfrecord failing its CRC, a truncated shard); names the files."""


def _tfrecord_files(data_dir: str) -> list[str]:
  return sorted(glob.glob(os.path.join(data_dir, "*.tfrecord*")))


def _unreadable_tfrecords(data_dir: str) -> list[str]:
  """The tfrecord files under `data_dir` whose records fail to read (CRC or truncation), each read once."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (already imported by tfds)

  bad = []
  for f in _tfrecord_files(data_dir):
    try:
      for _ in tf.data.TFRecordDataset(f):
        pass
    except tf.errors.OpError:
      bad.append(f)
  return bad


def _read_splits(tfds, make_ds, splits, data_dir: str, what: str) -> dict:
  """{split: (images, labels)} read with `make_ds(split)`; a TensorFlow read error becomes `CorruptDataError`
  naming the unreadable tfrecord files of `data_dir` (all of them if none fails on its own)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    return {s: _as_numpy(tfds, make_ds(s)) for s in splits}
  except tf.errors.OpError as e:
    bad = _unreadable_tfrecords(data_dir) if data_dir else []
    files = bad or _tfrecord_files(data_dir) or [data_dir]
    raise CorruptDataError(f"{what}: prepared tfds files cannot be read ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][-120:]}): {', '.join(files)}") from e


def idx_digest(idx_dir: str) -> dict:
  """{file name: {"size", "sha256"}} of the four MNIST idx files in `idx_dir` (the prepared dir's key)."""
  out = {}
  for f in IDX_FILES.values():
    path = os.path.join(idx_dir, f)
    if not os.path.exists(path):
      path += ".gz"
    h = hashlib.sha256()
    with open(path, "rb") as fh:
      for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
    out[os.path.basename(path)] = {"size": os.path.getsize(path), "sha256": h.hexdigest()}
  return out


def check_loader(loader: str, allowed: tuple[str, ...]) -> str:
  """Returns `loader` if it is one of `allowed`, else raises ValueError naming the argument and the choices."""
  if loader not in allowed:
    raise ValueError(f"loader must be one of {allowed}, got {loader!r}")
  return loader


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("tensorflow_datasets is not installed; `pip install asoftmax[tfds]` (or `make`) for "
                      "loader='tfds'; the 'idx' and 'folder' loaders need no extra") from e
  return tfds


@functools.cache
def mnist_builder_class():
  """The `AsoftmaxMnist` tfds builder class (defined on first use, so that tfds is imported only then).

  It registers as `asoftmax_mnist`: 60,000 train / 10,000 test images (28, 28, 1) uint8 with labels 0-9, read
  from the idx files in the builder's manual dir.
  """
  tfds = _import_tfds()

  class AsoftmaxMnist(tfds.core.GeneratorBasedBuilder):
    """MNIST prepared from local idx files (no download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "MNIST from the four idx files in the manual dir."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                                    "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] in the manual dir.")

    def _info(self):
      return self.dataset_info_from_configs(
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(28, 28, 1)),
              "label": tfds.features.ClassLabel(num_classes=10),
          }),
          supervised_keys=("image", "label"),
          disable_shuffling=True,  # read back in idx-file order (tfds shuffles by key hash otherwise)
          description="MNIST from local idx files (LeCun et al., 1998).")

    def _split_generators(self, dl_manager):
      d = os.fspath(dl_manager.manual_dir)
      return {"train": self._generate_examples(d, "train"), "test": self._generate_examples(d, "test")}

    def _generate_examples(self, directory, split):
      x = read_idx(os.path.join(directory, IDX_FILES[f"{split}_images"]))
      y = read_idx(os.path.join(directory, IDX_FILES[f"{split}_labels"]))
      if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"manual_dir: {split} images {x.shape} and labels {y.shape} do not match")
      for i in range(len(y)):
        yield i, {"image": x[i][..., None], "label": int(y[i])}

  return AsoftmaxMnist


@contextlib.contextmanager
def _quiet(tfds):
  """No tfds progress bars while preparing (a library draws none); the caller's setting is restored after."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top

  was = tqdm_utils._active  # pylint: disable=protected-access
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(was)


def _as_numpy(tfds, ds, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """A supervised (unbatched) tf.data.Dataset -> (images uint8, labels int32), read in batches of `batch`.

  (tfds' `batch_size=-1` aborts the process on a dataset of unknown size, e.g. under `tfds.testing.mock_data`.)
  """
  xs, ys = [], []
  for x, y in tfds.as_numpy(ds.batch(batch)):
    xs.append(np.asarray(x, np.uint8))
    ys.append(np.asarray(y, np.int32))
  if not xs:
    raise ValueError("the tfds split holds no examples")
  return np.concatenate(xs), np.concatenate(ys)


def load_mnist_tfds(data_dir: str, tfds_dir: str) -> ImageSplits:
  """MNIST through tfds: prepares `asoftmax_mnist` into `tfds_dir` from the idx files under `data_dir`.

  Args:
    data_dir: the directory holding the idx files, or its parent (`data_dir/mnist`), as for the idx loader.
    tfds_dir: the tfds data dir the prepared dataset is written to (once) and read from.

  Returns:
    `ImageSplits` with (60000, 28, 28) / (10000, 28, 28) uint8 images, the same arrays as the idx loader.

  Raises:
    DataNotFoundError (a ValueError and FileNotFoundError) naming `data_dir` when it holds no idx files.
    ValueError naming `tfds_dir` when it is empty.
  """
  if not tfds_dir:
    raise ValueError("tfds_dir must name the directory the prepared tfds dataset is written to, got ''")
  idx_dir = find_idx_dir(data_dir)
  if idx_dir is None:
    raise DataNotFoundError(f"data not found at {os.path.join(data_dir, 'mnist') if data_dir else '<unset>'} "
                            f"(data_dir = {data_dir!r} holds no MNIST idx files)")
  tfds = _import_tfds()
  key = idx_digest(idx_dir)
  root = os.path.join(tfds_dir, "asoftmax_mnist")
  stamp = os.path.join(root, "source.json")
  try:
    with open(stamp) as f:
      stamped = json.load(f).get("files")
  except (OSError, ValueError):
    stamped = None
  if stamped != key and os.path.isdir(root):  # prepared from other idx files (or before keys were stamped)
    shutil.rmtree(root)
  try:
    out = _prepare_and_read_mnist(tfds, tfds_dir, idx_dir, key, stamp)
  except CorruptDataError as e:
    warnings.warn(f"{e}; rebuilding {root}", stacklevel=2)
    shutil.rmtree(root, ignore_errors=True)
    out = _prepare_and_read_mnist(tfds, tfds_dir, idx_dir, key, stamp)
  return ImageSplits(out["train"][0][..., 0], out["train"][1], out["test"][0][..., 0], out["test"][1],
                     f"tfds asoftmax_mnist prepared in {os.path.abspath(tfds_dir)} from idx files in "
                     f"{os.path.abspath(idx_dir)}", tuple(str(i) for i in range(10)))


def _prepare_and_read_mnist(tfds, tfds_dir, idx_dir, key, stamp) -> dict:
  """Prepares `asoftmax_mnist` (if not prepared), stamps its key, and reads both splits."""
  builder = mnist_builder_class()(data_dir=tfds_dir)
  with _quiet(tfds):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=idx_dir))
  if os.path.isdir(os.path.dirname(stamp)):  # (not under tfds.testing.mock_data, which prepares nothing)
    results.write_json(stamp, {"files": key, "idx_dir": os.path.abspath(idx_dir)})
  return _read_splits(tfds, lambda s: builder.as_dataset(split=s, as_supervised=True), ("train", "test"),
                      os.fspath(builder.data_dir), f"tfds_dir = {tfds_dir!r} (asoftmax_mnist)")


def read_image_folder_tfds(folder: str, image_size: int = 64) -> tuple[np.ndarray, np.ndarray, tuple]:
  """`tfds.folder_dataset.ImageFolder` over `folder/<Class>/*.{jpg,png}` (e.g. `.../eurosat/2750`).

  ImageFolder reads `root/<split>/<label>/*`; here root is `folder`'s parent and the split is `folder`'s name.
  ImageFolder shuffles a split deterministically; the examples are put back in (class, file name) order, the
  order of `asoftmax.data.eurosat.read_image_folder`, so a seeded split picks the same files with either reader.

  Args:
    folder: the directory of class folders (find it with `asoftmax.data.eurosat.find_image_folder`).
    image_size: every image must be image_size x image_size x 3 (EuroSAT: 64); TensorFlow decodes them.

  Returns:
    (images (N, image_size, image_size, 3) uint8, labels (N,) int32, class_names sorted).

  Raises:
    DataNotFoundError naming `folder` when it is not a directory.
  """
  if not folder or not os.path.isdir(folder):
    raise DataNotFoundError(f"data not found at {folder or '<unset>'} (folder = {folder!r} is not a directory)")
  tfds = _import_tfds()
  folder = os.path.abspath(folder)
  root, split = os.path.dirname(folder), os.path.basename(folder)
  builder = tfds.folder_dataset.ImageFolder(root, shape=(image_size, image_size, 3))
  x, y = _as_numpy(tfds, builder.as_dataset(split=split, as_supervised=True))
  examples = builder._split_examples[split]  # pylint: disable=protected-access
  if len(examples) != len(y):
    raise ValueError(f"folder: ImageFolder listed {len(examples)} files but decoded {len(y)} images")
  order = sorted(range(len(y)), key=lambda i: (int(y[i]), os.path.basename(examples[i].image_path)))
  return x[order], y[order], tuple(builder.info.features["label"].names)


def load_eurosat_tfds(folder: str, *, image_size: int = 64, test_fraction: float = 0.2, seed: int = 0
                      ) -> ImageSplits:
  """EuroSAT through `read_image_folder_tfds(folder)` and the seeded stratified split (`test_fraction` of each
  class), the same split as `asoftmax.data.eurosat.load_eurosat` on the same folder."""
  x, y, classes = read_image_folder_tfds(folder, image_size)
  tr, te = stratified_split(y, test_fraction, seed)
  return ImageSplits(x[tr], y[tr], x[te], y[te], f"tfds ImageFolder {os.path.abspath(folder)} ({len(y)} images)",
                     classes)


def _builder_data_dir(builder) -> str:
  try:
    return os.fspath(builder.data_dir)
  except Exception:  # pylint: disable=broad-except  (mocked builders, or none prepared)
    return ""


def load_prepared(name: str, tfds_dir: str, squeeze_gray: bool = True) -> ImageSplits:
  """A dataset already prepared in a tfds data dir (`tfds.load(name, data_dir=tfds_dir, download=False)`).

  Reads the "train" and "test" splits when the dataset has both; a dataset with only "train" (EuroSAT) is split
  by the caller. Grayscale (N, H, W, 1) images are squeezed to (N, H, W) when `squeeze_gray`.

  Raises:
    DataNotFoundError (a ValueError and FileNotFoundError) naming `tfds_dir` when it holds no prepared `name`;
    CorruptDataError (a ValueError) naming the tfrecord files that cannot be read.
  """
  tfds = _import_tfds()
  builder = tfds.builder(name, data_dir=tfds_dir)
  splits = set(builder.info.splits.keys()) or {"train", "test"}
  try:
    out = _read_splits(tfds, lambda s: tfds.load(name, split=s, data_dir=tfds_dir, download=False,
                                                 as_supervised=True),
                       [s for s in ("train", "test") if s in splits], _builder_data_dir(builder),
                       f"tfds_dir = {tfds_dir!r} ({name})")
  except AssertionError as e:  # tfds: "Dataset <name>: could not find data in <dir>"
    raise DataNotFoundError(f"data not found at {os.path.join(tfds_dir, name)} (tfds_dir = {tfds_dir!r} holds "
                            f"no prepared {name}: {e})") from e
  x_tr, y_tr = out["train"]
  x_te, y_te = out.get("test", (x_tr[:0], y_tr[:0]))
  if squeeze_gray and x_tr.ndim == 4 and x_tr.shape[-1] == 1:
    x_tr, x_te = x_tr[..., 0], x_te[..., 0]
  names = tuple(builder.info.features["label"].names)
  return ImageSplits(x_tr, y_tr, x_te, y_te, f"tfds {name} in {os.path.abspath(tfds_dir)}", names)
