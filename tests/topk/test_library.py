"""asoftmax.topk against float64 numpy references: identities, certificates, certified k, search, output error.

Tolerances: computations are float32 in JAX; probabilities are compared with atol 1e-5 unless stated.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from asoftmax import topk


def _np_tail(s, valid):
  """tau_k for k = 1..N (float64), masked keys excluded."""
  out = np.zeros(s.shape)
  for idx in np.ndindex(s.shape[:-1]):
    x = np.sort(s[idx][valid[idx]].astype(np.float64))[::-1]
    p = np.exp(x - x.max())
    p /= p.sum()
    t = np.concatenate([np.cumsum(p[::-1])[::-1][1:], [0.0]])  # tail after k
    out[idx][: len(t)] = t
  return out


def _random_rows(rng, rows, N, ties=False, mask=False):
  sig = rng.uniform(0.2, 5.0, size=(rows, 1))
  s = rng.normal(size=(rows, N)) * sig
  if ties:
    s = np.round(s * 2) / 2  # many exact ties
  valid = np.ones((rows, N), bool)
  if mask:
    valid = rng.uniform(size=(rows, N)) < 0.7
    valid[:, 0] = True
  return s.astype(np.float32), valid


@pytest.mark.parametrize("ties,mask", [(False, False), (True, False), (False, True), (True, True)])
def test_tail_mass_matches_numpy(ties, mask):
  rng = np.random.default_rng(0)
  s, valid = _random_rows(rng, 64, 40, ties, mask)
  got = np.asarray(jax.jit(topk.tail_mass)(s, valid))
  np.testing.assert_allclose(got, _np_tail(s, valid), atol=2e-6, rtol=1e-4)
  assert (np.diff(got, axis=-1) <= 1e-7).all()  # nonincreasing
  n = valid.sum(-1)
  assert all((got[i, n[i] - 1:] == 0).all() for i in range(len(n)))  # tau_n = 0


def test_tail_mass_small_and_masked_with_minus_inf():
  # Tiny tails are not lost to cancellation: tau_1 = e^-20 / (1 + e^-20).
  s = np.array([[0.0, -20.0, -np.inf]], np.float32)
  t = np.asarray(topk.tail_mass(s))
  np.testing.assert_allclose(t[0, 0], np.exp(-20.0) / (1 + np.exp(-20.0)), rtol=1e-4)
  assert t[0, 1] == 0 and t[0, 2] == 0


def test_divergence_identities():
  rng = np.random.default_rng(1)
  s, valid = _random_rows(rng, 200, 32, ties=True, mask=True)
  n = valid.sum(-1)
  k = np.maximum(1, (rng.uniform(size=200) * n).astype(np.int32))
  direct = jax.jit(topk.truncated_divergences)(s, valid, k)
  tau = np.asarray(topk.tail_mass(s, valid))[np.arange(200), k - 1]
  cf = topk.divergences(tau)
  np.testing.assert_allclose(direct.tv, tau, atol=2e-6)
  np.testing.assert_allclose(direct.kl, cf.kl, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(direct.chi2, cf.chi2, atol=5e-5, rtol=1e-3)
  np.testing.assert_allclose(direct.hellinger2, cf.hellinger2, atol=5e-6)
  # TV = 1 - exp(-KL) exactly (Theorem 4.3), and it beats Pinsker.
  np.testing.assert_allclose(topk.tv_from_kl(direct.kl), direct.tv, atol=2e-6)
  assert (np.asarray(cf.tv) <= np.sqrt(np.asarray(cf.kl) / 2) + 1e-6).all()


def test_certificates_bound_true_tail_on_1000_cases():
  """Every certificate is >= the true tail mass on every k of 1,200 random rows (ties and masks included)."""
  rng = np.random.default_rng(2)
  checked = 0
  for ties in (False, True):
    for mask in (False, True):
      s, valid = _random_rows(rng, 300, 48, ties, mask)
      tau = _np_tail(s, valid)
      b = topk.tail_bounds(s, valid)
      slack = 1e-5 + 1e-4 * tau  # float32 rounding
      for name in ("single_gap", "exact_head", "multi_gap"):
        assert (np.asarray(getattr(b, name)) >= tau - slack).all(), name
      assert (np.asarray(b.multi_gap) <= np.asarray(b.exact_head) + 1e-6).all()
      assert (np.asarray(b.exact_head) <= np.asarray(b.single_gap) + 1e-6).all()
      checked += len(s)
  assert checked >= 1000


@pytest.mark.parametrize("eps", [0.1, 0.01, 1e-3])
def test_certified_k_minimal_and_within_budget(eps):
  rng = np.random.default_rng(3)
  s, valid = _random_rows(rng, 400, 64, ties=True, mask=True)
  out = topk.certified_k(s, valid, eps)
  tau = _np_tail(s, valid)
  k = np.asarray(out.exact.k)
  rows = np.arange(len(k))
  assert (tau[rows, k - 1] <= eps + 1e-6).all()
  assert ((k == 1) | (tau[rows, np.maximum(k - 2, 0)] > eps - 1e-6)).all()  # smallest such k
  for m in topk.METHODS:
    km = np.asarray(getattr(out, m).k)
    assert (km >= k).all() and (km <= valid.sum(-1)).all(), m
    assert (np.asarray(getattr(out, m).tv) <= eps + 1e-6).all(), m
    assert (np.asarray(getattr(out, m).tv) <= np.asarray(getattr(out, m).certificate) + 1e-5).all(), m


def test_blockwise_bounds_bracket_tail():
  rng = np.random.default_rng(4)
  N, M = 60, 6
  s, valid = _random_rows(rng, 300, N, mask=True)
  blocks = np.arange(N) // (N // M)
  lo, hi, sz, ex = topk.block_minmax(s, valid, blocks, M)
  in_head = np.zeros((300, M), bool)
  in_head[:, :2] = True
  tau_lo, tau_hi = topk.blockwise_bounds(lo, hi, sz, in_head)
  # True tail mass of this block partition.
  p = np.where(valid, np.exp(s - s.max(-1, keepdims=True)), 0)
  true = p[:, blocks >= 2].sum(-1) / p.sum(-1)
  assert (np.asarray(tau_lo) <= true + 1e-5).all() and (true <= np.asarray(tau_hi) + 1e-5).all()
  ex_head = np.where(in_head, np.asarray(ex), np.nan)
  _, tau_hi2 = topk.blockwise_bounds(lo, hi, sz, in_head, ex_head)  # exact head sums: tighter, still valid
  assert (true <= np.asarray(tau_hi2) + 1e-5).all() and (np.asarray(tau_hi2) <= np.asarray(tau_hi) + 1e-6).all()


@pytest.mark.parametrize("cells_fn", ["kmeans", "chunks"])
def test_mc_search_certificate_and_cell_bounds(cells_fn):
  key = jax.random.key(5)
  kq, kk, kc = jax.random.split(key, 3)
  G, Q, N, d = 4, 32, 96, 16
  keys = jax.random.normal(kk, (G, N, d)) + jnp.sin(jnp.arange(N))[None, :, None]
  q = jax.random.normal(kq, (G, Q, d)) * 1.5
  valid = np.ones((G, N), bool)
  valid[1, 50:] = False
  valid = jnp.asarray(valid)
  cells = (topk.kmeans_cells(keys, valid, kc, 10) if cells_fn == "kmeans" else topk.chunk_cells(keys, valid, 10))
  scale = 1 / np.sqrt(d)
  upper = topk.cell_upper_bounds(q, cells, scale)
  logits = jnp.einsum("gqd,gnd->gqn", q, keys) * scale
  # Every valid key's logit is below its cell's bound.
  ub_key = jnp.take_along_axis(upper, jnp.broadcast_to(jnp.minimum(cells.cell_of_key, 9)[:, None, :], logits.shape), -1)
  assert bool(jnp.all(jnp.where(valid[:, None, :], logits <= ub_key + 1e-5, True)))
  assert np.asarray(cells.sizes).sum() == int(valid.sum())
  for eps in (0.1, 0.01, 1e-3):
    r = topk.mc_search(logits, valid[:, None, :], upper, cells, eps)
    assert (np.asarray(r.certificate) <= eps).all()
    assert (np.asarray(r.tv) <= eps).all() and (np.asarray(r.tv_pruned) <= eps).all()  # no float slack
    assert (np.asarray(r.tv) <= np.asarray(r.certificate) + 1e-6).all()
    assert (np.asarray(r.tv_pruned) <= np.asarray(r.certificate_pruned) + 1e-6).all()
    assert (np.asarray(r.certificate_pruned) <= eps + 1e-7).all()
    n = np.asarray(valid.sum(-1))[:, None]
    assert (np.asarray(r.keys_scored) <= n).all() and (np.asarray(r.k_pruned) <= np.asarray(r.keys_scored)).all()


def test_output_error_identity_and_bounds():
  rng = np.random.default_rng(6)
  G, Q, N, dv = 3, 20, 40, 8
  s = (rng.normal(size=(G, Q, N)) * rng.uniform(0.5, 4, size=(G, Q, 1))).astype(np.float32)
  valid = np.ones((G, 1, N), bool)
  valid[2, :, 30:] = False
  V = (rng.normal(size=(G, N, dv)) + 3.0).astype(np.float32)
  k = rng.integers(1, 30, size=(G, Q)).astype(np.int32)
  e = topk.output_error(s, valid, V, k)
  # numpy reference
  vb = np.broadcast_to(valid, s.shape)
  x = np.where(vb, s.astype(np.float64), -np.inf)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  order = np.argsort(-x, -1, kind="stable")
  rank = np.argsort(order, -1)
  head = (rank < k[..., None]) & vb
  ph = np.where(head, p, 0)
  ph /= ph.sum(-1, keepdims=True)
  attn, attn_k = np.einsum("gqn,gnd->gqd", p, V), np.einsum("gqn,gnd->gqd", ph, V)
  err = np.linalg.norm(attn - attn_k, axis=-1)
  np.testing.assert_allclose(e.attn, attn, atol=1e-4)
  np.testing.assert_allclose(e.attn_k, attn_k, atol=1e-4)
  np.testing.assert_allclose(e.err, err, atol=1e-5)
  assert float(np.max(e.identity_residual)) < 1e-5
  tol = 1e-5
  for b in (e.b_norm, e.b_diam, e.b_var, e.b_min):
    assert (np.asarray(b) >= err - tol).all()
  # diam_{H,T} reference for one query
  g, qi = 2, 3
  hi, ti = np.where(head[g, qi])[0], np.where(vb[g, qi] & ~head[g, qi])[0]
  dd = np.linalg.norm(V[g][hi][:, None] - V[g][ti][None], axis=-1).max()
  tau = p[g, qi][ti].sum()
  np.testing.assert_allclose(e.b_diam[g, qi], tau * dd, rtol=1e-4, atol=1e-6)


def test_certified_topk_attention_matches_reference():
  rng = np.random.default_rng(7)
  q = rng.normal(size=(2, 3, 10, 8)).astype(np.float32) * 2
  K = rng.normal(size=(2, 3, 50, 8)).astype(np.float32)
  V = rng.normal(size=(2, 3, 50, 4)).astype(np.float32)
  mask = np.ones((2, 1, 1, 50), bool)
  mask[1, ..., 40:] = False
  for method in topk.METHODS:
    o = topk.certified_topk_attention(q, K, V, mask, 0.01, method=method)
    logits = np.einsum("bhqd,bhnd->bhqn", q, K) / np.sqrt(8)
    e = topk.output_error(logits, mask, V, o.k, with_diam=False)
    np.testing.assert_allclose(o.out, e.attn_k, atol=1e-5)
    assert (np.asarray(e.tail_mass) <= 0.01 + 1e-6).all()
    assert (np.asarray(e.tail_mass) <= np.asarray(o.certificate) + 1e-6).all()
    assert (np.asarray(o.probs)[1, ..., 40:] == 0).all()
  # vmapped inside jit: same result
  f = jax.jit(jax.vmap(lambda a, b, c: topk.topk_probs(jnp.einsum("qd,nd->qn", a, b) / np.sqrt(8), None, 0.01)[1]))
  np.testing.assert_array_equal(f(q[0], K[0], V[0]), topk.certified_topk_attention(q[0], K[0], V[0], None, 0.01).k)


def test_gaussian_rule_matches_simulation_at_2e5():
  """k_eps/n vs Phi_c(sigma + Phi^-1(eps)) at n = 2e5: within 0.01 absolute for sigma <= 2.

  The Gaussian score model of Tzachristas et al., "Certified Top-k attention via total variation", Sec. 6.
  """
  n = 200_000
  s = jax.random.normal(jax.random.key(8), (1, n))
  for sigma in (0.5, 1.0, 2.0):
    for eps in (0.1, 0.01):
      k = float(topk.certified_k(s * sigma, None, eps).exact.k[0]) / n
      pred = float(topk.predicted_keep_fraction(sigma, eps))
      np.testing.assert_allclose(pred, norm.sf(sigma + norm.ppf(eps)), rtol=1e-5)
      assert abs(k - pred) < 0.01, (sigma, eps, k, pred)
  # The closed-form tail mass inverts the rule.
  np.testing.assert_allclose(topk.gaussian_tail_mass(topk.predicted_keep_fraction(2.0, 0.05), 2.0), 0.05, rtol=1e-4)
  np.testing.assert_allclose(topk.gaussian_prediction(np.asarray(s[:, :50000] * 2.0), None, 0.01),
                             norm.sf(2.0 + norm.ppf(0.01)), atol=0.01)


def test_bad_input_raises():
  s = np.zeros((2, 5), np.float32)
  for eps in (0.0, 1.0, -0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match="epsilon"):
      topk.certified_k(s, None, eps)
  bad = s.copy()
  bad[0, 1] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    topk.tail_mass(bad)
  with pytest.raises(ValueError, match="no valid key"):
    topk.certified_k(s, np.array([[True] * 5, [False] * 5]), 0.1)
  with pytest.raises(ValueError, match="no valid key"):
    topk.tail_mass(np.full((1, 3), -np.inf, np.float32))
  with pytest.raises(ValueError, match="broadcast|key axis"):
    topk.tail_mass(s, np.ones((2, 4), bool))
  with pytest.raises(ValueError, match="dtype"):
    topk.tail_mass(np.zeros((2, 5), np.int32))
  q, K, V = np.zeros((3, 4), np.float32), np.zeros((6, 4), np.float32), np.zeros((6, 2), np.float32)
  with pytest.raises(ValueError, match="last dim"):
    topk.certified_topk_attention(q, np.zeros((6, 3), np.float32), V, None, 0.1)
  with pytest.raises(ValueError, match="number of keys"):
    topk.certified_topk_attention(q, K, np.zeros((5, 2), np.float32), None, 0.1)
  with pytest.raises(ValueError, match="method"):
    topk.certified_topk_attention(q, K, V, None, 0.1, method="nope")
  with pytest.raises(ValueError, match="values"):
    topk.output_error(s, None, np.zeros((4, 2), np.float32), np.ones(2, np.int32))
  with pytest.raises(ValueError, match="k must"):
    topk.output_error(s, None, np.zeros((5, 2), np.float32), np.ones(3, np.int32))
