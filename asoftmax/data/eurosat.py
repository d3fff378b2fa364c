"""EuroSAT (RGB) loaders: an image-folder directory in the standard `2750/<Class>/*.jpg` layout, or a prepared
tfds `eurosat/rgb` data dir. 27,000 images of 64 x 64 x 3 in 10 classes (Helber et al., 2019).

EuroSAT ships no train/test split; we draw one with a fixed seed (stratified by class, `test_fraction` of each).
"""

from __future__ import annotations

import os

import numpy as np

from asoftmax import results
from asoftmax.data.mnist import ImageSplits, stratified_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def find_image_folder(data_dir: str) -> str | None:
  """The EuroSAT image folder under `data_dir`: tries `eurosat/2750`, `2750`, `eurosat`, then `data_dir` itself.

  A folder qualifies if it has at least two sub-directories holding images. Returns None if none does.
  """
  if not data_dir:
    return None
  for d in (os.path.join(data_dir, "eurosat", "2750"), os.path.join(data_dir, "2750"),
            os.path.join(data_dir, "eurosat"), data_dir):
    if os.path.isdir(d):
      classes = [c for c in os.listdir(d) if os.path.isdir(os.path.join(d, c))
                 and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(os.path.join(d, c)))]
      if len(classes) >= 2:
        return d
  return None


def read_image_folder(folder: str, size: int = 64, max_per_class: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, tuple]:
  """Reads `folder/<Class>/*.{jpg,png,tif}` into arrays.

  Args:
    folder: root of the class folders; class ids follow the sorted class names.
    size: images are converted to RGB and resized (bilinear) to size x size when they differ.
    max_per_class: read only the first (sorted by file name) images of each class.

  Returns:
    (images (N, size, size, 3) uint8, labels (N,) int32, class_names).
  """
  from PIL import Image

  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder not found: {folder}")
  classes = tuple(sorted(c for c in os.listdir(folder) if os.path.isdir(os.path.join(folder, c))))
  files, labels = [], []
  for ci, c in enumerate(classes):
    names = sorted(f for f in os.listdir(os.path.join(folder, c)) if f.lower().endswith(IMAGE_EXTENSIONS))
    names = names[:max_per_class] if max_per_class else names
    files += [os.path.join(folder, c, f) for f in names]
    labels += [ci] * len(names)
  if not files:
    raise FileNotFoundError(f"no images (*{'/'.join(IMAGE_EXTENSIONS)}) in the class folders of {folder}")
  images = np.empty((len(files), size, size, 3), np.uint8)
  for i, f in enumerate(files):
    with Image.open(f) as im:
      im = im.convert("RGB")
      if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
      images[i] = np.asarray(im)
  return images, np.asarray(labels, np.int32), classes


def load_eurosat(data_dir: str, *, tfds_dir: str = "", test_fraction: float = 0.2, seed: int = 0,
                 cache_path: str = "", max_per_class: int | None = None) -> ImageSplits:
  """EuroSAT RGB from an image folder under `data_dir` (see `find_image_folder`) or a prepared tfds dir.

  Args:
    data_dir: directory containing `eurosat/2750/<Class>/*.jpg` (or `2750/...`, or the class folders).
    tfds_dir: a prepared tfds data dir holding `eurosat/rgb` (used when no image folder is found).
    test_fraction, seed: the stratified split.
    cache_path: optional `.npz` file; decoded images are stored there and reused by the next call.
    max_per_class: read at most this many images per class (tests, smoke runs).

  Raises:
    FileNotFoundError: no image folder and no tfds dir (the message names the paths looked at).
  """
  folder = find_image_folder(data_dir)
  if folder is not None:
    if cache_path and os.path.exists(cache_path):
      with np.load(cache_path) as z:
        x, y, classes = z["x"], z["y"], tuple(str(c) for c in z["classes"])
    else:
      x, y, classes = read_image_folder(folder, max_per_class=max_per_class)
      if cache_path:
        with results.atomic_path(cache_path, suffix=".npz") as tmp:
          np.savez(tmp, x=x, y=y, classes=np.asarray(classes))
    source = f"image folder {os.path.abspath(folder)} ({len(y)} images)"
  elif tfds_dir:
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("tensorflow_datasets is not installed; `pip install asoftmax[tfds]` to read tfds data "
                        "dirs (image folders need no extra)") from e
    ds = tfds.load("eurosat/rgb", split="train", data_dir=tfds_dir, download=False, batch_size=-1,
                   as_supervised=True)
    x, y = (np.asarray(a) for a in tfds.as_numpy(ds))
    x, y = x.astype(np.uint8), y.astype(np.int32)
    classes = tuple(str(i) for i in range(int(y.max()) + 1))
    source = f"tfds eurosat/rgb in {os.path.abspath(tfds_dir)} ({len(y)} images)"
  else:
    where = os.path.join(data_dir, "eurosat", "2750") if data_dir else "<data_dir unset: set ASOFTMAX_DATA_DIR>"
    raise FileNotFoundError(f"data not found at {where}")
  tr, te = stratified_split(y, test_fraction, seed)
  return ImageSplits(x[tr], y[tr], x[te], y[te], source, classes)
