"""Pieces of the RF-softmax classification experiment (the `:smoke` run is in test_smoke_configs.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import registry
from experiments.rff import classification as cls


def test_teacher_prior_and_peakedness_are_controlled():
  n = 256
  flat = cls.make_teacher(jax.random.key(0), n, 8, 8, "flat", 1.0)
  zipf = cls.make_teacher(jax.random.key(0), n, 8, 8, "zipf", 1.0)
  X = jax.random.normal(jax.random.key(1), (2000, 8))
  # the Zipf prior makes the label marginal skewed; the flat one does not
  for teacher, lo, hi in ((flat, 0.0, 0.05), (zipf, 0.1, 1.0)):
    p = jax.nn.softmax(cls.teacher_logits(teacher, X, 4.0), -1).mean(0)
    assert lo <= float(p.max()) <= hi
  # a larger tau gives a more peaked softmax
  top = [float(jax.nn.softmax(cls.teacher_logits(flat, X, t), -1).max(-1).mean()) for t in (4.0, 16.0)]
  assert top[1] > 3 * top[0]
  with pytest.raises(ValueError, match="prior"):
    cls.make_teacher(jax.random.key(0), n, 8, 8, "pareto", 1.0)


def test_eval_metrics_match_numpy():
  rng = np.random.default_rng(0)
  params = {"W": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), "C": jnp.asarray(rng.normal(size=(40, 6)),
                                                                                       jnp.float32)}
  X, y = rng.normal(size=(300, 5)).astype(np.float32), rng.integers(0, 40, 300)
  got = cls.evaluate(params, X, jnp.asarray(y), 7.0)
  h = X @ np.asarray(params["W"], np.float64).T
  h /= np.linalg.norm(h, axis=1, keepdims=True)
  C = np.asarray(params["C"], np.float64)
  C /= np.linalg.norm(C, axis=1, keepdims=True)
  o = 7.0 * h @ C.T
  nll = np.log(np.exp(o).sum(1)) - o[np.arange(300), y]
  top5 = np.argsort(-o, 1)[:, :5]
  assert got["perplexity"] == pytest.approx(np.exp(nll.mean()), rel=1e-4)
  assert got["p_at_1"] == pytest.approx((top5[:, 0] == y).mean())
  assert got["p_at_5"] == pytest.approx((top5 == y[:, None]).any(1).mean() / 5)


def test_equal_time_picks_the_last_checkpoint_within_full_softmax_time():
  curve = [{"step": s, "perplexity": 100.0 / s} for s in (10, 20, 40)]
  full = {"ms_per_step": 1.0, "curve": curve}
  assert cls._equal_time({"ms_per_step": 2.0, "curve": curve}, full, 40)["step"] == 20
  assert cls._equal_time({"ms_per_step": 1.0, "curve": curve}, full, 40)["step"] == 40
  assert cls._equal_time({"ms_per_step": 5.0, "curve": curve}, full, 40) is None


def test_config_rejects_unknown_sampler_and_variant():
  c = registry.load_config("configs/rff/classification.py", "smoke")
  with c.unlocked():
    c.samplers = ("full", "quadratic")
  with pytest.raises(ValueError, match="unknown samplers"):
    cls._specs(c)
  with pytest.raises(ValueError, match="unknown variant"):
    registry.load_config("configs/rff/classification.py", "huge")


def test_shared_negatives_train_and_bad_mode_raises():
  c = registry.load_config("configs/rff/classification.py", "smoke")
  n, tau = c.num_classes, 8.0
  teacher = cls.make_teacher(jax.random.key(0), n, c.teacher_dim, c.input_dim, "zipf", 1.0)
  data = cls.draw_data(jax.random.key(1), teacher, tau, c.steps, c.batch, c.input_dim)
  Xt, yt = cls.draw_data(jax.random.key(2), teacher, tau, 1, c.test_size, c.input_dim)
  counts = np.bincount(np.asarray(data[1]).ravel(), minlength=n).astype(float)
  spec = {"sampler": "rff", "D": 16, "nu": 2.0, "kappa": 0.01}
  with c.unlocked():
    c.negatives = "shared"
  r = cls.train_one(c, spec, tau, jax.random.key(3), data, (Xt[0], yt[0]), counts)
  assert np.isfinite(r["perplexity"]) and 0 <= r["p_at_1"] <= 1 and "TV_vs_leaf_clamp" in r
  with c.unlocked():
    c.negatives = "both"
  with pytest.raises(ValueError, match="negatives"):
    cls.train_one(c, spec, tau, jax.random.key(3), data, (Xt[0], yt[0]), counts)
