"""Tests for the RF-softmax experiment helpers (bias measurement, LM data, configs)."""

import jax
import numpy as np

from asoftmax import rff
from asoftmax.data import text
from experiments import registry
from experiments.rff import bias as rf_bias
from experiments.rff import lm as rf_lm


def test_gradient_bias_exact_at_noise_floor_and_uniform_above():
  C, h, t = rf_bias.synthetic_problem(jax.random.key(0), 128, 16, 2, 1.0)
  logits = 10.0 * h @ C.T
  exact = rff.exact_sampler(10.0)
  lq_exact = exact.log_probs(exact.init(C), h)
  unif = rff.uniform_sampler(128)
  lq_unif = unif.log_probs(unif.init(), h)
  for q in range(2):
    b, floor, pred = rff.gradient_bias(jax.random.key(q), logits[q], lq_exact[q], t[q], 5, 2000, 500)
    assert b < 3 * floor and pred < 1e-3
    bu, flu, predu = rff.gradient_bias(jax.random.key(q), logits[q], lq_unif[q], t[q], 5, 2000, 500)
    assert bu > 3 * flu


def test_distribution_metrics_match_numpy():
  C, h, t = rf_bias.synthetic_problem(jax.random.key(1), 64, 8, 3, 1.0)
  logits = 6.0 * h @ C.T
  lq = jax.nn.log_softmax(0.5 * logits, -1)
  kl, tv, chi2, ent, top1 = (np.asarray(x, np.float64) for x in rff.distribution_metrics(logits, lq, t))
  p = np.asarray(jax.nn.softmax(logits, -1), np.float64)
  q = np.asarray(jax.nn.softmax(0.5 * logits, -1), np.float64)
  np.testing.assert_allclose(kl, (p * np.log(p / q)).sum(1), rtol=1e-4)
  np.testing.assert_allclose(tv, 0.5 * np.abs(p - q).sum(1), rtol=1e-4)
  np.testing.assert_allclose(top1, p.max(1), rtol=1e-5)
  for b in range(3):
    mask = np.arange(64) != int(t[b])
    pt, qt = p[b][mask] / p[b][mask].sum(), q[b][mask] / q[b][mask].sum()
    np.testing.assert_allclose(chi2[b], (pt**2 / qt).sum() - 1, rtol=1e-3)


def test_synthetic_softmax_gets_peaked_with_tau():
  C, h, t = rf_bias.synthetic_problem(jax.random.key(2), 1024, 64, 8, 1.0)
  top = [float(jax.nn.softmax(tau * h @ C.T, -1).max(-1).mean()) for tau in (5.0, 14.0)]
  assert top[0] < 0.05 < 0.3 < top[1]


def test_ptb_reader_adds_eos(tmp_path):
  p = tmp_path / "x.txt"
  p.write_text(" a b \n c\n")
  assert text.words(p.read_text()) == ["a", "b", "<eos>", "c", "<eos>"]


def test_task_config_overrides_only_that_task():
  c = registry.load_config("configs/rff/lm.py:task=smollm2")
  assert tuple(c.tasks) == ("smollm2",)
  h = rf_lm.task_config(c, "smollm2")
  assert h.dim == c.smollm2.dim != c.dim and h.rff_nu == c.rff_nu  # overridden / inherited
  assert rf_lm.task_config(c, "lstm").dim == c.dim


def test_feature_head_queries_and_full_softmax_training_lowers_loss():
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from asoftmax.models import FeatureHead

  rng = np.random.default_rng(0)
  X = rng.normal(size=(256, 12)).astype(np.float16)
  y = (np.abs(X[:, 0].astype(np.float32)) * 10).astype(np.int32) % 40  # learnable from the features
  model = FeatureHead(40, 12, 8, rngs=nnx.Rngs(params=jax.random.key(0)))
  assert model(jnp.asarray(X)).shape == (256, 8) and model.classes.shape == (40, 8)

  class H:
    tau, dim, steps, learning_rate, eval_batch = 8.0, 8, 60, 3e-2, 128
    rebuild_every, tree_refresh = 0, "rebuild"

  before = rf_lm.evaluate(model, X, y, H)
  after, _, _ = rf_lm.train_one(H, (jax.random.key(1), jax.random.key(2)), model, lambda s: (X, y), (X, y),
                                np.ones(40), "full", None, None)
  assert after < 0.7 * before
