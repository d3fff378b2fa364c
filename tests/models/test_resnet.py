"""EuroSAT ResNet (asoftmax/models/resnet.py): the final layer is A, features are sparse ReLU activations,
BatchNorm statistics are part of the checksummed weights file, and training with flips/rotations learns."""

import numpy as np
import pytest
from flax import nnx

from asoftmax.models import resnet, train


def _tiny(seed=0):
  return resnet.EuroSATResNet(channels=(4, 8), blocks=(1, 1), width=32, rngs=nnx.Rngs(seed))


def _blobs(n=96, seed=0):
  """Two classes: class 1 has a bright centre square (unchanged by the 8 flips/rotations), class 0 only noise."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n).astype(np.int32)
  x = rng.integers(0, 80, (n, 64, 64, 3)).astype(np.uint8)
  x[y == 1, 16:48, 16:48] = 255  # class 1: a bright centre (invariant under the 8 symmetries)
  return x, y


def test_space_to_depth_matches_loops():
  x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  got = np.asarray(resnet.space_to_depth(x, 2))
  assert got.shape == (2, 2, 3, 12)
  for i in range(2):
    for j in range(3):
      np.testing.assert_array_equal(got[:, i, j], x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(2, 12))
  with pytest.raises(ValueError, match="multiples of the stem block"):
    resnet.space_to_depth(np.zeros((1, 5, 4, 3)), 2)


def test_features_head_is_a_and_bad_blocks():
  m = _tiny()
  x, _ = _blobs(5)
  f = train.extract_features(m, x)
  assert f.shape == (5, 32) and (f >= 0).all()
  np.testing.assert_allclose(f @ np.asarray(m.head_matrix()).T, np.asarray(m(x)), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="blocks"):
    resnet.EuroSATResNet(channels=(4, 8), blocks=(1,), rngs=nnx.Rngs(0))


def test_training_learns_and_batch_stats_are_cached(tmp_path):
  x, y = _blobs(128)
  m = _tiny()
  path = str(tmp_path / "w.safetensors")
  fit = lambda: train.train_classifier(m, x, y, epochs=10, batch_size=32, learning_rate=3e-3, seed=0,
                                       augment_flips=True, augment_rot90=True, warmup_steps=2)
  meta, cached = train.train_or_load(m, path, fit)
  assert not cached and meta["steps"] == 40 and train.accuracy(m, x, y) > 0.9  # eval mode: running statistics
  m2 = _tiny(seed=5)
  _, cached2 = train.train_or_load(m2, path, fit)
  assert cached2
  means = [np.asarray(v) for v in jax_leaves(nnx.state(m2, nnx.BatchStat))]
  assert any(np.abs(v).max() > 0 for v in means)  # running statistics came back from the file
  np.testing.assert_array_equal(np.asarray(m2(x[:7])), np.asarray(m(x[:7])))


def jax_leaves(tree):
  import jax

  return jax.tree_util.tree_leaves(tree)


def test_dihedral_augment_is_a_symmetry():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
  out = train._dihedral_augment(np.random.default_rng(1), x)
  seen = set()
  for a, b in zip(x, out):
    cands = [np.rot90(f, r) for f in (a, a[::-1]) for r in range(4)]
    k = [i for i, c in enumerate(cands) if np.array_equal(c, b)]
    assert k
    seen.add(k[0])
  assert len(seen) == 8  # all 8 symmetries of the square occur
