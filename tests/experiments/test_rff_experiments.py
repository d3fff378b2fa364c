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
  r = rf_lm.train_one(H, (jax.random.key(1), jax.random.key(2)), model, lambda s: (X, y), (X, y),
                      np.ones(40), "full", None, None)
  assert r.test_perplexity < 0.7 * before
  assert r.steps == 60 and not r.plateau and r.dev_curve == ()  # plateau rule off by default: fixed steps


def test_plateau_rule_stops_after_patience_non_improving_evaluations():
  rule = lambda ppl: rf_lm.plateau_index(ppl, patience=3, min_rel_improvement=0.01)
  assert rule([100.0, 90.0, 80.0, 70.0, 60.0, 50.0]) is None  # improving by > 1 % every time
  # Best 80 at index 2; 79.5 (0.6 %), 81, 79.3 (0.9 % below 80) do not count: stop at index 5.
  assert rule([100.0, 90.0, 80.0, 79.5, 81.0, 79.3, 10.0]) == 5
  # A slow creep of 0.6 % per evaluation adds up against the stored best and resets the count.
  assert rule([100.0, 99.4, 98.8, 98.2, 97.6, 97.0]) is None
  assert rule([100.0, 100.0, 100.0]) is None  # only 2 stale evaluations
  assert rule([100.0, 100.0, 100.0, 100.0]) == 3
  assert rf_lm.plateau_index([5.0, 5.0], patience=1, min_rel_improvement=0.0) == 1  # equal is no improvement


def _plateau_h(**kw):
  class H:
    tau, dim, steps, learning_rate, eval_batch = 8.0, 8, 6, 3e-2, 128
    rebuild_every, tree_refresh = 3, "touched"
    rff_nu, rff_kappa, tree_precompute = 4.0, 0.01, "true"
    plateau, eval_every, patience, min_rel_improvement, max_steps, negatives = False, 2, 2, 0.005, 6, "per_query"

    def get(self, k, default=None):
      return getattr(self, k, default)

  h = H()
  for k, v in kw.items():
    setattr(h, k, v)
  return h


def test_plateau_training_reports_curve_and_max_steps_reached():
  from flax import nnx

  from asoftmax.models import FeatureHead

  rng = np.random.default_rng(0)
  X = rng.normal(size=(256, 12)).astype(np.float16)
  y = (np.abs(X[:, 0].astype(np.float32)) * 10).astype(np.int32) % 40
  h = _plateau_h(plateau=True, eval_every=2, patience=2, min_rel_improvement=0.005, max_steps=6)
  model = FeatureHead(40, 12, 8, rngs=nnx.Rngs(params=jax.random.key(0)))
  r = rf_lm.train_one(h, (jax.random.key(1), jax.random.key(2)), model, lambda s: (X, y), (X, y),
                      np.ones(40), "full", None, None, dev_data=(X[:64], y[:64]))
  # Full softmax with lr 3e-2 keeps improving over 6 steps: no plateau, every evaluation recorded.
  assert [s for s, _ in r.dev_curve] == [2, 4, 6] and r.steps == 6 and not r.plateau
  assert r.dev_curve[-1][1] < r.dev_curve[0][1]
  # A learning rate of 0 never improves: the rule fires after `patience` stale evaluations (steps 4, 6).
  h0 = _plateau_h(plateau=True, eval_every=2, patience=2, min_rel_improvement=0.005, max_steps=20, learning_rate=0.0)
  model = FeatureHead(40, 12, 8, rngs=nnx.Rngs(params=jax.random.key(0)))
  r0 = rf_lm.train_one(h0, (jax.random.key(1), jax.random.key(2)), model, lambda s: (X, y), (X, y),
                       np.ones(40), "full", None, None, dev_data=(X[:64], y[:64]))
  assert r0.plateau and r0.steps == 6 and len(r0.dev_curve) == 3


def test_shared_negatives_train_end_to_end_with_finite_perplexity():
  from flax import nnx

  from asoftmax.models import FeatureHead

  rng = np.random.default_rng(1)
  X = rng.normal(size=(128, 12)).astype(np.float16)
  y = rng.integers(0, 40, 128).astype(np.int32)
  for name, D in (("rff", 16), ("unigram", None), ("exact", None)):
    model = FeatureHead(40, 12, 8, rngs=nnx.Rngs(params=jax.random.key(0)))
    before = rf_lm.evaluate(model, X, y, _plateau_h())
    r = rf_lm.train_one(_plateau_h(negatives="shared"), (jax.random.key(1), jax.random.key(2)), model,
                        lambda s: (X, y), (X, y), np.ones(40), name, 5, D)
    assert np.isfinite(r.test_perplexity) and r.test_perplexity != before and r.steps == 6, name
  with np.testing.assert_raises(ValueError):
    rf_lm.train_one(_plateau_h(negatives="batch"), (jax.random.key(1), jax.random.key(2)), model,
                    lambda s: (X, y), (X, y), np.ones(40), "uniform", 5, None)


def test_dev_positions_are_held_out_of_every_training_batch():
  h = _plateau_h(plateau=True, max_steps=50, batch=64, dev_chunks=2, window=16)
  pos, dev = rf_lm.feature_positions(h, jax.random.key(0), 8 * 16)
  assert pos.shape == (50, 64) and list(dev) == list(range(6 * 16, 8 * 16))
  assert not set(pos.ravel()) & set(dev) and pos.max() == 6 * 16 - 1 and pos.min() == 0
  again, _ = rf_lm.feature_positions(h, jax.random.key(0), 8 * 16)
  np.testing.assert_array_equal(pos, again)  # same key -> same batches
  # Off by default: every position trains, batches as before (h.steps rows over all positions).
  off = _plateau_h(batch=64, dev_chunks=0, window=16)
  pos0, dev0 = rf_lm.feature_positions(off, jax.random.key(0), 8 * 16)
  assert pos0.shape == (6, 64) and dev0.size == 0
  np.testing.assert_array_equal(pos0, np.asarray(jax.random.randint(jax.random.key(0), (6, 64), 0, 128)))
