r"""Certified top-k attention as a drop-in attention function (static shapes: a head mask, no gather).

For each query the head size $k$ is the smallest one certified by `method` (see `certificates.certified_k`), so
$\mathrm{TV}(P, \hat P) = \tau_k \le \epsilon$, and the output is $\sum_{i \in H_k} \hat P_i v_i$. Paper Sec. 6.

Example:
  >>> q, K, V = jnp.ones((2, 4)), jnp.eye(4)[:3] * 4.0, jnp.arange(6.0).reshape(3, 2)
  >>> o = certified_topk_attention(q, K, V, None, 0.01)
  >>> o.out.shape, o.k  # (Q, dv); every key has the same logit, so no smaller head is certified
  ((2, 2), Array([3, 3], dtype=int32))
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
from asoftmax.topk import certificates


class AttentionOutput(NamedTuple):
  r"""out: (..., Q, dv) truncated attention; k: (..., Q) int32 head size; certificate: (..., Q) bound on the TV
  at that k (the exact tail mass for method "exact"); probs: (..., Q, N) the truncated distribution $\hat P$.

  Invalid rows (only reachable under `jax.jit`, where values cannot be checked): a query with no valid key, or
  whose logits, output or valid keys' values are not finite (NaN, +-inf in q, keys or values), and every query
  when a traced epsilon is outside (0, 1), gets **k = 0 and certificate = NaN**; its `out` is not meaningful.
  Outside jit such input raises `ValueError`.
  """

  out: jax.Array
  k: jax.Array
  certificate: jax.Array
  probs: jax.Array


class TruncatedProbs(NamedTuple):
  r"""probs: (..., N) truncated softmax $\hat P$; k: (...,) int32 head size; certificate: (...,) bound on the TV.

  A row flagged invalid (NaN / +inf logits, no valid key, or an invalid traced epsilon) has k = 0 and
  certificate and probs NaN.
  """

  probs: jax.Array
  k: jax.Array
  certificate: jax.Array


def topk_probs_traced(logits: jax.Array, valid: jax.Array | None, epsilon, method: str = "exact") -> TruncatedProbs:
  """Traceable core of `topk_probs` (no argument checks)."""
  ck = getattr(certificates.certified_k_traced(logits, valid, epsilon, (method,)), method)
  head = _core.head_mask(logits, valid, ck.k)
  probs = jax.nn.softmax(jnp.where(head, logits, -jnp.inf), -1)
  return TruncatedProbs(jnp.where((ck.k > 0)[..., None], probs, jnp.nan), ck.k, ck.certificate)


def topk_probs(logits: ArrayLike, valid: ArrayLike | None, epsilon: float, method: str = "exact") -> TruncatedProbs:
  r"""Certified k per row and the truncated softmax $\hat P$: the attention weights of a model (e.g. BERT).

  Cheap to call inside a model's jitted step: shape and dtype checks are static, value checks run only on
  concrete input, and under `jax.jit` invalid rows are flagged in the result (no host sync).

  Args:
    logits: (..., N) float logits ($-\infty$ = masked; bfloat16 / float16 computed in float32).
    valid: optional bool mask broadcastable to `logits`.
    epsilon: TV budget in (0, 1).
    method: one of `certificates.METHODS`.

  Returns:
    `TruncatedProbs(probs, k, certificate)`; see there for the flag of invalid rows.

  Example:
    >>> r = topk_probs(jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05])), None, 0.1)
    >>> r.probs.round(3), r.k
    (Array([0.526, 0.316, 0.158, 0.   ], dtype=float32), Array(3, dtype=int32))
  """
  checks.open_unit("epsilon", epsilon)
  certificates.check_methods(method)
  if not isinstance(method, str):
    raise ValueError(f"method must be one of {certificates.METHODS}, got {method!r}")
  _core.check_logits(logits, valid)
  return topk_probs_traced(_core.as_float(logits), None if valid is None else jnp.asarray(valid), epsilon, method)


@functools.partial(jax.jit, static_argnames=("method",))
def _attention(q, keys, values, mask, epsilon, scale, method):
  logits = jnp.einsum("...qd,...nd->...qn", q, keys, preferred_element_type=jnp.float32) * scale
  # Non-finite q or keys give NaN / -inf logits, which would read as masked keys: flag the row.
  v = jnp.ones(logits.shape, bool) if mask is None else jnp.broadcast_to(mask, logits.shape)
  finite_v = jnp.all(jnp.isfinite(values), -1)  # (..., N)
  row_ok = jnp.all(~v | (jnp.isfinite(logits) & jnp.expand_dims(finite_v, -2)), -1)
  # Masked slots may hold garbage (an unused KV-cache slot): their logits are replaced by -inf.
  clean = jnp.where(v & jnp.isfinite(logits), logits, -jnp.inf)
  probs, k, cert = topk_probs_traced(clean, mask, epsilon, method)
  out = jnp.einsum("...qn,...nd->...qd", probs, jnp.where(finite_v[..., None], values, 0.0).astype(probs.dtype))
  row_ok = row_ok & (k > 0) & jnp.all(jnp.isfinite(out), -1) & (scale > 0)  # a traced scale is checked here
  return AttentionOutput(out, jnp.where(row_ok, k, 0), jnp.where(row_ok, cert, jnp.nan), probs)


def certified_topk_attention(q: ArrayLike, keys: ArrayLike, values: ArrayLike, mask: ArrayLike | None,
                             epsilon: float, method: str = "exact", scale: float | None = None) -> AttentionOutput:
  r"""Top-k attention with a per-query certified $k$: $\mathrm{TV}(\mathrm{softmax}(s), \hat P) \le \epsilon$.

  $s = q K^\top \cdot \mathrm{scale}$ (default $1/\sqrt{d}$), masked keys excluded; $k$ = smallest certified by
  `method` in `certificates.METHODS` ("exact" uses the exact tail mass, the others only their bound).

  Args:
    q: (..., Q, d) queries. keys: (..., N, d). values: (..., N, dv). Leading dims broadcast. Floating; bfloat16 and
      float16 (e.g. a half-precision KV cache) are accepted and the logits, softmax and output computed in float32.
    mask: optional bool, broadcastable to (..., Q, N); True = key may be attended. Masked slots of keys and values
      may hold anything (NaN included).
    epsilon: TV budget in (0, 1).
    method: "exact", "single_gap", "exact_head" or "multi_gap".
    scale: positive logit scale; default 1/sqrt(d). (A traced scale <= 0 flags every row.)

  Returns:
    `AttentionOutput(out, k, certificate, probs)`; the output error obeys `output_error` bounds. Under `jax.jit`
    invalid rows are flagged with k = 0 and certificate NaN (see `AttentionOutput`).

  Raises:
    ValueError: (outside jit) epsilon not in (0, 1), non-finite q / keys / values at an unmasked key, no keys,
      a query with every key masked, a bad method or scale, or mismatched shapes.
  """
  checks.open_unit("epsilon", epsilon)
  if method not in certificates.METHODS:
    raise ValueError(f"method must be one of {certificates.METHODS}, got {method!r}")
  for name, x in (("q", q), ("keys", keys), ("values", values)):
    checks.floating_array(name, x, finite=name == "q")  # keys / values: only where unmasked (below)
    if x.ndim < 2:
      raise ValueError(f"{name} must have at least 2 dims (..., len, dim), got shape {tuple(x.shape)}")
  if q.shape[-1] != keys.shape[-1]:
    raise ValueError(f"q and keys must share the last dim, got {q.shape} and {keys.shape}")
  if keys.shape[-2] != values.shape[-2]:
    raise ValueError(f"keys and values must have the same number of keys, got {keys.shape} and {values.shape}")
  try:
    lead = np.broadcast_shapes(q.shape[:-2], keys.shape[:-2], values.shape[:-2])
  except ValueError:
    raise ValueError(f"the leading dims of q, keys and values must broadcast, got {q.shape}, {keys.shape} and "
                     f"{values.shape}") from None
  lshape = tuple(lead) + (q.shape[-2], keys.shape[-2])
  checks.valid(mask, lshape, "mask", against="attention logits")
  scale = 1.0 / float(q.shape[-1]) ** 0.5 if scale is None else _core.check_scale(scale)
  _core.check_finite_at_used_keys("keys", keys, mask, lshape)
  _core.check_finite_at_used_keys("values", values, mask, lshape)
  return _attention(checks.as_array(q), checks.as_array(keys), checks.as_array(values),
                    None if mask is None else checks.as_array(mask), epsilon, scale, method)

