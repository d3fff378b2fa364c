"""Certified sketch search (asoftmax.topk.sketch, issue 28 item 1).

* Bounds: on adversarial keys (offsets up to 1e4, tiny and zero channel ranges, one outlier per page, float16 /
  bfloat16 stats, 4 and 8 bits) the float64 logit of every valid key and its float32 evaluation lie within
  [lo, hi] -- on every key of every seeded case (the bound is deterministic: zero failures allowed).
* Search: on 3 x 256 seeded rows (GQA, G = 3 query heads per key/value head, causal masks of random length)
  including hard rows -- ties (repeated keys), one dominant key, flat attention (tiny queries), peaked and
  moderate -- the certificate is <= epsilon and the realised TV of every query head (float64) is <= certificate,
  for eps in {0.1, 0.01, 0.001}; the output equals the truncated softmax over the head.
* Capacity: a flat row with a small capacity falls back to dense attention, flagged, with the dense output.
* Layout: 4-bit codes are stored packed, two per byte (codes nbytes = `sketch_bytes`' code part); bounds and search
  on the packed sketch equal those on the same codes unpacked one per byte (same certificates, same heads).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asoftmax import topk

N, D, G, P = 128, 16, 3, 16


def _rows(seed, R=256):
  """(R, G, D) queries, (R, N, D) keys / values, (R, N) causal valid masks; a mix of hard row kinds."""
  rng = np.random.default_rng(seed)
  K = rng.normal(size=(R, N, D)) * np.exp(-np.arange(D) / 6) + 0.3
  V = rng.normal(size=(R, N, D))
  q = rng.normal(size=(R, G, D)) * np.exp(-np.arange(D) / 6)
  kind = np.arange(R) % 5
  temp = np.where(kind == 0, 0.01, np.where(kind == 1, 20.0, 6.0))  # flat, peaked, moderate
  q = q * temp[:, None, None]
  ties = kind == 3
  K[ties] = np.repeat(K[ties][:, :8], N // 8, axis=1)  # every key 16 times: exact logit ties
  dom = kind == 4
  K[dom, 5] = 40 * q[dom, 0] / np.linalg.norm(q[dom, 0], axis=-1, keepdims=True) ** 2  # one dominant key (logit 10)
  length = rng.integers(1, N + 1, size=R)
  valid = np.arange(N)[None] < length[:, None]
  f = lambda x: x.astype(np.float32)
  return f(q), f(K), f(V), valid


@pytest.fixture(scope="module")
def rows():
  return _rows(0)


@pytest.mark.parametrize("bits,stat", [(4, jnp.float32), (8, jnp.float16), (4, jnp.bfloat16)])
def test_bounds_hold_on_adversarial_keys(bits, stat):
  rng = np.random.default_rng(bits)
  R = 24
  K = rng.normal(size=(R, N, D))
  K *= 10.0 ** rng.uniform(-6, 1, size=(R, 1, D))  # tiny to large channel ranges
  K += 10.0 ** rng.uniform(-2, 4, size=(R, 1, D)) * rng.choice([-1, 1], size=(R, 1, D))  # offsets up to 1e4
  K[:, ::P] *= 50  # an outlier at the start of every page
  K[:, :, 0] = 3.25  # a constant channel (zero range)
  if stat == jnp.float16:
    K = np.clip(K, -6e4, 6e4)
  K = K.astype(np.float32)
  q = (rng.normal(size=(R, G, D)) * 10.0 ** rng.uniform(-2, 2, size=(R, G, 1))).astype(np.float32)
  valid = np.arange(N)[None] < rng.integers(1, N + 1, size=(R, 1))
  sketch = topk.build_key_sketch(K, valid, bits=bits, page_size=P, stat_dtype=stat)
  lo, hi = map(np.asarray, topk.sketch_bounds(q, sketch, 0.25))
  exact = np.einsum("rgd,rnd->rgn", q.astype(np.float64), K.astype(np.float64)) * 0.25
  f32 = np.einsum("rgd,rnd->rgn", q, K) * np.float32(0.25)
  v = np.broadcast_to(valid[:, None, :], exact.shape)
  for s in (exact, f32):
    assert np.all((lo <= s) | ~v) and np.all((s <= hi) | ~v)
  w = (hi - lo)[v]
  assert np.median(w) < np.inf  # finite bounds


def _numpy_tv(q, K, valid, idx, k, fallback, scale):
  s = np.einsum("rgd,rnd->rgn", q.astype(np.float64), K.astype(np.float64)) * scale
  s = np.where(valid[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  head = np.zeros(valid.shape, bool)
  for r in range(len(k)):
    head[r, idx[r, :k[r]]] = True
  head |= fallback[:, None]
  return np.where(head[:, None], 0.0, p).sum(-1), s, head


_search = jax.jit(lambda q, K, V, s, v, e: topk.sketch_search(q, K, V, s, v, e, D ** -0.5, N // 2))


@pytest.mark.parametrize("bits", [4, 8])
def test_certificate_and_realised_tv(rows, bits):
  q, K, V, valid = rows
  sketch = topk.build_key_sketch(K, valid, bits=bits, page_size=P)
  kept = []
  for eps in (0.1, 0.01, 0.001):
    r = _search(q, K, V, sketch, valid, eps)
    cert, k, fb, idx, out = map(np.asarray, (r.certificate, r.k, r.fallback, r.indices, r.out))
    tv, s, head = _numpy_tv(q, K, valid, idx, k, fb, D ** -0.5)
    assert np.all(cert <= eps), (eps, cert.max())
    assert np.all(tv <= cert + 1e-7 * (fb[:, None])), (eps, (tv - cert).max())
    assert np.all(tv <= eps)
    # output = softmax over the head
    sh = np.where(head[:, None], s, -np.inf)
    ph = np.exp(sh - sh.max(-1, keepdims=True))
    ph /= ph.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("rgn,rne->rge", ph, V), atol=2e-5)
    assert np.all(np.asarray(r.keys_read) == k)
    kept.append(np.mean(k / valid.sum(-1)))
  assert kept[0] < kept[1] < kept[2] <= 1  # smaller epsilon, larger head


def test_fallback_is_flagged_and_dense():
  rng = np.random.default_rng(3)
  K = rng.normal(size=(2, N, D)).astype(np.float32)
  V = rng.normal(size=(2, N, D)).astype(np.float32)
  q = np.zeros((2, G, D), np.float32)  # flat: no small head can certify
  q[1] = 50 * K[1, 7]  # peaked: certifies within capacity
  sketch = topk.build_key_sketch(K, None, bits=8, page_size=P)
  r = topk.sketch_search(q, K, V, sketch, None, 0.01, D ** -0.5, 8)
  assert bool(r.fallback[0]) and not bool(r.fallback[1])
  assert int(r.k[0]) == N and float(r.certificate[0].max()) == 0.0
  np.testing.assert_allclose(np.asarray(r.out[0]), np.broadcast_to(V[0].mean(0), (G, D)), atol=1e-5)
  assert int(r.k[1]) <= 8


def test_packed_codes_match_bytes_and_unpacked_search(rows):
  q, K, V, valid = (x[:32] for x in rows)
  for bits in (3, 4, 8):
    sketch = topk.build_key_sketch(K, valid, bits=bits, page_size=P)
    width = D // 2 if bits <= 4 else D
    assert sketch.codes.shape == (32, N, width) and sketch.codes.dtype == jnp.uint8
    assert sketch.codes.nbytes == topk.sketch_bytes(32 * N, 0, D, bits)  # what is stored is what is counted
  sketch_4 = topk.build_key_sketch(K, valid, bits=4, page_size=P)
  flat = np.asarray(sketch_4.codes)
  unpacked = np.stack([flat & 15, flat >> 4], -1).reshape(32, N, D)  # channel 2j: low nibble, 2j + 1: high
  one_per_byte = sketch_4._replace(codes=jnp.asarray(unpacked))
  for a, b in zip(topk.sketch_bounds(q, sketch_4, D ** -0.5), topk.sketch_bounds(q, one_per_byte, D ** -0.5)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for eps in (0.1, 0.01):
    r, u = _search(q, K, V, sketch_4, valid, eps), _search(q, K, V, one_per_byte, valid, eps)
    for name in ("certificate", "k", "indices", "fallback", "out"):
      np.testing.assert_array_equal(np.asarray(getattr(r, name)), np.asarray(getattr(u, name)), err_msg=name)
  # the docstring's 2 x 2 example: codes [[0, 15], [15, 0]] -> one byte per key, low nibble first
  assert topk.build_key_sketch(jnp.array([[0.0, 1.0], [1.0, -1.0]]), None, 4, 2).codes.tolist() == [[240], [15]]


def test_bad_input():
  K = np.zeros((N, D), np.float32)
  sketch = topk.build_key_sketch(K, None)
  q = np.zeros((1, D), np.float32)
  with pytest.raises(ValueError, match="page_size"):
    topk.build_key_sketch(K, None, page_size=7)
  with pytest.raises(ValueError, match="bits"):
    topk.build_key_sketch(K, None, bits=9)
  with pytest.raises(ValueError, match="keys"):  # two 4-bit codes per byte: d must be even
    topk.build_key_sketch(K[:, :3], None, bits=4, page_size=4)
  assert topk.build_key_sketch(K[:, :3], None, bits=8, page_size=4).codes.shape == (N, 3)
  with pytest.raises(ValueError, match="d"):
    topk.sketch_bytes(N, 1, 3, 4)
  with pytest.raises(ValueError, match="capacity"):
    topk.sketch_search(q, K, K, sketch, None, 0.1, 1.0, N + 1)
  with pytest.raises(ValueError, match="epsilon"):
    topk.sketch_search(q, K, K, sketch, None, 1.0, 1.0, 4)
  with pytest.raises(ValueError, match="sketch"):
    topk.sketch_search(q, K, K, topk.build_key_sketch(K, None, page_size=32)._replace(codes=sketch.codes[:4]),
                       None, 0.1, 1.0, 4)
  with pytest.raises(ValueError, match="valid"):
    topk.sketch_search(q, K, K, sketch, np.zeros(N, bool), 0.1, 1.0, 4)
  bad = K.copy()
  bad[3, 0] = np.nan
  with pytest.raises(ValueError, match="keys"):
    topk.sketch_search(q, bad, K, sketch, None, 0.1, 1.0, 4)
  # under jit a NaN query flags the row
  r = jax.jit(lambda q: topk.sketch_search(q, K, K, sketch, None, 0.1, 1.0, 4))(np.full((1, D), np.nan, np.float32))
  assert np.isnan(np.asarray(r.certificate)).all()
