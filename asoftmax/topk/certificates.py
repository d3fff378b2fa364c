r"""Certificates on the tail mass from ordered logits, and the certified $k$ per row (paper Sec. 4; spec Sec. 3, 6).

Every bound $B_k$ here satisfies $B_k \ge \tau_k$ for all $k$ (proofs in the spec, Sec. 3). They use
$f(A, B) = B / (A + B)$, increasing in $B$ and decreasing in $A$: a lower bound on the head sum $Z_H$ and an upper
bound on the tail sum $Z_T$ give an upper bound on $\tau = Z_T / Z$. All are computed in log space as
$\mathrm{sigmoid}(\log Z_T^{\uparrow} - \log Z_H^{\downarrow})$.

* single gap (Theorem 4.5): $\tau_k \le \mathrm{sigmoid}(\log(n-k) - \log k - \Delta_k)$, $\Delta_k = s_{(k)} - s_{(k+1)}$;
* exact head (derived): $\tau_k \le (n-k) e^{s_{(k+1)}} / (Z_H + (n-k) e^{s_{(k+1)}})$;
* multi-gap (derived; dyadic breakpoints $r_\ell = k + 2^\ell - 1$): tail ranks $[k + 2^\ell, k + 2^{\ell+1})$ are
  each bounded by $s_{(k + 2^\ell)}$, and the head sum is exact;
* blockwise (eq. 4.4): per-block bounds $\ell_b \le s_j \le u_b$ give lower and upper bounds on $\tau$.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from asoftmax import checks
from asoftmax.topk import tail as tail_lib

METHODS = ("exact", "single_gap", "exact_head", "multi_gap")


class Bounds(NamedTuple):
  r"""Upper bounds on $\tau_k$ for every k = 1..N (entry k-1), each (..., N); 0 where k >= n."""

  single_gap: jax.Array
  exact_head: jax.Array
  multi_gap: jax.Array


def _bounds_from_sorted(ss: jax.Array, n: jax.Array, which=("single_gap", "exact_head", "multi_gap")) -> Bounds:
  ss = tail_lib.shift_by_max(ss)  # every bound is shift-invariant; O(1) magnitudes keep float32 accurate
  N = ss.shape[-1]
  kk = jnp.arange(1, N + 1)
  nn = n[..., None]
  in_range = kk < nn
  s_next = jnp.concatenate([ss[..., 1:], jnp.full_like(ss[..., :1], -jnp.inf)], -1)  # s_(k+1)
  safe_next = jnp.where(in_range, s_next, 0.0)
  safe_cur = jnp.where(kk <= nn, ss, 0.0)
  log_r = jnp.log(jnp.maximum(nn - kk, 1).astype(ss.dtype))  # log(n - k)
  log_k = jnp.log(kk.astype(ss.dtype))
  zero = jnp.zeros((), ss.dtype)
  # Single gap: Z_H >= k e^{s_(k)}, Z_T <= (n-k) e^{s_(k+1)}.
  b1 = jnp.where(in_range, jax.nn.sigmoid(log_r + safe_next - log_k - safe_cur), zero)
  # Exact head: Z_H exact (cumulative log-sum-exp), same tail bound.
  log_zh = jax.lax.cumlogsumexp(ss, axis=ss.ndim - 1)
  safe_zh = jnp.where(kk <= nn, log_zh, 0.0)
  b2 = jnp.where(in_range, jax.nn.sigmoid(log_r + safe_next - safe_zh), zero)
  if "multi_gap" not in which:
    return Bounds(b1, b2, None)
  # Multi-gap, dyadic segments: ranks [k + 2^l, min(k + 2^{l+1} - 1, n)] bounded by s_(k + 2^l).
  levels = max(1, math.ceil(math.log2(max(N, 2))) + 1)
  pw = 2 ** jnp.arange(levels)  # (L,)
  start = kk[:, None] + pw[None, :]  # 1-based rank of segment's first element, (N, L)
  size = jnp.clip(jnp.minimum(pw[None, :], nn[..., None] - start + 1), 0, None)  # (..., N, L)
  idx = jnp.clip(start - 1, 0, N - 1)
  s_start = ss[..., idx]  # (..., N, L)
  log_seg = jnp.where(size > 0, jnp.log(jnp.maximum(size, 1).astype(ss.dtype)) + jnp.where(size > 0, s_start, 0.0),
                      -jnp.inf)
  log_tail_ub = jax.nn.logsumexp(log_seg, -1)
  b3 = jnp.where(in_range, jax.nn.sigmoid(jnp.where(in_range, log_tail_ub, 0.0) - safe_zh), zero)
  return Bounds(b1, b2, b3)


@jax.jit
def _tail_bounds(logits, valid):
  r = tail_lib._sort_rows(logits, valid)
  return _bounds_from_sorted(r.s, r.n)


def tail_bounds(logits: ArrayLike, valid: ArrayLike | None = None) -> Bounds:
  r"""The three ordered-logit certificates $B_k \ge \tau_k$ for every $k$.

  Args:
    logits: (..., N) float logits; $-\infty$ marks a masked key.
    valid: optional bool mask broadcastable to `logits`.

  Returns:
    `Bounds(single_gap, exact_head, multi_gap)`, each (..., N) with entry `k-1` bounding $\tau_k$.
    Always `multi_gap <= exact_head <= single_gap` and each is `>= tail_mass(logits, valid)`.
  """
  checks.logits(logits)
  checks.valid(valid, logits.shape)
  tail_lib._check_rows_nonempty(logits, valid)
  return _tail_bounds(jnp.asarray(logits), None if valid is None else jnp.asarray(valid))


class CertifiedK(NamedTuple):
  """Certified head size per row for each method in `METHODS` (all (...,) arrays).

  k: dict method -> int32 head size; tv: dict method -> realised tail mass tau at that k (= TV(P, P_hat));
  certificate: dict method -> the bound at that k (for "exact", the exact tail mass); n: valid keys per row.
  """

  k: dict
  tv: dict
  certificate: dict
  n: jax.Array


def _first_leq(b: jax.Array, eps) -> jax.Array:
  return (1 + jnp.argmax(b <= eps, -1)).astype(jnp.int32)


def _certified_k_impl(logits, valid, epsilon, methods=METHODS) -> CertifiedK:
  log_t, r = tail_lib._log_tail(logits, valid)
  tau = jnp.exp(log_t)
  bound_names = [m for m in methods if m != "exact"]
  b = _bounds_from_sorted(r.s, r.n, bound_names) if bound_names else None
  # Rounding margin: the exact rule compares the float tail with eps / (1 + m), so the true tail is <= eps; the
  # certificates compare with eps / (1 + m)^2, so where a bound equals the tail in exact arithmetic (ties, a flat
  # tail) rounding cannot put k_cert below k_exact.
  m = tail_lib.rounding_margin(logits.shape[-1], tau.dtype)
  eps_exact = epsilon / (1.0 + m)
  eps_cert = eps_exact / (1.0 + m)
  ks = {"exact": (1 + jnp.sum(tau > eps_exact, -1)).astype(jnp.int32)}
  certs = {"exact": tau}
  for name in bound_names:
    bk = getattr(b, name)
    ks[name] = _first_leq(bk, eps_cert)
    certs[name] = bk
  at = lambda x, k: jnp.take_along_axis(x, (k - 1)[..., None], -1)[..., 0]
  return CertifiedK(
      k=ks,
      tv={m: at(tau, ks[m]) for m in ks},
      certificate={m: at(certs[m], ks[m]) for m in ks},
      n=r.n,
  )


_certified_k = jax.jit(_certified_k_impl, static_argnames=("methods",))


def certified_k(logits: ArrayLike, valid: ArrayLike | None, epsilon: float,
                methods: tuple[str, ...] = METHODS) -> CertifiedK:
  r"""Smallest certified head size per row, exact and from each certificate (spec Sec. 6, procedures 1-2).

  exact: $k_\epsilon = \min\{k : \tau_k \le \epsilon\} = 1 + \#\{k : \tau_k > \epsilon\}$;
  certificate-only: $k_B = \min\{k : B_k \le \epsilon\} \ge k_\epsilon$, so $\tau_{k_B} \le \epsilon$ is guaranteed.

  Float rounding: logits are shifted by their row max, the exact rule compares the float32 tail with
  $\epsilon/(1+m)$ and the certificates with $\epsilon/(1+m)^2$, $m$ = `tail.rounding_margin(N)` ($\approx 3\cdot
  10^{-5}$ at N = 256). So the true tail mass at every returned k is $\le \epsilon$, and $k_B \ge k_\epsilon$
  even where a bound is tight (exact ties); $k_\epsilon$ can exceed the infinitely precise oracle by one when
  $\tau_k \in (\epsilon/(1+m), \epsilon]$.

  Args:
    logits: (..., N) float logits ($-\infty$ = masked). valid: optional bool mask broadcastable to logits.
    epsilon: TV budget in (0, 1).
    methods: which of `METHODS` to compute ("exact" is always included).

  Returns:
    `CertifiedK` with dicts keyed by the requested methods.

  Example:
    >>> out = certified_k(jax.random.normal(key, (4, 128)) * 2, None, 0.01)
    >>> out.k["exact"], out.k["multi_gap"]
  """
  checks.epsilon(epsilon)
  checks.logits(logits)
  checks.valid(valid, logits.shape)
  tail_lib._check_rows_nonempty(logits, valid)
  methods = tuple(methods)
  if any(m not in METHODS for m in methods):
    raise ValueError(f"methods must be a subset of {METHODS}, got {methods}")
  return _certified_k(jnp.asarray(logits), None if valid is None else jnp.asarray(valid), epsilon, methods)


@jax.jit
def blockwise_bounds(log_lower: ArrayLike, log_upper: ArrayLike, sizes: ArrayLike, in_head: ArrayLike,
                     log_head_exact: ArrayLike | None = None) -> tuple[jax.Array, jax.Array]:
  r"""Blockwise lower and upper bounds on the tail mass (paper eq. 4.4, spec Sec. 3).

  With $\ell_b \le s_j \le u_b$ on block $B_b$, head blocks $\mathcal H$ and tail blocks $\mathcal T$:
  $\frac{\sum_{\mathcal T}|B_b|e^{\ell_b}}{\sum_{\mathcal H}|B_b|e^{u_b} + \sum_{\mathcal T}|B_b|e^{\ell_b}} \le \tau
  \le \frac{\sum_{\mathcal T}|B_b|e^{u_b}}{\sum_{\mathcal H}|B_b|e^{\ell_b} + \sum_{\mathcal T}|B_b|e^{u_b}}$.

  Args:
    log_lower, log_upper: (..., M) per-block logit bounds $\ell_b$, $u_b$.
    sizes: (..., M) number of keys per block (0 = empty block, ignored).
    in_head: (..., M) bool, True for head blocks.
    log_head_exact: optional (..., M) exact $\log \sum_{j \in B_b} e^{s_j}$ for scored head blocks; replaces both
      bounds of head blocks (NaN or absent entries fall back to the bounds).

  Returns:
    (tau_lower, tau_upper), each (...,).
  """
  lo, hi = jnp.asarray(log_lower), jnp.asarray(log_upper)
  sz = jnp.asarray(sizes)
  head = jnp.asarray(in_head) & (sz > 0)
  tailb = (~jnp.asarray(in_head)) & (sz > 0)
  lsz = jnp.log(jnp.maximum(sz, 1).astype(lo.dtype))
  h_lo, h_hi = lsz + lo, lsz + hi
  if log_head_exact is not None:
    ex = jnp.asarray(log_head_exact)
    h_lo = jnp.where(jnp.isnan(ex), h_lo, ex)
    h_hi = jnp.where(jnp.isnan(ex), h_hi, ex)
  lse = lambda x, m: jax.nn.logsumexp(jnp.where(m, x, -jnp.inf), -1)
  t_lo, t_hi = lse(lsz + lo, tailb), lse(lsz + hi, tailb)
  H_lo, H_hi = lse(h_lo, head), lse(h_hi, head)
  return jax.nn.sigmoid(t_lo - H_hi), jax.nn.sigmoid(t_hi - H_lo)


@functools.partial(jax.jit, static_argnames=("num_blocks",))
def block_minmax(logits: ArrayLike, valid: ArrayLike, block_of_key: ArrayLike, num_blocks: int):
  """Per-block min, max, size and exact log-sum-exp of the logits (inputs to `blockwise_bounds`).

  Args:
    logits: (..., N); valid: bool broadcastable; block_of_key: (N,) int in [0, num_blocks).

  Returns:
    (log_lower, log_upper, sizes, log_exact), each (..., M). Empty blocks have sizes 0.
  """
  logits = jnp.asarray(logits)
  v = jnp.broadcast_to(tail_lib._effective_valid(logits, jnp.asarray(valid)), logits.shape)
  memb = jax.nn.one_hot(jnp.asarray(block_of_key), num_blocks, dtype=bool)  # (N, M)
  m = v[..., :, None] & memb  # (..., N, M)
  x = logits[..., :, None]
  lower = jnp.min(jnp.where(m, x, jnp.inf), -2)
  upper = jnp.max(jnp.where(m, x, -jnp.inf), -2)
  sizes = jnp.sum(m, -2)
  exact = jax.nn.logsumexp(jnp.where(m, x, -jnp.inf), -2)
  lower = jnp.where(sizes > 0, lower, 0.0)
  upper = jnp.where(sizes > 0, upper, 0.0)
  return lower, upper, sizes, exact
