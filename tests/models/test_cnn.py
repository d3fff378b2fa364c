"""CNN classifiers: final layer is A (logits = features @ A.T), training, safetensors caching, and the
classification protocol (k = 3) on a small trained head."""

import numpy as np
import pytest
from flax import nnx

from asoftmax.models import cnn, train
from experiments import registry
from experiments.adaptive import classification, paper


def _digits(n=256, seed=0):
  """Tiny learnable problem: class c has a bright 7x7 block at a class-specific place, plus noise."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 10, n).astype(np.int32)
  x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
  for i, c in enumerate(y):
    r, col = 3 + 7 * (c // 4), 3 + 6 * (c % 4)
    x[i, r:r + 7, col:col + 6] = 255
  return x, y


def test_mnist_cnn_shapes_and_head_is_a():
  m = cnn.MnistCNN(rngs=nnx.Rngs(0))
  x, _ = _digits(6)
  feats = train.extract_features(m, x)
  assert feats.shape == (6, 25088) and m.dim == 25088  # the paper's d
  A = np.asarray(m.head_matrix())
  assert A.shape == (10, 25088)
  assert (feats >= 0).all() and (feats == 0).any()  # ReLU features
  logits = np.asarray(m(x))
  np.testing.assert_allclose(feats.astype(np.float64) @ A.T.astype(np.float64), logits, rtol=1e-4, atol=1e-4)


def test_eurosat_cnn_shapes_and_head_is_a():
  m = cnn.EuroSATCNN(channels=(4, 8, 8), width=128, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  feats = train.extract_features(m, x)
  assert feats.shape == (3, 128)
  np.testing.assert_allclose(feats @ np.asarray(m.head_matrix()).T, np.asarray(m(x)), rtol=1e-4, atol=1e-4)


def test_bad_image_shape_raises():
  m = cnn.MnistCNN(channels=(4, 8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="images must be"):
    m(np.zeros((2, 28, 28, 3), np.uint8))


def test_training_learns_and_is_deterministic():
  x, y = _digits(512)
  accs, params = [], []
  for _ in range(2):
    m = cnn.MnistCNN(channels=(4, 8), rngs=nnx.Rngs(0))
    before = train.accuracy(m, x, y)
    h = train.train_classifier(m, x, y, epochs=3, batch_size=64, learning_rate=3e-3, seed=0, progress=False)
    assert h["steps"] == 24
    accs.append(train.accuracy(m, x, y))
    params.append(np.asarray(m.head_matrix()))
  assert before < 0.4 and accs[0] > 0.9
  np.testing.assert_array_equal(params[0], params[1])  # same seed -> same weights


def test_safetensors_cache_roundtrip(tmp_path):
  x, y = _digits(128)
  m = cnn.MnistCNN(channels=(4, 8), rngs=nnx.Rngs(0))
  path = str(tmp_path / "w.safetensors")
  calls = []

  def fit():
    calls.append(1)
    return train.train_classifier(m, x, y, epochs=1, batch_size=32, progress=False)

  meta, cached = train.train_or_load(m, path, fit)
  assert not cached and len(calls) == 1 and meta["steps"] == 4
  m2 = cnn.MnistCNN(channels=(4, 8), rngs=nnx.Rngs(7))
  meta2, cached2 = train.train_or_load(m2, path, fit)
  assert cached2 and len(calls) == 1 and meta2["steps"] == 4
  np.testing.assert_array_equal(np.asarray(m2(x[:5])), np.asarray(m(x[:5])))
  _, cached3 = train.train_or_load(m2, path, fit, retrain=True)
  assert not cached3 and len(calls) == 2
  other = cnn.MnistCNN(channels=(4, 16), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="does not match"):
    train.load_params(other, path)


def test_topk3_rows_on_a_trained_head():
  import jax
  import ml_collections

  x, y = _digits(400)
  m = cnn.MnistCNN(channels=(4, 8), rngs=nnx.Rngs(0))
  train.train_classifier(m, x, y, epochs=2, batch_size=64, learning_rate=3e-3, progress=False)
  X = train.extract_features(m, x[:60])
  A = np.asarray(m.head_matrix())
  cfg = ml_collections.ConfigDict(dict(ks=(3,), deltas=(0.1,), epsilon=0.3, n_tune=20, beta=1.0,
                                       order="importance"))
  rows = classification.adaptive_rows(cfg, jax.random.key(0), A, X, {"dataset": "MNIST", "key": "mnist"})
  (r,) = rows
  assert r["k"] == 3 and r["n_eval"] == 40 and r["d"] == 14 * 14 * 8
  assert 0 <= r["success_lo"] <= r["success"] <= r["success_hi"] <= 1
  assert r["samples_mean"] > 0 and r["gain"] == pytest.approx(10 * r["d"] / r["samples_mean"])
  assert r["paper_gain"] is None and "k > 1" in r["paper_ref"]
  assert len(r["samples"]) == 40


def test_paper_entry_lookup():
  ref = paper.CLASSIFICATION["mnist"]["reference_repo"]
  e = classification.paper_entry("mnist", 0.01)
  assert e["paper_gain"] == ref["gain"][0.01] and e["paper_success"] == ref["success"][0.01]
  assert classification.paper_entry("mnist", 0.1)["paper_gain"] is None
  eurosat = classification.paper_entry("eurosat", 0.05)
  assert eurosat["paper_gain"] == paper.CLASSIFICATION["eurosat"]["gain_any_delta"] and eurosat["paper_success"] is None


@pytest.mark.slow
def test_full_mnist_accuracy_at_least_99(tmp_path):
  """Trains the full-config CNN on the full 60k MNIST (minutes on CPU) and checks >= 99% test accuracy."""
  from asoftmax import configlib
  from asoftmax.data import mnist

  data_dir = configlib.default_data_dir()
  if mnist.find_idx_dir(data_dir) is None:
    pytest.skip("full MNIST idx files not found (set ASOFTMAX_DATA_DIR)")
  config = registry.load_config("configs/adaptive/mnist.py")
  splits = mnist.load_mnist(data_dir)
  assert len(splits.y_train) == 60000 and len(splits.y_test) == 10000
  _, info = classification.trained_classifier(config, str(tmp_path), splits)
  assert info["test_accuracy"] >= 0.99
