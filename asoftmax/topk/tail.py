r"""Tail mass and the divergences it determines (Tzachristas et al., arXiv:2512.07647, Sec. 4).

For one row of logits $s_1..s_n$ (masked keys excluded) with $P = \mathrm{softmax}(s)$, keeping the $k$ largest
logits (head $H_k$) and renormalising gives $\hat P$. Everything here is a function of the tail mass
$\tau_k = \sum_{i \notin H_k} P_i$ (in code always `tail_mass`; `tau` is the rff inverse temperature):

* $\mathrm{TV}(P, \hat P) = \tau_k$ (Lemma 4.1);
* $\mathrm{KL}(\hat P \| P) = -\log(1 - \tau_k)$, so $\mathrm{TV} = 1 - e^{-\mathrm{KL}}$ (Theorem 4.3);
* $\chi^2(\hat P \| P) = \tau_k / (1 - \tau_k)$ and $H^2 = 1 - \sqrt{1 - \tau_k}$ (derived from the TV identity).

The tail is a reverse cumulative log-sum-exp of the sorted logits, never $1 - \mathrm{cumsum}$, so it stays accurate
for $\epsilon$ down to $10^{-3}$ and below.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from asoftmax import checks
from asoftmax.topk import _core
from asoftmax.topk._core import SortedRows


def _valid(valid):
  return None if valid is None else jnp.asarray(valid)


@jax.jit
def _sort_rows(logits, valid):
  r = _core.sort_rows(logits, valid)
  return r._replace(log_z=_core.flag(_core.bad_rows(logits, valid), r.log_z))


def sort_rows(logits: ArrayLike, valid: ArrayLike | None = None) -> SortedRows:
  r"""Sorts each row of logits in descending order, masked keys last.

  Args:
    logits: (..., N) float logits; $-\infty$ marks a masked key.
    valid: optional bool mask broadcastable to `logits`.

  Returns:
    `SortedRows(s, order, n, log_z)`. Under `jax.jit` a row with a NaN or +inf logit, or no valid key, gets
    `log_z` NaN (outside jit such input raises `ValueError`).

  Example:
    >>> r = sort_rows(jnp.array([[0.0, 2.0, 1.0]]))
    >>> r.s, r.order
    (Array([[2., 1., 0.]], dtype=float32), Array([[1, 2, 0]], dtype=int32))
  """
  _core.check_logits(logits, valid)
  return _sort_rows(_core.as_float(logits), _valid(valid))


@jax.jit
def _tail_mass(logits, valid):
  log_t, _ = _core.log_tail(logits, valid)
  return _core.flag(_core.bad_rows(logits, valid), jnp.exp(log_t))


def tail_mass(logits: ArrayLike, valid: ArrayLike | None = None) -> jax.Array:
  r"""Tail mass $\tau_k$ of softmax(logits) after keeping the top $k$, for every $k = 1..N$.

  $\tau_k = \sum_{j > k} e^{s_{(j)}} / Z$, computed as a reverse cumulative log-sum-exp (no cancellation).
  $\tau_k$ is nonincreasing and $\tau_k = 0$ for $k \ge n$ (the number of valid keys). Ties do not matter.

  Args:
    logits: (..., N) float logits (already scaled, e.g. $q \cdot k / \sqrt{d_h}$); $-\infty$ marks a masked key.
      bfloat16 / float16 are computed in float32.
    valid: optional bool mask broadcastable to `logits`; False keys are excluded (as if $-\infty$).

  Returns:
    (..., N) float array; entry `k - 1` is $\tau_k$. Under `jax.jit` a row with a NaN or +inf logit, or no valid
    key, is NaN (outside jit such input raises `ValueError`).

  Example:
    >>> np.asarray(tail_mass(jnp.log(jnp.array([0.5, 0.3, 0.2]))), float).round(4)
    array([0.5, 0.2, 0. ])
  """
  _core.check_logits(logits, valid)
  return _tail_mass(_core.as_float(logits), _valid(valid))


class Divergences(NamedTuple):
  """TV, KL, chi^2 and squared Hellinger distance between P and its top-k truncation P_hat (TV = tail mass).

  All arrays have the shape of the tail mass they were computed from (one entry per row).
  """

  tv: jax.Array
  kl: jax.Array
  chi2: jax.Array
  hellinger2: jax.Array


@jax.jit
def _divergences(t):
  bad = ~((t >= 0) & (t < 1))  # NaN included
  d = Divergences(t, -jnp.log1p(-t), t / (1.0 - t), 1.0 - jnp.sqrt(1.0 - t))
  return Divergences(*(_core.flag(bad, x) for x in d))


def divergences(tail_mass: ArrayLike) -> Divergences:
  r"""TV, KL, $\chi^2$ and squared Hellinger between $P$ and its top-$k$ truncation $\hat P$, from the tail mass.

  $\mathrm{TV} = \tau$, $\mathrm{KL}(\hat P\|P) = -\log(1-\tau)$, $\chi^2(\hat P\|P) = \tau/(1-\tau)$,
  $H^2 = 1 - \sqrt{1-\tau}$ with $\tau$ = `tail_mass` (Lemma 4.1, Theorem 4.3 of the paper).

  Args:
    tail_mass: float array (any shape) of tail masses $\tau \in [0, 1)$, e.g. from `tail_mass`.

  Returns:
    `Divergences(tv, kl, chi2, hellinger2)`, each of `tail_mass`'s shape. Under `jax.jit` an entry outside [0, 1)
    or NaN gives NaN (outside jit it raises `ValueError`).

  Example:
    >>> d = divergences(jnp.array([0.2, 0.5]))
    >>> np.asarray(d.kl, float).round(4), np.asarray(d.chi2, float).round(4)  # -log(1 - tau), tau / (1 - tau)
    (array([0.2231, 0.6931]), array([0.25, 1.  ]))
  """
  tail_mass = _core.as_float_array("tail_mass", tail_mass)
  checks.floating_array("tail_mass", tail_mass)
  if not checks.is_traced(tail_mass):
    t = np.asarray(tail_mass, np.float32)
    if not ((t >= 0) & (t < 1)).all():
      raise ValueError(f"tail_mass must be in [0, 1), got values in [{float(t.min())}, {float(t.max())}]")
  return _divergences(_core.as_float(tail_mass))


@jax.jit
def _tv_from_kl(kl):
  return jnp.where(kl >= 0, -jnp.expm1(-kl), jnp.nan)


def tv_from_kl(kl: ArrayLike) -> jax.Array:
  r"""$\mathrm{TV} = 1 - e^{-\mathrm{KL}(\hat P\|P)}$ (Theorem 4.3), computed as `-expm1(-kl)`.

  Args:
    kl: float array (any shape) of KL divergences $\ge 0$; $+\infty$ gives TV = 1.

  Returns:
    TV, `kl`'s shape. Under `jax.jit` a negative or NaN entry gives NaN (outside jit it raises `ValueError`).

  Example:
    >>> tv_from_kl(jnp.array([0.0, jnp.log(2.0), jnp.inf]))
    Array([0. , 0.5, 1. ], dtype=float32)
  """
  kl = _core.as_float_array("kl", kl)
  checks.floating_array("kl", kl, finite=False)
  if not checks.is_traced(kl):
    a = np.asarray(kl, np.float32)
    if (np.isnan(a) | (a < 0)).any():
      raise ValueError("kl must be >= 0 (NaN and negative entries are not divergences)")
  return _tv_from_kl(_core.as_float(kl))


@jax.jit
def _truncated_divergences(logits, valid, k):
  r = _core.sort_rows(logits, valid)
  v = _core.effective_valid(logits, valid) & ~jnp.isnan(logits)
  s = jnp.where(v, logits, -jnp.inf)
  rank = jnp.argsort(r.order, -1)
  head = (rank < k[..., None]) & v
  logp = s - r.log_z[..., None]
  p = jnp.exp(logp)
  log_zh = jax.nn.logsumexp(jnp.where(head, s, -jnp.inf), -1)
  logph = jnp.where(head, s - log_zh[..., None], -jnp.inf)
  ph = jnp.exp(logph)
  tv = 0.5 * jnp.sum(jnp.abs(p - ph), -1)
  kl = jnp.sum(jnp.where(head, ph * (logph - logp), 0.0), -1)
  chi2 = jnp.sum(jnp.where(head, ph * jnp.exp(logph - logp), 0.0), -1) - 1.0
  hel = 1.0 - jnp.sum(jnp.where(head, jnp.exp(0.5 * (logp + logph)), 0.0), -1)
  bad = _core.bad_rows(logits, valid) | (k < 1) | (k > logits.shape[-1])
  return Divergences(*(jnp.where(bad, jnp.nan, x) for x in (tv, kl, chi2, hel)))


def truncated_divergences(logits: ArrayLike, valid: ArrayLike | None, k: ArrayLike) -> Divergences:
  r"""TV, KL, $\chi^2$, $H^2$ computed directly from $P$ and $\hat P$ (no closed form), to check the identities.

  tv = $\frac12\sum|P - \hat P|$, kl = $\sum \hat P\log(\hat P/P)$, chi2 = $\sum \hat P^2/P - 1$,
  hellinger2 = $1 - \sum\sqrt{P\hat P}$; `divergences(tail_mass)` gives the same numbers in closed form.

  Args:
    logits: (..., N) float logits ($-\infty$ = masked). valid: optional bool mask broadcastable to `logits`.
    k: (...,) int head size per row, 1 <= k <= N (a k above the row's valid-key count n keeps all n keys).

  Returns:
    `Divergences`, each (...,). Under `jax.jit` a row with NaN / +inf logits, no valid key or k outside [1, N] is
    NaN (outside jit such input raises `ValueError`).

  Example:
    >>> d = truncated_divergences(jnp.log(jnp.array([0.5, 0.3, 0.2])), None, jnp.array(2))
    >>> round(float(d.tv), 4), round(float(d.kl), 4)  # tail mass 0.2: TV = 0.2, KL = -log(0.8)
    (0.2, 0.2231)
  """
  _core.check_logits(logits, valid)
  _core.check_k(k, tuple(logits.shape[:-1]), logits.shape[-1])
  return _truncated_divergences(_core.as_float(logits), _valid(valid), jnp.asarray(k))
