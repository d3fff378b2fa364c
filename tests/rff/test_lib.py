"""Tests for asoftmax.rff: RFF kernel, tree sampler, samplers, losses, sparse loader."""

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


def test_rff_kernel_converges_to_exact_kernel():
  x, y = _unit(0, (200, 16)), _unit(1, (200, 16))
  y = rff.normalize(x + 0.7 * y)  # pairs at various distances
  exact = np.asarray(rff.exact_kernel(x, y, 2.0))
  errs = []
  for D in (16, 256, 4096):
    W = rff.init_rff(jax.random.key(D), 16, D, 2.0)
    errs.append(np.sqrt(np.mean((np.asarray(rff.rff_kernel(x, y, W)) - exact) ** 2)))
  # sd of the estimate is (1 - K^2)/sqrt(2D): falls ~4x per 16x D; at D=4096 below 0.02.
  assert errs[0] > 2.5 * errs[1] > 2.5 * 2.5 * errs[2]
  assert errs[2] < 0.02
  # feature vectors have unit norm exactly
  W = rff.init_rff(jax.random.key(0), 16, 64, 2.0)
  np.testing.assert_allclose(np.linalg.norm(rff.rff_features(x, W), axis=-1), 1.0, rtol=1e-5)


def test_rff_estimate_std_is_one_minus_k_squared_over_sqrt_2d():
  """Across independent W draws, sd[phi(x).phi(y)] = (1 - K^2)/sqrt(2D) (not (1-K)^2/(2D))."""
  d, D, nu, R = 8, 32, 2.0, 3000
  x = _unit(30, (1, d))
  u = _unit(31, (1, d))
  u = rff.normalize(u - (u @ x.T) * x)  # orthogonal to x
  theta = jnp.linspace(0.05, 2.5, 6)[:, None]
  y = jnp.cos(theta) * x + jnp.sin(theta) * u  # K = exp(nu (cos theta - 1)) from ~1 to ~0.02
  K = np.asarray(rff.exact_kernel(x, y, nu), np.float64)
  Ws = jax.random.normal(jax.random.key(32), (R, D, d)) * np.sqrt(nu)
  est = np.asarray(jax.vmap(lambda W: jnp.sum(features_lib.rff_map(x, W) * features_lib.rff_map(y, W), -1))(Ws))
  np.testing.assert_allclose(est.mean(0), K, atol=4 * 0.5 / np.sqrt(2 * D * R))  # unbiased
  pred = (1 - K**2) / np.sqrt(2 * D)
  np.testing.assert_allclose(est.std(0), pred, rtol=0.08)  # sd of a sample sd at R = 3000 is ~1.3 %
  assert K.min() < 0.2 and K.max() > 0.9


@pytest.mark.parametrize("n,kappa", [(13, 0.01), (32, 0.0), (5, 0.1)])
def test_tree_path_probabilities_equal_enumerated_leaf_masses(n, kappa, numpy_path_probs):
  C = _unit(2, (n, 6))
  W = rff.init_rff(jax.random.key(3), 6, 8, 3.0)  # small D: some clamped (negative) node masses
  tree = rff.build_tree(features_lib.rff_map(C, W))
  psi = features_lib.rff_map(_unit(4, (3, 6)), W)
  lq, _ = jax.jit(rff.tree_log_probs)(psi, tree, kappa)
  for b in range(3):
    ref = numpy_path_probs(psi[b], tree.nodes, tree.counts, n, kappa)
    np.testing.assert_allclose(np.exp(np.asarray(lq[b], np.float64)), ref, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(ref.sum(), 1.0, rtol=1e-6)
    assert (ref[:n] > 0).all() and (ref[n:] == 0).all()


def test_tree_samples_the_path_product_not_the_leaf_clamped_kernel(numpy_path_probs):
  """Under heavy clamping (nu = 4, D = 8) the draws follow the branch-probability product, and the
  documented-elsewhere q prop. to max(phi(h).phi(c), 0) + floor is rejected (measured TV > 0.1)."""
  n, d, m, kappa = 64, 6, 200000, 0.01
  C, h = _unit(33, (n, d)), _unit(34, (1, d))
  s = rff.rff_sampler(jax.random.key(35), 8, 4.0, kappa=kappa)
  st = s.init(C)
  psi = features_lib.rff_map(h, st.W)
  assert float((psi @ st.tree.nodes[1:].T).min()) < 0  # clamping is active at some node
  path = numpy_path_probs(psi[0], st.tree.nodes, st.tree.counts, n, kappa)[:n]
  leaf = np.exp(np.asarray(tree_lib.leaf_clamped_log_probs(psi, st.tree, kappa), np.float64)[0, :n])
  np.testing.assert_allclose(leaf.sum(), 1.0, rtol=1e-5)
  ids, _ = s.sample(st, jax.random.key(36), h, m)
  obs = np.bincount(np.asarray(ids[0]), minlength=n)
  assert scipy.stats.chisquare(obs, path * m / path.sum()).pvalue > 1e-3
  assert scipy.stats.chisquare(obs, leaf * m / leaf.sum()).pvalue < 1e-12
  tv = 0.5 * np.abs(obs / m - leaf).sum()
  assert tv > 0.1 and abs(tv - 0.5 * np.abs(path - leaf).sum()) < 0.01


def test_quadratic_tree_equals_normalized_kernel():
  """Positive kernel, no clamping: the path probability is exactly alpha (h.c)^2 + 1, normalized."""
  n, d = 50, 5
  C, h = _unit(5, (n, d)), _unit(6, (4, d))
  for bucket in (1, 4):
    s = rff.quadratic_sampler(alpha=100.0, bucket=bucket)
    lq = s.log_probs(s.init(C), h)
    k = 100.0 * np.asarray(h @ C.T, np.float64) ** 2 + 1
    np.testing.assert_allclose(np.exp(np.asarray(lq)), k / k.sum(1, keepdims=True), rtol=1e-4)


@pytest.mark.parametrize("precompute", [False, True])
def test_tree_sample_frequencies_match_path_probabilities(precompute):
  n, d, m = 21, 6, 40000
  C, h = _unit(7, (n, d)), _unit(8, (2, d))
  s = rff.rff_sampler(jax.random.key(9), 16, 4.0, kappa=0.05, precompute=precompute)
  st = s.init(C)
  lp = np.asarray(s.log_probs(st, h), np.float64)
  ids, lq = s.sample(st, jax.random.key(10), h, m)
  ids = np.asarray(ids)
  np.testing.assert_allclose(np.take_along_axis(lp, ids, 1), lq, atol=1e-4)
  for b in range(2):
    obs = np.bincount(ids[b], minlength=n)
    exp = np.exp(lp[b]) / np.exp(lp[b]).sum() * m
    assert scipy.stats.chisquare(obs, exp).pvalue > 1e-3


def test_update_touched_classes_equals_rebuild():
  n, d = 40, 6
  C, h = _unit(11, (n, d)), _unit(12, (3, d))
  C2 = C.at[3:9].set(_unit(13, (6, d)))
  ids = jnp.array([[3, 4, 5], [6, 7, 8], [3, 3, 20]])  # duplicates and an untouched id
  for s in (rff.rff_sampler(jax.random.key(1), 32, 2.0), rff.quadratic_sampler(bucket=4), rff.exact_sampler(5.0)):
    got = s.log_probs(s.update(s.init(C), ids, C2), h)
    np.testing.assert_allclose(got, s.log_probs(s.init(C2), h), atol=2e-5)


def test_exact_sampling_gives_unbiased_corrected_gradient():
  """With q = softmax, E[grad of sampled loss] equals the full-softmax gradient (Monte Carlo, 4 SE)."""
  n, d, B, m, R, tau = 30, 8, 2, 5, 4000, 4.0
  C, hraw = _unit(14, (n, d)), jax.random.normal(jax.random.key(15), (B, d))
  t = jnp.array([0, 7])
  s = rff.exact_sampler(tau)
  st = s.init(C)
  ids, lq = s.sample(st, jax.random.key(16), rff.normalize(hraw), m * R)
  ids, lq = ids.reshape(B, R, m).transpose(1, 0, 2), lq.reshape(B, R, m).transpose(1, 0, 2)
  gs = jax.jit(jax.vmap(jax.grad(lambda h, i, q: rff.sampled_softmax_loss(h, C, t, i, q, tau).sum()),
                        in_axes=(None, 0, 0)))(hraw, ids, lq)
  gfull = jax.grad(lambda h: rff.full_softmax_loss(h, C, t, tau).sum())(hraw)
  mean, se = np.asarray(gs.mean(0)), np.asarray(gs.std(0)) / np.sqrt(R)
  assert np.all(np.abs(mean - gfull) <= 4 * se + 1e-5)
  # the uniform proposal at small m is measurably biased (the test above could fail)
  su = rff.uniform_sampler(n)
  ids, lq = su.sample(su.init(), jax.random.key(17), rff.normalize(hraw), m * R)
  ids, lq = ids.reshape(B, R, m).transpose(1, 0, 2), lq.reshape(B, R, m).transpose(1, 0, 2)
  gu = jax.jit(jax.vmap(jax.grad(lambda h, i, q: rff.sampled_softmax_loss(h, C, t, i, q, tau).sum()),
                        in_axes=(None, 0, 0)))(hraw, ids, lq)
  assert np.linalg.norm(gu.mean(0) - gfull) > 3 * np.linalg.norm(gu.std(0) / np.sqrt(R))


def test_losses_match_numpy_reference():
  n, d, B, m, tau = 20, 5, 3, 7, 6.0
  C, h = np.asarray(_unit(18, (n, d))) * 3.0, np.asarray(jax.random.normal(jax.random.key(19), (B, d)))
  t = np.array([1, 2, 3])
  ids = np.array(jax.random.randint(jax.random.key(20), (B, m), 0, n))
  ids[0, 0] = 1  # an accidental hit
  lq = np.log(np.full((B, m), 1.0 / n))
  Cn = C / np.linalg.norm(C, axis=1, keepdims=True)
  hn = h / np.linalg.norm(h, axis=1, keepdims=True)
  o = tau * hn @ Cn.T
  full = np.log(np.exp(o).sum(1)) - o[np.arange(B), t]
  np.testing.assert_allclose(jax.jit(rff.full_softmax_loss, static_argnums=3)(h, C, t, tau), full, rtol=1e-5)
  ref = []
  for b in range(B):
    w = np.exp(o[b, ids[b]] - lq[b] - np.log(m)) * (ids[b] != t[b])
    ref.append(np.log(np.exp(o[b, t[b]]) + w.sum()) - o[b, t[b]])
  got = jax.jit(rff.sampled_softmax_loss, static_argnums=5)(h, C, t, ids, lq, tau)
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
  C = _unit(21, (10, 4))
  s = rff.rff_sampler(jax.random.key(0), 8, 2.0)
  st = s.init(C)
  h = _unit(22, (2, 4))
  with pytest.raises(ValueError, match="h must have unit-norm"):
    s.sample(st, jax.random.key(0), 2.0 * h, 3)
  with pytest.raises(ValueError, match="m must be >= 1"):
    s.sample(st, jax.random.key(0), h, 0)
  with pytest.raises(ValueError, match="num_features"):
    rff.rff_sampler(jax.random.key(0), 0, 2.0)
  with pytest.raises(ValueError, match="nu"):
    rff.rff_sampler(jax.random.key(0), 8, 0.0)
  with pytest.raises(ValueError, match="nu"):
    rff.init_rff(jax.random.key(0), 4, 8, -1.0)
  with pytest.raises(ValueError, match="NaN"):
    s.init(C.at[0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="NaN"):
    s.sample(st, jax.random.key(0), h.at[0, 0].set(jnp.nan), 3)
  with pytest.raises(ValueError, match="x must have unit-norm"):
    rff.rff_features(2.0 * h, rff.init_rff(jax.random.key(0), 4, 8, 1.0))
  with pytest.raises(ValueError, match="counts"):
    rff.unigram_sampler([1.0, -1.0])
  with pytest.raises(ValueError, match="h has dimension"):
    s.sample(st, jax.random.key(0), _unit(0, (2, 5)), 3)


def test_sparse_loader_on_generated_file(tmp_path):
  p = tmp_path / "tiny.txt"
  p.write_text("3 5 4\n0,2 1:0.5 4:2\n 0:1\n3 2:1.5 3:-1\n")
  ds = rff.load_sparse(str(p))
  np.testing.assert_allclose(ds.features.toarray(), [[0, .5, 0, 0, 2], [1, 0, 0, 0, 0], [0, 0, 1.5, -1, 0]])
  np.testing.assert_allclose(ds.labels.toarray(), [[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
  scores = np.array([[0.9, 0.1, 0.8, 0.0], [0, 0, 0, 1], [0, 0, 0, 1.0]])
  assert rff.precision_at_k(scores, ds.labels, 1) == pytest.approx(2 / 3)
  (tmp_path / "bad.txt").write_text("1 5 4\n9 1:1\n")
  with pytest.raises(ValueError, match="label 9"):
    rff.load_sparse(str(tmp_path / "bad.txt"))
