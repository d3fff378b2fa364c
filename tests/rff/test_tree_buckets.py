"""Bucketed RF-softmax tree (`rff_bucket_sampler`, `tree.build_bucket_tree`): exact log q, draws, updates, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from asoftmax import rff
from asoftmax.rff import features as features_lib
from asoftmax.rff import tree as tree_lib


def _unit(key, shape):
  return rff.normalize(jax.random.normal(jax.random.key(key), shape))


def _numpy_bucket_log_q(psi, h, C, W, nu, bucket, kappa, path_probs):
  """Reference in float64: bucket sums of phi(c), heap, product of clamped branch probabilities per bucket,
  times the in-bucket softmax of nu h.c; every leaf enumerated."""
  n = C.shape[0]
  C = np.asarray(C, np.float64)
  W = np.asarray(W, np.float64)
  z = C @ W.T
  phi = np.concatenate([np.cos(z), np.sin(z)], 1) / np.sqrt(W.shape[0])
  nb = -(-n // bucket)
  P = 1 << int(np.ceil(np.log2(max(nb, 1))))
  nodes = np.zeros((2 * P, phi.shape[1]))
  counts = np.zeros(2 * P)
  for i in range(n):
    nodes[P + i // bucket] += phi[i]
    counts[P + i // bucket] += 1
  for k in range(P - 1, 0, -1):
    nodes[k] = nodes[2 * k] + nodes[2 * k + 1]
    counts[k] = counts[2 * k] + counts[2 * k + 1]
  qb = path_probs(psi, nodes, counts, n, kappa)
  s = nu * (C @ np.asarray(h, np.float64))
  q = np.zeros(n)
  for j in range(nb):
    sl = slice(j * bucket, min(n, (j + 1) * bucket))
    e = np.exp(s[sl] - s[sl].max())
    q[sl] = qb[j] * e / e.sum()
  return q, nodes


@pytest.mark.parametrize("n,bucket,kappa", [(37, 4, 0.01), (64, 8, 0.0), (5, 2, 0.1), (30, 1, 0.01)])
def test_bucket_probabilities_equal_enumeration(n, bucket, kappa, numpy_path_probs):
  """Dense log q of the bucketed sampler = enumerated path product x in-bucket kernel softmax (clamping active)."""
  d, D, nu = 6, 8, 3.0  # small D: negative node estimates, the clamp is active
  C, h = _unit(2, (n, d)), _unit(4, (3, d))
  s = rff.rff_bucket_sampler(jax.random.key(3), D, nu, bucket=bucket, kappa=kappa)
  st = s.init(C)
  lq = np.asarray(s.log_probs(st, h), np.float64)
  psi = np.asarray(features_lib.rff_map(h, st.W))
  for b in range(3):
    ref, nodes = _numpy_bucket_log_q(psi[b], h[b], st.class_vectors, st.W, nu, bucket, kappa, numpy_path_probs)
    np.testing.assert_allclose(np.asarray(st.tree.nodes), nodes, atol=2e-5)
    np.testing.assert_allclose(np.exp(lq[b]), ref, rtol=3e-4, atol=1e-7)
    np.testing.assert_allclose(ref.sum(), 1.0, rtol=1e-6)
    assert (ref > 0).all()
  # bucket = 1 draws what rff_sampler draws (the in-bucket softmax of one class is 1)
  if bucket == 1:
    base = rff.rff_sampler(jax.random.key(3), D, nu, kappa=kappa)
    np.testing.assert_allclose(lq, np.asarray(base.log_probs(base.init(C), h)), atol=1e-4)


def test_chunked_build_equals_dense_build():
  """Block-by-block build (several blocks, padding) equals build_tree on the dense feature table."""
  n, d, D, b = 300, 5, 16, 8
  C = _unit(20, (n, d))
  W = rff.init_rff(jax.random.key(21), d, D, 2.0)
  fn = lambda x: features_lib.rff_map(x, W)
  small = jax.jit(lambda c: tree_lib.build_bucket_tree(c, fn, 2 * D, b, block_bytes=4 * b * 2 * D * 4))(C)
  dense = rff.build_tree(fn(C), bucket=b)
  np.testing.assert_allclose(small.nodes, dense.nodes, atol=1e-5)
  np.testing.assert_array_equal(small.counts, dense.counts)
  assert (small.num_classes, small.bucket) == (n, b)


# One sampler for the statistical tests (one compile, many seeded inputs).
_N, _D_IN, _B = 2000, 8, 16
_S = rff.rff_bucket_sampler(jax.random.key(40), 32, 4.0, bucket=_B, kappa=0.01)


@jax.jit
def _draw_and_dense(key, C, h):
  st = _S.init(C)
  k1, k2 = jax.random.split(key)
  ids, lq = _S.sample(st, k1, h, 20000)
  ids_s, lq_s = _S.sample(st, k2, h, 20000, shared=True)
  return ids, lq, _S.log_probs(st, h), ids_s, lq_s, _S.log_probs(st, h, shared=True)


def _chi2_pvalue(ids, p, m):
  """Chi-square of draws against p with classes pooled into bins of expected count >= 20 (in q order)."""
  obs = np.bincount(ids, minlength=p.size).astype(np.float64)
  order = np.argsort(p)
  e, o = p[order] * m, obs[order]
  edges = np.searchsorted(np.cumsum(e), np.arange(20.0, m, 20.0))
  be = np.add.reduceat(e, np.unique(np.r_[0, edges[edges < p.size]]))
  bo = np.add.reduceat(o, np.unique(np.r_[0, edges[edges < p.size]]))
  return scipy.stats.chisquare(bo, be * bo.sum() / be.sum()).pvalue


def test_draws_follow_log_q_over_many_seeds():
  """n = 2,000, buckets of 16: for 12 seeded inputs (class tables, queries, one of them all queries equal and one
  with the classes clustered around the query: hard inputs), per-query and shared draws pass a chi-square test at
  alpha = 0.01, and returned log q equals the dense log q of the drawn ids. Failures allowed by a binomial bound:
  P(Binom(24, 0.01) >= 3) < 0.002."""
  fails, trials = 0, 0
  for seed in range(12):
    C = jax.random.normal(jax.random.key(100 + seed), (_N, _D_IN))
    h = _unit(200 + seed, (2, _D_IN))
    if seed == 0:
      h = jnp.repeat(h[:1], 2, 0)
    if seed == 1:  # classes near the query: very peaked kernel
      C = C * 0.05 + h[0]
    ids, lq, dense, ids_s, lq_s, dense_s = (np.asarray(x) for x in _draw_and_dense(jax.random.key(seed), C, h))
    np.testing.assert_allclose(np.take_along_axis(dense, ids, 1), lq, atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(dense_s[ids_s], lq_s, atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(np.exp(dense.astype(np.float64)).sum(1), 1.0, rtol=1e-4)
    for b in range(2):
      fails += _chi2_pvalue(ids[b], np.exp(dense[b].astype(np.float64)), ids.shape[1]) < 0.01
    fails += _chi2_pvalue(ids_s, np.exp(dense_s.astype(np.float64)), ids_s.shape[0]) < 0.01
    trials += 3
  assert trials == 36 and fails <= 3, fails  # P(Binom(36, 0.01) >= 4) < 6e-4


def test_update_of_changed_rows_equals_rebuild():
  n, d, b = 50, 6, 4
  C, h = _unit(11, (n, d)), _unit(12, (3, d))
  C2 = C.at[3:9].set(_unit(13, (6, d)))
  ids = jnp.array([[3, 4, 5], [6, 7, 8], [3, 3, 20]])  # same-bucket changes, duplicates and an untouched id
  s = rff.rff_bucket_sampler(jax.random.key(1), 32, 2.0, bucket=b)
  up = s.update(s.init(C), ids, C2)
  re = s.init(C2)
  np.testing.assert_allclose(up.tree.nodes, re.tree.nodes, atol=2e-5)
  np.testing.assert_allclose(s.log_probs(up, h), s.log_probs(re, h), atol=2e-5)
  np.testing.assert_allclose(up.class_vectors, re.class_vectors, atol=1e-6)


def test_memory_at_a_million_classes_and_bad_input():
  # D = 1024 frequencies (F = 2D) at n = 1e6: one-class leaves need 16 GiB, buckets of 32 need 0.5 GiB.
  assert tree_lib.tree_nbytes(10**6, 2048, 1) == 16 * 2**30
  assert tree_lib.tree_nbytes(10**6, 2048, 32) == 2**29
  assert tree_lib.bucket_for_budget(10**6, 2048, 2**30) == 16
  with pytest.raises(ValueError, match="bucket"):
    rff.rff_bucket_sampler(jax.random.key(0), 8, 1.0, bucket=0)
  with pytest.raises(ValueError, match="max_bytes"):
    tree_lib.bucket_for_budget(10, 2048, 100)
