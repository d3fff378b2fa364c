r"""Internal API of `asoftmax.topk`: the traceable pieces its public modules share (not exported, may change).

Every function here is pure, traceable and unchecked: public entry points check their arguments
(`asoftmax.checks`) and then call these. Names are public *within* the package so that modules never reach into
each other's private names.

* rows: `effective_valid`, `sort_rows`, `log_tail`, `head_mask`;
* float safety: `shift_by_max`, `rounding_margin`, `rcumlogsumexp`, `as_float`;
* the validity flag under `jax.jit`: `bad_rows`, `eps_ok`;
* eager checks shared by the public functions: `check_logits`, `check_k`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from asoftmax import checks
from asoftmax.checks import flag, rounding_margin  # noqa: F401 (shared with asoftmax.sharded through checks)
from asoftmax.checks import open_unit_ok as eps_ok  # noqa: F401


def check_scale(scale: Any) -> Any:
  """A positive finite logit scale (a float); a traced scale is returned as is (callers flag scale <= 0)."""
  return checks.positive_or_traced("scale", scale)


class SortedRows(NamedTuple):
  r"""Logits sorted in descending order with masked keys last.

  Attributes:
    s: (..., N) float, sorted logits $s_{(1)} \ge \dots \ge s_{(N)}$; masked keys are $-\infty$ at the end.
    order: (..., N) int32, `s = take_along_axis(logits, order, -1)`.
    n: (...,) int32, number of valid keys per row.
    log_z: (...,) float, $\log Z = \mathrm{logsumexp}(s)$; NaN for a row flagged invalid under `jax.jit`
      (NaN or +inf logits, or no valid key).
  """

  s: jax.Array
  order: jax.Array
  n: jax.Array
  log_z: jax.Array


# ------------------------------------------------------------------------------------------ dtypes
def as_float(x: Any) -> jax.Array:
  """`x` as a jax array computed in at least float32 (bfloat16 / float16 inputs are upcast, float64 kept)."""
  x = checks.as_array(x)
  if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
    return x.astype(jnp.float32)
  return x


def as_float_array(name: str, x: Any) -> Any:
  """A Python number becomes a float32 scalar array (so `checks.floating_array` can check it); arrays unchanged."""
  if isinstance(x, (float, int)) and not isinstance(x, bool):
    return np.asarray(x, np.float32)
  return x


# ------------------------------------------------------------------------------------------ rows
def effective_valid(logits: jax.Array, valid: jax.Array | None) -> jax.Array:
  """Bool, broadcast to `logits`: the key is unmasked (`valid`) and its logit is not -inf."""
  v = logits > -jnp.inf
  if valid is not None:
    v = v & valid
  return jnp.broadcast_to(v, logits.shape)


def bad_rows(logits: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """(...,) bool: the row holds a NaN or +inf logit, or has no valid key -- the rows flagged under `jax.jit`.

  One elementwise pass and a reduction over the key axis; no host sync.
  """
  nonfinite = jnp.any(jnp.isnan(logits) | (logits == jnp.inf), -1)
  return nonfinite | ~jnp.any(effective_valid(logits, valid), -1)




def sort_rows(logits: jax.Array, valid: jax.Array | None) -> SortedRows:
  """Sorted rows (descending, masked keys last as -inf), valid-key counts and log Z (not flagged: see `flag`)."""
  v = effective_valid(logits, valid) & ~jnp.isnan(logits)
  s = jnp.where(v, logits, -jnp.inf)
  order = jnp.argsort(-s, axis=-1, stable=True).astype(jnp.int32)
  ss = jnp.take_along_axis(s, order, -1)
  n = jnp.sum(v, -1).astype(jnp.int32)
  return SortedRows(ss, order, n, jax.nn.logsumexp(ss, -1))


def head_mask(logits: jax.Array, valid: jax.Array | None, k: jax.Array) -> jax.Array:
  """Bool (..., N): the k largest valid logits of each row (ties broken by position); all False on a bad row."""
  r = sort_rows(logits, valid)
  rank = jnp.argsort(r.order, -1)
  head = (rank < jnp.asarray(k)[..., None]) & effective_valid(logits, valid)
  return head & ~bad_rows(logits, valid)[..., None]


def rcumlogsumexp(x: jax.Array) -> jax.Array:
  r"""Reverse cumulative log-sum-exp along the last axis: out[..., j] = log sum_{i >= j} exp(x[..., i])."""
  return jnp.flip(jax.lax.cumlogsumexp(jnp.flip(x, -1), axis=x.ndim - 1), -1)


def shift_by_max(ss: jax.Array) -> jax.Array:
  """Sorted rows minus their first (largest) entry, so exp/log-sum-exp run at O(1) magnitudes; -inf stays -inf.

  A common offset of 1e4 leaves float32 log-sums with absolute errors of ~1e-3 nats (a relative error of 1e-3 on
  the tail mass); after the shift the errors are ~1e-7 nats. Rows with no finite entry are left at -inf.
  """
  top = ss[..., :1]
  return ss - jnp.where(jnp.isfinite(top), top, 0.0)




def log_tail(logits: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, SortedRows]:
  r"""$\log\tau_k$ for k = 1..N (..., N) from logits shifted by the row max, and the sorted rows (not flagged)."""
  r = sort_rows(logits, valid)
  ss = shift_by_max(r.s)
  incl = rcumlogsumexp(ss)  # log sum_{j >= k}
  log_t = jnp.concatenate([incl[..., 1:], jnp.full_like(incl[..., :1], -jnp.inf)], -1) - incl[..., :1]
  return jnp.minimum(log_t, 0.0), r


# ------------------------------------------------------------------------------------------ eager checks
def check_logits(logits: Any, valid: Any | None, name: str = "logits") -> None:
  """Floating logits (..., N >= 1) without NaN / +inf, a bool `valid` of matching shape, a valid key per row.

  Values are checked only when concrete (see `asoftmax.checks`); under `jax.jit` bad rows are flagged instead.
  """
  checks.logits(logits, name)
  checks.valid(valid, logits.shape, against=name)
  if checks.is_traced(logits, valid):
    return
  v = np.asarray(logits) > -np.inf
  if valid is not None:
    v = v & np.asarray(valid)
  if not v.any(axis=-1).all():
    raise ValueError(f"valid/{name}: a row has no valid key (all masked or -inf)")


def check_k(k: Any, shape: tuple[int, ...], num_keys: int) -> None:
  """`k`: an integer array of shape `shape` (the logits' rows) with entries in [1, num_keys] when concrete."""
  checks.int_array("k", k, 1, num_keys, shape=shape)


def check_finite_at_used_keys(name: str, x: Any, mask: Any | None, lshape: tuple[int, ...]) -> None:
  """(..., N, dim) `x` (keys or values) is finite at every key that some query may attend (`mask`, broadcast to
  the logits' shape `lshape` = (..., Q, N)); masked slots may hold anything (an unused KV-cache slot).

  Skipped for traced input (then the result's rows are flagged)."""
  if checks.is_traced(x, mask):
    return
  used = np.ones(tuple(lshape[:-2]) + tuple(lshape[-1:]), bool)
  if mask is not None:
    used = np.broadcast_to(np.asarray(mask), lshape).any(-2)
  a = np.asarray(x)
  if a.dtype.kind != "f":
    a = a.astype(np.float32)
  fin = np.isfinite(a).all(-1)
  if not (np.broadcast_to(fin, np.broadcast_shapes(fin.shape, used.shape)) | ~used).all():
    raise ValueError(f"{name} must be finite at every unmasked key (it contains -inf, +inf or NaN)")
