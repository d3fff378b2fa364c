r"""Certified top-k attention as a drop-in attention function (static shapes: a head mask, no gather).

For each query the head size $k$ is the smallest one certified by `method` (see `certificates.certified_k`), so
$\mathrm{TV}(P, \hat P) = \tau_k \le \epsilon$, and the output is $\sum_{i \in H_k} \hat P_i v_i$. Paper Sec. 6.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from asoftmax import checks
from asoftmax.topk import certificates
from asoftmax.topk import tail as tail_lib


class AttentionOutput(NamedTuple):
  r"""out: (..., Q, dv) truncated attention; k: (..., Q) int32 head size; certificate: (..., Q) bound on the TV
  at that k (the exact tail mass for method "exact"); probs: (..., Q, N) the truncated distribution $\hat P$.

  Invalid rows (only reachable under `jax.jit`, where values cannot be checked): a query with no valid key, or
  whose logits, output or valid keys' values are not finite (NaN, +-inf in q, keys or values), gets **k = 0 and
  certificate = NaN**; its `out` is not meaningful. Outside jit such input raises `ValueError`.
  """

  out: jax.Array
  k: jax.Array
  certificate: jax.Array
  probs: jax.Array


def topk_probs(logits: jax.Array, valid: jax.Array | None, epsilon, method: str = "exact"):
  r"""Traceable core: certified k per row and the truncated softmax $\hat P$ (..., N). For use inside models."""
  ck = certificates._certified_k_impl(logits, valid, epsilon, (method,))
  k = ck.k[method]
  r = tail_lib._sort_rows(logits, valid)
  rank = jnp.argsort(r.order, -1)
  v = jnp.broadcast_to(tail_lib._effective_valid(logits, valid), logits.shape)
  head = (rank < k[..., None]) & v
  probs = jax.nn.softmax(jnp.where(head, logits, -jnp.inf), -1)
  # A row with no valid key has no certified head: flag it (k = 0, certificate NaN) rather than report k = 1.
  ok = ck.n > 0
  return probs, jnp.where(ok, k, 0), jnp.where(ok, ck.certificate[method], jnp.nan)


@functools.partial(jax.jit, static_argnames=("method",))
def _attention(q, keys, values, mask, epsilon, scale, method):
  logits = jnp.einsum("...qd,...nd->...qn", q, keys) * scale
  # Non-finite q or keys give NaN / -inf logits, which `topk_probs` would read as masked keys: flag the row.
  v = jnp.ones(logits.shape, bool) if mask is None else jnp.broadcast_to(mask, logits.shape)
  finite_v = jnp.all(jnp.isfinite(values), -1)  # (..., N)
  row_ok = jnp.all(~v | (jnp.isfinite(logits) & jnp.expand_dims(finite_v, -2)), -1)
  probs, k, cert = topk_probs(jnp.where(jnp.isnan(logits), -jnp.inf, logits), mask, epsilon, method)
  out = jnp.einsum("...qn,...nd->...qd", probs, jnp.where(finite_v[..., None], values, 0.0))
  row_ok = row_ok & (k > 0) & jnp.all(jnp.isfinite(out), -1)
  return AttentionOutput(out, jnp.where(row_ok, k, 0), jnp.where(row_ok, cert, jnp.nan), probs)


def _check_finite(q, keys, values, mask, lshape):
  """q finite; keys and values finite wherever a key is valid for some query (unused cache slots may be garbage)."""
  if checks.is_traced(q, keys, values, mask):
    return
  if not np.isfinite(np.asarray(q)).all():
    raise ValueError("q must be finite (it contains -inf, +inf or NaN)")
  used = np.ones(lshape[:-2] + lshape[-1:], bool)
  if mask is not None:
    used = np.broadcast_to(np.asarray(mask), lshape).any(-2)
  for name, x in (("keys", keys), ("values", values)):
    xs = np.asarray(x)
    fin = np.isfinite(xs).all(-1)
    if not (np.broadcast_to(fin, np.broadcast_shapes(fin.shape, used.shape)) | ~used).all():
      raise ValueError(f"{name} must be finite at every unmasked key (it contains -inf, +inf or NaN)")


def certified_topk_attention(q: ArrayLike, keys: ArrayLike, values: ArrayLike, mask: ArrayLike | None,
                             epsilon: float, method: str = "exact", scale: float | None = None) -> AttentionOutput:
  r"""Top-k attention with a per-query certified $k$: $\mathrm{TV}(\mathrm{softmax}(s), \hat P) \le \epsilon$.

  $s = q K^\top \cdot \mathrm{scale}$ (default $1/\sqrt{d}$), masked keys excluded; $k$ = smallest certified by
  `method` in `certificates.METHODS` ("exact" uses the exact tail mass, the others only their bound).

  Args:
    q: (..., Q, d) queries. keys: (..., N, d). values: (..., N, dv). Leading dims broadcast.
    mask: optional bool, broadcastable to (..., Q, N); True = key may be attended.
    epsilon: TV budget in (0, 1).
    method: "exact", "single_gap", "exact_head" or "multi_gap".
    scale: logit scale; default 1/sqrt(d).

  Returns:
    `AttentionOutput(out, k, certificate, probs)`; the output error obeys `output_error` bounds. Under `jax.jit`
    invalid rows are flagged with k = 0 and certificate NaN (see `AttentionOutput`).

  Raises:
    ValueError: (outside jit) epsilon not in (0, 1), non-finite q / keys / values, no keys, a query with every
      key masked, or mismatched shapes.

  Example:
    >>> o = certified_topk_attention(q, K, V, None, 0.01)
    >>> o.out.shape, o.k  # (..., Q, dv), per-query head sizes
  """
  checks.epsilon(epsilon)
  if method not in certificates.METHODS:
    raise ValueError(f"method must be one of {certificates.METHODS}, got {method!r}")
  for name, x in (("q", q), ("keys", keys), ("values", values)):
    if getattr(x, "ndim", 0) < 2:
      raise ValueError(f"{name} must have at least 2 dims (..., len, dim), got shape {getattr(x, 'shape', None)}")
    if name == "q":
      checks.logits(x, name)
  if keys.shape[-2] == 0:
    raise ValueError(f"keys must hold at least one key, got shape {tuple(keys.shape)}")
  if q.shape[-1] != keys.shape[-1]:
    raise ValueError(f"q and keys must share the last dim, got {q.shape} and {keys.shape}")
  if keys.shape[-2] != values.shape[-2]:
    raise ValueError(f"keys and values must have the same number of keys, got {keys.shape} and {values.shape}")
  lshape = jnp.broadcast_shapes(q.shape[:-2], keys.shape[:-2]) + (q.shape[-2], keys.shape[-2])
  checks.valid(mask, lshape, "mask")
  for name, x in (("keys", keys), ("values", values)):
    if not np.issubdtype(np.dtype(x.dtype), np.floating):
      raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
  _check_finite(q, keys, values, mask, lshape)
  if scale is None:
    scale = 1.0 / float(q.shape[-1]) ** 0.5
  return _attention(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values),
                    None if mask is None else jnp.asarray(mask), epsilon, scale, method)
