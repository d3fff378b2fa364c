"""`asoftmax.topk.progressive` against a float64 numpy oracle: realised TV <= certificate <= eps on every query.

Each case draws many distinct seeded queries, including hard inputs: exact ties, one dominant key, flat attention
(all keys equal), keys far from the origin (offset 300) and large norms. The oracle is float64 numpy on the float32
logits fl(q.k) * scale computed in the original basis, as a model would compute them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asoftmax import topk


def _np_tail(ref, head):
  """float64 tail mass outside `head` of softmax(ref) per row."""
  r = ref.astype(np.float64)
  p = np.exp(r - r.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return (p * ~head).sum(-1)


def _np_k_eps(ref, eps):
  """float64 oracle k_eps per row."""
  r = -np.sort(-ref.astype(np.float64), -1)
  p = np.exp(r - r[:, :1])
  p /= p.sum(-1, keepdims=True)
  tail = np.concatenate([np.cumsum(p[:, ::-1], -1)[:, ::-1][:, 1:], np.zeros((len(p), 1))], -1)
  return 1 + (tail > eps).sum(-1)


def _case(kind, rng, N, d, Q):
  A = rng.normal(size=(d, d)) * np.exp(-np.arange(d) / (d / 4))[None]
  K = rng.normal(size=(N, d)) @ A.T
  q = rng.normal(size=(Q, d)) @ A.T * rng.uniform(0.2, 3.0, size=(Q, 1))
  if kind == "ties":
    K[N // 2:] = K[: N - N // 2]  # every key twice: exact logit ties
  elif kind == "dominant":
    K[3] = 8.0 * q.mean(0) / np.linalg.norm(q.mean(0))
    q = q + 6.0 * K[3] / np.linalg.norm(K[3])
  elif kind == "flat":
    K[:] = K[0]  # all logits equal: k_eps = ceil((1 - eps) n)
  elif kind == "offset":
    K = K + 300.0
  elif kind == "large":
    K, q = K * 30.0, q * 3.0
  held_K = rng.normal(size=(N, d)) @ A.T + (300.0 if kind == "offset" else 0.0)
  held_q = rng.normal(size=(Q, d)) @ A.T
  return K.astype(np.float32), q.astype(np.float32), held_K.astype(np.float32), held_q.astype(np.float32)


def _np_macs(dims, d, stages, blocks):
  """Cost model recount: d (query block norms) + per key: its coordinates + one product per norm block after the
  first stage (computed once, when the key gets its first bound; later stages' bounds are suffix sums of them)."""
  first_bound = sum(1 for b in (0,) + tuple(blocks[:-1]) if b >= stages[0])
  return d + dims.sum(-1) + (dims > 0).sum(-1) * first_bound


def test_multi_stage_bounds_are_counted_once():
  """Stages (8, 16, 32) with blocks (8, 16, 32): a fully scored key costs 32 + 2 (the products ||q_b|| ||k_b|| for
  blocks [8, 16) and [16, 32), computed at the first stage; the stage-16 bound is their suffix sum), not 32 + 3."""
  rng = np.random.default_rng(11)
  N, d, Q = 64, 32, 16
  K, q, hK, hq = _case("gaussian", rng, N, d, Q)
  basis = topk.fit_basis(hK, hq, np.ones(N, bool), np.ones(Q, bool))
  stages = (8, 16, 32)
  r = topk.progressive_search(topk.rotate_queries(q, basis), topk.prepare_keys(K, basis, stages), None, 1e-3,
                              d ** -0.5, stages)
  dims = np.asarray(r.dims)
  assert (dims == d).any() and (dims < d).any()
  np.testing.assert_array_equal(np.asarray(r.macs), d + dims.sum(-1) + 2 * N)


@functools.lru_cache(maxsize=None)
def _runner(stages, blocks, scale):
  """One jitted search per configuration (epsilon traced), shared by the parametrized cases."""
  return jax.jit(lambda q, pk, eps: topk.progressive_search(q, pk, None, eps, scale, stages, blocks=blocks))


@pytest.mark.parametrize("d,stages,blocks", [(32, (8, 16, 32), None), (32, (8, 16, 24, 32), (8, 12, 16, 20, 24, 28, 32)),
                                             (64, (8, 16, 32, 64), None)])
@pytest.mark.parametrize("kind", ["gaussian", "ties", "dominant", "flat", "offset", "large"])
def test_certificate_holds_on_every_query(kind, d, stages, blocks):
  N, Q = 96, 64
  blocks = blocks or stages
  scale = d ** -0.5
  run = _runner(stages, blocks, scale)
  for seed in range(1):
    rng = np.random.default_rng(1000 * seed + hash(kind) % 997)
    K, q, hK, hq = _case(kind, rng, N, d, Q)
    basis = topk.fit_basis(hK, hq, np.ones(N, bool), np.ones(Q, bool))
    pk = topk.prepare_keys(K, basis, blocks)
    qr = topk.rotate_queries(q, basis)
    ref = np.asarray(jnp.einsum("qd,nd->qn", q, K) * scale)
    for eps in (0.1, 0.01, 1e-3):
      r = run(qr, pk, jnp.float32(eps))
      head = np.asarray(r.head)
      tv = _np_tail(ref, head)
      cert = np.asarray(r.certificate)
      assert (tv <= cert).all() and (cert <= eps).all(), (kind, eps, tv.max(), cert.max())
      k = np.asarray(r.k)
      np.testing.assert_array_equal(k, head.sum(-1))
      assert (k >= _np_k_eps(ref, eps)).all()
      dims = np.asarray(r.dims)
      assert (dims[head] == d).all()  # the head is fully scored
      np.testing.assert_array_equal(np.asarray(r.partial_dims), dims.sum(-1))
      np.testing.assert_array_equal(np.asarray(r.keys_full), (dims == d).sum(-1))
      np.testing.assert_array_equal(np.asarray(r.macs), _np_macs(dims, d, stages, blocks))
      # Head logits equal the reference logits up to a common per-query shift.
      hl = np.asarray(r.head_logits)
      shift = np.where(head, ref - hl, np.nan)
      spread = np.nanmax(shift, -1) - np.nanmin(shift, -1)
      assert (spread <= 1e-3 * (1 + np.abs(ref).max())).all()


def test_flat_attention_keeps_the_oracle_head():
  """All logits equal: tau_k = (n - k)/n, so k must be ceil((1 - eps) n) (one more at an exact boundary)."""
  rng = np.random.default_rng(5)
  N, d = 200, 32
  K = np.tile(rng.normal(size=(1, d)), (N, 1)).astype(np.float32)
  q = rng.normal(size=(16, d)).astype(np.float32)
  basis = topk.fit_basis(rng.normal(size=(N, d)).astype(np.float32), q, np.ones(N, bool), np.ones(16, bool))
  pk = topk.prepare_keys(K, basis, (8, 16, 32))
  r = topk.progressive_search(topk.rotate_queries(q, basis), pk, None, 0.1, d ** -0.5, (8, 16, 32))
  k = np.asarray(r.k)
  assert (k >= 180).all() and (k <= 185).all(), k


def test_masks_and_vmap_over_queries():
  """A per-query causal mask; vmap over query batches gives the same result as one call."""
  rng = np.random.default_rng(7)
  N, d, Q = 64, 32, 64
  K, q, hK, hq = _case("gaussian", rng, N, d, Q)
  valid = np.tril(np.ones((Q, N), bool))
  basis = topk.fit_basis(hK, hq, np.ones(N, bool), np.ones(Q, bool))
  pk = topk.prepare_keys(K, basis, (8, 16, 32))
  qr = topk.rotate_queries(q, basis)
  r = topk.progressive_search(qr, pk, valid, 0.05, d ** -0.5, (8, 16, 32))
  assert not np.asarray(r.head)[~valid].any()
  ref = np.where(valid, np.asarray(jnp.einsum("qd,nd->qn", q, K) / np.sqrt(d)), -np.inf)
  assert (_np_tail(ref, np.asarray(r.head)) <= 0.05).all()
  f = jax.vmap(lambda qq, vv: topk.progressive_search(qq, pk, vv, 0.05, d ** -0.5, (8, 16, 32)))
  rv = f(qr.reshape(4, 16, d), valid.reshape(4, 16, N))
  np.testing.assert_array_equal(np.asarray(rv.k).ravel(), np.asarray(r.k))
  np.testing.assert_array_equal(np.asarray(rv.macs).ravel(), np.asarray(r.macs))


def test_basis_is_orthogonal_and_foldable():
  rng = np.random.default_rng(3)
  K = rng.normal(size=(3, 50, 16)).astype(np.float32) + 2.0
  q = rng.normal(size=(3, 40, 16)).astype(np.float32)
  b = topk.fit_basis(K, q, np.ones((3, 50), bool), np.ones((3, 40), bool))
  R = np.asarray(b.rotation)
  np.testing.assert_allclose(np.einsum("hde,hdf->hef", R, R), np.broadcast_to(np.eye(16), (3, 16, 16)), atol=1e-5)
  # q.k = q_rot . k_rot + q.mu: the shift is the same for every key of a query.
  pk = topk.prepare_keys(K, b, (4, 8, 16))
  qr = topk.rotate_queries(q, b)
  lhs = np.einsum("hqd,hnd->hqn", q, K) - np.einsum("hqd,hd->hq", q, np.asarray(b.key_mean))[..., None]
  np.testing.assert_allclose(np.einsum("hqd,hnd->hqn", np.asarray(qr), np.asarray(pk.keys)), lhs, atol=1e-3)


def test_bad_input_raises():
  rng = np.random.default_rng(0)
  K = rng.normal(size=(20, 8)).astype(np.float32)
  q = rng.normal(size=(4, 8)).astype(np.float32)
  b = topk.fit_basis(K, q, np.ones(20, bool), np.ones(4, bool))
  pk = topk.prepare_keys(K, b, (4, 8))
  qr = topk.rotate_queries(q, b)
  ok = dict(q_rot=qr, prepared=pk, valid=None, epsilon=0.1, scale=0.35, stages=(4, 8))
  for bad, match in [(dict(epsilon=0.0), "epsilon"), (dict(epsilon=1.5), "epsilon"), (dict(stages=(4, 6)), "stages"),
                     (dict(stages=(8, 4, 8)), "stages"), (dict(search_fraction=1.5), "search_fraction"),
                     (dict(scale=0.0), "scale"), (dict(scale=float("nan")), "scale"),
                     (dict(valid=np.zeros((4, 20), bool)), "valid"), (dict(stages=(2, 4, 8)), "blocks"),
                     (dict(q_rot=qr[:, :4]), "prepared.keys"),
                     (dict(q_rot=np.where(np.arange(8) == 0, -np.inf, np.asarray(qr)).astype(np.float32)), "q_rot")]:
    with pytest.raises(ValueError, match=match):
      topk.progressive_search(**{**ok, **bad})
  r = jax.jit(lambda v: topk.progressive_search(qr, pk, v, 0.1, 0.35, (4, 8)))(np.zeros((4, 20), bool))
  assert (np.asarray(r.k) == 0).all() and np.isnan(np.asarray(r.certificate)).all()


def _small_problem():
  rng = np.random.default_rng(5)
  K = rng.normal(size=(20, 8)).astype(np.float32) * 2.0
  q = rng.normal(size=(4, 8)).astype(np.float32)
  b = topk.fit_basis(K, q, np.ones(20, bool), np.ones(4, bool))
  return K, q, b, topk.prepare_keys(K, b, (4, 8)), topk.rotate_queries(q, b)


def test_prepared_block_norms_are_checked_not_trusted():
  """Zeroed, negative or shrunken block norms make the bounds too small (certificates below the true TV): concrete
  input raises naming the field; under jit the result is flagged (k = 0, certificate NaN)."""
  K, q, b, pk, qr = _small_problem()
  run = jax.jit(lambda p: topk.progressive_search(qr, p, None, 0.1, 0.35, (4, 8)))
  good = run(pk)
  assert (np.asarray(good.k) > 0).all() and np.isfinite(np.asarray(good.certificate)).all()
  bn = np.asarray(pk.block_norms)
  for field, bad in [("block_norms", np.zeros_like(bn)), ("block_norms", -bn), ("block_norms", 0.5 * bn),
                     ("guard_norm", np.zeros_like(np.asarray(pk.guard_norm)))]:
    p = pk._replace(**{field: bad})
    with pytest.raises(ValueError, match=f"prepared.{field}"):
      topk.progressive_search(qr, p, None, 0.1, 0.35, (4, 8))
    r = run(p)
    assert (np.asarray(r.k) == 0).all() and np.isnan(np.asarray(r.certificate)).all(), field
    assert not np.asarray(r.head).any()


def test_basis_must_be_orthogonal():
  """A user-built `Basis` whose rotation is not orthogonal changes every logit (q R R^T k != q k): rejected when
  concrete (naming basis.rotation); under jit the rotated queries / prepared keys are NaN, so the search is flagged."""
  K, q, b, pk, qr = _small_problem()
  R = np.asarray(b.rotation)
  for bad_R in (1.5 * R, R + 0.01 * np.random.default_rng(0).normal(size=R.shape).astype(np.float32)):
    bad = topk.Basis(bad_R, b.key_mean)
    with pytest.raises(ValueError, match="basis.rotation"):
      topk.prepare_keys(K, bad, (4, 8))
    with pytest.raises(ValueError, match="basis.rotation"):
      topk.rotate_queries(q, bad)
    qr_bad = jax.jit(topk.rotate_queries)(q, bad)
    pk_bad = jax.jit(lambda k, bb: topk.prepare_keys(k, bb, (4, 8)))(K, bad)
    assert np.isnan(np.asarray(qr_bad)).all() and np.isnan(np.asarray(pk_bad.block_norms)).all()
    r = jax.jit(lambda p: topk.progressive_search(qr, p, None, 0.1, 0.35, (4, 8)))(pk_bad)
    assert (np.asarray(r.k) == 0).all() and np.isnan(np.asarray(r.certificate)).all()
  ok = jax.jit(topk.rotate_queries)(q, b)  # fit_basis's own rotation passes under jit too
  np.testing.assert_allclose(np.asarray(ok), np.asarray(qr), atol=1e-5)
