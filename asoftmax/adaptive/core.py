r"""AdaptiveSoftmax: bandit-based PAC top-k softmax of `beta * A x`.

Implements Baharav et al., "Adaptive Sampling for Efficient Softmax Approximation" (NeurIPS 2024),
Algorithm 1 (best-arm identification, here for the top-k *set*) and Algorithm 2 (adaptive estimate of
the partition function), restated in `shared/papers/adaptive_softmax.md`, in two modes.

Arms are the rows of `A` (n of them); "pulling" arm i on coordinate j reads one product `A_ij x_j`
(one *sample*). Every arm of one query reads the coordinates in one shared order, so "arm i after m
pulls" is a prefix of that order. Per arm and pull level the algorithm keeps an estimate of
`mu_i = beta * A_i . x` and an interval `[lo_i, hi_i]`:

* **mode="certified"** (default): intervals valid for *every* `A` and `x`, no tuning.
  The order is a deterministic *head* (coordinates whose range weight `w_j = |x_j| M_j`,
  `M_j = max_i |A_ij|`, exceeds `head_ratio` times the mean) read first, then the remaining
  *tail* coordinates in a uniformly random order (sampling without replacement). After m pulls an
  arm knows its head part exactly and has `m_t = m - h` tail products, each in `[-R, R]` with
  `R = max_{j in tail} w_j` (a bound computed from `x` and the precomputed column maxima, with no
  extra reads of `A`). Its interval is the intersection of
  - the empirical Bernstein-Serfling bound for sampling without replacement (Bardenet & Maillard
    2015, "Concentration inequalities for sampling without replacement", Bernoulli 21(3),
    Theorem 4.3): with probability >= 1 - 5 delta', one-sided,
    `mean_hat - mean <= sigma_hat sqrt(2 rho_m log(1/delta') / m) + kappa (2R) log(1/delta') / m`,
    `kappa = 7/3 + 3/sqrt(2)`, `rho_m = 1 - (m-1)/N` (m <= N/2) or `(1 - m/N)(1 + 1/m)`, scaled
    by the tail size N; and
  - the deterministic bound `|unread part| <= sum_{j unread} w_j`, which holds always.
  One union bound over n arms x L pull levels x 2 sides (`delta' = delta / (10 n L)`) makes
  *every* interval the algorithm ever uses hold simultaneously with probability >= 1 - delta, so
  identification and normalization share the whole delta. A float32 rounding margin
  `2 u sqrt(d) beta sum_j w_j` (u the unit roundoff) widens every interval.
* **mode="paper"**: the paper's radius `r_i = sqrt(2 * fudge * var_i * log(c n L / delta'))` around
  a Horvitz-Thompson estimate, coordinates in Gumbel-top-d order with weights
  `|x_j| * sum_i |A_ij|` (importance, conditional inclusion probabilities given the (m+1)-th key,
  Kool et al. 2019) or uniform; `var_i` is *estimated*, so the radius is a confidence interval only
  for sub-Gaussian products. Fudge factors (tuned on training queries, `tuning.tune_fudge`) scale
  the variance. This is the mode of the paper's tables.

Algorithm, per query:

1. **Warm-up.** Every arm reads the first `warmup` coordinates of the order (one `(m0, n)` slab of
   `A^T`).
2. **Top-k identification** (successive elimination). Keep the arms whose upper bound reaches the
   k-th largest lower bound; double the pulls of the survivors until k remain or pulls reach
   `nnz(x)` (then the arm is exact). Survivors are compacted into a fixed-size buffer from a static
   schedule (n, n/8, n/64, ...), so a round costs (buffer size) x d, not n x d.
3. **Winners.** With `exact_winners=True` (default) the k winners are computed exactly; otherwise
   they keep their interval and the normalization loop refines them like any other arm.
4. **Partition function.** For each winner w, `p_w = e^mu_w / (e^mu_w + Z_-w)` with
   `Z_-w = sum_{i != w} e^mu_i` is bracketed by `[p_lo, p_hi]` from the arms' intervals; the returned
   `p_hat = 2 p_lo p_hi / (p_lo + p_hi)` is within a factor `1 +- eps` of every value in the bracket
   once `p_hi / p_lo <= (1 + eps) / (1 - eps)`. Until then the arms whose intervals widen the worst
   winner's bracket most move up one level, but only as many as are needed to cover the remaining
   deficit (an arm that cannot move the bracket by more than the slack left is not refined). A
   dominant winner's own error cancels in `p_w`, so it need not be computed exactly.
   `log_z` is `log((Z_lo + Z_hi) / 2)`.

Samples are counted as distinct products read: arm i at level l has read `min(m_l, nnz(x))`
products, winners `nnz(x)`. `phase_samples` splits the count into warm-up, elimination, winners and
normalization (`PHASES`). Rounds run inside `lax.while_loop`s with masks; a batch of queries is
handled by `jax.vmap`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from asoftmax import checks

MODES = ("certified", "paper")
ORDERS = ("importance", "uniform")
PHASES = ("warmup", "elimination", "winners", "normalization")
KAPPA = 7.0 / 3.0 + 3.0 / math.sqrt(2.0)  # Bardenet & Maillard (2015), Theorem 4.3


def _is_tracer(v) -> bool:
  return isinstance(v, jax.core.Tracer)


class PreparedMatrix(NamedTuple):
  """A matrix made ready for repeated AdaptiveSoftmax calls (validated once).

  Attributes:
    A: (n, d) the matrix, row-major (rows are contiguous: gathers of surviving arms).
    At: (d, n) its transpose, materialized (columns contiguous: the warm-up slab).
    col_l1: (d,) column L1 norms `sum_i |A_ij|` (paper mode's importance weights).
    col_max: (d,) column maxima `M_j = max_i |A_ij|` (certified mode's range bounds).
  """

  A: jax.Array
  At: jax.Array
  col_l1: jax.Array
  col_max: jax.Array


def prepare_matrix(A) -> PreparedMatrix:
  """Validates `A` (2-D, floating, non-empty; finite when concrete) and precomputes `A^T` and column norms.

  Works on traced arrays too (inside the user's `jax.jit`), where the value check is skipped.
  """
  if isinstance(A, PreparedMatrix):
    return A
  if _is_tracer(A):
    if A.ndim != 2 or not jnp.issubdtype(A.dtype, jnp.floating) or 0 in A.shape:
      raise ValueError(f"A must be a non-empty 2-D floating array, got shape {A.shape} dtype {A.dtype}")
    At = A.T
  else:
    checks.floating_array("A", A, (2,))
    A = jnp.asarray(A)
    At = jnp.asarray(np.ascontiguousarray(np.asarray(A).T))
  absA = jnp.abs(A)
  return PreparedMatrix(A=A, At=At, col_l1=jnp.sum(absA, axis=0), col_max=jnp.max(absA, axis=0))


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
  """Static configuration of one AdaptiveSoftmax call (hashable: it is a jit static argument).

  Attributes:
    n, d: matrix shape.
    k: size of the top set.
    delta: failure probability (total).
    mode: "certified" or "paper".
    order: "importance" or "uniform" (paper: the Gumbel weights; certified: with or without a head).
    levels: pull counts per level, increasing, the last equal to d.
    caps: survivor-buffer sizes of the elimination phases, decreasing, caps[0] = n.
    z_capacity: most arms refined per round of the partition-function loop.
    exact_winners: compute the k winners exactly after identification.
    head_ratio: certified mode: coordinates with `w_j > head_ratio * mean(w)` form the head.
    c: constant in paper mode's union-bound log term.
  """

  n: int
  d: int
  k: int
  delta: float
  mode: str
  order: str
  levels: tuple[int, ...]
  caps: tuple[int, ...]
  z_capacity: int
  exact_winners: bool = True
  head_ratio: float = 1.5
  c: float = 6.0

  @property
  def warmup(self) -> int:
    return self.levels[0]


def default_warmup(n: int, d: int, delta: float, min_warmup: int = 32) -> int:
  """Warm-up pulls per arm: `d * V0`, `V0 = 1 / (17 log(6 n / delta))`, in [min_warmup, d/10].

  Never more than d; never less than min(min_warmup, d).
  """
  v0 = 1.0 / (17.0 * math.log(6.0 * n / delta))
  m0 = max(min_warmup, math.ceil(d * v0))
  m0 = min(m0, max(min_warmup, math.ceil(0.1 * d)))
  return int(min(d, m0))


def make_config(
    n: int,
    d: int,
    *,
    k: int = 1,
    delta: float = 0.1,
    mode: str = "certified",
    order: str = "importance",
    warmup: int | None = None,
    growth: float = 2.0,
    min_cap: int = 16,
    cap_ratio: int = 8,
    z_capacity: int | None = None,
    exact_winners: bool = True,
    head_ratio: float = 1.5,
) -> AdaptiveConfig:
  """Builds the static schedule (pull levels, survivor buffers) for an (n, d) problem.

  Raises:
    ValueError: `warmup` not an integer in [1, d], `growth <= 1`, unknown `mode`/`order`.
  """
  checks.one_of("mode", mode, MODES)
  checks.one_of("order", order, ORDERS)
  m0 = default_warmup(n, d, delta) if warmup is None else checks.int_in_range("warmup", warmup, 1, d)
  growth = checks.positive("growth", growth)
  if growth <= 1.0:
    raise ValueError(f"growth must be > 1, got {growth}")
  head_ratio = checks.positive("head_ratio", head_ratio)
  levels = [m0]
  while levels[-1] < d:
    levels.append(int(min(d, max(levels[-1] + 1, math.ceil(levels[-1] * growth)))))
  caps = [n]
  while caps[-1] // cap_ratio >= max(2 * k, min_cap):
    caps.append(caps[-1] // cap_ratio)
  if z_capacity is None:
    zc = min(n, max(4 * k, 256))
  else:
    zc = min(n, checks.int_in_range("z_capacity", z_capacity, 1, 2**31 - 1))
  return AdaptiveConfig(
      n=n, d=d, k=k, delta=float(delta), mode=mode, order=order, levels=tuple(levels), caps=tuple(caps),
      z_capacity=zc, exact_winners=bool(exact_winners), head_ratio=float(head_ratio),
  )


class AdaptiveResult(NamedTuple):
  """Output of `adaptive_softmax` (leading batch axis iff the query was 2-D); a pure pytree of arrays.

  Attributes:
    indices: (..., k) int32 top-k arms, by estimated logit descending.
    probs: (..., k) their estimated softmax probabilities.
    log_z: (...,) estimated log partition function.
    samples: (...,) int32 products `A_ij x_j` read in all.
    phase_samples: (..., 4) int32 products read per phase, in the order of `PHASES`
      (warm-up, elimination, winners, normalization); sums to `samples`.
    logits: (..., k) the winners' logits (exact with `exact_winners=True`, else interval midpoints).
    certified: (...,) bool: the normalization loop met its stopping rule (it always does unless a
      level cap is hit; in certified mode this is the statement that holds with prob >= 1 - delta).
    rounds: (...,) int32 elimination rounds run.
  """

  indices: jax.Array
  probs: jax.Array
  log_z: jax.Array
  samples: jax.Array
  phase_samples: jax.Array
  logits: jax.Array
  certified: jax.Array
  rounds: jax.Array


# ---------------------------------------------------------------------------------------------
# Per-query building blocks (all shapes static; vmapped over queries by the public function).
# ---------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
  """Per-query constants: the coordinate order and per-level quantities. L = number of levels."""

  x: jax.Array  # (d,)
  order: jax.Array  # (d,) coordinates in reading order
  pos: jax.Array  # (d,) position of each coordinate in the order
  keys: jax.Array  # (d,) paper mode: perturbed log-weights `log w_j + g_j`; certified: sort keys
  logw: jax.Array  # (d,) paper mode: log-weights `log w_j` (inclusion probabilities); certified: unused
  t: jax.Array  # (L,) paper mode: thresholds
  tail: jax.Array  # (d,) bool certified: coordinate is in the uniformly sampled tail
  nnz: jax.Array  # () useful coordinates
  m_eff: jax.Array  # (L,) products read per arm at each level, min(m_l, nnz)
  m_tail: jax.Array  # (L,) certified: tail products read at each level
  n_tail: jax.Array  # () certified: tail population size N
  unread: jax.Array  # (L,) certified: sum of w_j over coordinates not yet read at each level
  rng: jax.Array  # () certified: R = max_{tail} w_j
  margin: jax.Array  # () certified: float32 rounding margin (unscaled by beta)
  top_level: jax.Array  # () first level that reads every useful coordinate


def _make_plan(key, x, col_l1, col_max, cfg: AdaptiveConfig) -> _Plan:
  d = cfg.d
  dt = x.dtype
  levels = jnp.asarray(cfg.levels, jnp.int32)
  useful = (x != 0) & (col_max > 0)
  nnz = jnp.sum(useful).astype(jnp.int32)
  m_eff = jnp.minimum(levels, nnz)
  top_level = jnp.argmax(m_eff >= nnz).astype(jnp.int32)
  w = jnp.where(useful, jnp.abs(x) * col_max, 0.0)
  if cfg.mode == "paper":
    if cfg.order == "importance":
      logw = jnp.log(jnp.where(useful, jnp.abs(x) * col_l1, 1.0))
    else:
      logw = jnp.zeros_like(x)
    g = jax.random.gumbel(key, x.shape, dtype=dt)
    keys = jnp.where(useful, logw + g, -jnp.inf)
    sorted_keys = -jnp.sort(-keys)
    t = jnp.where(levels < d, sorted_keys[jnp.minimum(levels, d - 1)], -jnp.inf)
    order = jnp.argsort(-keys)
    tail = useful
    logw = jnp.where(useful, logw, -jnp.inf)
  else:
    if cfg.order == "importance":
      mean_w = jnp.sum(w) / jnp.maximum(nnz, 1).astype(dt)
      head = useful & (w > cfg.head_ratio * mean_w)
    else:
      head = jnp.zeros_like(useful)
    wmax = jnp.maximum(jnp.max(w), jnp.finfo(dt).tiny)
    u = jax.random.uniform(key, x.shape, dtype=dt)
    # Head first (by w descending), then the tail in uniformly random order, then zero-mass coords.
    sort_key = jnp.where(head, -1.0 - w / wmax, jnp.where(useful, u, 2.0))
    order = jnp.argsort(sort_key, stable=True)
    keys = sort_key
    logw = jnp.zeros_like(x)
    t = jnp.zeros((len(cfg.levels),), dt)
    tail = useful & ~head
  pos = jnp.zeros((d,), jnp.int32).at[order].set(jnp.arange(d, dtype=jnp.int32))
  h = jnp.sum(useful & ~tail).astype(jnp.int32)
  m_tail = jnp.clip(m_eff - h, 0, None)
  cum_w = jnp.cumsum(w[order])
  total_w = cum_w[-1]
  unread = jnp.maximum(total_w - cum_w[jnp.clip(levels - 1, 0, d - 1)], 0.0)
  unread = jnp.where(m_eff >= nnz, 0.0, unread)
  rng = jnp.max(jnp.where(tail, w, 0.0))
  margin = 2.0 * jnp.finfo(dt).eps * math.sqrt(d) * total_w
  return _Plan(
      x=x, order=order, pos=pos, keys=keys, logw=logw, t=t, tail=tail, nnz=nnz, m_eff=m_eff, m_tail=m_tail,
      n_tail=nnz - h, unread=unread, rng=rng, margin=margin, top_level=top_level,
  )


def _certified_bounds(seen, s1, s2, lev, P: _Plan, beta, log_term):
  """(est, lo, hi) of `beta * A_i x` from the prefix sums of one arm (or arms) at level(s) `lev`.

  seen: sum of the products read; s1, s2: sum and sum of squares of the tail products read.
  """
  mt = P.m_tail[lev].astype(seen.dtype)
  N = jnp.maximum(P.n_tail, 1).astype(seen.dtype)
  mt1 = jnp.maximum(mt, 1.0)
  mean = s1 / mt1
  var = jnp.maximum(s2 / mt1 - mean * mean, 0.0)
  est = jnp.where(mt > 0, seen - s1 + N * mean, seen)
  rho = jnp.where(mt <= N / 2, 1.0 - (mt - 1.0) / N, (1.0 - mt / N) * (1.0 + 1.0 / mt1))
  rho = jnp.maximum(rho, 0.0)
  log_h, log_e = log_term
  # Hoeffding-Serfling (B&M 2015, Cor. 2.5) and empirical Bernstein-Serfling (Thm 4.3); both hold.
  rad_h = N * (2.0 * P.rng) * jnp.sqrt(rho * log_h / (2.0 * mt1))
  rad_e = N * (jnp.sqrt(2.0 * var * rho * log_e / mt1) + KAPPA * (2.0 * P.rng) * log_e / mt1)
  rad = jnp.where(mt >= 2, jnp.minimum(rad_h, rad_e), jnp.where(mt >= 1, rad_h, jnp.inf))
  u = P.unread[lev]
  lo = jnp.maximum(est - rad, seen - u) - P.margin
  hi = jnp.minimum(est + rad, seen + u) + P.margin
  est = jnp.clip(est, lo, hi)
  return beta * est, beta * lo, beta * hi


def _paper_weights(P: _Plan, t, m_eff, order):
  """Column-space weights (a, b) for the HT estimate at threshold(s) t: `A_i @ a`, `A_i^2 @ b`."""
  x, keys = P.x, P.keys
  incl = keys > t
  if order == "importance":
    # Conditional inclusion probability of coordinate j given the threshold t (the (m+1)-th largest
    # key): P(log w_j + G_j > t) = 1 - exp(-exp(log w_j - t)), G_j ~ Gumbel (Kool et al. 2019).
    pi = -jnp.expm1(-jnp.exp(jnp.where(incl, P.logw - t, 0.0)))
    pi = jnp.where(incl, pi, 1.0)
    a = jnp.where(incl, x / pi, 0.0)
    b = jnp.where(incl, x * x * (1.0 - pi) / (pi * pi), 0.0)
  else:
    f = m_eff.astype(x.dtype) / jnp.maximum(P.nnz, 1).astype(x.dtype)
    f = jnp.where(f > 0, f, 1.0)
    a = jnp.where(incl, x / f, 0.0)
    b = jnp.where(incl, x * x, 0.0)
  return a, b


def _paper_finish(est, q, m_eff, nnz, order):
  """Turns (sum estimate, variance term) into the HT variance of the sum estimate."""
  if order == "importance":
    return jnp.maximum(q, 0.0)
  m = jnp.maximum(m_eff, 1).astype(est.dtype)
  N = jnp.maximum(nnz, 1).astype(est.dtype)
  f = m / N
  s1 = est * f  # sum of the m sampled products
  s2 = (q - s1 * s1 / m) / jnp.maximum(m - 1.0, 1.0)
  return jnp.maximum(N * N * (1.0 - f) * jnp.maximum(s2, 0.0) / m, 0.0)


def _level_stats(rows, lev, P: _Plan, beta, log_term, cfg: AdaptiveConfig):
  """Per-arm state (est, aux1, aux2) for `rows` (r, d) at level `lev` (scalar or (r,)).

  Certified: aux = (lo, hi). Paper: aux = (var, 0) (the radius depends on the phase's fudge).
  """
  levels = jnp.asarray(cfg.levels, jnp.int32)
  vec = jnp.ndim(lev) > 0
  x = P.x
  if cfg.mode == "certified":
    inc = (P.pos[None] if vec else P.pos) < (levels[lev][:, None] if vec else levels[lev])
    tinc = inc & (P.tail[None] if vec else P.tail)
    a_seen = jnp.where(inc, x, 0.0)
    a_tail = jnp.where(tinc, x, 0.0)
    b_tail = jnp.where(tinc, x * x, 0.0)
    if vec:
      seen = jnp.sum(rows * a_seen, 1)
      s1 = jnp.sum(rows * a_tail, 1)
      s2 = jnp.sum(rows * rows * b_tail, 1)
    else:
      seen, s1, s2 = rows @ a_seen, rows @ a_tail, (rows * rows) @ b_tail
    return _certified_bounds(seen, s1, s2, lev, P, beta, log_term)
  t = P.t[lev][:, None] if vec else P.t[lev]
  m = P.m_eff[lev][:, None] if vec else P.m_eff[lev]
  a, b = _paper_weights(P, t, m, cfg.order)
  if vec:
    e, q = jnp.sum(rows * a, 1), jnp.sum(rows * rows * b, 1)
  else:
    e, q = rows @ a, (rows * rows) @ b
  var = beta * beta * _paper_finish(e, q, P.m_eff[lev], P.nnz, cfg.order)
  return beta * e, var, jnp.zeros_like(var)


def _bounds(est, aux1, aux2, fudge, log_term, mode):
  if mode == "certified":
    return aux1, aux2
  r = jnp.sqrt(2.0 * fudge * aux1 * log_term)
  return est - r, est + r


def _kth_largest(v, k):
  return jax.lax.top_k(v, k)[0][k - 1]


def _single_query(key, A, At, col_l1, col_max, x, eps, beta, fudge_b, fudge_z, cfg: AdaptiveConfig):
  n, k = cfg.n, cfg.k
  L = len(cfg.levels)
  P = _make_plan(key, x, col_l1, col_max, cfg)
  if cfg.mode == "certified":
    # One union bound over n arms x L levels x 2 sides: each one-sided event gets delta / (2 n L),
    # half to Hoeffding-Serfling (delta_h = delta / (4 n L)) and half to empirical Bernstein-Serfling
    # (which fails with prob. 5 delta_e, delta_e = delta / (20 n L)).
    log_b = log_z_term = (jnp.asarray(math.log(4.0 * n * L / cfg.delta), x.dtype),
                          jnp.asarray(math.log(20.0 * n * L / cfg.delta), x.dtype))
  else:
    log_b = log_z_term = jnp.asarray(math.log(cfg.c * n * L / (cfg.delta / 2)), x.dtype)
  mode = cfg.mode

  def samples_of(lvl):
    return jnp.sum(P.m_eff[lvl]).astype(jnp.int32)

  # ---- warm-up: every arm, first m0 coordinates of the order, read from the (m0, n) slab.
  cols0 = P.order[: cfg.warmup]
  slab = At[cols0]  # (m0, n)
  est, aux1, aux2 = _level_stats(slab.T, jnp.int32(0), P._replace(
      x=P.x[cols0], pos=P.pos[cols0], tail=P.tail[cols0], keys=P.keys[cols0], logw=P.logw[cols0]), beta, log_b, cfg)
  lvl = jnp.zeros((n,), jnp.int32)
  s_warm = samples_of(lvl)

  def eliminate(alive, est, aux1, aux2):
    lo, hi = _bounds(est, aux1, aux2, fudge_b, log_b, mode)
    lcb = jnp.where(alive, lo, -jnp.inf)
    return alive & (hi >= _kth_largest(lcb, k))

  alive = eliminate(jnp.ones((n,), bool), est, aux1, aux2)

  def done(state):
    level, alive = state[0], state[1]
    return (jnp.sum(alive) <= k) | (level >= P.top_level)

  def make_body(cap):
    def body(state):
      level, alive, est, aux1, aux2, lvl, rounds = state
      nl = level + 1
      if cap == n:
        e, a1, a2 = _level_stats(A, nl, P, beta, log_b, cfg)
        est, aux1, aux2 = (jnp.where(alive, u, v) for u, v in ((e, est), (a1, aux1), (a2, aux2)))
        lvl = jnp.where(alive, nl, lvl)
      else:
        idx = jax.lax.top_k(alive.astype(jnp.int32), cap)[1]
        valid = alive[idx]
        e, a1, a2 = _level_stats(A[idx], nl, P, beta, log_b, cfg)
        est = est.at[idx].set(jnp.where(valid, e, est[idx]))
        aux1 = aux1.at[idx].set(jnp.where(valid, a1, aux1[idx]))
        aux2 = aux2.at[idx].set(jnp.where(valid, a2, aux2[idx]))
        lvl = lvl.at[idx].set(jnp.where(valid, nl, lvl[idx]))
      alive = eliminate(alive, est, aux1, aux2)
      return nl, alive, est, aux1, aux2, lvl, rounds + 1

    return body

  state = (jnp.int32(0), alive, est, aux1, aux2, lvl, jnp.int32(0))
  for p, cap in enumerate(cfg.caps):
    nxt = cfg.caps[p + 1] if p + 1 < len(cfg.caps) else 0

    def cond(s, nxt=nxt):
      return (~done(s)) & (jnp.sum(s[1]) > nxt)

    state = jax.lax.while_loop(cond, make_body(cap), state)
  _, alive, est, aux1, aux2, lvl, rounds = state
  s_elim = samples_of(lvl)

  # ---- winners.
  win = jax.lax.top_k(jnp.where(alive, est, -jnp.inf), k)[1]
  is_win = jnp.zeros((n,), bool).at[win].set(True)
  if cfg.exact_winners:
    win_logits = beta * (A[win] @ x)
    est = est.at[win].set(win_logits)
    if mode == "certified":
      aux1 = aux1.at[win].set(win_logits)
      aux2 = aux2.at[win].set(win_logits)
    else:
      aux1 = aux1.at[win].set(0.0)
    lvl = lvl.at[win].set(jnp.maximum(P.top_level, lvl[win]))
  s_win = samples_of(lvl)

  # ---- partition function: refine the arms whose width still matters.
  log_ratio = jnp.log1p(eps) - jnp.log1p(-eps)
  zc = cfg.z_capacity

  others = jnp.arange(n)[None, :] != win[:, None]  # (k, n)

  def prob_bounds(lo, hi):
    """Per winner w: bounds on log p_w from mu_w in [lo_w, hi_w] and Z_-w = sum_{i != w} e^mu_i.

    p_w = e^mu_w / (e^mu_w + Z_-w) grows with mu_w and falls with Z_-w. Returns (k,) log p_lo,
    log p_hi and log(e^lo_w + Z_-w,hi) (the denominator of p_lo).
    """
    lzp_hi = jax.nn.logsumexp(jnp.where(others, hi[None], -jnp.inf), axis=1)
    lzp_lo = jax.nn.logsumexp(jnp.where(others, lo[None], -jnp.inf), axis=1)
    lo_w, hi_w = lo[win], hi[win]
    den_lo = jnp.logaddexp(lo_w, lzp_hi)
    return lo_w - den_lo, hi_w - jnp.logaddexp(hi_w, lzp_lo), den_lo

  def z_status(est, aux1, aux2, lvl):
    lo, hi = _bounds(est, aux1, aux2, fudge_z, log_z_term, mode)
    lp_lo, lp_hi, den_lo = prob_bounds(lo, hi)
    gaps = lp_hi - lp_lo
    j = jnp.argmax(gaps)
    ok = gaps[j] <= log_ratio
    deficit = gaps[j] - log_ratio  # in log units, for the worst winner
    # First-order effect of each arm's interval on that gap: (e^hi_i - e^lo_i) / (e^lo_w + Z_-w,hi) for
    # the other arms, (hi_w - lo_w)(1 - p_lo) for the winner itself (a dominant winner's error cancels).
    w = win[j]
    width = jnp.exp(hi - den_lo[j]) * -jnp.expm1(-(hi - lo))
    width = width.at[w].set((hi[w] - lo[w]) * -jnp.expm1(lp_lo[j]))
    refinable = (lvl < P.top_level) & (hi > lo)
    return ok, deficit, jnp.where(refinable, width, -1.0)

  def z_cond(s):
    est, aux1, aux2, lvl, ok, deficit, score = s
    return (~ok) & jnp.any(score > 0)

  def z_body(s):
    est, aux1, aux2, lvl, ok, deficit, score = s
    top, idx = jax.lax.top_k(score, zc)
    before = jnp.cumsum(top) - top  # widths of the wider arms already chosen
    valid = (top > 0) & ((before < deficit) | (jnp.arange(zc) == 0))
    nl = jnp.minimum(lvl[idx] + 1, L - 1)
    e, a1, a2 = _level_stats(A[idx], nl, P, beta, log_z_term, cfg)
    est = est.at[idx].set(jnp.where(valid, e, est[idx]))
    aux1 = aux1.at[idx].set(jnp.where(valid, a1, aux1[idx]))
    aux2 = aux2.at[idx].set(jnp.where(valid, a2, aux2[idx]))
    lvl = lvl.at[idx].set(jnp.where(valid, nl, lvl[idx]))
    ok, deficit, score = z_status(est, aux1, aux2, lvl)
    return est, aux1, aux2, lvl, ok, deficit, score

  ok, deficit, score = z_status(est, aux1, aux2, lvl)
  est, aux1, aux2, lvl, ok, deficit, score = jax.lax.while_loop(
      z_cond, z_body, (est, aux1, aux2, lvl, ok, deficit, score))
  s_all = samples_of(lvl)

  lo, hi = _bounds(est, aux1, aux2, fudge_z, log_z_term, mode)
  lp_lo, lp_hi, _ = prob_bounds(lo, hi)
  # The harmonic mean of the bounds is within a factor 1 +- eps of every p in [p_lo, p_hi] as soon as
  # p_hi / p_lo <= (1 + eps) / (1 - eps).
  log_p = jnp.log(2.0) + lp_lo + lp_hi - jnp.logaddexp(lp_lo, lp_hi)
  log_z = jnp.logaddexp(jax.nn.logsumexp(lo), jax.nn.logsumexp(hi)) - jnp.log(2.0)
  win_logits = 0.5 * (lo[win] + hi[win])
  order_w = jnp.argsort(-win_logits)
  win, win_logits, log_p = win[order_w], win_logits[order_w], log_p[order_w]
  phase = jnp.stack([s_warm, s_elim - s_warm, s_win - s_elim, s_all - s_win]).astype(jnp.int32)
  return AdaptiveResult(
      indices=win.astype(jnp.int32),
      probs=jnp.exp(log_p),
      log_z=log_z,
      samples=s_all,
      phase_samples=phase,
      logits=win_logits,
      certified=ok,
      rounds=rounds,
  )


@functools.partial(jax.jit, static_argnames=("cfg",))
def _batched(keys, A, At, col_l1, col_max, X, eps, beta, fudge_b, fudge_z, cfg):
  fn = functools.partial(_single_query, cfg=cfg)
  return jax.vmap(fn, in_axes=(0, None, None, None, None, 0, None, None, None, None))(
      keys, A, At, col_l1, col_max, X, eps, beta, fudge_b, fudge_z
  )


def _scalar(name, value, check):
  """Checks a Python/concrete scalar with `check`; traced scalars pass through unchecked."""
  if _is_tracer(value):
    return value
  return check(name, value)


def adaptive_softmax(
    key: jax.Array,
    A,
    x,
    *,
    k: int = 1,
    epsilon: float = 0.3,
    delta: float = 0.1,
    beta: float = 1.0,
    mode: str = "certified",
    order: str = "importance",
    fudge_bandit: float = 1.0,
    fudge_z: float = 1.0,
    warmup: int | None = None,
    exact_winners: bool = True,
    head_ratio: float = 1.5,
    growth: float = 2.0,
    z_capacity: int | None = None,
    check_finite: bool = True,
) -> AdaptiveResult:
  r"""PAC top-k softmax of `beta * A x` by adaptive sampling.

  In `mode="certified"` (default), for every `A` and `x`, with probability >= 1 - delta over the
  algorithm's own randomness, the returned index set is the top-k of `mu = beta * A x` and every
  returned probability satisfies `|p_hat - p| <= epsilon * p`, where
  `p_i = exp(mu_i) / sum_j exp(mu_j)` (empirical Bernstein-Serfling intervals with ranges from the
  column maxima of `A`; see the module docstring). Up to float32 rounding of the sums: a margin of
  `2 u sqrt(d)` times `beta * sum_j |x_j| max_i |A_ij|` is added to every interval.

  In `mode="paper"` the intervals are the paper's sub-Gaussian radii around an estimated variance,
  scaled by fudge factors tuned on training queries (`tuning.tune_fudge`): the guarantee then holds
  only as far as the tuning split represents the test queries.

  Args:
    key: a `jax.random` key. A single query uses it directly; query i of a batch uses
      `jax.random.split(key, b)[i]`.
    A: (n, d) floating matrix, or a `PreparedMatrix` from `prepare_matrix(A)` (validate once,
      reuse across calls: recommended for benchmarks).
    x: (d,) query or (b, d) batch of queries, floating, finite.
    k: size of the top set, 1 <= k <= n.
    epsilon: multiplicative accuracy of the probabilities, in (0, 1).
    delta: failure probability, in (0, 1).
    beta: inverse temperature (> 0).
    mode: "certified" (valid for every input, no tuning) or "paper" (tuned sub-Gaussian radii).
    order: "importance" or "uniform". Paper mode: Gumbel-top-d on `|x_j| sum_i |A_ij|`, or
      uniform. Certified mode: a deterministic head of dominant coordinates then a uniform tail, or
      uniform only.
    fudge_bandit: paper mode: multiplies the variance in the identification radii.
    fudge_z: paper mode: multiplies the variance in the normalization radii.
    warmup: warm-up pulls per arm, an integer in [1, d] (default
      `d / (17 log(6n/delta))` clipped to [32, d/10]). In certified mode any warm-up keeps the
      guarantee.
    exact_winners: compute the k winners exactly (default); otherwise their logits are estimated
      to the accuracy the probabilities need.
    head_ratio: certified mode: coordinates whose `|x_j| max_i |A_ij|` exceeds `head_ratio` times
      the mean are read first, for every arm (> 0).
    growth: factor by which surviving arms' pulls grow per round (> 1).
    z_capacity: most arms refined per normalization round (default min(n, max(4k, 256))).
    check_finite: scan `x` for NaN/inf on the host when it is concrete (one pass; turn off inside
      timing loops).

  Returns:
    AdaptiveResult (a pytree of arrays); arrays carry a leading batch axis iff `x` is 2-D.

  Raises:
    ValueError: an argument is invalid (the message names it). Traced arrays (inside the user's
      `jax.jit`) get shape and dtype checks only.

  Example:
    >>> import jax
    >>> from asoftmax import adaptive
    >>> A = jax.random.normal(jax.random.key(0), (100, 1000)) / 30
    >>> res = adaptive.adaptive_softmax(jax.random.key(1), A, A[3] * 30, k=1)
    >>> int(res.indices[0]), bool(res.certified)
    (3, True)
    >>> int(res.samples) < 100 * 1000
    True
  """
  prep = prepare_matrix(A)
  n, d = prep.A.shape
  if getattr(x, "ndim", None) not in (1, 2):
    raise ValueError(f"x must have 1 or 2 dimensions, got shape {getattr(x, 'shape', None)}")
  if _is_tracer(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"x must have a floating dtype, got {x.dtype}")
  elif check_finite:
    checks.floating_array("x", x, (1, 2))
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must have a floating dtype, got {x.dtype}")
  if x.shape[-1] != d:
    raise ValueError(f"x has shape {tuple(x.shape)} but A has shape {(n, d)}: x must be (d,) or (b, d) with d={d}")
  k = checks.int_in_range("k", k, 1, n)
  epsilon = _scalar("epsilon", epsilon, checks.open_unit)
  delta = checks.open_unit("delta", delta)
  beta = _scalar("beta", beta, checks.positive)
  fudge_bandit = _scalar("fudge_bandit", fudge_bandit, checks.positive)
  fudge_z = _scalar("fudge_z", fudge_z, checks.positive)
  checks.one_of("mode", mode, MODES)
  if mode == "certified" and not (_is_tracer(fudge_bandit) or _is_tracer(fudge_z)):
    if fudge_bandit != 1.0 or fudge_z != 1.0:
      raise ValueError(
          f"fudge_bandit and fudge_z apply to mode='paper' only; got {fudge_bandit}, {fudge_z} with mode='certified'"
      )
  cfg = make_config(n, d, k=k, delta=delta, mode=mode, order=order, warmup=warmup, growth=growth,
                    z_capacity=z_capacity, exact_winners=exact_winners, head_ratio=head_ratio)
  single = x.ndim == 1
  X = (x[None] if single else x).astype(prep.A.dtype)
  # A batch gets split(key, b)[i] for query i; a single query uses `key` itself, so that
  # batched and per-query calls agree query by query.
  keys = key[None] if single else jax.random.split(key, X.shape[0])
  f = lambda v: jnp.asarray(v, prep.A.dtype)  # noqa: E731
  res = _batched(keys, prep.A, prep.At, prep.col_l1, prep.col_max, X, f(epsilon), f(beta), f(fudge_bandit),
                 f(fudge_z), cfg)
  if single:
    res = jax.tree.map(lambda a: a[0], res)
  return res
