r"""Certified top-k attention as a drop-in for `jax.nn.dot_product_attention` and flax's `attention_fn` (issue 26).

Beyond the paper (Tzachristas et al., arXiv:2512.07647, Sec. 6 states the TV certificate
$\mathrm{TV}(P, \hat P) = \tau_H$ for a truncated softmax). Same arguments and layout as
`jax.nn.dot_product_attention` / `flax.nnx.dot_product_attention`: query `[..., q_len, heads, dim]`, key and value
`[..., kv_len, kv_heads, dim]`, `bias` and `mask` broadcastable to `[..., heads, q_len, kv_len]`, `is_causal`,
`dtype`, `precision`, and flax's dropout / `module` keywords, so that

    nnx.MultiHeadAttention(..., attention_fn=functools.partial(topk.dot_product_attention, epsilon=0.01))

runs certified top-k attention. Every query row keeps the head $H = \{i : p_i \ge T\}$ of a threshold $T$ chosen
so that the softmax mass left out is at most $\epsilon$ ($\tau_H \le \epsilon$, the certificate), and attends with
the truncated softmax $\hat P_i = p_i / \sum_{j \in H} p_j$ on $H$.

How it is computed (no sort): the threshold is found by `iters` bisection steps in log space on the tail mass
$\mathrm{tail}(T) = \sum_{p_i < T} p_i$, as in `asoftmax.topk.decode.threshold_heads`, starting from
$T_0 = \epsilon Z / N$ (every key below it has weight $< \epsilon Z / N$, so at most $N$ of them leave
$\le \epsilon$: certified with no search). Only thresholds whose computed tail is $\le \epsilon Z / (1 + m)$
($m = 4(N + 4)u$, the rounding margin of `decode.sum_margin`) are accepted, so every row's certificate is
$\le \epsilon$ whatever `iters` is; more steps give smaller heads (at 8 steps the bracket of
$\log(N/\epsilon)$ nats is resolved to $1/256$ of it). The work is done flash-style: `lax.map` over blocks of
`query_block` queries of one (batch, head), so that a block's logits stay in cache through the search; no
`[..., heads, q_len, kv_len]` array is materialised.

Gradient: $\partial/\partial s$ of the truncated softmax with the kept set $H$ held fixed (the set is a
piecewise-constant function of the logits: its derivative is zero almost everywhere, and the threshold search is
under `stop_gradient`). So gradients equal those of `softmax(where(head, s, -inf)) @ v` for the head the forward
pass chose; they are not the dense softmax's gradients (those differ by $O(\epsilon)$ terms).

Masks and bad input:
* `mask` may be bool or float (flax's `make_attention_mask` / `make_causal_mask` return float32 0/1; nonzero =
  attend). `is_causal` keeps key j for query i iff j <= i (top-left aligned, as jax and flax do).
* A query row with every key masked (or every logit $-\infty$) attends uniformly to all keys, as dense attention
  does (jax and flax replace masked logits by one large negative number): no NaN; k = kv_len, certificate 0.
* Concrete NaN / inf in query, key or value raises `ValueError`. Under `jax.jit` (values unseen) a row with a
  NaN or +inf logit, and every row when a traced epsilon is outside (0, 1), is flagged: output NaN, k = 0,
  certificate NaN (the project policy of `asoftmax/checks.py`).

Example:
  >>> q = jnp.ones((1, 3, 2, 4)); kv = jnp.arange(48.0).reshape(1, 6, 2, 4) / 48
  >>> out, cert = dot_product_attention(q, kv, kv, epsilon=0.1, is_causal=True, return_certificate=True)
  >>> out.shape, cert.k.shape, bool((cert.certificate <= 0.1).all())
  ((1, 3, 2, 4), (1, 2, 3), True)
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from asoftmax import checks
from asoftmax.topk import _core
from asoftmax.topk.decode import sum_margin


class AttentionCertificate(NamedTuple):
  r"""Per query row, in flax's weight layout `[..., heads, q_len]`.

  Attributes:
    k: int32 head size $|H|$ (kv_len on a fully masked row; 0 on a row flagged under `jax.jit`).
    certificate: float32 $\tau_H = \mathrm{TV}(\mathrm{softmax}, \hat P) \le \epsilon$, the softmax mass outside
      the kept head (computed in float32); NaN on a flagged row.
  """

  k: jax.Array
  certificate: jax.Array


def _bisect_block(s, valid, eps, iters):
  r"""One block of rows: s (R, N) float32 logits, valid (R, N) bool (or None: every key).

  Returns (w (R, N) unnormalised truncated weights, their row sums (R, 1), k (R,), tail mass (R,), bad (R,)).
  Threshold search in weight space (module docstring): $T = e^{t}$ with $t$ bisected on $[\log(\epsilon' / N), 0]$,
  $\epsilon' = \epsilon / (1 + m)$, weights $e_i = e^{s_i - \max s} \in [0, 1]$; head = $\{e_i \ge T\}$.
  """
  N = s.shape[-1]
  if valid is not None:
    s = jnp.where(valid, s, -jnp.inf)
  mx = jnp.max(s, -1, keepdims=True)  # NaN propagates: NaN or +inf here is the jit validity flag
  bad = jnp.isnan(mx[:, 0]) | (mx[:, 0] == jnp.inf)
  # Every key masked or -inf: dense attention attends uniformly (masked logits = one big negative). Same here.
  empty = mx == -jnp.inf
  mx = jax.lax.stop_gradient(jnp.where(empty | bad[:, None], 0.0, mx))
  e = jnp.exp(jnp.where(empty, 0.0, s - mx))  # -inf -> 0; no NaN selected into exp (see _core.flag)
  es = jax.lax.stop_gradient(e)
  z = jnp.sum(es, -1, keepdims=True)
  target = eps * z / (1.0 + sum_margin(N))  # (R, 1)

  def step(_, bracket):
    a, b = bracket  # log thresholds: tail(e^a) <= target < tail(e^b) (b untested at the start)
    mid = 0.5 * (a + b)
    ok = jnp.sum(jnp.where(es < jnp.exp(mid), es, 0.0), -1, keepdims=True) <= target
    return jnp.where(ok, mid, a), jnp.where(ok, b, mid)

  lo = jnp.log(target) - math.log(N)  # every key below e^lo has weight < target / N: certified with no search
  lo, _ = jax.lax.fori_loop(0, iters, step, (lo, jnp.zeros_like(lo)))
  head = es >= jnp.exp(lo)
  w = jnp.where(head, e, 0.0)
  tail = jnp.sum(jnp.where(head, 0.0, es), -1)
  k = jnp.sum(head, -1).astype(jnp.int32)
  return w, jnp.sum(w, -1, keepdims=True), k, tail / z[:, 0], bad


def _as_4d(name, x, lead, H, Q, N):
  """`x` broadcastable to lead + (H, Q, N) -> (B', H', Q', N') with B' in {1, prod(lead)} and H', Q', N' in {1, full}."""
  full = tuple(lead) + (H, Q, N)
  try:
    np.broadcast_shapes(tuple(x.shape), full)
  except ValueError:
    raise ValueError(f"{name} of shape {tuple(x.shape)} does not broadcast to [..., heads, q_len, kv_len] = "
                     f"{full}") from None
  if x.ndim > len(full):
    raise ValueError(f"{name} has more dims ({x.ndim}) than [..., heads, q_len, kv_len] = {full}")
  x = jnp.reshape(x, (1,) * (len(full) - x.ndim) + tuple(x.shape))
  nl = len(lead)
  if all(d == 1 for d in x.shape[:nl]):
    return x.reshape((1,) + x.shape[nl:])
  x = jnp.broadcast_to(x, tuple(lead) + x.shape[nl:])
  return x.reshape((math.prod(lead),) + x.shape[nl:])


def _pick(x, b, h, c, qb):
  """(qb or 1, N') rows of a (B', H', Q', N') array for block (b, h, query chunk c)."""
  x = jax.lax.dynamic_index_in_dim(x, b if x.shape[0] > 1 else 0, 0, keepdims=False)
  x = jax.lax.dynamic_index_in_dim(x, h if x.shape[0] > 1 else 0, 0, keepdims=False)
  if x.shape[0] > 1:
    x = jax.lax.dynamic_slice_in_dim(x, c * qb, qb, 0)
  return x


@functools.partial(jax.jit, static_argnames=("is_causal", "iters", "query_block", "precision", "out_dtype",
                                             "broadcast_dropout", "use_dropout"))
def _attention(q, k, v, bias, mask, epsilon, scale, dropout_rng, dropout_rate, *, is_causal, iters, query_block,
               precision, out_dtype, broadcast_dropout, use_dropout):
  """q (B, Q, H, D), k (B, N, Hk, D), v (B, N, Hk, Dv); bias/mask (B', H', Qp', N') or None."""
  B, Q, H, D = q.shape
  N, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
  rep = H // Hk
  qb = query_block
  nc = -(-Q // qb)
  Qp = nc * qb
  qt = jnp.transpose(q, (0, 2, 1, 3))  # (B, H, Q, D)
  if Qp != Q:
    qt = jnp.pad(qt, ((0, 0), (0, 0), (0, Qp - Q), (0, 0)))
  qt = qt.reshape(B * H * nc, qb, D)
  kt = jnp.transpose(k, (0, 2, 1, 3)).reshape(B * Hk, N, D)
  vt = jnp.transpose(v, (0, 2, 1, 3)).reshape(B * Hk, N, Dv)
  eps = jnp.asarray(epsilon, jnp.float32)
  keep_prob = 1.0 - dropout_rate

  def block(args):
    i, qq = args
    b, h, c = i // (H * nc), (i // nc) % H, i % nc
    kv_i = b * Hk + h // rep
    kk = jax.lax.dynamic_index_in_dim(kt, kv_i, 0, keepdims=False)
    vv = jax.lax.dynamic_index_in_dim(vt, kv_i, 0, keepdims=False)
    s = jnp.einsum("qd,nd->qn", qq, kk, precision=precision, preferred_element_type=jnp.float32) * scale
    if bias is not None:
      s = s + _pick(bias, b, h, c, qb).astype(jnp.float32)
    valid = None
    if mask is not None:
      valid = jnp.broadcast_to(_pick(mask, b, h, c, qb), (qb, N))
    if is_causal:
      causal = jnp.arange(N)[None, :] <= (c * qb + jnp.arange(qb))[:, None]
      valid = causal if valid is None else valid & causal
    w, sw, kk_, tv, bad = _bisect_block(s, valid, eps, iters)
    if use_dropout:  # flax's dropout on the attention weights (after truncation; the certificate is before it)
      rng = jax.random.fold_in(dropout_rng, c if broadcast_dropout else i)
      keep = jax.random.bernoulli(rng, keep_prob, (qb, N))
      w = w * keep.astype(w.dtype) / keep_prob
    out = jnp.einsum("qn,nd->qd", w, vv.astype(jnp.float32), precision=precision) / sw
    bad = bad | ~_core.eps_ok(eps)
    return _core.flag(bad, out), jnp.where(bad, 0, kk_), _core.flag(bad, tv)

  out, kh, tv = jax.lax.map(block, (jnp.arange(B * H * nc), qt))
  out = out.reshape(B, H, Qp, Dv)[:, :, :Q].transpose(0, 2, 1, 3).astype(out_dtype)
  return out, AttentionCertificate(kh.reshape(B, H, Qp)[..., :Q], tv.reshape(B, H, Qp)[..., :Q])


def dot_product_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike, bias: ArrayLike | None = None,
                          mask: ArrayLike | None = None, broadcast_dropout: bool = True,
                          dropout_rng: jax.Array | None = None, dropout_rate: float = 0.0,
                          deterministic: bool = False, dtype: Any = None, precision: Any = None,
                          module: Any = None, promote_dtype: Any = None, is_causal: bool = False, *,
                          epsilon: float = 0.01, scale: float | None = None, iters: int = 8,
                          query_block: int | None = None, return_certificate: bool = False):
  r"""Certified top-k attention with `jax.nn.dot_product_attention`'s layout and flax's `attention_fn` signature.

  $\mathrm{out}_q = \sum_{i \in H_q} \hat P_{qi} v_i$, $\hat P_q$ the softmax of $s_q = q K^\top \cdot
  \mathrm{scale} + \mathrm{bias}$ truncated to a head $H_q$ with $\tau_{H_q} = \sum_{i \notin H_q} P_{qi} \le
  \epsilon$ (so $\mathrm{TV}(P_q, \hat P_q) \le \epsilon$ and each output coordinate is within
  $\epsilon \cdot (\max_i v_{ij} - \min_i v_{ij})$ of dense attention's). See the module docstring for the search,
  the gradient (the truncated softmax's with the head fixed) and fully masked rows (uniform, as dense).

  Args:
    query: `[..., q_len, heads, dim]` float.
    key: `[..., kv_len, kv_heads, dim]`; heads must be a multiple of kv_heads (grouped-query attention).
    value: `[..., kv_len, kv_heads, v_dim]`.
    bias: optional float, broadcastable to `[..., heads, q_len, kv_len]`, added to the scaled logits.
    mask: optional bool or float (nonzero = attend), broadcastable to `[..., heads, q_len, kv_len]`.
    broadcast_dropout, dropout_rng, dropout_rate, deterministic: flax's attention dropout, applied to the
      truncated weights (with `dropout_rng` folded with the block index; not flax's random stream).
    dtype: dtype of the computation's inputs and of the output (default: the promoted input dtype). Logits,
      search, softmax and the weighted sum run in float32.
    precision: passed to the two matrix products.
    module: a flax NNX module (flax passes it when called with `sow_weights=True`): `k` and `certificate` are
      sown as `nnx.Intermediate` values `topk_k` and `topk_certificate`; read them with `nnx.capture(fn,
      nnx.Intermediate)` (tests/topk/test_dot_product.py shows it).
    promote_dtype: ignored (accepted for flax's signature).
    is_causal: keep key j for query i only if j <= i.
    epsilon: TV budget in (0, 1) per query row (may be traced).
    scale: logit scale; default 1/sqrt(dim).
    iters: bisection steps (static, >= 0): 0 keeps $\{p_i \ge \epsilon Z/N\}$ (certified, larger heads); each step
      halves the threshold's bracket. Every setting is certified.
    query_block: queries per `lax.map` step (static); default max(1, min(q_len, 2**18 // kv_len)).
    return_certificate: also return `AttentionCertificate(k, certificate)` (`[..., heads, q_len]`).

  Returns:
    `[..., q_len, heads, v_dim]` output (and the `AttentionCertificate` if `return_certificate`). Under
    `jax.jit` rows with a NaN / +inf logit, or all rows for a traced epsilon outside (0, 1), are flagged: output
    and certificate NaN, k = 0.

  Raises:
    ValueError: naming the argument: bad shapes or dtypes, concrete NaN / inf in query, key, value or bias
      (-inf allowed in bias), epsilon not in (0, 1), bad scale / iters / query_block, dropout without an rng.

  Example:
    >>> import functools
    >>> from flax import nnx
    >>> attn = functools.partial(dot_product_attention, epsilon=0.01)
    >>> layer = nnx.MultiHeadAttention(num_heads=2, in_features=8, attention_fn=attn, decode=False,
    ...                                rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
  """
  del promote_dtype
  for name, x in (("query", query), ("key", key), ("value", value)):
    checks.floating_array(name, x)
    if x.ndim < 3:
      raise ValueError(f"{name} must have shape [..., length, heads, dim], got shape {tuple(x.shape)}")
  lead = tuple(query.shape[:-3])
  if tuple(key.shape[:-3]) != lead or tuple(value.shape[:-3]) != lead:
    raise ValueError(f"query, key and value must share their leading (batch) dims, got {tuple(query.shape)}, "
                     f"{tuple(key.shape)} and {tuple(value.shape)}")
  Q, H, D = query.shape[-3:]
  N, Hk = key.shape[-3], key.shape[-2]
  if key.shape[-1] != D:
    raise ValueError(f"query and key must have the same dim, got {tuple(query.shape)} and {tuple(key.shape)}")
  if tuple(value.shape[-3:-1]) != (N, Hk):
    raise ValueError(f"key and value must have the same kv_len and kv_heads, got {tuple(key.shape)} and "
                     f"{tuple(value.shape)}")
  if H % Hk:
    raise ValueError(f"query heads ({H}) must be a multiple of key heads ({Hk})")
  checks.open_unit("epsilon", epsilon)
  scale = 1.0 / math.sqrt(D) if scale is None else _core.check_scale(scale)
  iters = checks.int_in_range("iters", iters, lo=0)
  query_block = max(1, min(Q, 2 ** 18 // N)) if query_block is None else checks.int_in_range("query_block", query_block)
  query_block = min(query_block, Q)
  is_causal = checks.boolean("is_causal", is_causal)
  return_certificate = checks.boolean("return_certificate", return_certificate)
  use_dropout = not deterministic and float(dropout_rate) > 0.0
  if use_dropout:
    if not 0.0 < float(dropout_rate) < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    if dropout_rng is None:
      raise ValueError("dropout_rng is required when dropout_rate > 0 and not deterministic")
  if dtype is None:
    dtype = jnp.result_type(query, key, value)
  q, k, v = (jnp.asarray(x, dtype) for x in (query, key, value))
  nc = -(-Q // query_block)
  Qp = nc * query_block
  b4 = m4 = None
  if bias is not None:
    checks.floating_array("bias", bias, finite=False)
    if not checks.is_traced(bias):
      a = np.asarray(bias, np.float32)
      if np.isnan(a).any() or np.isposinf(a).any():
        raise ValueError("bias contains NaN or +inf")
    b4 = _as_4d("bias", jnp.asarray(bias), lead, H, Q, N)
  if mask is not None:
    if getattr(mask, "shape", None) is None:
      raise ValueError(f"mask must be an array, got {type(mask).__name__}")
    m4 = _as_4d("mask", jnp.asarray(mask), lead, H, Q, N)
    m4 = m4 if m4.dtype == jnp.bool_ else m4 != 0
  if Qp != Q:  # pad the query axis of per-query bias / mask to whole blocks (padded rows are dropped)
    b4, m4 = (x if x is None or x.shape[2] == 1 else
              jnp.pad(x, ((0, 0), (0, 0), (0, Qp - Q), (0, 0)), constant_values=fill)
              for x, fill in ((b4, 0.0), (m4, True)))
  B = math.prod(lead)
  out, cert = _attention(q.reshape((B,) + q.shape[-3:]), k.reshape((B,) + k.shape[-3:]),
                         v.reshape((B,) + v.shape[-3:]), b4, m4, epsilon, scale,
                         dropout_rng if use_dropout else None, float(dropout_rate) if use_dropout else 0.0,
                         is_causal=is_causal, iters=iters, query_block=query_block, precision=precision,
                         out_dtype=jnp.dtype(dtype), broadcast_dropout=bool(broadcast_dropout),
                         use_dropout=use_dropout)
  out = out.reshape(lead + out.shape[1:])
  cert = AttentionCertificate(*(x.reshape(lead + x.shape[1:]) for x in cert))
  if module is not None:
    from flax import nnx
    module.sow(nnx.Intermediate, "topk_k", cert.k)
    module.sow(nnx.Intermediate, "topk_certificate", cert.certificate)
  return (out, cert) if return_certificate else out
