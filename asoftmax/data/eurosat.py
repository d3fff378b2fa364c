"""EuroSAT (RGB) loaders: an image-folder directory in the standard `2750/<Class>/*.jpg` layout, or a prepared
tfds `eurosat/rgb` data dir. 27,000 images of 64 x 64 x 3 in 10 classes (Helber et al., 2019).

EuroSAT ships no train/test split; we draw one with a fixed seed (stratified by class, `test_fraction` of each).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np

from asoftmax import checks, results
from asoftmax.data.mnist import ImageSplits, stratified_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def find_image_folder(data_dir: str) -> str | None:
  """The EuroSAT image folder under `data_dir`: tries `eurosat/2750`, `2750`, `eurosat`, then `data_dir` itself.

  A folder qualifies if it has at least two sub-directories holding images. Returns None if none does.
  """
  if not checks.string("data_dir", data_dir, optional=True):
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

  checks.existing_path("folder", folder, "directory")  # a FileNotFoundError (and ValueError) naming `folder`
  size = checks.int_in_range("size", size)
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


def _images_sha256(x: np.ndarray, y: np.ndarray, classes: tuple) -> str:
  h = hashlib.sha256()
  h.update(f"{x.shape}|{x.dtype}|{y.shape}|{y.dtype}|{'|'.join(classes)}|".encode())
  h.update(np.ascontiguousarray(x).tobytes())
  h.update(np.ascontiguousarray(y).tobytes())
  return h.hexdigest()


def _read_cache(cache_path: str, folder: str, loader: str) -> tuple | None:
  """(x, y, classes) from a decoded-image cache written by `load_eurosat`, or None (with a warning naming the file)
  when it is unreadable, fails its sha256, or was decoded from another folder or by another loader."""
  try:
    with np.load(cache_path) as z:
      x, y, classes = z["x"], z["y"], tuple(str(c) for c in z["classes"])
      meta = json.loads(str(z["meta"]))
  except Exception as e:  # pylint: disable=broad-except -- zip/pickle/key errors of a damaged or old-format file
    warnings.warn(f"image cache {cache_path} is unreadable or has no checksum ({type(e).__name__}: {e}); "
                  "decoding the images again and overwriting it")
    return None
  if meta.get("sha256") != _images_sha256(x, y, classes):
    warnings.warn(f"image cache {cache_path} fails its sha256 (corrupted); decoding again and overwriting it")
    return None
  if meta.get("folder") != os.path.abspath(folder) or meta.get("loader") != loader:
    warnings.warn(f"image cache {cache_path} holds {meta.get('loader')!r} images of {meta.get('folder')!r}, not "
                  f"{loader!r} images of {os.path.abspath(folder)!r}; decoding again and overwriting it")
    return None
  return x, y, classes


def load_eurosat(data_dir: str, *, loader: str = "folder", tfds_dir: str = "", test_fraction: float = 0.2,
                 seed: int = 0, cache_path: str = "", max_per_class: int | None = None) -> ImageSplits:
  """EuroSAT RGB from an image folder under `data_dir` (see `find_image_folder`) or a prepared tfds dir.

  Args:
    data_dir: directory containing `eurosat/2750/<Class>/*.jpg` (or `2750/...`, or the class folders).
    loader: "folder" (PIL decodes the image folder) or "tfds" (`tfds.folder_dataset.ImageFolder` over the same
      folder, `asoftmax.data.tfds_data.load_eurosat_tfds`); either falls back to a prepared tfds `eurosat/rgb`
      in `tfds_dir` when no image folder exists. Both give the same split of the same files.
    tfds_dir: a prepared tfds data dir holding `eurosat/rgb` (used when no image folder is found).
    test_fraction, seed: the stratified split.
    cache_path: optional `.npz` file; decoded images are stored there with their sha256, the folder and the loader,
      and reused by the next call; a cache that fails its checksum or was made from another folder or loader is
      reported (warning naming the file) and rebuilt.
    max_per_class: read at most this many images per class (tests, smoke runs; "folder" loader only).

  Raises:
    ValueError naming `loader` for an unknown loader.
    DataNotFoundError (a FileNotFoundError and ValueError; the message starts "data not found at" and names
      `data_dir`): no image folder and no tfds dir.
  """
  from asoftmax.data import tfds_data  # pylint: disable=g-import-not-at-top  (cheap: tfds itself is lazy)

  tfds_data.check_loader(loader, ("folder", "tfds"))
  folder = find_image_folder(data_dir)
  if folder is not None:
    cached = _read_cache(cache_path, folder, loader) if cache_path and os.path.exists(cache_path) else None
    if cached is not None:
      x, y, classes = cached
    else:
      if loader == "tfds":
        x, y, classes = tfds_data.read_image_folder_tfds(folder)
      else:
        x, y, classes = read_image_folder(folder, max_per_class=max_per_class)
      if cache_path:
        meta = {"sha256": _images_sha256(x, y, classes), "folder": os.path.abspath(folder), "loader": loader}
        with results.atomic_path(cache_path, suffix=".npz") as tmp:
          np.savez(tmp, x=x, y=y, classes=np.asarray(classes), meta=np.asarray(json.dumps(meta)))
    how = "tfds ImageFolder" if loader == "tfds" else "image folder"
    source = f"{how} {os.path.abspath(folder)} ({len(y)} images)"
  elif tfds_dir:
    s = tfds_data.load_prepared("eurosat/rgb", tfds_dir)
    x, y, classes = s.x_train, s.y_train, s.class_names
    source = f"tfds eurosat/rgb in {os.path.abspath(tfds_dir)} ({len(y)} images)"
  else:
    where = os.path.join(data_dir, "eurosat", "2750") if data_dir else "<data_dir unset: set ASOFTMAX_DATA_DIR>"
    raise tfds_data.DataNotFoundError(f"data not found at {where} (data_dir = {data_dir!r})")
  tr, te = stratified_split(y, test_fraction, seed)
  return ImageSplits(x[tr], y[tr], x[te], y[te], source, classes)
