r"""Certified top-k attention as a drop-in attention function (static shapes: a head mask, no gather).

For each query the head size $k$ is the smallest one certified by `method` (see `certificates.certified_k`), so
$\mathrm{TV}(P, \hat P) = \tau_k \le \epsilon$, and the output is $\sum_{i \in H_k} \hat P_i v_i$. Paper Sec. 6.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from asoftmax.topk import _checks
from asoftmax.topk import certificates
from asoftmax.topk import tail as tail_lib


class AttentionOutput(NamedTuple):
  r"""out: (..., Q, dv) truncated attention; k: (..., Q) int32 head size; certificate: (..., Q) bound on the TV
  at that k (the exact tail mass for method "exact"); probs: (..., Q, N) the truncated distribution $\hat P$."""

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
  return probs, k, ck.certificate[method]


@functools.partial(jax.jit, static_argnames=("method",))
def _attention(q, keys, values, mask, epsilon, scale, method):
  logits = jnp.einsum("...qd,...nd->...qn", q, keys) * scale
  probs, k, cert = topk_probs(logits, mask, epsilon, method)
  out = jnp.einsum("...qn,...nd->...qd", probs, values)
  return AttentionOutput(out, k, cert, probs)


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
    `AttentionOutput(out, k, certificate, probs)`; the output error obeys `output_error` bounds.

  Example:
    >>> o = certified_topk_attention(q, K, V, None, 0.01)
    >>> o.out.shape, o.k  # (..., Q, dv), per-query head sizes
  """
  _checks.epsilon(epsilon)
  if method not in certificates.METHODS:
    raise ValueError(f"method must be one of {certificates.METHODS}, got {method!r}")
  for name, x in (("q", q), ("keys", keys), ("values", values)):
    if getattr(x, "ndim", 0) < 2:
      raise ValueError(f"{name} must have at least 2 dims (..., len, dim), got shape {getattr(x, 'shape', None)}")
    _checks.logits(x, name)
  if q.shape[-1] != keys.shape[-1]:
    raise ValueError(f"q and keys must share the last dim, got {q.shape} and {keys.shape}")
  if keys.shape[-2] != values.shape[-2]:
    raise ValueError(f"keys and values must have the same number of keys, got {keys.shape} and {values.shape}")
  lshape = jnp.broadcast_shapes(q.shape[:-2], keys.shape[:-2]) + (q.shape[-2], keys.shape[-2])
  _checks.valid(mask, lshape, "mask")
  if scale is None:
    scale = 1.0 / float(q.shape[-1]) ** 0.5
  return _attention(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values),
                    None if mask is None else jnp.asarray(mask), epsilon, scale, method)
