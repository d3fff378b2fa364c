"""asoftmax.rff.gradient_bias against an exact numpy enumeration of E[g'] (tiny n, m = 1 and 2)."""

import itertools

import jax
import numpy as np
import pytest

from asoftmax import rff


def exact_expected_gradient(logits, q, t, m):
  """E[g'] by enumerating every m-tuple of negatives drawn i.i.d. from q~ (numpy, float64)."""
  n = len(logits)
  e = np.exp(logits - logits.max())
  qt = q.copy()
  qt[t] = 0.0
  qt /= qt.sum()
  neg = [i for i in range(n) if i != t]
  mean = np.zeros(n)
  for s in itertools.product(neg, repeat=m):
    prob = np.prod([qt[j] for j in s])
    w = np.array([e[j] / (m * qt[j]) for j in s])
    zhat = e[t] + w.sum()
    g = np.zeros(n)
    for j, wj in zip(s, w):
      g[j] += wj / zhat
    g[t] += e[t] / zhat - 1.0
    mean += prob * g
  return mean


@pytest.mark.parametrize("m", [1, 2])
def test_monte_carlo_bias_matches_exact_enumeration(m):
  rng = np.random.default_rng(m)
  logits = rng.normal(size=6) * 2.0
  q = np.exp(rng.normal(size=6))
  q /= q.sum()
  t = 2
  p = np.exp(logits - logits.max())
  p /= p.sum()
  g_full = p.copy()
  g_full[t] -= 1.0
  want = np.linalg.norm(exact_expected_gradient(logits, q, t, m) - g_full)
  assert want > 1e-3  # a proposal far from p: the bias is resolvable
  got = rff.gradient_bias(jax.random.key(0), np.float32(logits), np.log(q).astype(np.float32), t, m, 40_000, 4_000)
  assert abs(float(got.bias) - want) < 4 * float(got.noise_floor) + 1e-4, (float(got.bias), want)


def test_exact_proposal_is_unbiased_and_first_order_zero():
  logits = np.array([3.0, 1.0, 0.5, -2.0, 0.0], np.float32)
  got = rff.gradient_bias(jax.random.key(1), logits, np.asarray(jax.nn.log_softmax(logits)), 1, 3, 4000, 1000)
  assert float(got.bias) < 3 * float(got.noise_floor)
  assert float(got.first_order) < 1e-6


def test_first_order_prediction_matches_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=7).astype(np.float32)
  q = np.exp(rng.normal(size=7))
  q /= q.sum()
  t, m = 4, 5
  e = np.exp(logits.astype(np.float64) - logits.max())
  qt = q.copy()
  qt[t] = 0
  qt /= qt.sum()
  Z, Zt = e.sum(), e.sum() - e[t]
  neg = np.arange(7) != t
  V = np.sum(np.where(neg, e**2 / np.where(neg, qt, 1), 0)) - Zt**2
  pred = (e * V / Z**3 - np.where(neg, (e**2 / np.where(neg, qt, 1) - Zt * e) / Z**2, 0)) / m
  got = rff.gradient_bias(jax.random.key(0), logits, np.log(q).astype(np.float32), t, m, 100, 100)
  np.testing.assert_allclose(float(got.first_order), np.linalg.norm(pred), rtol=1e-4)


def test_bad_arguments():
  with pytest.raises(ValueError, match="m must be >= 1"):
    rff.gradient_bias(jax.random.key(0), np.zeros(3, np.float32), np.zeros(3, np.float32), 0, 0, 10)
  with pytest.raises(ValueError, match="multiple of chunk"):
    rff.gradient_bias(jax.random.key(0), np.zeros(3, np.float32), np.zeros(3, np.float32), 0, 1, 10, 3)
