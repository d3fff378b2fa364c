"""AdaptiveSoftmax: bandit-based PAC top-k softmax of `beta * A x`.

Implements Baharav et al., "Adaptive Sampling for Efficient Softmax Approximation" (NeurIPS 2024),
Algorithm 1 (best-arm identification, here for the top-k *set*) and Algorithm 2 (adaptive estimate of
the partition function), restated in `shared/papers/adaptive_softmax.md`.

Arms are the rows of `A` (n of them); "pulling" arm i on coordinate j reads one product `A_ij x_j`
(one *sample*). Per query:

1. **Coordinate order.** One order of the d coordinates, shared by all arms: Gumbel-top-d with
   log-weights `log w_j`, `w_j = |x_j| * sum_i |A_ij|` (importance) or `w_j = 1` (uniform).
   Coordinates with `x_j = 0` (or an all-zero column) carry no mass and are never read, so the
   exact cost is `n * nnz(x)`.
2. **Estimator after m pulls** (the first m coordinates of the order). Horvitz-Thompson
   `mu_i = beta * sum_{j in S} A_ij x_j / pi_j`, with `pi_j = 1 - exp(-exp(log w_j + g_j... - t))`:
   the conditional inclusion probability given the threshold `t` = the (m+1)-th largest perturbed
   key (Kool et al. 2019), which makes the estimate unbiased; variance estimate
   `sum_{j in S} (A_ij x_j)^2 (1 - pi_j) / pi_j^2`. Uniform order: `(nnz/m) sum y` with the sample
   variance and the finite-population correction. At `m = nnz` both are exact with zero variance.
3. **Confidence radius** `r_i = sqrt(2 * fudge * var_i * log(c * n * L / delta'))`, a union bound
   over n arms and the L pull levels.
4. **Top-k identification.** Warm-up pulls for every arm, then successive elimination: keep the
   arms whose upper bound reaches the k-th largest lower bound; double the pulls of the survivors
   until k remain or pulls reach nnz(x). The k winners are then computed exactly.
5. **Partition function.** `log Z_hat = logsumexp(mu_hat)`; the arms with the widest contribution
   `exp(mu + r) - exp(mu - r)` get more pulls until `Z_hi <= (1 + eps) Z_hat` and
   `Z_lo >= (1 - eps) Z_hat`, so every returned probability `exp(mu_win - log Z_hat)` is within
   a factor (1 +- eps). Identification and normalization each get delta / 2.

Work follows the survivors: after the warm-up (which reads `A^T[order[:m0]]`, an (m0, n) slab),
each round gathers only the rows of the surviving arms into a fixed-size buffer whose size comes
from a static schedule (n, n/8, n/64, ...), so a round costs (buffer size) x d, not n x d. Rounds
run inside `lax.while_loop`s with masks; a batch of queries is handled by `jax.vmap`.

Samples are counted as distinct products read: arm i at level l has read `min(m_l, nnz(x))`
products; winners `nnz(x)`. (Re-weighting a prefix at a higher level re-uses products already
read; the compute for that is the buffer matmul, and is what the benchmark measures.)
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

ORDERS = ("importance", "uniform")


class PreparedMatrix(NamedTuple):
  """A matrix made ready for repeated AdaptiveSoftmax calls (validated once).

  Attributes:
    A: (n, d) the matrix, row-major (rows are contiguous: gathers of surviving arms).
    At: (d, n) its transpose, materialized (columns contiguous: the warm-up slab).
    col_l1: (d,) column L1 norms `sum_i |A_ij|`, for the importance weights.
  """

  A: jax.Array
  At: jax.Array
  col_l1: jax.Array


def prepare_matrix(A) -> PreparedMatrix:
  """Validates `A` (2-D, floating, finite, non-empty) and precomputes `A^T` and column norms."""
  if isinstance(A, PreparedMatrix):
    return A
  checks.floating_array("A", A, (2,))
  A = jnp.asarray(A)
  At = jnp.asarray(np.ascontiguousarray(np.asarray(A).T))
  return PreparedMatrix(A=A, At=At, col_l1=jnp.sum(jnp.abs(A), axis=0))


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
  """Static configuration of one AdaptiveSoftmax call (hashable: it is a jit static argument).

  Attributes:
    n, d: matrix shape.
    k: size of the top set.
    delta: failure probability (total; split delta/2 identification, delta/2 normalization).
    order: "importance" or "uniform" coordinate order.
    levels: pull counts per level, increasing, the last equal to d.
    caps: survivor-buffer sizes of the elimination phases, decreasing, caps[0] = n.
    z_capacity: arms refined per round of the partition-function loop.
    c: constant in the union-bound log term.
  """

  n: int
  d: int
  k: int
  delta: float
  order: str
  levels: tuple[int, ...]
  caps: tuple[int, ...]
  z_capacity: int
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
    order: str = "importance",
    warmup: int | None = None,
    growth: float = 2.0,
    min_cap: int = 16,
    cap_ratio: int = 8,
    z_capacity: int | None = None,
) -> AdaptiveConfig:
  """Builds the static schedule (pull levels, survivor buffers) for an (n, d) problem."""
  m0 = default_warmup(n, d, delta) if warmup is None else int(min(max(1, warmup), d))
  if growth <= 1.0:
    raise ValueError(f"growth must be > 1, got {growth}")
  levels = [m0]
  while levels[-1] < d:
    levels.append(int(min(d, max(levels[-1] + 1, math.ceil(levels[-1] * growth)))))
  caps = [n]
  while caps[-1] // cap_ratio >= max(2 * k, min_cap):
    caps.append(caps[-1] // cap_ratio)
  zc = min(n, max(4 * k, 256)) if z_capacity is None else int(min(n, max(1, z_capacity)))
  return AdaptiveConfig(
      n=n, d=d, k=k, delta=float(delta), order=order, levels=tuple(levels), caps=tuple(caps), z_capacity=zc
  )


class AdaptiveResult(NamedTuple):
  """Output of `adaptive_softmax` (leading batch axis iff the query was 2-D).

  Attributes:
    indices: (..., k) int32 top-k arms, by logit descending.
    probs: (..., k) their estimated softmax probabilities.
    log_z: (...,) estimated log partition function.
    samples: (...,) int32 products `A_ij x_j` read (warm-up, rounds, exact winners, normalization).
    logits: (..., k) exact logits of the winners (computed exactly, as the algorithm prescribes).
    certified: (...,) bool: the normalization loop met its stopping rule (always, unless a cap hit).
    rounds: (...,) int32 elimination rounds run.
    config: the static AdaptiveConfig it ran with (not batched).
  """

  indices: jax.Array
  probs: jax.Array
  log_z: jax.Array
  samples: jax.Array
  logits: jax.Array
  certified: jax.Array
  rounds: jax.Array
  config: AdaptiveConfig | None = None


# ---------------------------------------------------------------------------------------------
# Per-query building blocks (all shapes static; vmapped over queries by the public function).
# ---------------------------------------------------------------------------------------------


def _coordinate_keys(key, x, col_l1, order):
  """Perturbed log-weights (d,) and nnz; zero-mass coordinates get -inf (never read)."""
  useful = (x != 0) & (col_l1 > 0)
  if order == "importance":
    logw = jnp.log(jnp.where(useful, jnp.abs(x) * col_l1, 1.0))
  else:
    logw = jnp.zeros_like(x)
  g = jax.random.gumbel(key, x.shape, dtype=x.dtype)
  keys = jnp.where(useful, logw + g, -jnp.inf)
  return keys, jnp.sum(useful).astype(jnp.int32)


def _thresholds(keys, levels):
  """Threshold per level: the (m+1)-th largest key (-inf when m >= d). Returns (L,)."""
  d = keys.shape[0]
  sorted_keys = -jnp.sort(-keys)
  lv = jnp.asarray(levels)
  return jnp.where(lv < d, sorted_keys[jnp.minimum(lv, d - 1)], -jnp.inf)


def _level_weights(keys, x, t, m_eff, nnz, order):
  """Column-space weights for estimates at one level (broadcasts over a leading axis of t).

  Returns (a, b) such that, for a row A_i, `A_i @ a` is the sum estimate and `A_i^2 @ b` the
  variance term (see `_finish`).
  """
  incl = keys > t
  if order == "importance":
    pi = -jnp.expm1(-jnp.exp(jnp.where(incl, keys - t, 0.0)))
    pi = jnp.where(incl, pi, 1.0)
    a = jnp.where(incl, x / pi, 0.0)
    b = jnp.where(incl, x * x * (1.0 - pi) / (pi * pi), 0.0)
  else:
    f = m_eff.astype(x.dtype) / jnp.maximum(nnz, 1).astype(x.dtype)
    f = jnp.where(f > 0, f, 1.0)
    a = jnp.where(incl, x / f, 0.0)
    b = jnp.where(incl, x * x, 0.0)
  return a, b


def _finish(est, q, m_eff, nnz, order):
  """Turns (sum estimate, variance term) into the HT variance of the sum estimate."""
  if order == "importance":
    return jnp.maximum(q, 0.0)
  m = jnp.maximum(m_eff, 1).astype(est.dtype)
  N = jnp.maximum(nnz, 1).astype(est.dtype)
  f = m / N
  s1 = est * f  # sum of the m sampled products
  s2 = (q - s1 * s1 / m) / jnp.maximum(m - 1.0, 1.0)
  return jnp.maximum(N * N * (1.0 - f) * jnp.maximum(s2, 0.0) / m, 0.0)


def _radius(var, fudge, log_term):
  return jnp.sqrt(2.0 * fudge * var * log_term)


def _kth_largest(v, k):
  return jax.lax.top_k(v, k)[0][k - 1]


def _single_query(key, A, At, col_l1, x, eps, beta, fudge_b, fudge_z, cfg: AdaptiveConfig):
  n, d, k = cfg.n, cfg.d, cfg.k
  L = len(cfg.levels)
  levels = jnp.asarray(cfg.levels, jnp.int32)
  dt = A.dtype
  keys, nnz = _coordinate_keys(key, x, col_l1, cfg.order)
  t = _thresholds(keys, cfg.levels)  # (L,)
  m_eff = jnp.minimum(levels, nnz)  # (L,) products really read at each level
  # A level whose pulls reach nnz is exact; cap levels there so loops stop early for sparse x.
  top_level = jnp.argmax(m_eff >= nnz).astype(jnp.int32)  # first exact level
  log_b = jnp.log(cfg.c * n * L / (cfg.delta / 2))
  log_z_term = jnp.log(cfg.c * n * L / (cfg.delta / 2))

  def weights(level):
    return _level_weights(keys, x, t[level], m_eff[level], nnz, cfg.order)

  # ---- warm-up: every arm, first m0 coordinates of the order, read from the (m0, n) slab.
  cols0 = jax.lax.top_k(keys, cfg.warmup)[1]  # the first m0 coordinates of the order
  a0, b0 = weights(0)
  slab = At[cols0]  # (m0, n)
  est0 = a0[cols0] @ slab
  q0 = b0[cols0] @ (slab * slab)
  est = beta * est0
  var = beta * beta * _finish(est0, q0, m_eff[0], nnz, cfg.order)
  lvl = jnp.zeros((n,), jnp.int32)

  def eliminate(alive, est, var):
    rad = _radius(var, fudge_b, log_b)
    lcb = jnp.where(alive, est - rad, -jnp.inf)
    ucb = jnp.where(alive, est + rad, -jnp.inf)
    return alive & (ucb >= _kth_largest(lcb, k))

  alive = eliminate(jnp.ones((n,), bool), est, var)

  def done(state):
    level, alive = state[0], state[1]
    return (jnp.sum(alive) <= k) | (level >= top_level)

  def make_body(cap):
    def body(state):
      level, alive, est, var, lvl, rounds = state
      nl = level + 1
      a, b = weights(nl)
      if cap == n:
        rows, valid, idx = A, alive, None
      else:
        idx = jax.lax.top_k(alive.astype(jnp.int32), cap)[1]
        rows, valid = A[idx], alive[idx]
      e = rows @ a
      q = (rows * rows) @ b
      e_new = beta * e
      v_new = beta * beta * _finish(e, q, m_eff[nl], nnz, cfg.order)
      if idx is None:
        est = jnp.where(valid, e_new, est)
        var = jnp.where(valid, v_new, var)
        lvl = jnp.where(valid, nl, lvl)
      else:
        est = est.at[idx].set(jnp.where(valid, e_new, est[idx]))
        var = var.at[idx].set(jnp.where(valid, v_new, var[idx]))
        lvl = lvl.at[idx].set(jnp.where(valid, nl, lvl[idx]))
      alive = eliminate(alive, est, var)
      return nl, alive, est, var, lvl, rounds + 1

    return body

  state = (jnp.int32(0), alive, est, var, lvl, jnp.int32(0))
  for p, cap in enumerate(cfg.caps):
    nxt = cfg.caps[p + 1] if p + 1 < len(cfg.caps) else 0

    def cond(s, nxt=nxt):
      return (~done(s)) & (jnp.sum(s[1]) > nxt)

    state = jax.lax.while_loop(cond, make_body(cap), state)
  _, alive, est, var, lvl, rounds = state

  # ---- winners, computed exactly.
  win = jax.lax.top_k(jnp.where(alive, est, -jnp.inf), k)[1]
  win_logits = beta * (A[win] @ x)
  est = est.at[win].set(win_logits)
  var = var.at[win].set(0.0)
  lvl = lvl.at[win].set(L - 1)

  # ---- partition function: refine the arms with the widest contribution to Z.
  log1p_eps, log1m_eps = jnp.log1p(eps), jnp.log1p(-eps)
  zc = cfg.z_capacity

  def z_status(est, var, lvl):
    rad = _radius(var, fudge_z, log_z_term)
    log_z = jax.nn.logsumexp(est)
    ok = (jax.nn.logsumexp(est + rad) - log_z <= log1p_eps) & (jax.nn.logsumexp(est - rad) - log_z >= log1m_eps)
    # log of the width exp(mu + r) - exp(mu - r); -inf for exact arms.
    width = est + rad + jnp.log(-jnp.expm1(-2.0 * rad))
    refinable = (lvl < top_level) & (rad > 0)
    return ok, jnp.where(refinable, width, -jnp.inf)

  def z_cond(s):
    est, var, lvl, ok, score = s
    return (~ok) & jnp.any(score > -jnp.inf)

  def z_body(s):
    est, var, lvl, ok, score = s
    idx = jax.lax.top_k(score, zc)[1]
    valid = score[idx] > -jnp.inf
    nl = jnp.minimum(lvl[idx] + 1, L - 1)  # (zc,)
    a, b = _level_weights(keys[None], x[None], t[nl][:, None], m_eff[nl][:, None], nnz, cfg.order)
    rows = A[idx]
    e = jnp.sum(rows * a, axis=1)
    q = jnp.sum(rows * rows * b, axis=1)
    e_new = beta * e
    v_new = beta * beta * _finish(e, q, m_eff[nl], nnz, cfg.order)
    est = est.at[idx].set(jnp.where(valid, e_new, est[idx]))
    var = var.at[idx].set(jnp.where(valid, v_new, var[idx]))
    lvl = lvl.at[idx].set(jnp.where(valid, nl, lvl[idx]))
    ok, score = z_status(est, var, lvl)
    return est, var, lvl, ok, score

  ok, score = z_status(est, var, lvl)
  est, var, lvl, ok, _ = jax.lax.while_loop(z_cond, z_body, (est, var, lvl, ok, score))

  log_z = jax.nn.logsumexp(est)
  order_w = jnp.argsort(-win_logits)
  win, win_logits = win[order_w], win_logits[order_w]
  samples = jnp.sum(m_eff[lvl]).astype(jnp.int32)
  return AdaptiveResult(
      indices=win.astype(jnp.int32),
      probs=jnp.exp(win_logits - log_z),
      log_z=log_z,
      samples=samples,
      logits=win_logits,
      certified=ok | ~jnp.any(jnp.isfinite(score)),
      rounds=rounds,
  )


@functools.partial(jax.jit, static_argnames=("cfg",))
def _batched(keys, A, At, col_l1, X, eps, beta, fudge_b, fudge_z, cfg):
  fn = functools.partial(_single_query, cfg=cfg)
  return jax.vmap(fn, in_axes=(0, None, None, None, 0, None, None, None, None))(
      keys, A, At, col_l1, X, eps, beta, fudge_b, fudge_z
  )


def adaptive_softmax(
    key: jax.Array,
    A,
    x,
    *,
    k: int = 1,
    epsilon: float = 0.3,
    delta: float = 0.1,
    beta: float = 1.0,
    order: str = "importance",
    fudge_bandit: float = 1.0,
    fudge_z: float = 1.0,
    warmup: int | None = None,
    growth: float = 2.0,
    z_capacity: int | None = None,
    check_finite: bool = True,
) -> AdaptiveResult:
  r"""PAC top-k softmax of `beta * A x` by adaptive sampling.

  With probability >= 1 - delta (for fudge factors 1), the returned index set is the top-k of
  `mu = beta * A x` and every returned probability satisfies `|p_hat - p| <= epsilon * p`,
  where `p_i = exp(mu_i) / sum_j exp(mu_j)`.

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
    order: "importance" (Gumbel-top-d on `|x_j| sum_i |A_ij|`) or "uniform".
    fudge_bandit: multiplies the variance in the identification radii (tuned <= 1).
    fudge_z: multiplies the variance in the normalization radii (tuned <= 1).
    warmup: warm-up pulls per arm (default `d / (17 log(6n/delta))` clipped to [32, d/10]).
    growth: factor by which surviving arms' pulls grow per round (> 1).
    z_capacity: arms refined per normalization round (default min(n, max(4k, 256))).
    check_finite: scan `x` for NaN/inf on the host (one pass; turn off inside timing loops).

  Returns:
    AdaptiveResult; arrays carry a leading batch axis iff `x` is 2-D.

  Example:
    >>> A = jax.random.normal(jax.random.key(0), (100, 1000)) / 30
    >>> res = adaptive_softmax(jax.random.key(1), A, A[3] * 30, k=1)
    >>> int(res.indices[0])
    3
  """
  prep = prepare_matrix(A)
  n, d = prep.A.shape
  if check_finite:
    checks.floating_array("x", x, (1, 2))
  else:
    if getattr(x, "ndim", None) not in (1, 2):
      raise ValueError(f"x must have 1 or 2 dimensions, got shape {getattr(x, 'shape', None)}")
  x = jnp.asarray(x)
  if x.shape[-1] != d:
    raise ValueError(f"x has shape {tuple(x.shape)} but A has shape {(n, d)}: x must be (d,) or (b, d) with d={d}")
  k = checks.int_in_range("k", k, 1, n)
  epsilon = checks.open_unit("epsilon", epsilon)
  delta = checks.open_unit("delta", delta)
  beta = checks.positive("beta", beta)
  fudge_bandit = checks.positive("fudge_bandit", fudge_bandit)
  fudge_z = checks.positive("fudge_z", fudge_z)
  checks.one_of("order", order, ORDERS)
  cfg = make_config(n, d, k=k, delta=delta, order=order, warmup=warmup, growth=growth, z_capacity=z_capacity)
  single = x.ndim == 1
  X = (x[None] if single else x).astype(prep.A.dtype)
  # A batch gets split(key, b)[i] for query i; a single query uses `key` itself, so that
  # batched and per-query calls agree query by query.
  keys = key[None] if single else jax.random.split(key, X.shape[0])
  f = lambda v: jnp.asarray(v, prep.A.dtype)  # noqa: E731
  res = _batched(keys, prep.A, prep.At, prep.col_l1, X, f(epsilon), f(beta), f(fudge_bandit), f(fudge_z), cfg)
  if single:
    res = jax.tree.map(lambda a: a[0], res)
  return res._replace(config=cfg)
