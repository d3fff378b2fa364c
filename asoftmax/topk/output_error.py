r"""Output-level error of top-k attention and its certificates.

Tzachristas et al., "Certified Top-k Attention via Total Variation", arXiv:2512.07647, Sec. 5.

With $\mu_{head} = \sum_H P_i v_i / (1-\tau)$ and $\mu_{tail} = \sum_T P_i v_i / \tau$:

* head-tail identity (Theorem 5.2): $\mathrm{Attn} - \mathrm{Attn}_k = \tau(\mu_{tail} - \mu_{head})$;
* norm bound (Prop. 5.1): $\|err\| \le 2C\tau$ with $C = \max_j \|v_j\|$;
* head-tail diameter (Prop. 5.3): $\|err\| \le \tau\,\mathrm{diam}_{H,T}$, $\mathrm{diam}_{H,T} =
  \max_{i\in H, j\in T}\|v_i - v_j\|$;
* variance bound: $\|err\| \le \sqrt{\tau/(1-\tau)}\sqrt{\mathrm{Var}_P(V)}$;
* combined (Theorem 5.6): the minimum of the three.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from asoftmax import checks
from asoftmax.topk import _core


class OutputError(NamedTuple):
  r"""Per-query output error of the top-k truncation and its bounds (all (...,) unless noted).

  attn, attn_k: (..., dv) full and truncated attention outputs. err: $\|attn - attn_k\|_2$. tail_mass: $\tau$.
  identity_residual: $\|(attn - attn_k) - \tau(\mu_{tail} - \mu_{head})\|_2$ (float rounding only).
  b_norm, b_diam, b_var: the three bounds; b_min: their minimum. b_diam is NaN when `with_diam=False`.
  """

  attn: jax.Array
  attn_k: jax.Array
  err: jax.Array
  tail_mass: jax.Array
  identity_residual: jax.Array
  b_norm: jax.Array
  b_diam: jax.Array
  b_var: jax.Array
  b_min: jax.Array


def head_mask(logits: ArrayLike, valid: ArrayLike | None, k: ArrayLike) -> jax.Array:
  """Bool (..., N): the k largest valid logits of each row (ties broken by position, as in `tail.sort_rows`).

  Args:
    logits: (..., N) float logits ($-\\infty$ = masked). valid: optional bool mask broadcastable to `logits`.
    k: (...,) int head size per row, in [1, N].

  Returns:
    (..., N) bool. Under `jax.jit` a row with a NaN or +inf logit or no valid key is all False (no head).

  Example:
    >>> head_mask(jnp.array([[0.1, 3.0, 2.0, -1.0]]), None, jnp.array([2]))
    Array([[False,  True,  True, False]], dtype=bool)
  """
  _core.check_logits(logits, valid)
  _core.check_k(k, tuple(logits.shape[:-1]), logits.shape[-1])
  return _head_mask(_core.as_float(logits), None if valid is None else jnp.asarray(valid), jnp.asarray(k))


_head_mask = jax.jit(_core.head_mask)


_DIAM_BLOCK = 64  # rows of the pairwise-distance matrix formed at once: (64, N, dv) differences


def _pairwise_dist(vals):
  """(N, N) Euclidean distances from coordinate differences (never |a|^2 + |b|^2 - 2ab), in row blocks."""
  N, dv = vals.shape
  B = min(_DIAM_BLOCK, N)
  nb = -(-N // B)
  padded = jnp.concatenate([vals, jnp.zeros((nb * B - N, dv), vals.dtype)], 0).reshape(nb, B, dv)
  rows = jax.lax.map(lambda blk: jnp.sqrt(jnp.sum((blk[:, None, :] - vals[None]) ** 2, -1)), padded)
  return rows.reshape(nb * B, N)[:N]


def _diam_one(vals, head, tailm):
  # vals (N, dv); head, tailm (Q, N). max_{i in H, j in T} ||v_i - v_j||, O(Q N^2) for one head.
  dist = _pairwise_dist(vals)
  row = jnp.max(jnp.where(tailm[:, None, :], dist[None], 0.0), -1)  # (Q, N): farthest tail key from key i
  return jnp.max(jnp.where(head, row, 0.0), -1)


@functools.partial(jax.jit, static_argnames=("with_diam",))
def _output_error(logits, valid, values, k, with_diam=True):
  v = _core.effective_valid(logits, valid) & ~jnp.isnan(logits)
  s = jnp.where(v, logits, -jnp.inf)
  p = jax.nn.softmax(s, -1)
  head = _core.head_mask(logits, valid, k)
  tailm = v & ~head
  tail = jnp.sum(jnp.where(tailm, p, 0.0), -1)
  ph = jnp.where(head, p, 0.0)
  zh = jnp.sum(ph, -1, keepdims=True)
  vals = _core.as_float(values)
  lead = jnp.broadcast_shapes(logits.shape[:-2], vals.shape[:-2])
  vals = jnp.broadcast_to(vals, lead + vals.shape[-2:])
  v = jnp.broadcast_to(v, lead + v.shape[-2:])
  used = jnp.any(v, -2)  # (..., N): keys valid for some query; the others may hold garbage (unused cache slots)
  vals = jnp.where(used[..., None], vals, 0.0)
  # Work with values centred on the mean of the *used* values (masked slots excluded): the weighted sums, the
  # error (sum_i (P_i - P_hat_i) v_i = sum_i (P_i - P_hat_i)(v_i - c)) and the variance then run at the scale of
  # the values' spread, not their offset.
  cnt = jnp.maximum(jnp.sum(used, -1), 1).astype(vals.dtype)
  c = jnp.sum(vals, -2, keepdims=True) / cnt[..., None, None]
  vc = jnp.where(used[..., None], vals - c, 0.0)
  mm = lambda w: jnp.einsum("...qn,...nd->...qd", w, vc, precision="highest")
  attn_c = mm(p)
  attn_k_c = mm(ph / zh)
  attn, attn_k = attn_c + c, attn_k_c + c
  diff = mm(p - ph / zh)
  err = jnp.linalg.norm(diff, axis=-1)
  mu_head = mm(ph) / zh
  pt = jnp.where(tailm, p, 0.0)
  mu_tail = mm(pt) / jnp.maximum(tail, 1e-30)[..., None]
  resid = jnp.linalg.norm(diff - tail[..., None] * (mu_tail - mu_head), axis=-1)
  vnorm = jnp.linalg.norm(vals, axis=-1)  # (..., N)
  C = jnp.max(jnp.where(v, jnp.expand_dims(vnorm, -2), 0.0), -1)
  b_norm = 2.0 * C * tail
  # Var_P(V) = E_P||v - c||^2 - ||attn - c||^2; the cancellation error is bounded by
  # ~(N + dv) u (E_P||v - c||^2 + ||attn - c||^2), which is added so the result stays an upper bound.
  sq = jnp.sum(vc * vc, -1)
  ac = attn_c
  e_sq = jnp.einsum("...qn,...n->...q", p, sq, precision="highest")
  a_sq = jnp.sum(ac * ac, -1)
  u = jnp.finfo(vals.dtype).eps / 2
  slack = 4.0 * (logits.shape[-1] + vals.shape[-1] + 4) * u * (e_sq + a_sq)
  var = jnp.maximum(e_sq - a_sq, 0.0) + slack
  b_var = jnp.sqrt(tail / jnp.maximum(1.0 - tail, 1e-30) * var)
  if with_diam:
    Q, N = logits.shape[-2:]
    fv = vals.reshape((-1,) + vals.shape[-2:])
    fh = jnp.broadcast_to(head, lead + (Q, N)).reshape((-1, Q, N))
    ft = jnp.broadcast_to(tailm, lead + (Q, N)).reshape((-1, Q, N))
    diam = jax.lax.map(lambda a: _diam_one(*a), (fv, fh, ft)).reshape(lead + (Q,))
    b_diam = tail * diam * (1.0 + 4.0 * (vals.shape[-1] + 4) * u)  # rounding of the distances
  else:
    b_diam = jnp.full_like(tail, jnp.nan)
  b_min = jnp.fmin(jnp.fmin(b_norm, b_var), b_diam)
  # Validity flag: NaN / +inf logits, no valid key or k outside [1, N] (rows), non-finite used values (all rows).
  bad = _core.bad_rows(logits, valid) | (k < 1) | (k > logits.shape[-1])
  bad = bad | ~jnp.all(jnp.isfinite(vals))
  res = OutputError(attn, attn_k, err, tail, resid, b_norm, b_diam, b_var, b_min)
  return jax.tree.map(lambda x: jnp.where(bad[..., None] if x.ndim > bad.ndim else bad, jnp.nan, x), res)


def output_error(logits: ArrayLike, valid: ArrayLike | None, values: ArrayLike, k: ArrayLike,
                 with_diam: bool = True) -> OutputError:
  r"""Error of top-k attention against full attention, the head-tail identity and the three bounds.

  Args:
    logits: (..., Q, N) scaled logits; valid: optional bool mask broadcastable to logits.
    values: (..., N, dv) float value vectors (leading dims broadcast to logits' leading dims); finite at every
      key some query may attend (masked slots may hold anything). bfloat16 / float16 are computed in float32.
    k: (..., Q) int head size per query, 1 <= k <= N.
    with_diam: compute $\tau\,\mathrm{diam}_{H,T}$ ($O(QN^2)$ per head, done one head at a time).

  Returns:
    `OutputError`. Always err <= b_norm, b_var, b_diam (up to float rounding). Under `jax.jit` a query with a NaN
    or +inf logit, no valid key or k outside [1, N], and every query when a used value is not finite, is NaN
    (outside jit such input raises `ValueError`).

  Example:
    >>> s = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    >>> e = output_error(s, None, jnp.array([[0.0], [1.0], [2.0]]), jnp.array([2]))
    >>> np.asarray(e.tail_mass, float).round(4), np.asarray(e.err, float).round(4)  # attention 0.7, truncated 0.375
    (array([0.2]), array([0.325]))
  """
  _core.check_logits(logits, valid)
  checks.floating_array("values", values, finite=False)
  N = logits.shape[-1]
  if values.ndim < 2 or values.shape[-2] != N:
    raise ValueError(f"values must have shape (..., {N}, dv) (N from logits), got {tuple(values.shape)}")
  lead = tuple(logits.shape[:-2])
  if values.ndim - 2 > len(lead) or np.broadcast_shapes(tuple(values.shape[:-2]), lead) != lead:
    raise ValueError(f"values' leading dims {tuple(values.shape[:-2])} must broadcast to logits' {lead}")
  _core.check_k(k, tuple(logits.shape[:-1]), N)
  _core.check_finite_at_used_keys("values", values, valid, tuple(logits.shape))
  return _output_error(_core.as_float(logits), None if valid is None else jnp.asarray(valid), values,
                       jnp.asarray(k), with_diam=checks.boolean("with_diam", with_diam))
