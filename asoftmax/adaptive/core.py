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
   schedule (n, n/8, n/64, ...).
3. **Winners.** With `exact_winners=True` (default) the k winners are computed exactly; otherwise
   they keep their interval and the normalization loop refines them like any other arm.
4. **Partition function.** Certified mode, and paper mode with `normalization="bracket"` (default): for each winner w, `p_w = e^mu_w / (e^mu_w + Z_-w)` with
   `Z_-w = sum_{i != w} e^mu_i` is bracketed by `[p_lo, p_hi]` from the arms' intervals; the returned
   `p_hat = 2 p_lo p_hi / (p_lo + p_hi)` is within a factor `1 +- eps` of every value in the bracket
   once `p_hi / p_lo <= (1 + eps) / (1 - eps)`. Until then the arms whose intervals widen the worst
   winner's bracket most move up one level, but only as many as are needed to cover the remaining
   deficit (an arm that cannot move the bracket by more than the slack left is not refined). A
   dominant winner's own error cancels in `p_w`, so it need not be computed exactly.
   `log_z` is `log((Z_lo + Z_hi) / 2)`. Paper mode with `normalization="paper"`: the paper's Algorithm 2
   (`_paper_normalization`): one target variance per arm from the first-pass estimates, the arms above
   their target read further, `log Z = logsumexp(mu_hat)`.

Samples are counted as distinct products read: arm i at level l has read `min(m_l, nnz(x))`
products, winners `nnz(x)`. `phase_samples` splits the count into warm-up, elimination, winners and
normalization (`PHASES`).

Implementation (reads follow samples). Moving arms from level l to l + 1 reads only the columns
`order[m_l : m_{l+1}]` of those arms (certified mode adds them to per-arm running sums `seen`, tail sum,
tail sum of squares; paper mode re-reads the level's prefix `order[:m_{l+1}]`, since its Horvitz-Thompson
weights change with the level's threshold: at most twice the incremental reads with doubling levels).
Each round takes the cheapest of three read paths for its moving arms (`_READ_COST`, measured on XLA:CPU):
the *slab* (the block's rows of `A^T`, contiguous, streamed into every arm's sums: one row at a time for
one query, C rows as a small GEMM for a group), a *gather* of the (arms x columns) block into the smallest
static buffer that holds the moving arms (n, n/8, ... in the elimination; z_capacity, z_capacity/8, ...
in the normalization loop), or their *full rows* (contiguous; `A @ x` when every arm moves). Full rows
are taken below the top level only with `exact_rows=True` (the arms become exact: more samples, less
time); otherwise only once the level reads every useful coordinate. No (n, d) array other than `A` and
`A^T` is formed (tests/test_adaptive_perf.py reads the compiled program). A 16-bit `A` is read as stored
and multiplied in float32. Rounds are `lax.while_loop`s with masks; a batch runs query by query
(`lax.map`: each query's own control flow), or, with `shared_order=True`, as one group sharing one order
(blocks read once for the union of the queries' moving arms, products as small GEMMs).
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
NORMALIZATIONS = ("bracket", "paper")
PHASES = ("warmup", "elimination", "winners", "normalization")
KAPPA = 7.0 / 3.0 + 3.0 / math.sqrt(2.0)  # Bardenet & Maillard (2015), Theorem 4.3


# Cost of one product read by each path of a round, relative to one product of the streamed `A @ x` (GEMV),
# measured on XLA:CPU (`python scripts/bench_adaptive.py --micro`: 32,000 x 4096 float32): a row of A^T streamed
# into every arm's sums 2.7x, full rows of the moving arms gathered 32 at a time 2.6x, an element gather of
# (arms x 32 columns) blocks 55-160x (1 and 2 cores). A round takes the cheapest path that holds its moving arms.
_READ_COST = {"slab": 2.7, "rows": 2.6, "gather": 100.0}


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
  ct = _compute_dtype(A.dtype)
  absA = jnp.abs(A)
  return PreparedMatrix(A=A, At=At, col_l1=jnp.sum(absA, axis=0, dtype=ct), col_max=jnp.max(absA, axis=0).astype(ct))


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
    shared_order: one coordinate order for the whole batch (else one per query).
    normalization: paper mode's partition function: "bracket" (refine until the probability bracket from the
      arms' intervals closes) or "paper" (Algorithm 2: target variances, point estimate).
    exact_rows: read full rows (the arms become exact) whenever that costs less time than their new columns.
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
  shared_order: bool = False
  normalization: str = "bracket"
  exact_rows: bool = False
  c: float = 6.0

  @property
  def warmup(self) -> int:
    return self.levels[0]


def default_warmup(n: int, d: int, delta: float, min_warmup: int = 32) -> int:
  """Warm-up pulls per arm: `d * V0`, `V0 = 1 / (17 log(6 n / delta))`, in [min_warmup, d/10].

  Never more than d; never less than min(min_warmup, d).

  Raises:
    ValueError: `n`, `d` or `min_warmup` not an integer >= 1, or `delta` not in (0, 1).
  """
  n, d = checks.pos_int("n", n), checks.pos_int("d", d)
  delta = checks.open_unit("delta", delta)
  min_warmup = checks.pos_int("min_warmup", min_warmup)
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
    shared_order: bool = False,
    normalization: str = "bracket",
    exact_rows: bool = False,
) -> AdaptiveConfig:
  """Builds the static schedule (pull levels, survivor buffers) for an (n, d) problem.

  Raises:
    ValueError: `n`, `d` not integers >= 1, `k` not in [1, n], `delta` not in (0, 1), `warmup` not an
      integer in [1, d], `growth <= 1`, `min_cap` < 1, `cap_ratio` < 2, unknown `mode`/`order`.
  """
  n, d = checks.pos_int("n", n), checks.pos_int("d", d)
  k = checks.int_in_range("k", k, 1, n)
  delta = checks.open_unit("delta", delta)
  min_cap = checks.pos_int("min_cap", min_cap)
  cap_ratio = checks.pos_int("cap_ratio", cap_ratio, lo=2)
  checks.one_of("mode", mode, MODES)
  checks.one_of("order", order, ORDERS)
  checks.one_of("normalization", normalization, NORMALIZATIONS)
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
    # Each round of the normalization loop scans all n arms (bounds, top-k of the widths), so few arms per
    # round means many O(n) rounds. Measured on SmolLM2's head (n = 49152, d = 576, paper mode, fudge_bandit
    # 0.1, 20 queries, CPU): 256 -> 60.9 s, 1024 -> 30.4 s, 4096 -> 11.4 s, with 0.4 % more samples.
    zc = min(n, max(4 * k, 4096))
  else:
    zc = min(n, checks.int_in_range("z_capacity", z_capacity, 1, 2**31 - 1))
  return AdaptiveConfig(
      n=n, d=d, k=k, delta=float(delta), mode=mode, order=order, levels=tuple(levels), caps=tuple(caps),
      z_capacity=zc, exact_winners=bool(exact_winners), head_ratio=float(head_ratio),
      shared_order=bool(shared_order), normalization=normalization, exact_rows=bool(exact_rows),
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
# Building blocks. A *group* is B queries that share one coordinate order: B = 1 on the default
# per-query path (queries run one after another under `lax.map`), B = batch with `shared_order`.
# All shapes are static; per-arm state is (B, n).
# ---------------------------------------------------------------------------------------------


def _compute_dtype(dtype):
  """Accumulation dtype: float32 for 16-bit storage (bf16 / f16 heads), else the storage dtype."""
  return jnp.dtype(jnp.float32) if jnp.dtype(dtype).itemsize < 4 else jnp.dtype(dtype)


class _Plan(NamedTuple):
  """Constants of a group of queries sharing one coordinate order. L = number of levels.

  In a group plan (`_make_group_plan`) the per-query fields `x`, `unread`, `rng`, `margin` carry a
  leading B axis; in a single-query plan (`_make_plan`, used by `_level_stats`) they do not.
  """

  x: jax.Array  # (B, d) queries
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
  unread: jax.Array  # (B, L) certified: sum of w_j over coordinates not yet read at each level
  rng: jax.Array  # (B,) certified: R = max_{tail} w_j
  margin: jax.Array  # (B,) certified: float32 rounding margin (unscaled by beta)
  top_level: jax.Array  # () first level that reads every useful coordinate


def _make_group_plan(key, X, col_l1, col_max, cfg: AdaptiveConfig) -> _Plan:
  """The order and per-level constants of B queries X (B, d) that share one order.

  The order's weights use `a_j = max_q |X_qj|` (for B = 1: `|x_j|`); the certified bounds use each
  query's own `w_qj = |X_qj| M_j` (range, unread mass, rounding margin).
  """
  d = cfg.d
  dt = X.dtype
  levels = jnp.asarray(cfg.levels, jnp.int32)
  absx = jnp.max(jnp.abs(X), axis=0)
  useful = (absx != 0) & (col_max > 0)
  nnz = jnp.sum(useful).astype(jnp.int32)
  m_eff = jnp.minimum(levels, nnz)
  top_level = jnp.argmax(m_eff >= nnz).astype(jnp.int32)
  w = jnp.where(useful, absx * col_max, 0.0)
  if cfg.mode == "paper":
    if cfg.order == "importance":
      logw = jnp.log(jnp.where(useful, absx * col_l1, 1.0))
    else:
      logw = jnp.zeros_like(absx)
    g = jax.random.gumbel(key, absx.shape, dtype=dt)
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
    u = jax.random.uniform(key, absx.shape, dtype=dt)
    # Head first (by w descending), then the tail in uniformly random order, then zero-mass coords.
    sort_key = jnp.where(head, -1.0 - w / wmax, jnp.where(useful, u, 2.0))
    order = jnp.argsort(sort_key, stable=True)
    keys = sort_key
    logw = jnp.zeros_like(absx)
    t = jnp.zeros((len(cfg.levels),), dt)
    tail = useful & ~head
  pos = jnp.zeros((d,), jnp.int32).at[order].set(jnp.arange(d, dtype=jnp.int32))
  h = jnp.sum(useful & ~tail).astype(jnp.int32)
  m_tail = jnp.clip(m_eff - h, 0, None)
  wq = jnp.where(useful, jnp.abs(X) * col_max, 0.0)  # (B, d) each query's own range weights
  cum_w = jnp.cumsum(wq[:, order], axis=1)
  total_w = cum_w[:, -1]
  unread = jnp.maximum(total_w[:, None] - cum_w[:, jnp.clip(levels - 1, 0, d - 1)], 0.0)
  unread = jnp.where(m_eff >= nnz, 0.0, unread)
  rng = jnp.max(jnp.where(tail, wq, 0.0), axis=1)
  margin = 2.0 * jnp.finfo(dt).eps * math.sqrt(d) * total_w
  return _Plan(
      x=X, order=order, pos=pos, keys=keys, logw=logw, t=t, tail=tail, nnz=nnz, m_eff=m_eff, m_tail=m_tail,
      n_tail=nnz - h, unread=unread, rng=rng, margin=margin, top_level=top_level,
  )


def _make_plan(key, x, col_l1, col_max, cfg: AdaptiveConfig) -> _Plan:
  """Single-query plan (x (d,)): the group plan of one query with its B axis dropped."""
  P = _make_group_plan(key, x[None], col_l1, col_max, cfg)
  return P._replace(x=x, unread=P.unread[0], rng=P.rng[0], margin=P.margin[0])


def _bounds_from_sums(seen, s1, s2, mt, N, unread, rng, margin, beta, log_term):
  """(est, lo, hi) of `beta * A_i x` from an arm's sums (arrays broadcast together).

  seen: sum of the products read; s1, s2: sum and sum of squares of the tail products read; mt: tail
  products read; N: tail population size; unread: sum of `w_j` over unread coordinates; rng: R.
  """
  mt = mt.astype(seen.dtype)
  N = jnp.maximum(N, 1).astype(seen.dtype)
  mt1 = jnp.maximum(mt, 1.0)
  mean = s1 / mt1
  var = jnp.maximum(s2 / mt1 - mean * mean, 0.0)
  est = jnp.where(mt > 0, seen - s1 + N * mean, seen)
  rho = jnp.where(mt <= N / 2, 1.0 - (mt - 1.0) / N, (1.0 - mt / N) * (1.0 + 1.0 / mt1))
  rho = jnp.maximum(rho, 0.0)
  log_h, log_e = log_term
  # Hoeffding-Serfling (B&M 2015, Cor. 2.5) and empirical Bernstein-Serfling (Thm 4.3); both hold.
  rad_h = N * (2.0 * rng) * jnp.sqrt(rho * log_h / (2.0 * mt1))
  rad_e = N * (jnp.sqrt(2.0 * var * rho * log_e / mt1) + KAPPA * (2.0 * rng) * log_e / mt1)
  rad = jnp.where(mt >= 2, jnp.minimum(rad_h, rad_e), jnp.where(mt >= 1, rad_h, jnp.inf))
  lo = jnp.maximum(est - rad, seen - unread) - margin
  hi = jnp.minimum(est + rad, seen + unread) + margin
  est = jnp.clip(est, lo, hi)
  return beta * est, beta * lo, beta * hi


def _certified_bounds(seen, s1, s2, lev, P: _Plan, beta, log_term):
  """(est, lo, hi) of `beta * A_i x` from the prefix sums of one arm (or arms) at level(s) `lev`
  (single-query plan)."""
  return _bounds_from_sums(seen, s1, s2, P.m_tail[lev], P.n_tail, P.unread[lev], P.rng, P.margin, beta, log_term)


def _paper_coef(x, keys, logw, t, m_eff, nnz, order):
  """Column-space weights (a, b) for the HT estimate at threshold t: `sum_j A_ij a_j`, `sum_j A_ij^2 b_j`.

  x, keys, logw: values of the coordinates concerned (x may carry a leading query axis).
  """
  incl = keys > t
  if order == "importance":
    # Conditional inclusion probability of coordinate j given the threshold t (the (m+1)-th largest
    # key): P(log w_j + G_j > t) = 1 - exp(-exp(log w_j - t)), G_j ~ Gumbel (Kool et al. 2019).
    pi = -jnp.expm1(-jnp.exp(jnp.where(incl, logw - t, 0.0)))
    pi = jnp.where(incl, pi, 1.0)
    a = jnp.where(incl, x / pi, 0.0)
    b = jnp.where(incl, x * x * (1.0 - pi) / (pi * pi), 0.0)
  else:
    f = m_eff.astype(x.dtype) / jnp.maximum(nnz, 1).astype(x.dtype)
    f = jnp.where(f > 0, f, 1.0)
    a = jnp.where(incl, x / f, 0.0)
    b = jnp.where(incl, x * x, 0.0)
  return a, b


def _paper_weights(P: _Plan, t, m_eff, order):
  """`_paper_coef` over all d coordinates of a single-query plan."""
  return _paper_coef(P.x, P.keys, P.logw, t, m_eff, P.nnz, order)


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
  """Reference (not on the hot path): per-arm state (est, aux1, aux2) of full `rows` (r, d) at level
  `lev` (scalar or (r,)) under a single-query plan, with d-long masked weights.

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
  """k-th largest along the last axis."""
  return jax.lax.top_k(v, k)[0][..., k - 1]


def _mv(M, V):
  """(B, r) = V @ M^T for a block M (r, c) and coefficients V (B, c), accumulated in V's dtype.

  B = 1 is a matrix-vector product (XLA:CPU runs `(1, c) @ (c, r)` far slower than `M @ v`).
  """
  M = M.astype(V.dtype)
  if V.shape[0] == 1:
    return (M @ V[0])[None]
  return jnp.einsum("rc,bc->br", M, V)


def _vm(V, S):
  """(B, n) = V @ S for coefficients V (B, c) and a slab S (c, n) of A^T."""
  S = S.astype(V.dtype)
  if V.shape[0] == 1:
    return (V[0] @ S)[None]
  return V @ S


def _full_dot(A, V, chunk: int = 4096):
  """(B, n) = V @ A^T over all rows of A, without an (n, d) temporary.

  Same-dtype A is one GEMV / GEMM. A 16-bit A is converted to V's dtype a row chunk at a time
  (XLA:CPU would otherwise materialize A in float32).
  """
  if A.dtype == V.dtype:
    return _mv(A, V)
  n = A.shape[0]
  if n <= chunk:
    return _mv(A, V)
  n_chunks = -(-n // chunk)

  def body(i, out):
    start = jnp.minimum(i * chunk, n - chunk)
    rows = jax.lax.dynamic_slice_in_dim(A, start, chunk, axis=0)
    return jax.lax.dynamic_update_slice_in_dim(out, _mv(rows, V), start, axis=1)

  return jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((V.shape[0], n), V.dtype))


def _buckets(top: int, k: int, ratio: int = 8, min_cap: int = 16) -> tuple[int, ...]:
  """Static buffer sizes top, top/8, top/64, ... (as `make_config`'s caps)."""
  caps = [top]
  while caps[-1] // ratio >= max(2 * k, min_cap):
    caps.append(caps[-1] // ratio)
  return tuple(caps)


class _State(NamedTuple):
  """Per-arm state of a group, each (B, n)."""

  sums: tuple  # certified: (seen, s1, s2) running sums over the prefix read; paper: (e, q) at the level
  est: jax.Array  # beta * estimate
  aux1: jax.Array  # certified: lo; paper: variance
  aux2: jax.Array  # certified: hi; paper: 0
  lvl: jax.Array  # int32 level (-1: nothing read yet)


def _group(key, A, At, col_l1, col_max, X, eps, beta, fudge_b, fudge_z, cfg: AdaptiveConfig) -> AdaptiveResult:
  """AdaptiveSoftmax for B queries X (B, d) that share one coordinate order (drawn from `key`).

  Each level's new columns are read only for the arms that move to it: a round of the elimination
  or of the normalization loop gathers the (arms x new columns) block of A (certified mode adds it
  to the running sums; paper mode re-reads the level's prefix, since its HT weights change with the
  level's threshold), the arms compacted into the smallest static buffer that holds them. With
  every arm moving, the block is the contiguous slab `A^T[cols]`. The last level reads full rows.
  """
  n, k, d = cfg.n, cfg.k, cfg.d
  B = X.shape[0]
  L = len(cfg.levels)
  levels = cfg.levels
  mode = cfg.mode
  ct = X.dtype
  P = _make_group_plan(key, X, col_l1, col_max, cfg)
  if mode == "certified":
    # One union bound over n arms x L levels x 2 sides: each one-sided event gets delta / (2 n L),
    # half to Hoeffding-Serfling (delta_h = delta / (4 n L)) and half to empirical Bernstein-Serfling
    # (which fails with prob. 5 delta_e, delta_e = delta / (20 n L)).
    log_b = log_z_term = (jnp.asarray(math.log(4.0 * n * L / cfg.delta), ct),
                          jnp.asarray(math.log(20.0 * n * L / cfg.delta), ct))
  else:
    log_b = log_z_term = jnp.asarray(math.log(cfg.c * n * L / (cfg.delta / 2)), ct)
  bidx = jnp.arange(B)[:, None]

  def derive(sums, nl):
    """(est, aux1, aux2) of arms at level nl (static) from their sums (each (B, r))."""
    if mode == "certified":
      seen, s1, s2 = sums
      return _bounds_from_sums(seen, s1, s2, P.m_tail[nl], P.n_tail, P.unread[:, nl, None], P.rng[:, None],
                               P.margin[:, None], beta, log_b)
    e, q = sums
    var = beta * beta * _paper_finish(e, q, P.m_eff[nl], P.nnz, cfg.order)
    return beta * e, var, jnp.zeros_like(var)

  C = min(32, max(8, levels[0]))  # columns per chunk of a gathered block
  lev_arr = jnp.asarray(levels, jnp.int32)
  # The order with each level's new columns sorted (a chunk of a dense block touches few cache lines).
  seg = jnp.searchsorted(lev_arr, jnp.arange(d, dtype=jnp.int32), side="right")
  order_blk = jnp.sort(seg * d + P.order) % d
  n_sums = 3 if mode == "certified" else 2

  def advance(S: _State, move, l, buckets: tuple[int, ...]) -> _State:
    """Moves the arms in `move` (B, n), all at level l (traced; -1: warm-up), to level l + 1, or to the top
    level (exact) when reading their full rows is cheaper than their new columns (`_READ_COST`)."""
    nl = l + 1
    union = jnp.any(move, axis=0)
    u = jnp.sum(union)
    start = jnp.where(l >= 0, lev_arr[jnp.maximum(l, 0)], 0) if mode == "certified" else jnp.int32(0)
    stop = lev_arr[nl]
    top = L - 1

    def compact(cap):
      """(idx, gather index, mask (B, cap)) of the moving arms in a buffer of `cap` (None: all n)."""
      if cap == n:
        return None, None, move
      idx = jnp.nonzero(union, size=cap, fill_value=n)[0]
      gi = jnp.minimum(idx, n - 1)
      return idx, gi, move[:, gi] & (idx < n)[None]

    def finish(S: _State, cap, idx, gi, m, new, add, lev) -> _State:
      """Writes the moved arms' sums (added to their running sums if `add`) and bounds at level lev."""
      if cap == n:
        old = lambda a: a  # noqa: E731
        put = lambda a, v: jnp.where(m, v, a)  # noqa: E731
      else:
        old = lambda a: a[:, gi]  # noqa: E731
        put = lambda a, v: a.at[:, idx].set(jnp.where(m, v, a[:, gi]), mode="drop")  # noqa: E731
      if add:
        new = tuple(old(s) + p for s, p in zip(S.sums, new))
      est, a1, a2 = derive(new, lev)
      return _State(sums=tuple(put(s, v) for s, v in zip(S.sums, new)), est=put(S.est, est),
                    aux1=put(S.aux1, a1), aux2=put(S.aux2, a2), lvl=S.lvl)

    def coef_of(cols, ok):
      """Coefficients (B, C) of the chunk's columns: certified (x, x tail, x^2 tail); paper (a, b)."""
      xb = X[:, cols]
      if mode == "certified":
        tb = P.tail[cols] & ok
        return jnp.where(ok, xb, 0.0), jnp.where(tb, xb, 0.0), jnp.where(tb, xb * xb, 0.0)
      a, b = _paper_coef(xb, P.keys[cols], P.logw[cols], P.t[nl], P.m_eff[nl], P.nnz, cfg.order)
      return jnp.where(ok, a, 0.0), jnp.where(ok, b, 0.0)

    def slab(S: _State):
      """Every arm: the block's rows of A^T (contiguous). One query streams one row at a time into its sums
      (no copy); a group multiplies C rows at a time as a small GEMM (B, C) @ (C, n)."""
      if B == 1:
        def body(j, acc):
          col = order_blk[start + j]
          row = jax.lax.dynamic_index_in_dim(At, col, keepdims=False).astype(ct)[None]  # (1, n)
          coef = coef_of(col[None], jnp.ones((1,), bool))
          prods = [V * row for V in coef[:-1]] + [coef[-1] * (row * row)]
          return tuple(a + v for a, v in zip(acc, prods))

        n_iter = stop - start
      else:
        def body(i, acc):
          p = start + i * C + jnp.arange(C)
          ok = p < stop
          cols = order_blk[jnp.minimum(p, d - 1)]
          coef = coef_of(cols, ok)
          blk = At[cols]  # (C, n)
          prods = [_vm(V, blk) for V in coef[:-1]] + [_vm(coef[-1], jnp.square(blk.astype(ct)))]
          return tuple(a + v for a, v in zip(acc, prods))

        n_iter = (stop - start + C - 1) // C
      acc = tuple(jnp.zeros((B, n), ct) for _ in range(n_sums))
      new = jax.lax.fori_loop(0, n_iter, body, acc)
      return finish(S, n, None, None, move, new, mode == "certified", nl), nl

    def gather(cap):
      """The moving arms only: (cap x C) blocks of their new columns (certified) or the prefix (paper)."""
      def run(S: _State):
        idx, gi, m = compact(cap)

        def body(i, acc):
          p = start + i * C + jnp.arange(C)
          ok = p < stop
          cols = order_blk[jnp.minimum(p, d - 1)]
          coef = coef_of(cols, ok)
          blk = A[gi[:, None], cols[None, :]]  # (cap, C)
          prods = [_mv(blk, V) for V in coef[:-1]] + [_mv(jnp.square(blk.astype(ct)), coef[-1])]
          return tuple(a + v for a, v in zip(acc, prods))

        n_chunks = (stop - start + C - 1) // C
        acc = tuple(jnp.zeros((B, cap), ct) for _ in range(n_sums))
        new = jax.lax.fori_loop(0, n_chunks, body, acc)
        return finish(S, cap, idx, gi, m, new, mode == "certified", nl), nl

      return run

    def rows(cap):
      """The moving arms' full rows (contiguous), R rows at a time: the arms become exact (top level)."""
      def run(S: _State):
        idx, gi, m = compact(cap)
        if cap == n:
          seen = _full_dot(A, X)
        else:
          R = min(cap, 32)
          n_blk = -(-cap // R)

          def body(i, out):
            s0 = jnp.minimum(i * R, cap - R)
            g = jax.lax.dynamic_slice_in_dim(gi, s0, R)
            return jax.lax.dynamic_update_slice_in_dim(out, _mv(A[g], X), s0, axis=1)

          n_live = jnp.minimum((u + R - 1) // R, n_blk)
          seen = jax.lax.fori_loop(0, n_live, body, jnp.zeros((B, cap), ct))
        zero = jnp.zeros_like(seen)
        new = (seen, zero, zero) if mode == "certified" else (seen, zero)
        return finish(S, cap, idx, gi, m, new, False, jnp.int32(top)), jnp.int32(top)

      return run

    # Branches and their cost in units of one streamed product of `A @ x` (see _READ_COST).
    small = [c for c in buckets if c < n]
    ncols = (stop - start).astype(jnp.float32)
    branches = [slab, rows(n)] + [gather(c) for c in small] + [rows(c) for c in small]
    costs = [n * ncols * _READ_COST["slab"], jnp.float32(n * d)]
    costs += [c * ncols * _READ_COST["gather"] for c in small] + [jnp.float32(c * d * _READ_COST["rows"]) for c in small]
    # Full rows hold the same samples as the new columns once the level reads every useful coordinate; below
    # that they make the arms exact (more samples, less time): only with `exact_rows`.
    rows_ok = jnp.asarray(cfg.exact_rows) | (nl >= P.top_level)
    fits = [True, rows_ok] + [u <= c for c in small] + [rows_ok & (u <= c) for c in small]
    costs = jnp.stack([jnp.where(f, jnp.asarray(c, jnp.float32), jnp.inf) for c, f in zip(costs, fits)])
    S2, lev = jax.lax.switch(jnp.argmin(costs), branches, S)
    return S2._replace(lvl=jnp.where(move, lev, S.lvl))

  def samples_of(lvl):
    return jnp.sum(P.m_eff[lvl], axis=1).astype(jnp.int32)

  # ---- warm-up: every arm, first m0 coordinates of the order, read from the (m0, n) slab.
  zeros = jnp.zeros((B, n), ct)
  S = _State(sums=(zeros,) * n_sums, est=zeros, aux1=zeros, aux2=zeros, lvl=jnp.full((B, n), -1, jnp.int32))
  S = advance(S, jnp.ones((B, n), bool), jnp.int32(-1), (n,))
  s_warm = samples_of(S.lvl)

  def eliminate(alive, S: _State):
    lo, hi = _bounds(S.est, S.aux1, S.aux2, fudge_b, log_b, mode)
    lcb = jnp.where(alive, lo, -jnp.inf)
    return alive & (hi >= _kth_largest(lcb, k)[:, None])

  # ---- top-k identification: round l moves the survivors from level l to l + 1.
  alive = eliminate(jnp.ones((B, n), bool), S)
  done = (jnp.sum(alive, axis=1) <= k) | (P.top_level <= 0)

  def round_cond(c):
    l, _, _, done, _ = c
    return (l < L - 1) & ~jnp.all(done)

  def round_body(c):
    l, S, alive, done, rounds = c
    # Survivors below the top are all at level l (a round may have made some exact: full rows were cheaper).
    S = advance(S, alive & ~done[:, None] & (S.lvl == l), l, cfg.caps)
    alive = jnp.where(done[:, None], alive, eliminate(alive, S))
    rounds = rounds + (~done).astype(jnp.int32)
    all_exact = ~jnp.any(alive & (S.lvl < P.top_level), axis=1)
    done = done | (jnp.sum(alive, axis=1) <= k) | (P.top_level <= l + 1) | all_exact
    return l + 1, S, alive, done, rounds

  _, S, alive, done, rounds = jax.lax.while_loop(
      round_cond, round_body, (jnp.int32(0), S, alive, done, jnp.zeros((B,), jnp.int32)))
  s_elim = samples_of(S.lvl)

  # ---- winners.
  win = jax.lax.top_k(jnp.where(alive, S.est, -jnp.inf), k)[1]  # (B, k)
  if cfg.exact_winners:
    win_logits = beta * jnp.einsum("bkd,bd->bk", A[win].astype(ct), X)
    est = S.est.at[bidx, win].set(win_logits)
    if mode == "certified":
      aux1 = S.aux1.at[bidx, win].set(win_logits)
      aux2 = S.aux2.at[bidx, win].set(win_logits)
    else:
      aux1, aux2 = S.aux1.at[bidx, win].set(0.0), S.aux2
    lvl = S.lvl.at[bidx, win].set(jnp.maximum(P.top_level, S.lvl[bidx, win]))
    S = S._replace(est=est, aux1=aux1, aux2=aux2, lvl=lvl)
  s_win = samples_of(S.lvl)

  if mode == "paper" and cfg.normalization == "paper":
    return _paper_normalization(S, P, advance, win, rounds, (s_warm, s_elim, s_win), samples_of, eps, fudge_z, cfg)

  # ---- partition function (certified): refine the arms whose width still matters.
  log_ratio = jnp.log1p(eps) - jnp.log1p(-eps)
  zc = cfg.z_capacity
  z_buckets = _buckets(min(n, B * zc), k)
  others = jnp.arange(n)[None, None, :] != win[:, :, None]  # (B, k, n)

  def prob_bounds(lo, hi):
    """Per query and winner w: bounds on log p_w from mu_w in [lo_w, hi_w] and Z_-w = sum_{i != w} e^mu_i.

    p_w = e^mu_w / (e^mu_w + Z_-w) grows with mu_w and falls with Z_-w. Returns (B, k) log p_lo,
    log p_hi and log(e^lo_w + Z_-w,hi) (the denominator of p_lo).
    """
    lzp_hi = jax.nn.logsumexp(jnp.where(others, hi[:, None], -jnp.inf), axis=2)
    lzp_lo = jax.nn.logsumexp(jnp.where(others, lo[:, None], -jnp.inf), axis=2)
    lo_w, hi_w = jnp.take_along_axis(lo, win, 1), jnp.take_along_axis(hi, win, 1)
    den_lo = jnp.logaddexp(lo_w, lzp_hi)
    return lo_w - den_lo, hi_w - jnp.logaddexp(hi_w, lzp_lo), den_lo

  def z_status(S: _State):
    lo, hi = _bounds(S.est, S.aux1, S.aux2, fudge_z, log_z_term, mode)
    lp_lo, lp_hi, den_lo = prob_bounds(lo, hi)
    gaps = lp_hi - lp_lo
    j = jnp.argmax(gaps, axis=1)[:, None]
    pick = lambda a: jnp.take_along_axis(a, j, 1)[:, 0]  # noqa: E731
    ok = pick(gaps) <= log_ratio
    deficit = pick(gaps) - log_ratio  # in log units, for the worst winner
    # First-order effect of each arm's interval on that gap: (e^hi_i - e^lo_i) / (e^lo_w + Z_-w,hi) for
    # the other arms, (hi_w - lo_w)(1 - p_lo) for the winner itself (a dominant winner's error cancels).
    w = pick(win)[:, None]
    width = jnp.exp(hi - pick(den_lo)[:, None]) * -jnp.expm1(-(hi - lo))
    own = (jnp.take_along_axis(hi, w, 1) - jnp.take_along_axis(lo, w, 1)) * -jnp.expm1(pick(lp_lo)[:, None])
    width = width.at[bidx, w].set(own)
    refinable = (S.lvl < P.top_level) & (hi > lo)
    return ok, deficit, jnp.where(refinable, width, -1.0)

  def z_active(ok, score):
    return (~ok) & jnp.any(score > 0, axis=1)

  def z_cond(c):
    _, ok, _, score = c
    return jnp.any(z_active(ok, score))

  def z_body(c):
    S, ok, deficit, score = c
    top, idx = jax.lax.top_k(score, zc)
    before = jnp.cumsum(top, axis=1) - top  # widths of the wider arms already chosen
    valid = (top > 0) & ((before < deficit[:, None]) | (jnp.arange(zc) == 0)[None]) & z_active(ok, score)[:, None]
    move = jnp.zeros((B, n), bool).at[bidx, idx].set(valid)
    lvl0 = S.lvl

    def level_body(c):
      l, S = c
      ml = move & (lvl0 == l)
      return l + 1, jax.lax.cond(jnp.any(ml), lambda S: advance(S, ml, l, z_buckets), lambda S: S, S)

    lmin = jnp.min(jnp.where(move, lvl0, L))
    _, S = jax.lax.while_loop(lambda c: c[0] < L - 1, level_body, (lmin, S))
    return (S,) + z_status(S)

  S, ok, _, _ = jax.lax.while_loop(z_cond, z_body, (S,) + z_status(S))
  s_all = samples_of(S.lvl)

  lo, hi = _bounds(S.est, S.aux1, S.aux2, fudge_z, log_z_term, mode)
  lp_lo, lp_hi, _ = prob_bounds(lo, hi)
  # The harmonic mean of the bounds is within a factor 1 +- eps of every p in [p_lo, p_hi] as soon as
  # p_hi / p_lo <= (1 + eps) / (1 - eps).
  log_p = jnp.log(2.0) + lp_lo + lp_hi - jnp.logaddexp(lp_lo, lp_hi)
  log_z = jnp.logaddexp(jax.nn.logsumexp(lo, axis=1), jax.nn.logsumexp(hi, axis=1)) - jnp.log(2.0)
  win_logits = 0.5 * (jnp.take_along_axis(lo, win, 1) + jnp.take_along_axis(hi, win, 1))
  return _result(win, win_logits, log_p, log_z, (s_warm, s_elim, s_win, s_all), ok, rounds)


def _result(win, win_logits, log_p, log_z, counts, ok, rounds) -> AdaptiveResult:
  """Assembles the result of a group: winners sorted by logit, samples split by phase.

  counts: cumulative samples (B,) after warm-up, elimination, winners and normalization.
  """
  order_w = jnp.argsort(-win_logits, axis=1)
  win, win_logits, log_p = (jnp.take_along_axis(a, order_w, 1) for a in (win, win_logits, log_p))
  s_warm, s_elim, s_win, s_all = counts
  phase = jnp.stack([s_warm, s_elim - s_warm, s_win - s_elim, s_all - s_win], axis=1).astype(jnp.int32)
  return AdaptiveResult(indices=win.astype(jnp.int32), probs=jnp.exp(log_p), log_z=log_z, samples=s_all,
                        phase_samples=phase, logits=win_logits, certified=ok, rounds=rounds)


def _paper_normalization(S: _State, P: _Plan, advance, win, rounds, phase_counts, samples_of, eps, fudge_z,
                         cfg: AdaptiveConfig) -> AdaptiveResult:
  r"""Paper mode's partition function: Algorithm 2 of Baharav et al. (2024), as in the authors' code.

  From the first-pass estimates `mu_i` and variances `v_i` (fudge-scaled) of every arm, with
  `C_i = sqrt(2 log(6n/delta') v_i)`, `alpha_i = e^{mu_i - C_i}`, `gamma_i = sqrt(alpha_i)` and
  `delta' = delta / 2`, each arm gets a target variance

    `V_i = min(sum(gamma) / (c gamma_i), sum(alpha) / (d alpha_i))`,
    `c = 16 sqrt(2) log(6n/delta') sum(gamma)^2 / (eps sum(alpha))`, `d = 16 log(12/delta') / eps^2`,

  so arms with a negligible share of the mass need no more pulls and the heavy ones are read until
  their variance meets the target. Each arm then moves up the pull levels (one sweep over the levels, only
  the arms still above their target) and `log Z = logsumexp(mu_hat)`: a point estimate whose error is the
  sum of the arms' independent errors, not a worst-case bracket, so it is a confidence statement only as
  far as the variance estimates are (the fudge factor is tuned, like the bandit one).
  """
  n, k, L = cfg.n, cfg.k, len(cfg.levels)
  B = S.est.shape[0]
  ct = S.est.dtype
  s_warm, s_elim, s_win = phase_counts
  dprime = cfg.delta / 2.0
  lt = math.log(6.0 * n / dprime)

  def targets(S: _State):
    v = fudge_z * S.aux1
    log_alpha = S.est - jnp.sqrt(2.0 * lt * v)
    log_gamma = 0.5 * log_alpha
    lse_a = jax.nn.logsumexp(log_alpha, axis=1, keepdims=True)
    lse_g = jax.nn.logsumexp(log_gamma, axis=1, keepdims=True)
    log_c = math.log(16.0 * math.sqrt(2.0) * lt) - jnp.log(eps) + 2.0 * lse_g - lse_a
    log_d = math.log(16.0 * math.log(12.0 / dprime)) - 2.0 * jnp.log(eps)
    return jnp.minimum(lse_g - log_c - log_gamma, lse_a - log_d - log_alpha)  # (B, n) log target variance

  log_v1 = targets(S)

  def needy(S: _State):
    v = fudge_z * S.aux1
    return (S.lvl < P.top_level) & (v > 0) & (jnp.log(jnp.maximum(v, jnp.finfo(ct).tiny)) > log_v1)

  z_buckets = _buckets(min(n, B * cfg.z_capacity), k)

  def level_body(c):
    l, S = c
    ml = needy(S) & (S.lvl == l)
    return l + 1, jax.lax.cond(jnp.any(ml), lambda S: advance(S, ml, l, z_buckets), lambda S: S, S)

  need0 = needy(S)
  lmin = jnp.min(jnp.where(need0, S.lvl, L))
  _, S = jax.lax.while_loop(lambda c: c[0] < L - 1, level_body, (lmin, S))
  s_all = samples_of(S.lvl)

  log_z = jax.nn.logsumexp(S.est, axis=1)
  win_logits = jnp.take_along_axis(S.est, win, 1)
  log_p = win_logits - log_z[:, None]
  return _result(win, win_logits, log_p, log_z, (s_warm, s_elim, s_win, s_all), ~jnp.any(needy(S), axis=1),
                 rounds)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _batched(keys, A, At, col_l1, col_max, X, eps, beta, fudge_b, fudge_z, cfg):
  """Shared order: one group with keys[0]. Per-query orders: query i is a group of one with keys[i],
  run one after another (`lax.map`: real control flow per query, no lock-step over the batch)."""
  args = (A, At, col_l1, col_max)
  scal = (eps, beta, fudge_b, fudge_z)
  if cfg.shared_order or X.shape[0] == 1:
    return _group(keys[0], *args, X, *scal, cfg)

  def one(kx):
    res = _group(kx[0], *args, kx[1][None], *scal, cfg)
    return jax.tree.map(lambda a: a[0], res)

  return jax.lax.map(one, (keys, X))


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
    shared_order: bool = False,
    normalization: str = "bracket",
    exact_rows: bool = False,
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
    z_capacity: most arms refined per normalization round (default min(n, max(4k, 4096))).
    shared_order: a batch shares one coordinate order, drawn from `key` (one slab read for all
      queries, rounds as small GEMMs over the union of the queries' surviving arms). Each query's
      statement above still holds (its order is still a deterministic head and a uniformly random
      tail, or a Gumbel-top-d order), but the queries' outcomes are no longer independent. The
      order's weights use `max_q |x_qj|`; each query's bounds use its own `|x_qj|`. Default False:
      one order per query, queries run one after another. The group's loops run until its last query
      is done; with `mode="paper"` and `normalization="bracket"` each normalization round re-reads the
      level prefixes of the union of the queries' moving arms for the whole batch (SmolLM2 head, 64
      queries: 12.9 s against 0.27 s with `normalization="paper", exact_rows=True` on one CPU core,
      README "Benchmarks"), so pair `shared_order` with those two options or with certified mode.
    normalization: paper mode's partition function. "bracket" (default): every arm whose interval still
      moves a winner's probability bracket is refined until `p_hi / p_lo <= (1 + eps) / (1 - eps)`.
      "paper": the paper's Algorithm 2 (as in the authors' code): one target variance per arm from the
      first-pass estimates (heavy arms are read further, light ones not), then `log Z = logsumexp(mu_hat)`;
      `fudge_z` scales the variances.
    exact_rows: when True, a round reads the full rows of its moving arms (they become exact) whenever
      that costs less wall-clock than their new columns (`_READ_COST`): more samples, less time on
      hardware where gathers are slow. False (default): reads follow the algorithm's samples.
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
                    z_capacity=z_capacity, exact_winners=exact_winners, head_ratio=head_ratio,
                    shared_order=bool(shared_order) and x.ndim == 2, normalization=normalization,
                    exact_rows=exact_rows)
  if normalization != "bracket" and mode != "paper":
    raise ValueError(f"normalization={normalization!r} applies to mode='paper' only (got mode={mode!r})")
  single = x.ndim == 1
  ct = _compute_dtype(prep.A.dtype)  # 16-bit A: products and sums in float32
  X = (x[None] if single else x).astype(ct)
  # A batch gets split(key, b)[i] for query i; a single query uses `key` itself, so that
  # batched and per-query calls agree query by query. A shared order uses `key` itself.
  keys = key[None] if (single or cfg.shared_order) else jax.random.split(key, X.shape[0])
  f = lambda v: jnp.asarray(v, ct)  # noqa: E731
  res = _batched(keys, prep.A, prep.At, prep.col_l1, prep.col_max, X, f(epsilon), f(beta), f(fudge_bandit),
                 f(fudge_z), cfg)
  if single:
    res = jax.tree.map(lambda a: a[0], res)
  return res
