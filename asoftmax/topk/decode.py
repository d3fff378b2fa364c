r"""Certified top-k for causal (decoder) attention at long context, without sorting (issue 15 part 2).

Beyond the paper. The exact oracle $k_\epsilon = \min\{k : \tau_k \le \epsilon\}$ (`certificates.certified_k`,
method "exact") sorts every row; on XLA:CPU a sort of $9 \times 2048$ rows of 2,048 logits takes ~10 s, so a
30-layer decoder would spend minutes per window sorting. The same head is a *threshold set*: with
$\mathrm{tail}(t) = \sum_{s_i < t} e^{s_i}$ (nondecreasing in $t$), the smallest head with tail mass $\le \epsilon$
is $H = \{i : s_i \ge t^\star\}$, $t^\star = \max\{t : \mathrm{tail}(t) \le \epsilon Z\}$. `threshold_heads` finds
$t^\star$ by bisection (`lax.fori_loop`, a fixed number of steps, all epsilons at once), in row blocks
(`lax.map`) so that one block stays in cache.

Guarantee: the returned head always satisfies $\mathrm{TV}(P, \hat P_H) = \tau_H \le \epsilon$: the computed tail
is compared with $\epsilon Z / (1 + m)$, $m = 4 (N + 4) u$ ($u$ = unit roundoff), which covers the rounding of
float sums of $N$ nonnegative terms (relative error $\le (N-1)u/(1-(N-1)u)$ each for tail and $Z$) and of the
exponentials; keys whose $e^{s_i - \max s}$ underflows (weight $< 10^{-38}$) count as zero. $|H|$ equals the
sorted oracle's $k_\epsilon$ (for the same rounding rule) except at exact ties of logits at the threshold, where
every tied key is kept (so $|H| \ge k_\epsilon$ there), and when the bisection's final bracket is wider than the
gap between two logits (it halves the bracket $[\log(\epsilon/N), 1]$ around the row max `iters` times: 26
steps resolve ~$2^{-26} \cdot 15$ nats, about float32's resolution there).

Example:
  >>> s = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  >>> r = threshold_heads(s, None, (0.1, 0.01))
  >>> r.k  # eps = 0.1: two keys leave 0.2 > 0.1, three leave 0.05; eps = 0.01: all four
  Array([[3, 4]], dtype=int32)
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


class ThresholdHeads(NamedTuple):
  r"""Per row and epsilon (leading dims (...), last axis E = len(epsilons)).

  Attributes:
    k: (..., E) int32 head size $|H|$ (number of valid keys with logit $\ge$ threshold); 0 on a flagged row.
    tv: (..., E) float32 realised tail mass $\tau_H = \mathrm{TV}(P, \hat P_H)$ (computed in float32); NaN on a
      flagged row (under `jax.jit`: a NaN or +inf logit, or no valid key).
    threshold: (..., E) float32 $t^\star$ relative to the row max (logit $-$ max); the head is $s - \max s \ge t^\star$;
      NaN on a flagged row.
    n: (...,) int32 valid keys per row.
  """

  k: jax.Array
  tv: jax.Array
  threshold: jax.Array
  n: jax.Array


def sum_margin(num_keys: int, dtype=jnp.float32) -> float:
  """Relative margin $m = 4(N + 4)u$ for comparing float sums of N nonnegative terms (see the module docstring)."""
  u = float(jnp.finfo(dtype).eps) / 2
  return 4.0 * (int(num_keys) + 4) * u


def _block_heads(s, v, eps, iters):
  """s (R, N) float32 logits, v (R, N) bool; eps (E,). Returns k (R, E), tv (R, E), t (R, E), sh (R, N), e (R, N)."""
  N = s.shape[-1]
  v = v & (s > -jnp.inf)
  mx = jnp.max(jnp.where(v, s, -jnp.inf), -1, keepdims=True)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  sh = jnp.where(v, s - mx, -jnp.inf)
  e = jnp.exp(sh)
  z = jnp.sum(e, -1)  # (R,)
  target = eps[None, :] * (z / (1.0 + sum_margin(N, s.dtype)))[:, None]  # (R, E)

  def tail(t):  # t (R, E) -> (R, E) sum of e over keys with sh < t
    return jnp.sum(jnp.where(sh[:, None, :] < t[..., None], e[:, None, :], 0.0), -1)

  lo0 = jnp.min(jnp.where(v, sh, jnp.inf), -1)  # every key in the head: tail 0
  lo0 = jnp.where(jnp.isfinite(lo0), lo0, 0.0)
  # Every key below log(target / N) has weight < target / N, so at most N of them sum to <= target: a valid start.
  lo = jnp.maximum(lo0[:, None], jnp.log(target) - jnp.log(jnp.float32(N)))
  hi = jnp.ones_like(lo)  # above the max (0): the tail is Z > target

  def step(_, bracket):
    a, b = bracket
    mid = 0.5 * (a + b)
    ok = tail(mid) <= target
    return jnp.where(ok, mid, a), jnp.where(ok, b, mid)

  lo, _ = jax.lax.fori_loop(0, iters, step, (lo, hi))
  k = jnp.sum((sh[:, None, :] >= lo[..., None]) & v[:, None, :], -1).astype(jnp.int32)
  tv = tail(lo) / z[:, None]
  return k, tv, lo, sh, e


def _blocked(fn, rows, row_block):
  """Applies fn to (R, ...) row arrays in blocks of row_block rows (lax.map), padding the last block."""
  R = rows[0].shape[0]
  nb = -(-R // row_block)
  pad = nb * row_block - R
  padded = [jnp.concatenate([x, jnp.broadcast_to(fill, (pad,) + x.shape[1:]).astype(x.dtype)]) if pad else x
            for x, fill in zip(rows, (0.0, True))]
  out = jax.lax.map(lambda a: fn(*a), tuple(x.reshape((nb, row_block) + x.shape[1:]) for x in padded))
  return jax.tree.map(lambda y: y.reshape((nb * row_block,) + y.shape[2:])[:R], out)


@functools.partial(jax.jit, static_argnames=("epsilons", "iters", "row_block"))
def _threshold_heads(logits, valid, epsilons, iters, row_block):
  shape = logits.shape
  N = shape[-1]
  s = logits.reshape((-1, N)).astype(jnp.float32)
  v = jnp.broadcast_to(valid, shape).reshape((-1, N))
  eps = jnp.asarray(epsilons, jnp.float32)
  k, tv, t = _blocked(lambda a, b: _block_heads(a, b, eps, iters)[:3], (s, v), row_block)
  n = jnp.sum(v & (s > -jnp.inf), -1).astype(jnp.int32)
  bad = _core.bad_rows(s, v)  # the jit validity flag: a NaN / +inf logit or no valid key (R,)
  k = jnp.where(bad[:, None], 0, k)
  tv, t = _core.flag(bad, tv), _core.flag(bad, t)
  E = len(epsilons)
  return ThresholdHeads(k.reshape(shape[:-1] + (E,)), tv.reshape(shape[:-1] + (E,)), t.reshape(shape[:-1] + (E,)),
                        n.reshape(shape[:-1]))


def _check(logits, valid, iters, row_block):
  checks.logits(logits)
  checks.valid(valid, logits.shape)
  iters = checks.int_in_range("iters", iters)
  row_block = checks.int_in_range("row_block", row_block)
  if not checks.is_traced(logits, valid):
    vv = np.asarray(logits) > -np.inf
    if valid is not None:
      vv = vv & np.asarray(valid)
    if not vv.any(-1).all():
      raise ValueError("valid/logits: a row has no valid key (all masked or -inf)")
  return iters, row_block


def threshold_heads(logits: ArrayLike, valid: ArrayLike | None, epsilons, iters: int = 26,
                    row_block: int = 256) -> ThresholdHeads:
  r"""Smallest certified heads $H_\epsilon = \{i : s_i \ge t^\star_\epsilon\}$ with $\tau_H \le \epsilon$, by bisection.

  Args:
    logits: (..., N) float logits ($-\infty$ = masked), e.g. causal attention scores.
    valid: optional bool mask broadcastable to `logits`.
    epsilons: a sequence of TV budgets in (0, 1) (static Python numbers; all found in one pass).
    iters: bisection steps on the threshold (26 halve a bracket of ~15 nats to float32 resolution).
    row_block: rows per `lax.map` step (memory: row_block * N * len(epsilons) floats).

  Returns:
    `ThresholdHeads(k, tv, threshold, n)`. Always tv <= epsilon (module docstring); k = the sorted oracle's
    $k_\epsilon$ except at exact ties at the threshold (then larger). Under `jax.jit` a row with a NaN or +inf logit
    or no valid key is flagged: k = 0, tv and threshold NaN.

  Raises:
    ValueError: bad epsilons (or a traced one), iters or row_block, bad shapes or dtype, or (concrete input) NaN /
      +inf logits or a row with no valid key.
  """
  iters, row_block = _check(logits, valid, iters, row_block)
  eps = checks.open_unit_tuple("epsilons", epsilons)
  logits = jnp.asarray(logits)
  v = jnp.ones((), bool) if valid is None else jnp.asarray(valid)
  return _threshold_heads(logits, v, eps, iters, row_block)


def _topk_block(s, v, eps, iters):
  k, tv, t, sh, e = _block_heads(s, v, eps[None], iters)
  head = sh >= t[:, :1]
  w = jnp.where(head, e, 0.0)
  return w / jnp.sum(w, -1, keepdims=True), k[:, 0], tv[:, 0]


@functools.partial(jax.jit, static_argnames=("iters", "row_block"))
def _threshold_topk_probs(logits, valid, epsilon, iters, row_block):
  shape = logits.shape
  N = shape[-1]
  s = logits.reshape((-1, N)).astype(jnp.float32)
  v = jnp.broadcast_to(valid, shape).reshape((-1, N))
  eps = jnp.asarray(epsilon, jnp.float32)
  p, k, tv = _blocked(lambda a, b: _topk_block(a, b, eps, iters), (s, v), row_block)
  bad = _core.bad_rows(s, v) | ~_core.eps_ok(epsilon)  # the jit validity flag (R,)
  p, tv, k = _core.flag(bad, p), _core.flag(bad, tv), jnp.where(bad, 0, k)
  return p.reshape(shape), k.reshape(shape[:-1]), tv.reshape(shape[:-1])


def threshold_topk_probs(logits: ArrayLike, valid: ArrayLike | None, epsilon: float, iters: int = 26,
                         row_block: int = 256) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Truncated softmax $\hat P$ on the smallest certified head of every row (no sort): a drop-in attention.

  $\hat P_i = e^{s_i} / \sum_{j \in H} e^{s_j}$ for $i \in H_\epsilon$ (see `threshold_heads`), 0 elsewhere;
  $\mathrm{TV}(\mathrm{softmax}(s), \hat P) = \tau_H \le \epsilon$ on every row. Traceable (use inside a model).

  Args:
    logits: (..., N) float ($-\infty$ = masked); valid: optional bool mask broadcastable to logits.
    epsilon: TV budget in (0, 1) (may be traced). iters, row_block: as in `threshold_heads`.

  Returns:
    (probs (..., N), k (...,) int32 head size, tv (...,) realised tail mass). Under `jax.jit` a row with a NaN or
    +inf logit or no valid key, or every row when a traced epsilon is outside (0, 1), is flagged: probs and tv NaN,
    k = 0.

  Example:
    >>> p, k, tv = threshold_topk_probs(jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]])), None, 0.1)
    >>> print(k, p.round(3), tv)
    [3] [[0.526 0.316 0.158 0.   ]] [0.05]
  """
  iters, row_block = _check(logits, valid, iters, row_block)
  checks.open_unit("epsilon", epsilon)
  v = jnp.ones((), bool) if valid is None else jnp.asarray(valid)
  return _threshold_topk_probs(jnp.asarray(logits), v, jnp.asarray(epsilon, jnp.float32), iters, row_block)
