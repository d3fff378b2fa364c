"""`asoftmax.topk.dot_product_attention`: the certified top-k drop-in for flax's `attention_fn` (issue 26 item 1).

Checks against dense `jax.nn.dot_product_attention` on the same inputs: every row's certificate <= epsilon and
equal to the realised tail mass of its head (float64 reference), the output within the certified bound
|out - dense| <= certificate * (max_i v_ij - min_i v_ij), fully masked rows as dense (uniform, no NaN),
gradients equal to the truncated softmax's with the head fixed (zero on a fully masked row, as dense), the flag
under jit, and the swap into `nnx.MultiHeadAttention` (output bound through the output projection, k and
certificate sown, traced once). Tiny shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from asoftmax import topk

EPS = 0.05
B, Q, H, HK, N, D = 2, 7, 4, 2, 9, 8


def _inputs(seed, hk=HK, q_scale=2.0):
  r = np.random.default_rng(seed)
  q = (q_scale * r.normal(size=(B, Q, H, D))).astype(np.float32)
  k = r.normal(size=(B, N, hk, D)).astype(np.float32)
  v = r.normal(size=(B, N, hk, D)).astype(np.float32)
  mask = r.random((B, 1, Q, N)) > 0.3
  mask[0, 0, 3] = False  # a fully masked query row
  bias = r.normal(size=(1, H, Q, N)).astype(np.float32)
  return q, k, v, mask, bias


def _dense_probs(q, k, bias, mask, is_causal):
  """float64 dense attention weights (B, H, Q, N) as jax.nn computes them (masked = one large negative)."""
  rep = q.shape[2] // k.shape[2]
  k = np.repeat(np.asarray(k, np.float64), rep, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), k) / np.sqrt(q.shape[-1])
  if bias is not None:
    s = s + bias
  valid = np.ones(s.shape, bool)
  if mask is not None:
    valid &= np.broadcast_to(np.asarray(mask) != 0, s.shape)
  if is_causal:
    valid &= np.tril(np.ones(s.shape[-2:], bool))
  s = np.where(valid, s, -1e30)
  p = np.exp(s - s.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


CASES = {
    "plain, iters=0": dict(iters=0),
    "float-mask+bias": dict(mask="float", bias=True),
    "causal+bool-mask": dict(is_causal=True, mask=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_within_certified_bound_of_dense(case):
  opts = CASES[case]
  q, k, v, mask, bias = _inputs(1)
  m = None if "mask" not in opts else (mask.astype(np.float32) if opts["mask"] == "float" else mask)
  b = bias if opts.get("bias") else None
  causal = opts.get("is_causal", False)
  out, cert = topk.dot_product_attention(q, k, v, b, m, is_causal=causal, epsilon=EPS, iters=opts.get("iters", 8),
                                         query_block=3, return_certificate=True)
  dense = jax.nn.dot_product_attention(q, k, v, bias=b, mask=None if m is None else m != 0, is_causal=causal)
  c = np.asarray(cert.certificate)
  assert out.shape == q.shape and cert.k.shape == (B, H, Q)
  assert np.isfinite(np.asarray(out)).all() and (c <= EPS).all() and (np.asarray(cert.k) >= 1).all()
  # The certificate is the realised tail mass of the kept head: the k largest dense weights of the row.
  P = _dense_probs(q, k, b, m, causal)
  Ps = -np.sort(-P, -1)
  kk = np.asarray(cert.k)
  tail = 1.0 - np.take_along_axis(np.cumsum(Ps, -1), kk[..., None] - 1, -1)[..., 0]
  np.testing.assert_allclose(c, np.maximum(tail, 0), atol=2e-6)
  # |out - dense| <= certificate * range of the values (per kv head and coordinate), + float32 slack.
  vr = np.repeat(np.ptp(v, axis=1), H // HK, axis=1)  # (B, H, D)
  bound = np.transpose(c, (0, 2, 1))[..., None] * vr[:, None] + 1e-5
  assert (np.abs(np.asarray(out) - np.asarray(dense)) <= bound).all()
  if m is not None:  # query 3 of batch 0 has every key masked: uniform over all keys, as dense (no NaN)
    assert (kk[0, :, 3] == N).all() and (c[0, :, 3] == 0).all()
    np.testing.assert_allclose(np.asarray(out[0, 3]), np.asarray(dense[0, 3]), atol=1e-6)


def test_gradient_is_truncated_softmax_with_head_fixed():
  q, k, v, mask, bias = _inputs(3)
  attn = functools.partial(topk.dot_product_attention, bias=bias, mask=mask, epsilon=0.1, query_block=4)
  _, cert = attn(q, k, v, return_certificate=True)
  P = _dense_probs(q, k, bias, mask, False)
  rank = np.argsort(np.argsort(-P, -1), -1)
  head = jnp.asarray(rank < np.asarray(cert.k)[..., None])  # (B, H, Q, N) the kept set, fixed

  def ref(q, k, v):
    rep = H // HK
    s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, rep, 2)) / np.sqrt(D) + bias
    s = jnp.where(mask.any(-1, keepdims=True), s, 0.0)  # a fully masked row: uniform, constant (as dense)
    p = jax.nn.softmax(jnp.where(head, s, -jnp.inf), -1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, jnp.repeat(v, rep, 2))

  ct = np.random.default_rng(4).normal(size=q.shape).astype(np.float32)
  g_ours = jax.jit(jax.grad(lambda *a: jnp.vdot(attn(*a), ct), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(lambda *a: jnp.vdot(ref(*a), ct), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_flagged_under_jit():
  q, k, v, _, _ = _inputs(5)
  f = jax.jit(lambda q, e: topk.dot_product_attention(q, k, v, epsilon=e, return_certificate=True))
  qn = q.copy()
  qn[1, 2, 0, 0] = np.nan
  out, cert = f(qn, 0.1)
  assert np.isnan(np.asarray(out[1, 2, 0])).all() and int(cert.k[1, 0, 2]) == 0
  assert np.isnan(float(cert.certificate[1, 0, 2])) and np.isfinite(np.asarray(out[0])).all()
  out, cert = f(q, 1.5)
  assert np.isnan(np.asarray(out)).all() and (np.asarray(cert.k) == 0).all()
  with pytest.raises(ValueError, match="query"):
    topk.dot_product_attention(qn, k, v)
  with pytest.raises(ValueError, match="dropout_rng"):
    topk.dot_product_attention(q, k, v, dropout_rate=0.1)
  # flax's dropout keywords: applied to the truncated weights when not deterministic.
  drop = topk.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(0))
  same = topk.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(0), deterministic=True)
  assert np.isfinite(np.asarray(drop)).all() and not np.allclose(drop, same)
  np.testing.assert_allclose(np.asarray(same), np.asarray(topk.dot_product_attention(q, k, v)), atol=1e-6)


def test_swap_into_nnx_multihead_attention():
  F, heads, L = 16, 4, 10
  attn = functools.partial(topk.dot_product_attention, epsilon=EPS)
  dense = nnx.MultiHeadAttention(num_heads=heads, in_features=F, decode=False, rngs=nnx.Rngs(0))
  ours = nnx.MultiHeadAttention(num_heads=heads, in_features=F, decode=False, attention_fn=attn, rngs=nnx.Rngs(0))
  x = 3.0 * jax.random.normal(jax.random.key(1), (2, L, F))
  mask = nnx.make_causal_mask(jnp.ones((2, L)))  # float32 0/1, as flax's helpers return

  traces = []

  @nnx.jit
  def apply(model, x):  # sow_weights=True makes flax pass the module: k and certificate are sown
    traces.append(1)
    return nnx.capture(lambda m, x: m(x, mask=mask, sow_weights=True), nnx.Intermediate)(model, x)

  y_ours, sown = apply(ours, x)
  apply(ours, x + 1.0)
  assert len(traces) == 1  # traced once
  y_dense = dense(x, mask=mask)
  cert = sown["topk_certificate"].get_value()[0]  # (2, heads, L)
  assert np.asarray(sown["topk_k"].get_value()[0]).min() >= 1 and (np.asarray(cert) <= EPS).all()
  # |y - y_dense| <= sum_{h,j} cert[b,h,q] * range_j(v[b,:,h,j]) * |W_out[h,j,f]|.
  v = dense.value(x)  # (2, L, heads, F // heads)
  vr = np.ptp(np.asarray(v), axis=1)  # (2, heads, hd)
  W = np.abs(np.asarray(dense.out.kernel[...]))  # (heads, hd, F)
  bound = np.einsum("bhq,bhj,hjf->bqf", np.asarray(cert), vr, W) + 1e-4
  assert (np.abs(np.asarray(y_ours) - np.asarray(y_dense)) <= bound).all()
