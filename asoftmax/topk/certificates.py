r"""Certificates on the tail mass from ordered logits, and the certified $k$ per row.

Tzachristas et al., "Certified Top-k Attention via Total Variation", arXiv:2512.07647, Sec. 4.

Every bound $B_k$ here satisfies $B_k \ge \tau_k$ for all $k$ (Theorem 4.5 for the single gap; the others follow
from the same monotonicity argument, sketched below, and are checked numerically in tests/topk). They use
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
import numpy as np
from jax.typing import ArrayLike

from asoftmax import checks
from asoftmax.topk import _core


METHODS = ("exact", "single_gap", "exact_head", "multi_gap")


class Bounds(NamedTuple):
  r"""Upper bounds on $\tau_k$ for every k = 1..N (entry k-1), each (..., N); 0 where k >= n."""

  single_gap: jax.Array
  exact_head: jax.Array
  multi_gap: jax.Array


def _bounds_from_sorted(ss: jax.Array, n: jax.Array, which=("single_gap", "exact_head", "multi_gap")) -> Bounds:
  ss = _core.shift_by_max(ss)  # every bound is shift-invariant; O(1) magnitudes keep float32 accurate
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
  r = _core.sort_rows(logits, valid)
  bad = _core.bad_rows(logits, valid)
  return Bounds(*(_core.flag(bad, x) for x in _bounds_from_sorted(r.s, r.n)))


def tail_bounds(logits: ArrayLike, valid: ArrayLike | None = None) -> Bounds:
  r"""The three ordered-logit certificates $B_k \ge \tau_k$ for every $k$.

  Args:
    logits: (..., N) float logits; $-\infty$ marks a masked key (bfloat16 / float16 computed in float32).
    valid: optional bool mask broadcastable to `logits`.

  Returns:
    `Bounds(single_gap, exact_head, multi_gap)`, each (..., N) with entry `k-1` bounding $\tau_k$.
    Always `multi_gap <= exact_head <= single_gap` and each is `>= tail_mass(logits, valid)`. Under `jax.jit` a
    row with a NaN or +inf logit, or no valid key, is NaN (outside jit such input raises `ValueError`).

  Example:
    >>> b = tail_bounds(jnp.log(jnp.array([0.5, 0.3, 0.2])))
    >>> np.asarray(b.exact_head, float).round(4)  # bounds on the tail masses 0.5, 0.2, 0
    array([0.5455, 0.2   , 0.    ])
  """
  _core.check_logits(logits, valid)
  return _tail_bounds(_core.as_float(logits), None if valid is None else jnp.asarray(valid))


class CertifiedHead(NamedTuple):
  """The certified head size of one method, per row (all (...,) arrays).

  Attributes:
    k: int32 head size; 0 for a row flagged invalid under `jax.jit`.
    tv: realised tail mass $\\tau_k$ = TV(P, P_hat) at that k (float32; NaN on a flagged row).
    certificate: the method's bound at that k (for "exact", the tail mass itself; NaN on a flagged row).
  """

  k: jax.Array
  tv: jax.Array
  certificate: jax.Array


class CertifiedK(NamedTuple):
  """Certified head sizes per row, one `CertifiedHead` per method of `METHODS` (None where not requested).

  Read a method by attribute (`ck.exact.k`, `ck.multi_gap.tv`) or by name (`getattr(ck, method)`).

  Attributes:
    exact, single_gap, exact_head, multi_gap: `CertifiedHead` or None.
    n: (...,) int32 valid keys per row.
  """

  exact: CertifiedHead
  single_gap: CertifiedHead | None
  exact_head: CertifiedHead | None
  multi_gap: CertifiedHead | None
  n: jax.Array


def _first_leq(b: jax.Array, eps) -> jax.Array:
  return (1 + jnp.argmax(b <= eps, -1)).astype(jnp.int32)


def certified_k_traced(logits: jax.Array, valid: jax.Array | None, epsilon, methods=METHODS) -> CertifiedK:
  """Traceable core of `certified_k` (no argument checks); flags bad rows and an invalid epsilon (k = 0, NaN)."""
  log_t, r = _core.log_tail(logits, valid)
  tail = jnp.exp(log_t)
  bound_names = [m for m in methods if m != "exact"]
  b = _bounds_from_sorted(r.s, r.n, bound_names) if bound_names else None
  # Rounding margin: the exact rule compares the float tail with eps / (1 + m), so the true tail is <= eps; the
  # certificates compare with eps / (1 + m)^2, so where a bound equals the tail in exact arithmetic (ties, a flat
  # tail) rounding cannot put k_cert below k_exact.
  m = _core.rounding_margin(logits.shape[-1], tail.dtype)
  eps_exact = epsilon / (1.0 + m)
  eps_cert = eps_exact / (1.0 + m)
  ks = {"exact": (1 + jnp.sum(tail > eps_exact, -1)).astype(jnp.int32)}
  certs = {"exact": tail}
  for name in bound_names:
    bk = getattr(b, name)
    ks[name] = _first_leq(bk, eps_cert)
    certs[name] = bk
  ok = ~_core.bad_rows(logits, valid) & _core.eps_ok(epsilon)
  at = lambda x, k: jnp.take_along_axis(x, (k - 1)[..., None], -1)[..., 0]
  heads = {name: CertifiedHead(jnp.where(ok, ks[name], 0), jnp.where(ok, at(tail, ks[name]), jnp.nan),
                               jnp.where(ok, at(certs[name], ks[name]), jnp.nan)) for name in ks}
  return CertifiedK(**{name: heads.get(name) for name in METHODS}, n=r.n)


_certified_k = jax.jit(certified_k_traced, static_argnames=("methods",))


def check_methods(methods) -> tuple[str, ...]:
  """`methods` as a tuple of names from `METHODS` (ValueError naming `methods` otherwise)."""
  if isinstance(methods, str):
    methods = (methods,)
  methods = tuple(methods)
  if not methods or any(m not in METHODS for m in methods):
    raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {methods}")
  return methods


def certified_k(logits: ArrayLike, valid: ArrayLike | None, epsilon: float,
                methods: tuple[str, ...] = METHODS) -> CertifiedK:
  r"""Smallest certified head size per row, exact and from each certificate (the paper's Sec. 4).

  exact: $k_\epsilon = \min\{k : \tau_k \le \epsilon\} = 1 + \#\{k : \tau_k > \epsilon\}$;
  certificate-only: $k_B = \min\{k : B_k \le \epsilon\} \ge k_\epsilon$, so $\tau_{k_B} \le \epsilon$ is guaranteed.

  Float rounding: logits are shifted by their row max, the exact rule compares the float32 tail with
  $\epsilon/(1+m)$ and the certificates with $\epsilon/(1+m)^2$, $m$ = the rounding margin
  ($\approx 3\cdot 10^{-5}$ at N = 256). So the true tail mass at every returned k is $\le \epsilon$, and
  $k_B \ge k_\epsilon$ even where a bound is tight (exact ties); $k_\epsilon$ can exceed the infinitely precise
  oracle by one when $\tau_k \in (\epsilon/(1+m), \epsilon]$.

  Args:
    logits: (..., N) float logits ($-\infty$ = masked; bfloat16 / float16 computed in float32).
    valid: optional bool mask broadcastable to logits.
    epsilon: TV budget in (0, 1).
    methods: which of `METHODS` to compute ("exact" is always included).

  Returns:
    `CertifiedK`: a `CertifiedHead(k, tv, certificate)` per requested method. Under `jax.jit` a row with a NaN or
    +inf logit or no valid key, and every row when a traced epsilon is outside (0, 1), gets k = 0 and tv and
    certificate NaN (outside jit such input raises `ValueError`).

  Example:
    >>> ck = certified_k(jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]])), None, 0.1)
    >>> ck.exact.k, ck.exact.tv.round(4), ck.single_gap.k
    (Array([3], dtype=int32), Array([0.05], dtype=float32), Array([4], dtype=int32))
  """
  checks.open_unit("epsilon", epsilon)
  _core.check_logits(logits, valid)
  methods = check_methods(methods)
  return _certified_k(_core.as_float(logits), None if valid is None else jnp.asarray(valid), epsilon, methods)


class TailInterval(NamedTuple):
  """Lower and upper bounds on the tail mass, each (...,)."""

  lower: jax.Array
  upper: jax.Array


@jax.jit
def _blockwise_bounds(lo, hi, sz, in_head, ex):
  head = in_head & (sz > 0)
  tailb = (~in_head) & (sz > 0)
  lsz = jnp.log(jnp.maximum(sz, 1).astype(lo.dtype))
  h_lo, h_hi = lsz + lo, lsz + hi
  if ex is not None:
    h_lo = jnp.where(jnp.isnan(ex), h_lo, ex)
    h_hi = jnp.where(jnp.isnan(ex), h_hi, ex)
  lse = lambda x, m: jax.nn.logsumexp(jnp.where(m, x, -jnp.inf), -1)
  t_lo, t_hi = lse(lsz + lo, tailb), lse(lsz + hi, tailb)
  H_lo, H_hi = lse(h_lo, head), lse(h_hi, head)
  used = sz > 0
  bad = jnp.any(used & (jnp.isnan(lo) | jnp.isnan(hi) | (lo == jnp.inf) | (hi == jnp.inf) | (lo > hi)), -1)
  flag = lambda x: jnp.where(bad, jnp.nan, x)
  return TailInterval(flag(jax.nn.sigmoid(t_lo - H_hi)), flag(jax.nn.sigmoid(t_hi - H_lo)))


def blockwise_bounds(log_lower: ArrayLike, log_upper: ArrayLike, sizes: ArrayLike, in_head: ArrayLike,
                     log_head_exact: ArrayLike | None = None) -> TailInterval:
  r"""Blockwise lower and upper bounds on the tail mass (eq. 4.4 of the paper).

  With $\ell_b \le s_j \le u_b$ on block $B_b$, head blocks $\mathcal H$ and tail blocks $\mathcal T$:
  $\frac{\sum_{\mathcal T}|B_b|e^{\ell_b}}{\sum_{\mathcal H}|B_b|e^{u_b} + \sum_{\mathcal T}|B_b|e^{\ell_b}} \le \tau
  \le \frac{\sum_{\mathcal T}|B_b|e^{u_b}}{\sum_{\mathcal H}|B_b|e^{\ell_b} + \sum_{\mathcal T}|B_b|e^{u_b}}$.

  Args:
    log_lower, log_upper: (..., M) per-block logit bounds $\ell_b \le u_b$ ($-\infty$ allowed; no NaN, no $+\infty$).
    sizes: (..., M) int number of keys per block, >= 0 (0 = empty block, ignored).
    in_head: (..., M) bool, True for head blocks.
    log_head_exact: optional (..., M) exact $\log \sum_{j \in B_b} e^{s_j}$ for scored head blocks; replaces both
      bounds of head blocks (NaN entries fall back to the bounds).

  Returns:
    `TailInterval(lower, upper)`, each (...,). Under `jax.jit` a row whose non-empty blocks have NaN or $+\infty$
    bounds, or $\ell_b > u_b$, is NaN (outside jit such input raises `ValueError`).

  Example:
    >>> lo = jnp.log(jnp.array([0.5, 0.2]))
    >>> b = blockwise_bounds(lo, lo, jnp.array([1, 1]), jnp.array([True, False]))  # exact: tail 0.2 / 0.7
    >>> b.lower.round(4), b.upper.round(4)
    (Array(0.2857, dtype=float32), Array(0.2857, dtype=float32))
  """
  checks.logits(log_lower, "log_lower")
  checks.logits(log_upper, "log_upper")
  shape = tuple(log_lower.shape)
  if tuple(log_upper.shape) != shape:
    raise ValueError(f"log_lower and log_upper must have the same shape, got {shape} and {tuple(log_upper.shape)}")
  checks.int_array("sizes", sizes, 0, None, shape=shape)
  ih = getattr(in_head, "dtype", None)
  if ih is None or np.dtype(ih) != np.bool_ or tuple(in_head.shape) != shape:
    raise ValueError(f"in_head must be a bool array of shape {shape}, got {getattr(in_head, 'shape', in_head)!r}")
  if log_head_exact is not None:
    checks.floating_array("log_head_exact", log_head_exact, finite=False)
    if tuple(log_head_exact.shape) != shape:
      raise ValueError(f"log_head_exact must have shape {shape}, got {tuple(log_head_exact.shape)}")
  if not checks.is_traced(log_lower, log_upper, sizes):
    used = np.asarray(sizes) > 0
    if (used & (np.asarray(log_lower, np.float32) > np.asarray(log_upper, np.float32))).any():
      raise ValueError("log_lower must be <= log_upper in every non-empty block")
  ex = None if log_head_exact is None else _core.as_float(log_head_exact)
  return _blockwise_bounds(_core.as_float(log_lower), _core.as_float(log_upper), jnp.asarray(sizes),
                           jnp.asarray(in_head), ex)


class BlockStats(NamedTuple):
  """Per-block statistics of the logits, each (..., M): the inputs of `blockwise_bounds`.

  Attributes:
    log_lower, log_upper: min and max valid logit of the block (0 for an empty block).
    sizes: int32 number of valid keys in the block.
    log_exact: exact log-sum-exp of the block's valid logits (-inf for an empty block).
  """

  log_lower: jax.Array
  log_upper: jax.Array
  sizes: jax.Array
  log_exact: jax.Array


@functools.partial(jax.jit, static_argnames=("num_blocks",))
def _block_minmax(logits, valid, block_of_key, num_blocks):
  v = _core.effective_valid(logits, valid)
  memb = jax.nn.one_hot(block_of_key, num_blocks, dtype=bool)  # (N, M)
  m = v[..., :, None] & memb  # (..., N, M)
  x = logits[..., :, None]
  lower = jnp.min(jnp.where(m, x, jnp.inf), -2)
  upper = jnp.max(jnp.where(m, x, -jnp.inf), -2)
  sizes = jnp.sum(m, -2).astype(jnp.int32)
  exact = jax.nn.logsumexp(jnp.where(m, x, -jnp.inf), -2)
  bad = _core.bad_rows(logits, valid)[..., None]
  lower = jnp.where(bad, jnp.nan, jnp.where(sizes > 0, lower, 0.0))
  upper = jnp.where(bad, jnp.nan, jnp.where(sizes > 0, upper, 0.0))
  return BlockStats(lower, upper, sizes, jnp.where(bad, jnp.nan, exact))


def block_minmax(logits: ArrayLike, valid: ArrayLike | None, block_of_key: ArrayLike, num_blocks: int) -> BlockStats:
  """Per-block min, max, size and exact log-sum-exp of the logits (inputs to `blockwise_bounds`).

  Args:
    logits: (..., N) float logits ($-\\infty$ = masked). valid: optional bool mask broadcastable to `logits`.
    block_of_key: (N,) int block of each key, in [0, num_blocks).
    num_blocks: M >= 1.

  Returns:
    `BlockStats(log_lower, log_upper, sizes, log_exact)`, each (..., M). Empty blocks have sizes 0. Under
    `jax.jit` a row with a NaN or +inf logit or no valid key is NaN.

  Example:
    >>> st = block_minmax(jnp.array([[3.0, 1.0, 0.0, 2.0]]), None, jnp.array([0, 0, 1, 1]), 2)
    >>> st.log_lower, st.log_upper, st.sizes
    (Array([[1., 0.]], dtype=float32), Array([[3., 2.]], dtype=float32), Array([[2, 2]], dtype=int32))
  """
  num_blocks = checks.int_in_range("num_blocks", num_blocks)
  _core.check_logits(logits, valid)
  checks.int_array("block_of_key", block_of_key, 0, num_blocks - 1, shape=(logits.shape[-1],))
  return _block_minmax(_core.as_float(logits), None if valid is None else jnp.asarray(valid),
                       jnp.asarray(block_of_key), num_blocks)
