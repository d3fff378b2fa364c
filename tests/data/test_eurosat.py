"""EuroSAT loader on generated image folders, and the "not run" rows when the data is absent."""

import os

import numpy as np
import pytest
from PIL import Image

from asoftmax.data import eurosat


def _folder(root, n_per_class=5, classes=("Forest", "AnnualCrop", "River"), size=64, ext=".png"):
  rng = np.random.default_rng(0)
  imgs = {}
  for c in classes:
    os.makedirs(os.path.join(root, c), exist_ok=True)
    for i in range(n_per_class):
      a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
      Image.fromarray(a).save(os.path.join(root, c, f"{c}_{i}{ext}"))
      imgs[(c, i)] = a
  return imgs


def test_read_image_folder_exact_pixels(tmp_path):
  imgs = _folder(str(tmp_path))
  x, y, classes = eurosat.read_image_folder(str(tmp_path))
  assert classes == ("AnnualCrop", "Forest", "River")  # sorted: class id = sorted position
  assert x.shape == (15, 64, 64, 3) and x.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(y), [5, 5, 5])
  np.testing.assert_array_equal(x[0], imgs[("AnnualCrop", 0)])  # PNG is lossless
  np.testing.assert_array_equal(x[5], imgs[("Forest", 0)])


def test_jpg_and_resize(tmp_path):
  _folder(str(tmp_path), n_per_class=2, size=40, ext=".jpg")
  x, y, _ = eurosat.read_image_folder(str(tmp_path))
  assert x.shape == (6, 64, 64, 3)


@pytest.mark.parametrize("layout", ["eurosat/2750", "2750", ""])
def test_load_eurosat_layouts_split_and_cache(tmp_path, layout):
  root = tmp_path / "data"
  _folder(str(root / layout) if layout else str(root), n_per_class=10)
  cache = str(tmp_path / "cache.npz")
  s = eurosat.load_eurosat(str(root), test_fraction=0.2, seed=3, cache_path=cache)
  assert len(s.y_train) == 24 and len(s.y_test) == 6
  np.testing.assert_array_equal(np.bincount(s.y_test), [2, 2, 2])
  assert os.path.exists(cache) and s.source.startswith("image folder")
  s2 = eurosat.load_eurosat(str(root), test_fraction=0.2, seed=3, cache_path=cache)
  np.testing.assert_array_equal(s.x_test, s2.x_test)
  np.testing.assert_array_equal(s.y_train, s2.y_train)


def test_missing_data_message(tmp_path):
  with pytest.raises(FileNotFoundError, match="data not found at .*eurosat/2750"):
    eurosat.load_eurosat(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="ASOFTMAX_DATA_DIR"):
    eurosat.load_eurosat("")


def test_experiment_rows_say_not_run_when_data_absent(tmp_path):
  from experiments import registry

  config = registry.load_config("configs/adaptive/eurosat.py")
  config.data_dir = str(tmp_path / "nowhere")
  import jax

  out = registry.get("adaptive_eurosat").run(config, str(tmp_path / "work"), jax.random.key(0))
  assert len(out.rows) == len(config.ks) * len(config.deltas) * len(config.modes)
  assert {r["mode"] for r in out.rows} == set(config.modes)
  for r in out.rows:
    assert r["status"].startswith("not run: data not found at ")
    assert r["gain"] is None and r["success"] is None  # typed rows: every column present, no numbers
