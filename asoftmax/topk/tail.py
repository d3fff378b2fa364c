r"""Tail mass and the divergences it determines (Tzachristas et al., arXiv:2512.07647, Sec. 4).

For one row of logits $s_1..s_n$ (masked keys excluded) with $P = \mathrm{softmax}(s)$, keeping the $k$ largest
logits (head $H_k$) and renormalising gives $\hat P$. Everything here is a function of the tail mass
$\tau_k = \sum_{i \notin H_k} P_i$:

* $\mathrm{TV}(P, \hat P) = \tau_k$ (Lemma 4.1);
* $\mathrm{KL}(\hat P \| P) = -\log(1 - \tau_k)$, so $\mathrm{TV} = 1 - e^{-\mathrm{KL}}$ (Theorem 4.3);
* $\chi^2(\hat P \| P) = \tau_k / (1 - \tau_k)$ and $H^2 = 1 - \sqrt{1 - \tau_k}$ (derived; spec Sec. 2).

The tail is a reverse cumulative log-sum-exp of the sorted logits, never $1 - \mathrm{cumsum}$, so it stays accurate
for $\epsilon$ down to $10^{-3}$ and below.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from asoftmax import checks


class SortedRows(NamedTuple):
  r"""Logits sorted in descending order with masked keys last.

  Attributes:
    s: (..., N) float, sorted logits $s_{(1)} \ge \dots \ge s_{(N)}$; masked keys are $-\infty$ at the end.
    order: (..., N) int32, `s = take_along_axis(logits, order, -1)`.
    n: (...,) int32, number of valid keys per row.
    log_z: (...,) float, $\log Z = \mathrm{logsumexp}(s)$.
  """

  s: jax.Array
  order: jax.Array
  n: jax.Array
  log_z: jax.Array


def _effective_valid(logits: jax.Array, valid: jax.Array | None) -> jax.Array:
  v = logits > -jnp.inf
  if valid is not None:
    v = v & valid
  return v


def rcumlogsumexp(x: jax.Array) -> jax.Array:
  r"""Reverse cumulative log-sum-exp along the last axis: out[..., j] = log sum_{i >= j} exp(x[..., i])."""
  return jnp.flip(jax.lax.cumlogsumexp(jnp.flip(x, -1), axis=x.ndim - 1), -1)


def _sort_rows(logits, valid) -> SortedRows:
  logits = jnp.asarray(logits)
  v = _effective_valid(logits, None if valid is None else jnp.asarray(valid))
  v = jnp.broadcast_to(v, logits.shape)
  s = jnp.where(v, logits, -jnp.inf)
  order = jnp.argsort(-s, axis=-1, stable=True).astype(jnp.int32)
  ss = jnp.take_along_axis(s, order, -1)
  n = jnp.sum(v, -1).astype(jnp.int32)
  return SortedRows(ss, order, n, jax.nn.logsumexp(ss, -1))


sort_rows = jax.jit(_sort_rows)


def shift_by_max(ss: jax.Array) -> jax.Array:
  """Sorted rows minus their first (largest) entry, so exp/log-sum-exp run at O(1) magnitudes; -inf stays -inf.

  A common offset of 1e4 leaves float32 log-sums with absolute errors of ~1e-3 nats (a relative error of 1e-3 on
  the tail mass); after the shift the errors are ~1e-7 nats. Rows with no finite entry are left at -inf.
  """
  top = ss[..., :1]
  return ss - jnp.where(jnp.isfinite(top), top, 0.0)


def rounding_margin(num_keys: int, dtype=jnp.float32) -> float:
  r"""Relative safety margin $m$ for comparing a float tail mass (or a bound on it) with $\epsilon$.

  A computed tail mass $\tilde\tau$ of a row of `num_keys` shifted logits satisfies
  $|\tilde\tau - \tau| \le m\,\tau$ with $m = 64\,u\,\lceil\log_2 N + 1\rceil$ ($u$ = unit roundoff; a
  log-sum-exp scan of depth $O(\log N)$ over values of magnitude $O(\log N + |\log\epsilon|)$); measured errors
  are 10-100x smaller (tests/test_topk_library.py). Stopping rules compare with $\epsilon/(1+m)$ so that the true
  tail mass of the chosen head is $\le \epsilon$.
  """
  u = float(jnp.finfo(dtype).eps) / 2
  return 64.0 * u * (math.ceil(math.log2(max(int(num_keys), 2))) + 1)


def _log_tail(logits, valid):
  r = _sort_rows(logits, valid)
  ss = shift_by_max(r.s)
  # log tau_k for k = 1..N: log sum_{j > k} exp(s_(j)) - log Z, on logits shifted by the row max.
  incl = rcumlogsumexp(ss)  # log sum_{j >= k}
  log_t = jnp.concatenate([incl[..., 1:], jnp.full_like(incl[..., :1], -jnp.inf)], -1) - incl[..., :1]
  return jnp.minimum(log_t, 0.0), r


@jax.jit
def _tail_mass(logits, valid):
  log_t, _ = _log_tail(logits, valid)
  return jnp.exp(log_t)


def tail_mass(logits: ArrayLike, valid: ArrayLike | None = None) -> jax.Array:
  r"""Tail mass $\tau_k$ of softmax(logits) after keeping the top $k$, for every $k = 1..N$.

  $\tau_k = \sum_{j > k} e^{s_{(j)}} / Z$, computed as a reverse cumulative log-sum-exp (no cancellation).
  $\tau_k$ is nonincreasing and $\tau_k = 0$ for $k \ge n$ (the number of valid keys). Ties do not matter.

  Args:
    logits: (..., N) float logits (already scaled, e.g. $q \cdot k / \sqrt{d_h}$); $-\infty$ marks a masked key.
    valid: optional bool mask broadcastable to `logits`; False keys are excluded (as if $-\infty$).

  Returns:
    (..., N) float array; entry `k - 1` is $\tau_k$.

  Example:
    >>> tail_mass(jnp.log(jnp.array([0.5, 0.3, 0.2])))  # [0.5, 0.2, 0.0]
  """
  checks.logits(logits)
  checks.valid(valid, logits.shape)
  _check_rows_nonempty(logits, valid)
  return _tail_mass(jnp.asarray(logits), None if valid is None else jnp.asarray(valid))


def _check_rows_nonempty(logits, valid):
  if checks.is_traced(logits, valid):
    return
  import numpy as np

  v = np.asarray(logits) > -np.inf
  if valid is not None:
    v = v & np.asarray(valid)
  if not v.any(axis=-1).all():
    raise ValueError("valid/logits: a row has no valid key (all masked or -inf)")


class Divergences(NamedTuple):
  """Closed forms in the tail mass tau (spec Sec. 2). All arrays have tau's shape."""

  tv: jax.Array
  kl: jax.Array
  chi2: jax.Array
  hellinger2: jax.Array


@jax.jit
def divergences(tau: ArrayLike) -> Divergences:
  r"""TV, KL, $\chi^2$ and squared Hellinger between $P$ and its top-$k$ truncation $\hat P$, from $\tau$.

  $\mathrm{TV} = \tau$, $\mathrm{KL}(\hat P\|P) = -\log(1-\tau)$, $\chi^2(\hat P\|P) = \tau/(1-\tau)$,
  $H^2 = 1 - \sqrt{1-\tau}$ (paper Lemma 4.1, Theorem 4.3; spec Sec. 2).

  Args:
    tau: float array of tail masses in [0, 1).

  Returns:
    `Divergences(tv, kl, chi2, hellinger2)`.
  """
  tau = jnp.asarray(tau)
  return Divergences(tau, -jnp.log1p(-tau), tau / (1.0 - tau), 1.0 - jnp.sqrt(1.0 - tau))


@jax.jit
def tv_from_kl(kl: ArrayLike) -> jax.Array:
  r"""$\mathrm{TV} = 1 - e^{-\mathrm{KL}(\hat P\|P)}$ (Theorem 4.3), computed as `-expm1(-kl)`."""
  return -jnp.expm1(-jnp.asarray(kl))


@jax.jit
def truncated_divergences(logits: ArrayLike, valid: ArrayLike, k: ArrayLike) -> dict:
  """TV, KL, chi^2, Hellinger^2 computed directly from P and P_hat (no closed form), for checking the identities.

  Args:
    logits: (..., N) float; valid: bool broadcastable; k: (...,) int, head size per row (1 <= k <= n).

  Returns:
    dict of (...,) arrays: tv = 1/2 sum |P - P_hat|, kl = sum P_hat log(P_hat / P), chi2 = sum P_hat^2 / P - 1,
    hellinger2 = 1 - sum sqrt(P P_hat).
  """
  logits = jnp.asarray(logits)
  v = jnp.broadcast_to(_effective_valid(logits, jnp.asarray(valid)), logits.shape)
  s = jnp.where(v, logits, -jnp.inf)
  r = _sort_rows(logits, valid)
  rank = jnp.argsort(r.order, -1)
  head = (rank < jnp.asarray(k)[..., None]) & v
  logp = s - r.log_z[..., None]
  p = jnp.exp(logp)
  log_zh = jax.nn.logsumexp(jnp.where(head, s, -jnp.inf), -1)
  logph = jnp.where(head, s - log_zh[..., None], -jnp.inf)
  ph = jnp.exp(logph)
  tv = 0.5 * jnp.sum(jnp.abs(p - ph), -1)
  kl = jnp.sum(jnp.where(head, ph * (logph - logp), 0.0), -1)
  chi2 = jnp.sum(jnp.where(head, ph * jnp.exp(logph - logp), 0.0), -1) - 1.0
  hel = 1.0 - jnp.sum(jnp.where(head, jnp.exp(0.5 * (logp + logph)), 0.0), -1)
  return dict(tv=tv, kl=kl, chi2=chi2, hellinger2=hel)
