r"""AdaptiveSoftmax: bandit-based PAC top-k softmax of `beta * A x`.

Implements Baharav et al., "Adaptive Sampling for Efficient Softmax Approximation" (NeurIPS 2024):
Algorithm 1 (best-arm identification by successive elimination, here for the top-k *set*) and
Algorithm 2 (adaptive estimate of the partition function), in two modes that differ only in the
interval they put around an arm's estimate (`_intervals`).

Arms are the rows of `A` (n of them); "pulling" arm i on coordinate j reads one product `A_ij x_j`
(one *sample*). Every arm of one query reads the coordinates in one shared order, so "arm i at level l"
has read a prefix of that order: `levels[l]` products (`min(levels[l], nnz(x))`).

**The order (sampling scheme).** Each query's order is a deterministic *head* followed by a *tail*
read in a uniformly random order (sampling without replacement):

* head: the (at most `head_size`) coordinates whose range weight `w_j = |x_j| M_j`,
  `M_j = max_i |A_ij|`, exceeds a threshold `tau >= head_ratio * mean(w)`; every arm reads them
  exactly in the warm-up. They are found without sorting d: the largest `w` within the blocks of 256
  coordinates with the largest block maxima (`_head`).
* tail: the other useful coordinates (`x_j != 0`, `M_j > 0`) in the order of a uniformly random
  permutation `pi` drawn **once** in `prepare_matrix` (A^T stored in that order, so a run of positions is
  a contiguous read), started at a uniformly random position drawn from each call's key (a cyclic shift).
  For any `x` chosen independently of `pi`, the tail coordinates appear in a uniformly random order
  (a uniform random permutation stays uniform under any shift and restricted to any subset fixed
  before it is drawn), which is all the intervals below need. Outcomes of calls on one prepared matrix
  are not independent of each other; `prepare_matrix(A, key=...)` redraws `pi`. A call costs a few O(d)
  passes over `x` (weights, block maxima, counts) plus the products it reads: no sort, no d random draws.

**Intervals** (`_intervals`), from the head sum, the tail sum and sum of squares of the `m` tail
products read, the tail size `N`, and `R = tau` (every tail product is in `[-R, R]`):

* **mode="certified"** (default): valid for *every* `A` and `x` (independent of `pi`), no tuning. The
  intersection of the Hoeffding-Serfling bound (Bardenet & Maillard 2015, "Concentration inequalities for
  sampling without replacement", Bernoulli 21(3), Corollary 2.5) and the empirical Bernstein-Serfling
  bound (ibid., Theorem 4.3: with probability >= 1 - 5 delta', one-sided,
  `mean_hat - mean <= sigma_hat sqrt(2 rho_m log(1/delta') / m) + kappa (2R) log(1/delta') / m`,
  `kappa = 7/3 + 3/sqrt(2)`) scaled by N, with the deterministic bound `|unread part| <= sum_{unread} w_j`.
  One union bound over n arms x L levels x 2 sides (`delta' = delta / (10 n L)`) makes *every* interval
  the algorithm may use hold at once with probability >= 1 - delta, so identification and normalization
  share the whole delta. A float32 rounding margin `2 u sqrt(d) beta sum_j w_j` widens every sampled arm's
  interval; an arm whose products were all read is as exact as `A @ x` in float32 and gets none (heavy tails make
  the margin wide: with it, a call that had read everything could not close its probability bracket).
* **mode="paper"**: the paper's radius `r = sqrt(2 fudge var log(c n L / delta'))` around the same
  estimate, `var` the *estimated* variance of the tail estimate (finite-population corrected sample
  variance, `N^2 (1 - m/N) s^2 / m`): a confidence interval only for sub-Gaussian products. Fudge
  factors tuned on training queries (`tuning.tune_fudge`) scale the variance. The paper orders
  coordinates by Gumbel-top-d importance weights (Horvitz-Thompson estimate); here the weight is spent
  on the deterministic head instead, which needs no per-call sort.

Algorithm, per query (one function per step below):

1. `_warm_up`: every arm reads the head and the first tail coordinates (`levels[0]` products).
2. `_eliminate` (Algorithm 1): keep the arms whose upper bound reaches the k-th largest lower bound;
   the survivors move up one level per round (pulls x `growth`) until k remain or they are exact.
3. `_winners`: with `exact_winners=True` (default) the k winners are computed exactly.
4. Partition function: `_bracket_normalization` (certified mode; paper mode's default): for each winner w,
   `p_w = e^mu_w / (e^mu_w + Z_-w)` is bracketed from the arms' intervals and the arms that widen the
   worst bracket most move up until `p_hi / p_lo <= (1 + eps) / (1 - eps)`; the returned
   `p_hat = 2 p_lo p_hi / (p_lo + p_hi)` is then within `1 +- eps` of every value in the bracket.
   `_paper_normalization` (`normalization="paper"`): Algorithm 2, target variances from the first-pass
   estimates, point estimate `log Z = logsumexp(mu_hat)`.

Time, not samples (defaults; `exact_below=0` turns both off): a problem with `n * d <= exact_below` is one exact
`A @ x` (`_exact_group`), and the call stops sampling and finishes with one exact `A @ x` (every arm exact) when
sampling on costs more: after the warm-up, when the survivors are predicted to read more than that product costs
(`_predicted_cost`: each survivor's interval by the mode's own rule at the later levels), and before any round
whose reads, added to those already spent, would pass it (ski rental: at most about twice the exact product).
With the fallback on and `exact_winners`, the k arms with the largest warm-up estimates are read in full right
after the warm-up (`_leaders`; they are usually the winners, read in full anyway): their exact logits bound the
prediction's boundary, which the largest of n noisy estimates would otherwise inflate.

Samples are counted as distinct products read: arm i at level l has read `min(levels[l], nnz(x))`
products; exact arms `nnz(x)`. `phase_samples` splits them into warm-up, elimination, winners and
normalization (`PHASES`).

Reads (`_advance`): moving arms from level l to l + 1 reads only their next positions of the order (running
sums, never a re-read), C positions per step (head and unused coordinates masked). Each move takes the
cheapest of three read paths by a measured cost model (`_READ_COST`): the *slab* (C contiguous rows of the
ordered `A^T`, every arm, a small GEMV/GEMM per step), *segments* (C contiguous entries of each moving arm's
ordered row, the arms compacted into the smallest static buffer that holds them: n, n/8, ...), or their
*full rows* (`A @ x`, the arms become exact; below the top level only with `exact_rows=True`). No (n, d) array other than `A` and `A^T` is formed (tests/adaptive/test_core_perf.py reads the
compiled program). A 16-bit `A` is read as stored and multiplied in float32. Rounds are `lax.while_loop`s with
masks; a batch runs query by query (`lax.map`), or, with `shared_order=True`, as one group sharing one order.
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
HEAD_BLOCK = 256  # about this many coordinates per block when the head is searched by block maxima (`_head`)

# Cost of one product read by each path of a round, relative to one product of the streamed `A @ x` (GEMV),
# measured on XLA:CPU (`python scripts/bench_adaptive.py --micro`): a block of C rows of the ordered A^T into
# every arm's sums 1.8-3.4x, full rows of the moving arms 2.6x, C-long segments of the moving arms' ordered
# rows 1.8-5x (32,000 x 4096 with C = 16: 5.0x; 100 x 1e5 / 1e6 with C = 256: 3.4x / 1.8x). A round takes
# the cheapest path that holds its moving arms.
_READ_COST = {"slab": 2.7, "rows": 2.6, "segment": 5.0}

# Problems with n * d at most this many products are computed exactly by default (`exact_below`): there a call's
# rounds cost more than the whole `A @ x`. Measured on XLA:CPU (configs/adaptive/wallclock.py, batch 1): the
# rounds of one call take about 0.3-0.7 ms whatever the samples, the streamed GEMV about 1.7e-7 ms per product,
# so the algorithm was slower than `A @ x` in every cell with n * d <= 1e6 and faster in most with n * d >= 1e7.
EXACT_BELOW = 4_000_000


# ============================================================================================ the matrix
class PreparedMatrix(NamedTuple):
  """A matrix made ready for repeated AdaptiveSoftmax calls (validated once; the tail order drawn once).

  Holds three copies of A's entries (3x its memory): A as given (full rows), and A^T and A with columns in the
  order `perm`, each extended by its first C positions (`big_chunk(n)`) so that any run of C positions of the
  cyclic order is one contiguous read.

  Attributes:
    A: (n, d) the matrix, row-major (full rows of the arms that become exact).
    At: (d + C, n) its transpose with rows in the order `perm`: `At[p] = A[:, perm[p mod d]]` (every arm's
      products at a run of positions: a contiguous block of rows).
    Ap: (n, d + C) A with columns in that order, `Ap[:, p] = A[:, perm[p mod d]]` (one arm's products at a run
      of positions: a contiguous segment of its row).
    perm: (d + C,) int32 coordinate at each position of the order (a uniformly random permutation, extended).
    inv: (d,) int32 position of each coordinate (`inv[perm[p]] = p`).
    col_l1: (d,) column L1 norms `sum_i |A_ij|`.
    col_max: (d,) column maxima `M_j = max_i |A_ij|` (the range bounds).
  """

  A: jax.Array
  At: jax.Array
  Ap: jax.Array
  perm: jax.Array
  inv: jax.Array
  col_l1: jax.Array
  col_max: jax.Array


def read_chunk(n: int) -> int:
  """Positions of the order read per step of a read loop for an n-row matrix: about 64k products of the slab
  per step, a power of two in [16, 256]."""
  return int(min(256, max(16, 2 ** int(math.log2(max(1, 65536 // n))))))


def big_chunk(n: int) -> int:
  """Positions per step of a long read (`_read_tail`, while at least this many positions remain to read): about
  1M products of the slab per step, a power of two in [read_chunk(n), 4096]. Fewer steps where d is large: each
  step has a fixed cost of a few microseconds on XLA:CPU (a sparse query at d = 1e6 stepped 264 times in its
  warm-up)."""
  return int(min(4096, max(read_chunk(n), 2 ** int(math.log2(max(1, 2**20 // n))))))


def prepare_matrix(A, key: jax.Array | None = None) -> PreparedMatrix:
  """Validates `A` (2-D, floating, non-empty; finite when concrete), draws the tail order, stores `A^T` in it.

  Args:
    A: (n, d) floating matrix (or a `PreparedMatrix`, returned as is).
    key: PRNG key of the coordinate order `pi` (default `jax.random.key(0)`). Every call on the returned
      matrix reads tail coordinates in `pi` order from a random start: its guarantee holds for queries chosen
      independently of `pi`. Prepare again with another key to redraw it.

  Works on traced arrays too (inside the user's `jax.jit`), where the value check is skipped.

  Example:
    >>> import jax
    >>> from asoftmax import adaptive
    >>> prep = adaptive.prepare_matrix(jax.numpy.ones((3, 5)))
    >>> prep.A.shape, sorted(prep.perm[:5].tolist())
    ((3, 5), [0, 1, 2, 3, 4])
  """
  if isinstance(A, PreparedMatrix):
    return A
  key = jax.random.key(0) if key is None else checks.prng_key("key", key)
  if checks.is_traced(A):
    if A.ndim != 2 or not jnp.issubdtype(A.dtype, jnp.floating) or 0 in A.shape:
      raise ValueError(f"A must be a non-empty 2-D floating array, got shape {A.shape} dtype {A.dtype}")
  else:
    checks.floating_array("A", A, (2,))
  n, d = A.shape
  inv, ext = _order(key, d, big_chunk(n))
  if checks.is_traced(A) or checks.is_traced(ext):
    A = jnp.asarray(A)
    At, Ap = A.T[ext], A[:, ext]
  else:
    A_np, e = np.asarray(A), np.asarray(ext)
    Ap_np = np.take(A_np, e, axis=1)  # a gather within each row (cache-friendly), then one transpose copy
    At, Ap = jax.device_put(np.ascontiguousarray(Ap_np.T)), jax.device_put(Ap_np)
    A = A if isinstance(A, jax.Array) else jax.device_put(A_np)
  col_l1, col_max = _column_stats(A)
  return PreparedMatrix(A=A, At=At, Ap=Ap, perm=ext, inv=inv, col_l1=col_l1, col_max=col_max)


@functools.partial(jax.jit, static_argnames=("d", "extra"))
def _order(key, d: int, extra: int):
  """(inv, ext) of `prepare_matrix`: the inverse of a random permutation of d coordinates, and the permutation
  followed by its first `extra` entries (repeated if extra > d). One compiled program per (d, extra): done eagerly,
  its dozen small operations compiled one by one at every new shape (~0.45 s of a first call on CPU)."""
  perm = jax.random.permutation(key, d).astype(jnp.int32)
  inv = jnp.zeros((d,), jnp.int32).at[perm].set(jnp.arange(d, dtype=jnp.int32))
  return inv, jnp.concatenate([perm, jnp.tile(perm, -(-extra // d))[:extra]])


@jax.jit
def _column_stats(A):
  """(col_l1, col_max) of `prepare_matrix`: per column of A, the sum and the max of |A_ij| in the compute dtype."""
  ct = _compute_dtype(A.dtype)
  absA = jnp.abs(A)
  return jnp.sum(absA, axis=0, dtype=ct), jnp.max(absA, axis=0).astype(ct)


# ============================================================================================ config
@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
  """Static configuration of one AdaptiveSoftmax call (hashable: it is a jit static argument).

  Attributes:
    n, d: matrix shape.
    k: size of the top set.
    delta: failure probability (total).
    mode: "certified" or "paper".
    order: "importance" (a head of dominant coordinates, then the tail) or "uniform" (no head).
    levels: products per arm at each level, increasing, the last equal to d.
    caps: survivor-buffer sizes of the elimination phases, decreasing, caps[0] = n.
    z_capacity: most arms refined per round of the partition-function loop.
    exact_winners: compute the k winners exactly after identification.
    head_ratio: a head coordinate has `w_j > head_ratio * mean(w)` (and more).
    head_size: most head coordinates (at most the warm-up).
    shared_order: one coordinate order for the whole batch (else one per query).
    normalization: paper mode's partition function: "bracket" or "paper" (Algorithm 2).
    exact_rows: read full rows (the arms become exact) whenever that costs less time than their new columns.
    exact: the problem is small (n * d <= exact_below): the call computes `A x` exactly, no sampling.
    fallback: finish with one exact `A @ x` when sampling on is predicted to cost more (`_predicted_cost`,
      after the warm-up) or the reads spent would pass its cost (before each round); off with `exact_below=0`.
    growth: ratio of consecutive levels.
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
  head_size: int = 64
  shared_order: bool = False
  normalization: str = "bracket"
  exact_rows: bool = False
  exact: bool = False
  fallback: bool = False
  growth: float = 2.0
  c: float = 6.0

  @property
  def warmup(self) -> int:
    return self.levels[0]

  @property
  def n_head(self) -> int:
    """Static capacity of the head: at most half the warm-up (0 with `order="uniform"`)."""
    return 0 if self.order == "uniform" else min(self.head_size, self.levels[0] // 2, self.d)

  @property
  def chunk(self) -> int:
    """Positions of the order read per step of a read loop (`read_chunk`)."""
    return read_chunk(self.n)


def default_warmup(n: int, d: int, delta: float, min_warmup: int = 32) -> int:
  """Warm-up pulls per arm: `d * V0`, `V0 = 1 / (17 log(6 n / delta))`, in [min_warmup, d/10].

  Never more than d; never less than min(min_warmup, d).

  Raises:
    ValueError: `n`, `d` or `min_warmup` not an integer >= 1, or `delta` not in (0, 1).
  """
  n, d = checks.int_in_range("n", n), checks.int_in_range("d", d)
  delta = checks.open_unit("delta", delta)
  min_warmup = checks.int_in_range("min_warmup", min_warmup)
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
    head_size: int = 64,
    shared_order: bool = False,
    normalization: str = "bracket",
    exact_rows: bool = False,
    exact_below: int = EXACT_BELOW,
) -> AdaptiveConfig:
  """Builds the static schedule (pull levels, survivor buffers) for an (n, d) problem.

  Raises:
    ValueError: `n`, `d` not integers >= 1, `k` not in [1, n], `delta` not in (0, 1), `warmup` not an
      integer in [1, d], `exact_below` not an integer >= 0, `growth <= 1`, `min_cap` < 1, `cap_ratio` < 2, `head_size` < 0, unknown
      `mode`/`order`/`normalization`, a boolean option that is not a bool.
  """
  n, d = checks.int_in_range("n", n), checks.int_in_range("d", d)
  k = checks.int_in_range("k", k, 1, n)
  delta = checks.open_unit("delta", delta)
  min_cap = checks.int_in_range("min_cap", min_cap)
  cap_ratio = checks.int_in_range("cap_ratio", cap_ratio, lo=2)
  head_size = checks.int_in_range("head_size", head_size, lo=0)
  exact_below = checks.int_in_range("exact_below", exact_below, lo=0)
  checks.one_of("mode", mode, MODES)
  checks.one_of("order", order, ORDERS)
  checks.one_of("normalization", normalization, NORMALIZATIONS)
  for name, v in (("exact_winners", exact_winners), ("shared_order", shared_order), ("exact_rows", exact_rows)):
    checks.boolean(name, v)
  m0 = default_warmup(n, d, delta) if warmup is None else checks.int_in_range("warmup", warmup, 1, d)
  growth = checks.positive("growth", growth)
  if growth <= 1.0:
    raise ValueError(f"growth must be > 1, got {growth}")
  head_ratio = checks.positive("head_ratio", head_ratio)
  levels = [m0]
  while levels[-1] < d:
    levels.append(int(min(d, max(levels[-1] + 1, math.ceil(levels[-1] * growth)))))
  caps = _buckets(n, k, cap_ratio, min_cap)
  if z_capacity is None:
    # Each round of the normalization loop scans all n arms (bounds, top-k of the widths), so few arms per
    # round means many O(n) rounds. Measured on SmolLM2's head (n = 49152, d = 576, paper mode, fudge_bandit
    # 0.1, 20 queries, CPU): 256 -> 60.9 s, 1024 -> 30.4 s, 4096 -> 11.4 s, with 0.4 % more samples.
    zc = min(n, max(4 * k, 4096))
  else:
    zc = min(n, checks.int_in_range("z_capacity", z_capacity, 1, 2**31 - 1))
  return AdaptiveConfig(
      n=n, d=d, k=k, delta=float(delta), mode=mode, order=order, levels=tuple(levels), caps=caps,
      z_capacity=zc, exact_winners=bool(exact_winners), head_ratio=float(head_ratio), head_size=head_size,
      shared_order=bool(shared_order), normalization=normalization, exact_rows=bool(exact_rows),
      exact=n * d <= exact_below, fallback=exact_below > 0, growth=float(growth),
  )


def _buckets(top: int, k: int, ratio: int = 8, min_cap: int = 16) -> tuple[int, ...]:
  """Static buffer sizes top, top/8, top/64, ... down to max(2k, min_cap)."""
  caps = [top]
  while caps[-1] // ratio >= max(2 * k, min_cap):
    caps.append(caps[-1] // ratio)
  return tuple(caps)


class AdaptiveResult(NamedTuple):
  """Output of `adaptive_softmax` (leading batch axis iff the query was 2-D); a pure pytree of arrays.

  Attributes:
    indices: (..., k) int32 top-k arms, by estimated logit descending.
    probs: (..., k) their estimated softmax probabilities (NaN: the call's inputs were invalid under jit).
    log_z: (...,) estimated log partition function.
    samples: (...,) int32 products `A_ij x_j` read in all.
    phase_samples: (..., 4) int32 products read per phase, in the order of `PHASES`
      (warm-up, elimination, winners, normalization); sums to `samples`.
    logits: (..., k) the winners' logits (exact with `exact_winners=True`, else interval midpoints).
    certified: (...,) bool: the normalization loop met its stopping rule on valid inputs (in certified
      mode this is the statement that holds with prob >= 1 - delta).
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


def _compute_dtype(dtype):
  """Accumulation dtype: float32 for 16-bit storage (bf16 / f16 heads), else the storage dtype."""
  return jnp.dtype(jnp.float32) if jnp.dtype(dtype).itemsize < 4 else jnp.dtype(dtype)


# ============================================================================================ the plan
# A *group* is B queries that share one order: B = 1 on the default per-query path (queries run one after
# another under `lax.map`), B = batch with `shared_order`. The order's weights use `a_j = max_q |X_qj|`;
# every bound uses each query's own `w_qj = |X_qj| M_j`.


class _Plan(NamedTuple):
  """Per-call constants of a group (B queries, L levels, H head slots). O(d) to build, no sort."""

  X: jax.Array  # (B, d) queries (compute dtype)
  offset: jax.Array  # () int32 position of the order where the tail reading starts (random per call)
  head: jax.Array  # (H,) int32 head coordinates
  head_ok: jax.Array  # (H,) bool slot holds a head coordinate
  tau: jax.Array  # () a useful coordinate is in the tail iff a_j M_j <= tau
  nnz: jax.Array  # (B,) int32 useful coordinates of each query
  n_head: jax.Array  # (B,) int32 head coordinates useful to each query
  n_tail: jax.Array  # (B,) int32 tail population N of each query
  tail_w: jax.Array  # (B,) sum of w over each query's tail
  rng: jax.Array  # (B,) R: every tail product lies in [-R, R]
  margin: jax.Array  # (B,) float32 rounding margin (unscaled by beta)
  need: jax.Array  # (L,) int32 tail coordinates (of the shared tail) read at each level
  top_level: jax.Array  # () first level that reads every useful coordinate


def _block_size(d: int) -> int:
  """Coordinates per block of the head search: a divisor of d near `HEAD_BLOCK` (no padding copy), else 256."""
  if d <= HEAD_BLOCK:
    return d
  for delta in range(0, HEAD_BLOCK // 2):
    for b in (HEAD_BLOCK - delta, HEAD_BLOCK + delta):
      if d % b == 0:
        return b
  return HEAD_BLOCK


def _head(aw, cfg: AdaptiveConfig, mean):
  """The head: `{j : aw_j > tau}` with at most H members, from block maxima, without sorting d.

  Candidate thresholds `t_i = head_ratio * mean * 2^(i/4)`. The smallest t_i with at most H blocks whose maximum
  exceeds it picks the candidate blocks (every coordinate above t_i lies in one of them); the smallest
  t_i >= that with at most H coordinates of those blocks above it is tau. Such an i exists: at most
  `nnz / (head_ratio 2^(i/4))` coordinates exceed t_i. Cost: one pass for the block maxima (fused with the
  weights), then O(H * block) work. Returns (head (H,) int32, ok (H,) bool, tau, max_j aw_j).
  """
  H, d = cfg.n_head, cfg.d
  if H == 0:
    return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool), jnp.asarray(jnp.inf, aw.dtype), jnp.max(aw)
  b = _block_size(d)
  nb = -(-d // b)
  blocks = aw.reshape(nb, b) if nb * b == d else jnp.pad(aw, (0, nb * b - d)).reshape(nb, b)
  bmax = jnp.max(blocks, axis=1)
  n_t = int(min(240, 4 * math.ceil(math.log2(max(2.0, d / (cfg.head_ratio * H)))) + 8))
  t = cfg.head_ratio * mean * jnp.exp2(0.25 * jnp.arange(n_t, dtype=aw.dtype))  # (T,)
  hb = min(H, nb)
  nblk = jnp.sum(bmax[None, :] > t[:, None], axis=1)  # (T,) blocks above each threshold
  i0 = jnp.argmax(nblk <= hb)
  bval, bsel = jax.lax.top_k(bmax, hb)  # every block above t[i0] (at most hb); XLA:CPU's nonzero is ~10x slower
  bsel = jnp.where(bval > t[i0], bsel, nb)
  cand = (bsel[:, None] * b + jnp.arange(b)[None]).reshape(-1)
  in_range = (bsel[:, None] < nb).repeat(b, axis=1).reshape(-1) & (cand < d)
  cand = jnp.minimum(cand, d - 1)
  g = jnp.where(in_range, aw[cand], -1.0)
  ncnt = jnp.sum(g[None, :] > t[:, None], axis=1)  # (T,) exact for i >= i0
  i1 = jnp.argmax((jnp.arange(n_t) >= i0) & (ncnt <= H))
  tau = t[i1]
  sel = jax.lax.top_k(jnp.where(g > tau, g, -1.0), H)[1]  # the ncnt[i1] <= H coordinates above tau come first
  ok = jnp.arange(H) < jnp.minimum(ncnt[i1], H)
  return cand[sel].astype(jnp.int32), ok, tau, jnp.max(bmax)


def _plan(offset, X, col_max, cfg: AdaptiveConfig) -> _Plan:
  """The group's constants from its queries X (B, d): two fused O(d) passes (weights and their sums, block
  maxima) and O(H * 256) for the head."""
  d = cfg.d
  ct = X.dtype
  useful_col = (col_max > 0).astype(ct)
  if X.shape[0] == 1:  # 1-D passes: XLA:CPU reduces a (1, d) row far slower than a (d,) vector
    aw = jnp.abs(X[0]) * col_max
    total_q = jnp.sum(aw)[None]
    nnz_q = jnp.sum((aw > 0).astype(ct))[None].astype(jnp.int32)
    nnz_s = nnz_q[0]
    mean = total_q[0] / jnp.maximum(nnz_s, 1).astype(ct)
  else:
    aw = jnp.max(jnp.abs(X), axis=0) * col_max  # (d,) shared weights
    total_q = jnp.abs(X) @ col_max  # (B,) as GEMVs
    nnz_q = ((X != 0).astype(ct) @ useful_col).astype(jnp.int32)
    nnz_s = jnp.sum((aw > 0).astype(ct)).astype(jnp.int32)
    mean = jnp.sum(aw) / jnp.maximum(nnz_s, 1).astype(ct)
  head, ok, tau, wmax = _head(aw, cfg, mean)
  xh = jnp.where(ok[None], X[:, head], 0.0)
  wh = jnp.abs(xh) * col_max[head][None]
  n_head_q = jnp.sum(wh > 0, axis=1).astype(jnp.int32)
  h_s = jnp.sum(ok).astype(jnp.int32)
  n_tail_s = nnz_s - h_s
  levels = jnp.asarray(cfg.levels, jnp.int32)
  need = jnp.clip(levels - h_s, 0, n_tail_s)
  top_level = jnp.argmax(levels >= nnz_s).astype(jnp.int32)
  rng = jnp.minimum(tau, wmax) * jnp.ones_like(total_q)
  margin = 2.0 * jnp.finfo(ct).eps * math.sqrt(d) * total_q
  return _Plan(X=X, offset=jnp.asarray(offset, jnp.int32), head=head, head_ok=ok, tau=tau, nnz=nnz_q,
               n_head=n_head_q, n_tail=nnz_q - n_head_q, tail_w=total_q - jnp.sum(wh, axis=1), rng=rng,
               margin=margin, need=need, top_level=top_level)


# ============================================================================================ arm state
class _Arms(NamedTuple):
  """Per-arm state of a group, each (B, n); the sums are unscaled by beta."""

  lvl: jax.Array  # int32 level reached (-1: nothing read yet)
  s_head: jax.Array  # sum of the head products (the whole product once the arm is exact)
  s1: jax.Array  # sum of the tail products read
  s2: jax.Array  # sum of their squares


class _Levels(NamedTuple):
  """What each level of the group's order holds, filled when a level is first read (L levels)."""

  pos: jax.Array  # (L,) int32 position of the order just after the level's last tail coordinate
  cnt: jax.Array  # (B, L) int32 tail products each query's arms hold at the level
  wsum: jax.Array  # (B, L) sum of w over those tail coordinates


def _init_levels(P: _Plan, cfg: AdaptiveConfig) -> _Levels:
  """Empty tables, except levels >= top_level, which hold every useful coordinate (known without reading)."""
  L = len(cfg.levels)
  B = P.X.shape[0]
  full = jnp.arange(L) >= P.top_level
  return _Levels(pos=jnp.where(full, cfg.d, 0).astype(jnp.int32),
                 cnt=jnp.where(full[None], P.n_tail[:, None], 0).astype(jnp.int32),
                 wsum=jnp.where(full[None], P.tail_w[:, None], 0.0).astype(P.X.dtype) * jnp.ones((B, 1), P.X.dtype))


def _samples(arms: _Arms, tabs: _Levels, P: _Plan):
  """(B,) products read: arm i at level l holds its useful head coordinates and cnt[l] tail products."""
  lvl = jnp.maximum(arms.lvl, 0)
  per = P.n_head[:, None] + jnp.take_along_axis(tabs.cnt, lvl, axis=1)
  return jnp.sum(jnp.where(arms.lvl >= 0, per, 0), axis=1).astype(jnp.int32)


def _bounds_from_sums(seen, s1, s2, mt, N, unread, rng, margin, beta, log_term):
  """Certified (est, lo, hi) of `beta * A_i x` from an arm's sums (arrays broadcast together).

  seen: sum of every product read (head and tail); s1, s2: sum and sum of squares of the mt tail products
  read; N: tail size; unread: sum of `w_j` over unread tail coordinates; rng: R; log_term: (log 1/delta_h,
  log 1/delta_e) of Hoeffding-Serfling (Bardenet & Maillard 2015, Cor. 2.5) and empirical
  Bernstein-Serfling (Thm 4.3); both hold, the interval is their intersection with the deterministic bound.
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
  rad_h = N * (2.0 * rng) * jnp.sqrt(rho * log_h / (2.0 * mt1))
  rad_e = N * (jnp.sqrt(2.0 * var * rho * log_e / mt1) + KAPPA * (2.0 * rng) * log_e / mt1)
  rad = jnp.where(mt >= 2, jnp.minimum(rad_h, rad_e), jnp.where(mt >= 1, rad_h, jnp.inf))
  lo = jnp.maximum(est - rad, seen - unread) - margin
  hi = jnp.minimum(est + rad, seen + unread) + margin
  est = jnp.clip(est, lo, hi)
  return beta * est, beta * lo, beta * hi


def _paper_estimate(s_head, s1, s2, mt, N):
  """Paper mode's (estimate, variance) of `A_i x`: head exact plus N times the tail sample mean, variance
  `N^2 (1 - m/N) s^2 / m` (sampling without replacement; s^2 the unbiased sample variance). Fewer than two
  tail products of a tail not yet read whole: infinite variance."""
  m = mt.astype(s1.dtype)
  Nf = jnp.maximum(N, 1).astype(s1.dtype)
  m1 = jnp.maximum(m, 1.0)
  mean = s1 / m1
  s_sq = jnp.maximum(s2 - m * mean * mean, 0.0) / jnp.maximum(m - 1.0, 1.0)
  var = Nf * Nf * jnp.maximum(1.0 - m / Nf, 0.0) * s_sq / m1
  var = jnp.where((m < 2) & (mt < N), jnp.inf, var)
  est = s_head + jnp.where(mt > 0, Nf * mean, 0.0)
  return est, var


def _arm_tables(arms: _Arms, tabs: _Levels, P: _Plan):
  """Per arm: (tail products held, unread tail weight), both (B, n)."""
  lvl = jnp.maximum(arms.lvl, 0)
  mt = jnp.take_along_axis(tabs.cnt, lvl, axis=1)
  ws = jnp.take_along_axis(tabs.wsum, lvl, axis=1)
  unread = jnp.where(mt >= P.n_tail[:, None], 0.0, jnp.maximum(P.tail_w[:, None] - ws, 0.0))
  return mt, unread


def _intervals(arms: _Arms, tabs: _Levels, P: _Plan, cfg: AdaptiveConfig, beta, fudge, log_term):
  """(est, lo, hi) of `beta * A_i x` for every arm: the mode's interval rule (module docstring)."""
  mt, unread = _arm_tables(arms, tabs, P)
  return _interval_rule(arms.s_head, arms.s1, arms.s2, mt, unread, P, cfg, beta, fudge, log_term)


def _interval_rule(s_head, s1, s2, mt, unread, P: _Plan, cfg: AdaptiveConfig, beta, fudge, log_term):
  """(est, lo, hi) from an arm's sums: head sum, tail sum and sum of squares of its mt tail products, the unread
  tail weight. Certified: `_bounds_from_sums`, the rounding margin on sampled arms only (a row read in full is as
  exact as `A @ x`); paper: the paper's radius around `_paper_estimate`."""
  N = P.n_tail[:, None]
  if cfg.mode == "certified":
    margin = jnp.where(mt >= N, 0.0, P.margin[:, None])
    return _bounds_from_sums(s_head + s1, s1, s2, mt, N, unread, P.rng[:, None], margin, beta, log_term)
  est, var = _paper_estimate(s_head, s1, s2, mt, N)
  r = jnp.sqrt(2.0 * fudge * var * log_term)
  return beta * est, beta * (est - r), beta * (est + r)


# ============================================================================================ reads
class _Group(NamedTuple):
  """The arrays one group reads: the prepared matrix, the plan, and the call's scalars."""

  A: jax.Array
  At: jax.Array
  Ap: jax.Array
  perm: jax.Array
  inv: jax.Array
  col_max: jax.Array
  P: _Plan


def _mv(M, V):
  """(B, r) = V @ M^T for a block M (r, c) and coefficients V (B, c), accumulated in V's dtype.

  B = 1 is a matrix-vector product (XLA:CPU runs `(1, c) @ (c, r)` far slower than `M @ v`).
  """
  M = M.astype(V.dtype)
  if V.shape[0] == 1:
    return (M @ V[0])[None]
  return jnp.einsum("rc,bc->br", M, V)


def _vm(V, S):
  """(B, n) = V @ S for coefficients V (B, c) and rows S (c, n) of A^T."""
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


def _read_tail(g: _Group, cfg: AdaptiveConfig, start, count, reader, width: int, big: bool = False):
  """Reads the next `count` tail coordinates of the order from position `start` into every arm of `reader`.

  Each step takes the C positions from the current one (stored at `(offset + p) mod d`: one contiguous run,
  thanks to the extension), masks the head, unused coordinates and any beyond `count`, and hands the run's
  start and the coefficients to `reader(q, V, V^2) -> (sum, sum of squares)` over `width` arms. With `big` (the
  slab), steps take `big_chunk(n)` positions while the positions still to read (`count` over the share of useful
  coordinates) fill one, then `read_chunk(n)` (one loop more to compile, so only on the path that reads the most).
  Returns (end position, (s1, s2) each (B, width), tail products per query (B,),
  their w sum (B,)).
  """
  P, d = g.P, cfg.d
  X = P.X
  B = X.shape[0]
  ct = X.dtype

  def step(C):
    def body(c):
      p, got, s1, s2, cnt, ws = c
      q = (P.offset + p) % d
      coord = jax.lax.dynamic_slice_in_dim(g.perm, q, C)
      xc = X[:, coord]  # (B, C)
      mc = g.col_max[coord]
      aw = jnp.max(jnp.abs(xc), axis=0) * mc
      flag = (p + jnp.arange(C) < d) & (aw > 0) & (aw <= P.tau)
      lim = count - got
      cum = jnp.cumsum(flag)
      take = flag & (cum <= lim)
      k = jnp.minimum(cum[-1], lim).astype(jnp.int32)
      V = jnp.where(take[None], xc, 0.0)
      a, b = reader(q, V, V * V)
      last = jnp.argmax(jnp.where(take, jnp.arange(C), -1))
      p_next = jnp.where(got + k >= count, p + last + 1, p + C)
      return (p_next, got + k, s1 + a, s2 + b, cnt + jnp.sum(V != 0, axis=1).astype(jnp.int32),
              ws + jnp.sum(jnp.abs(V) * mc[None], axis=1))
    return body

  def more(c):
    p, got = c[0], c[1]
    return (got < count) & (p < d)

  C, CB = cfg.chunk, big_chunk(cfg.n)
  z = jnp.zeros((B, width), ct)
  c = (start, jnp.int32(0), z, z, jnp.zeros((B,), jnp.int32), jnp.zeros((B,), ct))
  if big and C < CB <= d // 4:  # static: a loop to compile only where big steps can run several times
    per_pos = jnp.maximum(jnp.sum(P.n_tail), 1).astype(jnp.float32) / d  # useful tail coordinates per position
    c = jax.lax.while_loop(lambda c: more(c) & ((count - c[1]).astype(jnp.float32) >= CB * per_pos), step(CB), c)
  p, _, s1, s2, cnt, ws = jax.lax.while_loop(more, step(C), c)
  return p, (s1, s2), cnt, ws


def _advance(g: _Group, cfg: AdaptiveConfig, arms: _Arms, tabs: _Levels, move, l, buckets, all_rows=None,
             costs=None):
  """Moves the arms in `move` (B, n), all at level l (traced; -1: warm-up), to level l + 1: their next tail
  coordinates (and the head at warm-up) by the cheapest read path, or their full rows when that is cheaper and
  allowed (they become exact). `all_rows` (traced bool, optional): read the full rows of `move` (any levels)
  regardless of cost (the fallback). `costs`: the paths' `_path_costs` for `move`, if the caller has them.
  Returns (arms, tables)."""
  n, d = cfg.n, cfg.d
  P = g.P
  X = P.X
  nl = l + 1
  lc = jnp.maximum(l, 0)
  start = jnp.where(l >= 0, tabs.pos[lc], 0)
  count = P.need[nl] - jnp.where(l >= 0, P.need[lc], 0)
  union = jnp.any(move, axis=0)
  u = jnp.sum(union)

  def compact(cap):
    idx = jnp.nonzero(union, size=cap, fill_value=n)[0]
    gi = jnp.minimum(idx, n - 1)
    return idx, gi, move[:, gi] & (idx < n)[None]

  def store(arms, tabs, cap, idx, gi, m, new, lev, add):
    """Writes the moved arms' sums (added to their sums if `add`) at level lev."""
    if cap == n:
      old = lambda a: a  # noqa: E731
      put = lambda a, v: jnp.where(m, v, a)  # noqa: E731
    else:
      old = lambda a: a[:, gi]  # noqa: E731
      put = lambda a, v: a.at[:, idx].set(jnp.where(m, v, a[:, gi]), mode="drop")  # noqa: E731
    fields = ("s_head", "s1", "s2")
    if add:
      new = tuple(old(getattr(arms, f)) + v for f, v in zip(fields, new))
    upd = {f: put(getattr(arms, f), v) for f, v in zip(fields, new)}
    return arms._replace(lvl=jnp.where(move, lev, arms.lvl), **upd), tabs

  def record(tabs, p_end, cnt, ws):
    base_c = jnp.where(l >= 0, tabs.cnt[:, lc], 0)
    base_w = jnp.where(l >= 0, tabs.wsum[:, lc], 0.0)
    return _Levels(pos=tabs.pos.at[nl].set(p_end), cnt=tabs.cnt.at[:, nl].set(base_c + cnt),
                   wsum=tabs.wsum.at[:, nl].set(base_w + ws))

  def slab(state):
    arms, tabs = state

    def reader(q, V, V2):
      blk = jax.lax.dynamic_slice_in_dim(g.At, q, V.shape[1], axis=0)  # (C, n)
      return _vm(V, blk), _vm(V2, jnp.square(blk.astype(V.dtype)))

    p_end, (s1, s2), cnt, ws = _read_tail(g, cfg, start, count, reader, n, big=True)
    head = jnp.zeros_like(s1)
    if cfg.n_head:
      vh = jnp.where(P.head_ok[None], X[:, P.head], 0.0)
      head = jnp.where(l < 0, _vm(vh, g.At[g.inv[P.head]]), 0.0)
    tabs = record(tabs, p_end, cnt, ws)
    return store(arms, tabs, n, None, None, move, (head, s1, s2), nl, True)

  def segment(cap):
    def run(state):
      arms, tabs = state
      idx, gi, m = compact(cap)

      def reader(q, V, V2):
        blk = jax.vmap(lambda r: jax.lax.dynamic_slice(g.Ap, (r, q), (1, V.shape[1]))[0])(gi)  # (cap, C)
        return _mv(blk, V), _mv(jnp.square(blk.astype(V.dtype)), V2)

      p_end, (s1, s2), cnt, ws = _read_tail(g, cfg, start, count, reader, cap)
      tabs = record(tabs, p_end, cnt, ws)
      return store(arms, tabs, cap, idx, gi, m, (jnp.zeros_like(s1), s1, s2), nl, True)
    return run

  def rows(cap):
    def run(state):
      arms, tabs = state
      if cap == n:
        idx = gi = None
        m = move
        exact = _full_dot(g.A, X)
      else:
        idx, gi, m = compact(cap)
        R = min(cap, 32)
        n_blk = -(-cap // R)

        def body(i, out):
          s0 = jnp.minimum(i * R, cap - R)
          gg = jax.lax.dynamic_slice_in_dim(gi, s0, R)
          return jax.lax.dynamic_update_slice_in_dim(out, _mv(g.A[gg], X), s0, axis=1)

        exact = jax.lax.fori_loop(0, jnp.minimum((u + R - 1) // R, n_blk), body,
                                  jnp.zeros((X.shape[0], cap), X.dtype))
      z = jnp.zeros_like(exact)
      return store(arms, tabs, cap, idx, gi, m, (exact, z, z), P.top_level, False)
    return run

  small = [c for c in buckets if c < n]
  branches = [slab, rows(n)] + [segment(c) for c in small] + [rows(c) for c in small]
  costs = _path_costs(g, cfg, move, l, buckets) if costs is None else costs
  pick = jnp.argmin(costs) if all_rows is None else jnp.where(all_rows, 1, jnp.argmin(costs))  # 1: rows(n)
  return jax.lax.switch(pick, branches, (arms, tabs))


def _path_costs(g: _Group, cfg: AdaptiveConfig, move, l, buckets):
  """Cost of each read path of `_advance` (slab, full rows of all arms, then segments and full rows of the moving
  arms in each smaller buffer) for moving the arms in `move` from level l to l + 1, in units of one streamed product
  of `A @ x` (`_READ_COST`); inf where a path does not apply. (branches,) float32."""
  n, d, P = cfg.n, cfg.d, g.P
  nl = l + 1
  lc = jnp.maximum(l, 0)
  count = P.need[nl] - jnp.where(l >= 0, P.need[lc], 0)
  u = jnp.sum(jnp.any(move, axis=0))
  small = [c for c in buckets if c < n]
  ncols = count.astype(jnp.float32) * (d / jnp.maximum(jnp.sum(P.n_tail), 1).astype(jnp.float32)) ** (P.X.shape[0] == 1)
  costs = [n * ncols * _READ_COST["slab"], jnp.float32(n * d)]
  costs += [c * ncols * _READ_COST["segment"] for c in small] + [jnp.float32(c * d * _READ_COST["rows"]) for c in small]
  rows_ok = jnp.asarray(cfg.exact_rows) | (nl >= P.top_level)
  fits = [l >= -1, rows_ok & (l >= 0)] + [(u <= c) & (l >= 0) for c in small] + [rows_ok & (u <= c) & (l >= 0)
                                                                                  for c in small]
  return jnp.stack([jnp.where(f, jnp.asarray(c, jnp.float32), jnp.inf) for c, f in zip(costs, fits)])


# ============================================================================================ the algorithm
class _Ctx(NamedTuple):
  """Scalars of one call: (beta, fudge_bandit, fudge_z, epsilon) and the union-bound log terms."""

  beta: jax.Array
  fudge_b: jax.Array
  fudge_z: jax.Array
  eps: jax.Array
  log_term: object  # certified: (log 1/delta_h, log 1/delta_e); paper: log(c n L / (delta / 2))


def _log_term(cfg: AdaptiveConfig, dtype):
  """The union bound's log terms. Certified: n arms x L levels x 2 sides, each one-sided event delta/(2nL),
  half to Hoeffding-Serfling (delta / (4nL)) and half to empirical Bernstein-Serfling (fails w.p. 5 delta_e,
  delta_e = delta / (20nL)). Paper: log(c n L / (delta / 2)) (the paper's radius, Sec. 3)."""
  n, L = cfg.n, len(cfg.levels)
  if cfg.mode == "certified":
    return (jnp.asarray(math.log(4.0 * n * L / cfg.delta), dtype), jnp.asarray(math.log(20.0 * n * L / cfg.delta), dtype))
  return jnp.asarray(math.log(cfg.c * n * L / (cfg.delta / 2)), dtype)


def _warm_up(g: _Group, cfg: AdaptiveConfig):
  """Algorithm 1, line 1: every arm reads the head and the first tail coordinates (levels[0] products)."""
  B, n = g.P.X.shape[0], cfg.n
  z = jnp.zeros((B, n), g.P.X.dtype)
  arms = _Arms(lvl=jnp.full((B, n), -1, jnp.int32), s_head=z, s1=z, s2=z)
  return _advance(g, cfg, arms, _init_levels(g.P, cfg), jnp.ones((B, n), bool), jnp.int32(-1), (n,))


def _kth_largest(v, k: int):
  """(B,) the k-th largest entry of each row of v (B, n): a max for k = 1 (XLA:CPU's top_k is far slower)."""
  if k == 1:
    return jnp.max(v[0])[None] if v.shape[0] == 1 else jnp.max(v, axis=1)  # 1-D: XLA:CPU reduces a (1, n) row slowly
  return jax.lax.top_k(v, k)[0][:, k - 1]


def _elimination_rule(lo, hi, alive, k: int):
  """Algorithm 1's elimination rule on intervals (B, n): keep the arms whose upper bound reaches the k-th largest
  lower bound. The arms holding the k largest lower bounds always stay: an exact arm's lower and upper bounds are
  one number computed twice, and where two fusions round it differently its upper bound can sit one ulp below its
  own lower bound (seen with XLA:CPU at optimization level 0: every arm eliminated, a wrong winner)."""
  lcb = jnp.where(alive, lo, -jnp.inf)
  kth = _kth_largest(lcb, k)[:, None]
  return alive & ((hi >= kth) | (lcb >= kth))


def _survivors(arms, tabs, alive, g: _Group, cfg: AdaptiveConfig, ctx: _Ctx):
  """Algorithm 1's elimination rule (`_elimination_rule`) on the arms' current intervals."""
  _, lo, hi = _intervals(arms, tabs, g.P, cfg, ctx.beta, ctx.fudge_b, ctx.log_term)
  return _elimination_rule(lo, hi, alive, cfg.k)


def _predicted_cost(arms: _Arms, tabs: _Levels, alive, g: _Group, cfg: AdaptiveConfig, ctx: _Ctx, boundary=None):
  """Predicted cost of the elimination rounds still to run, in streamed products of `A @ x` (`_path_costs`).

  Each survivor's interval is evaluated at every later level by the mode's own rule (`_interval_rule`), as if its
  tail mean and mean square stayed as read so far and the unread weight shrank in proportion: an arm is predicted
  eliminated at the first level where its upper bound is below the k-th largest projected lower bound there (the
  elimination rule, `_survivors`). Elimination ends at the level where the last arm goes (the top level if more
  than k are never eliminated); each survivor reads up to its own elimination level or that end, and each round is
  priced by its cheapest read path (a slab reads every arm, however few survive). This sees both ways the radii
  shrink (1/sqrt(m) and the range term's 1/m) and radii that never beat the gaps (a range bound far above the
  typical product: every arm to the top). It is optimistic where the
  largest warm-up estimates are high by chance and come down as the arms read on (paper mode on an LLM-like head,
  32,000 x 4096: 0.1-0.3 n·d predicted against about 2.3 n·d spent; a boundary lowered by sqrt(2 log n) standard
  deviations caught those but also fell back on Fig. 2's gaussian at d = 1e5, where sampling is 1.7x faster): the
  check before each round (`_eliminate`) bounds what those cost. A heuristic for time only: the fallback it
  triggers computes every arm exactly. Cost: L interval evaluations and top-k's over the n arms, once per call.
  """
  P = g.P
  mt, unread = _arm_tables(arms, tabs, P)
  m = jnp.maximum(mt, 1).astype(P.X.dtype)
  N = P.n_tail[:, None]
  Nf = jnp.maximum(N, 1).astype(m.dtype)
  below = alive & (arms.lvl < P.top_level)
  L = len(cfg.levels)
  mean, sq = arms.s1 / m, arms.s2 / m  # a tail product's mean and mean square, as read so far

  def at_level(l, gone):
    mp = jnp.clip(jnp.maximum(P.need[l], mt), 0, N)  # (B, n) tail products held at level l
    f = mp.astype(m.dtype)
    left = jnp.maximum(Nf - mp, 0.0) / jnp.maximum(Nf - mt, 1.0)
    s1, s2 = jnp.where(mp > mt, mean * f, arms.s1), jnp.where(mp > mt, sq * f, arms.s2)
    _, lo, hi = _interval_rule(arms.s_head, s1, s2, mp, unread * left, P, cfg, ctx.beta, ctx.fudge_b,
                               ctx.log_term)
    kth = _kth_largest(jnp.where(alive, lo, -jnp.inf), cfg.k)
    if boundary is not None:
      kth = jnp.minimum(kth, boundary)
    out = below & (hi < kth[:, None]) & (gone == L)
    return jnp.where(out, l, gone)

  gone = jax.lax.fori_loop(0, L, at_level, jnp.full(mt.shape, L, jnp.int32))  # (B, n) level an arm goes
  stays = below & (gone == L)
  last = jnp.max(jnp.where(below & (gone < L), gone, 0), axis=1)
  stop = jnp.where(jnp.sum(stays | (alive & ~below), axis=1) <= cfg.k, last, L - 1)  # (B,) level elimination ends
  reach = jnp.where(below, jnp.minimum(jnp.where(gone < L, gone, L - 1), stop[:, None]), -1)  # last level read

  def round_cost(l, total):  # round l moves the arms that read beyond level l, by the cheapest path
    move = reach > l
    return total + jnp.where(jnp.any(move), jnp.min(_path_costs(g, cfg, move, l, cfg.caps)), 0.0)

  return jax.lax.fori_loop(0, L - 1, round_cost, jnp.float32(0.0))


def _eliminate(g: _Group, cfg: AdaptiveConfig, ctx: _Ctx, arms, tabs):
  """Algorithm 1 (successive elimination, for a top-k set): round l moves the survivors from level l to l + 1
  until k remain or every survivor is exact. Returns (arms, tables, alive, rounds).

  With `cfg.fallback` (time only: the call then computes every arm exactly, one `A @ x`, and its answer is exact):
  * after the warm-up, when the rounds are predicted to cost more than that product (`_predicted_cost`), no round
    runs;
  * before each round, when the reads spent so far plus the round's would pass the cost of that product (the
    cheapest path's `_path_costs`, one scalar per round), the call stops sampling there (ski rental: a call never
    costs much more than twice the exact product, whatever the radii do)."""
  B, n, L = g.P.X.shape[0], cfg.n, len(cfg.levels)
  top = g.P.top_level
  spent = jnp.min(_path_costs(g, cfg, jnp.ones((B, n), bool), jnp.int32(-1), (n,)))  # the warm-up's
  boundary = None
  if cfg.fallback and cfg.exact_winners:
    arms, boundary = _leaders(g, cfg, ctx, arms, tabs)
    spent = spent + B * cfg.k * cfg.d * _READ_COST["rows"]
  alive = _survivors(arms, tabs, jnp.ones((B, n), bool), g, cfg, ctx)
  done = (jnp.sum(alive, axis=1) <= cfg.k) | (top <= 0)
  exact_cost = float(cfg.n) * float(cfg.d)
  fall = jnp.asarray(False)
  if cfg.fallback:
    fall = ~jnp.all(done) & (_predicted_cost(arms, tabs, alive & ~done[:, None], g, cfg, ctx, boundary)
                             > exact_cost)

  def cond(c):
    l, _, _, _, done, _, _, _ = c
    return (l < L - 1) & ~jnp.all(done)

  def body(c):
    l, arms, tabs, alive, done, rounds, spent, fall = c
    # Survivors below the top are all at level l (a round may have made some exact: full rows were cheaper).
    move = alive & ~done[:, None] & (arms.lvl == l)
    costs = _path_costs(g, cfg, move, l, cfg.caps)
    step = jnp.min(costs)
    if cfg.fallback:
      fall = fall | (spent + step > exact_cost)
    # With `fall` the full-rows path is taken whatever the costs (which are those of `move`, computed once).
    arms, tabs = _advance(g, cfg, arms, tabs, jnp.where(fall, arms.lvl < top, move), l, cfg.caps, all_rows=fall,
                          costs=costs)
    alive = jnp.where(done[:, None], alive, _survivors(arms, tabs, alive, g, cfg, ctx))
    rounds = rounds + (~done & ~fall).astype(jnp.int32)
    all_exact = ~jnp.any(alive & (arms.lvl < top), axis=1)
    done = done | (jnp.sum(alive, axis=1) <= cfg.k) | (top <= l + 1) | all_exact | fall
    return l + 1, arms, tabs, alive, done, rounds, spent + step, fall

  init = (jnp.int32(0), arms, tabs, alive, done, jnp.zeros((B,), jnp.int32), spent, fall)
  _, arms, tabs, alive, _, rounds, _, _ = jax.lax.while_loop(cond, body, init)
  return arms, tabs, alive, rounds


def _exact_rows(g: _Group, arms: _Arms, idx):
  """Arms `idx` (B, r) read in full: their products `A_i x` computed exactly (r rows of A per query); they move
  to the top level (exact: a zero-width interval)."""
  B = idx.shape[0]
  bidx = jnp.arange(B)[:, None]
  exact = jnp.einsum("brd,bd->br", g.A[idx].astype(g.P.X.dtype), g.P.X)
  lvl = arms.lvl.at[bidx, idx].set(jnp.maximum(g.P.top_level, arms.lvl[bidx, idx]))
  return _Arms(lvl=lvl, s_head=arms.s_head.at[bidx, idx].set(exact), s1=arms.s1.at[bidx, idx].set(0.0),
               s2=arms.s2.at[bidx, idx].set(0.0))


def _leaders(g: _Group, cfg: AdaptiveConfig, ctx: _Ctx, arms, tabs):
  """The k arms with the largest warm-up estimates, read in full (`_exact_rows`). Returns (arms, (B,) the k-th
  largest of their exact logits).

  With `exact_winners` the winners are read in full anyway, and the leaders usually are the winners: reading them
  now costs nothing more, gives elimination an exact boundary from its first round, and gives `_predicted_cost` a
  boundary that is not inflated by chance (the largest of n noisy warm-up estimates is high by chance)."""
  est, _, _ = _intervals(arms, tabs, g.P, cfg, ctx.beta, ctx.fudge_b, ctx.log_term)
  lead = jax.lax.top_k(est, cfg.k)[1]  # (B, k)
  arms = _exact_rows(g, arms, lead)
  vals = ctx.beta * jnp.take_along_axis(arms.s_head, lead, axis=1)
  return arms, jnp.min(vals, axis=1)


def _winners(g: _Group, cfg: AdaptiveConfig, ctx: _Ctx, arms, tabs, alive):
  """Algorithm 1's output: the k surviving arms with the largest estimates; with `exact_winners` their
  products are computed exactly (Sec. 3: "the best arm is then computed exactly"), unless they already are."""
  est, _, _ = _intervals(arms, tabs, g.P, cfg, ctx.beta, ctx.fudge_b, ctx.log_term)
  win = jax.lax.top_k(jnp.where(alive, est, -jnp.inf), cfg.k)[1]  # (B, k)
  if cfg.exact_winners:
    sampled = jnp.take_along_axis(arms.lvl, win, axis=1) < g.P.top_level
    arms = jax.lax.cond(jnp.any(sampled), lambda a: _exact_rows(g, a, win), lambda a: a, arms)
  return win, arms


def _refine(g: _Group, cfg: AdaptiveConfig, arms, tabs, move, buckets):
  """Moves each arm in `move` up one level, level by level from the lowest to the highest that holds one of them
  (arms below the top only)."""
  L = len(cfg.levels)
  lvl0 = arms.lvl

  def body(c):
    l, arms, tabs = c
    ml = move & (lvl0 == l)
    arms, tabs = jax.lax.cond(jnp.any(ml), lambda s: _advance(g, cfg, s[0], s[1], ml, l, buckets), lambda s: s,
                              (arms, tabs))
    return l + 1, arms, tabs

  lmin = jnp.min(jnp.where(move, lvl0, L))
  lmax = jnp.max(jnp.where(move, lvl0, -1))  # only the levels that hold moving arms
  _, arms, tabs = jax.lax.while_loop(lambda c: (c[0] < L - 1) & (c[0] <= lmax), body, (lmin, arms, tabs))
  return arms, tabs


def _prob_bounds(lo, hi, win):
  """Per query and winner w: bounds on log p_w from mu_w in [lo_w, hi_w] and Z_-w = sum_{i != w} e^mu_i.

  p_w = e^mu_w / (e^mu_w + Z_-w) grows with mu_w and falls with Z_-w. Returns (B, k) log p_lo, log p_hi
  and log(e^lo_w + Z_-w,hi) (the denominator of p_lo).
  """
  n = lo.shape[1]
  others = jnp.arange(n)[None, None, :] != win[:, :, None]  # (B, k, n)
  lzp_hi = jax.nn.logsumexp(jnp.where(others, hi[:, None], -jnp.inf), axis=2)
  lzp_lo = jax.nn.logsumexp(jnp.where(others, lo[:, None], -jnp.inf), axis=2)
  lo_w, hi_w = jnp.take_along_axis(lo, win, 1), jnp.take_along_axis(hi, win, 1)
  den_lo = jnp.logaddexp(lo_w, lzp_hi)
  return lo_w - den_lo, hi_w - jnp.logaddexp(hi_w, lzp_lo), den_lo


def _bracket_normalization(g: _Group, cfg: AdaptiveConfig, ctx: _Ctx, arms, tabs, win):
  """The partition function by closing each winner's probability bracket (certified; paper mode's default).

  Until `p_hi / p_lo <= (1 + eps) / (1 - eps)` for every winner, the arms whose intervals widen the worst
  winner's bracket most (first-order effect `(e^hi_i - e^lo_i) / (e^lo_w + Z_-w,hi)`; the winner's own
  `(hi_w - lo_w)(1 - p_lo)`, since a dominant winner's error cancels in p_w) move up one level, only as many
  as cover the remaining deficit. Returns (arms, tables, log p (B, k), log Z (B,), winner logits, ok (B,)).
  """
  B, n, k = g.P.X.shape[0], cfg.n, cfg.k
  bidx = jnp.arange(B)[:, None]
  log_ratio = jnp.log1p(ctx.eps) - jnp.log1p(-ctx.eps)
  zc = cfg.z_capacity
  z_buckets = _buckets(min(n, B * zc), k)

  def status(arms, tabs):
    _, lo, hi = _intervals(arms, tabs, g.P, cfg, ctx.beta, ctx.fudge_z, ctx.log_term)
    lp_lo, lp_hi, den_lo = _prob_bounds(lo, hi, win)
    gaps = lp_hi - lp_lo
    j = jnp.argmax(gaps, axis=1)[:, None]
    pick = lambda a: jnp.take_along_axis(a, j, 1)[:, 0]  # noqa: E731
    ok = pick(gaps) <= log_ratio
    deficit = pick(gaps) - log_ratio
    w = pick(win)[:, None]
    width = jnp.exp(hi - pick(den_lo)[:, None]) * -jnp.expm1(-(hi - lo))
    own = (jnp.take_along_axis(hi, w, 1) - jnp.take_along_axis(lo, w, 1)) * -jnp.expm1(pick(lp_lo)[:, None])
    width = width.at[bidx, w].set(own)
    refinable = (arms.lvl < g.P.top_level) & (hi > lo)
    return ok, deficit, jnp.where(refinable, width, -1.0)

  def active(ok, score):
    return (~ok) & jnp.any(score > 0, axis=1)

  def body(c):
    arms, tabs, ok, deficit, score = c
    top, idx = jax.lax.top_k(score, zc)
    # One more level shrinks an arm's interval by about 1/sqrt(growth): choose arms until the expected gain
    # (that fraction of their widths, widest first) covers the deficit.
    gain = top * (1.0 - cfg.growth ** -0.5)
    before = jnp.cumsum(gain, axis=1) - gain
    valid = (top > 0) & ((before < deficit[:, None]) | (jnp.arange(zc) == 0)[None]) & active(ok, score)[:, None]
    move = jnp.zeros((B, n), bool).at[bidx, idx].set(valid)
    arms, tabs = _refine(g, cfg, arms, tabs, move, z_buckets)
    return (arms, tabs) + status(arms, tabs)

  arms, tabs, ok, _, _ = jax.lax.while_loop(lambda c: jnp.any(active(c[2], c[4])), body,
                                            (arms, tabs) + status(arms, tabs))
  _, lo, hi = _intervals(arms, tabs, g.P, cfg, ctx.beta, ctx.fudge_z, ctx.log_term)
  lp_lo, lp_hi, _ = _prob_bounds(lo, hi, win)
  # The harmonic mean of the bounds is within a factor 1 +- eps of every p in [p_lo, p_hi] as soon as
  # p_hi / p_lo <= (1 + eps) / (1 - eps).
  log_p = jnp.log(2.0) + lp_lo + lp_hi - jnp.logaddexp(lp_lo, lp_hi)
  log_z = jnp.logaddexp(jax.nn.logsumexp(lo, axis=1), jax.nn.logsumexp(hi, axis=1)) - jnp.log(2.0)
  win_logits = 0.5 * (jnp.take_along_axis(lo, win, 1) + jnp.take_along_axis(hi, win, 1))
  return arms, tabs, log_p, log_z, win_logits, ok


def _paper_normalization(g: _Group, cfg: AdaptiveConfig, ctx: _Ctx, arms, tabs, win):
  r"""Paper mode's partition function: Algorithm 2 of Baharav et al. (2024), as in the authors' code.

  From the first-pass estimates `mu_i` and variances `v_i` (fudge-scaled) of every arm, with
  `C_i = sqrt(2 log(6n/delta') v_i)`, `alpha_i = e^{mu_i - C_i}`, `gamma_i = sqrt(alpha_i)` and
  `delta' = delta / 2`, each arm gets a target variance

    `V_i = min(sum(gamma) / (c gamma_i), sum(alpha) / (d alpha_i))`,
    `c = 16 sqrt(2) log(6n/delta') sum(gamma)^2 / (eps sum(alpha))`, `d = 16 log(12/delta') / eps^2`,

  the arms above their target move up the levels (one sweep) and `log Z = logsumexp(mu_hat)`: a point
  estimate, a confidence statement only as far as the variance estimates are (the fudge factor is tuned).
  Returns (arms, tables, log p, log Z, winner logits, ok).
  """
  n, k = cfg.n, cfg.k
  B = g.P.X.shape[0]
  ct = g.P.X.dtype
  dprime = cfg.delta / 2.0
  lt = math.log(6.0 * n / dprime)
  beta = ctx.beta

  def est_var(arms, tabs):
    mt, _ = _arm_tables(arms, tabs, g.P)
    est, var = _paper_estimate(arms.s_head, arms.s1, arms.s2, mt, g.P.n_tail[:, None])
    return beta * est, ctx.fudge_z * beta * beta * var

  est, v = est_var(arms, tabs)
  log_alpha = est - jnp.sqrt(2.0 * lt * v)
  log_gamma = 0.5 * log_alpha
  lse_a = jax.nn.logsumexp(log_alpha, axis=1, keepdims=True)
  lse_g = jax.nn.logsumexp(log_gamma, axis=1, keepdims=True)
  log_c = math.log(16.0 * math.sqrt(2.0) * lt) - jnp.log(ctx.eps) + 2.0 * lse_g - lse_a
  log_d = math.log(16.0 * math.log(12.0 / dprime)) - 2.0 * jnp.log(ctx.eps)
  log_target = jnp.minimum(lse_g - log_c - log_gamma, lse_a - log_d - log_alpha)  # (B, n)

  def needy(arms, tabs):
    _, v = est_var(arms, tabs)
    return (arms.lvl < g.P.top_level) & (v > 0) & (jnp.log(jnp.maximum(v, jnp.finfo(ct).tiny)) > log_target)

  L = len(cfg.levels)
  z_buckets = _buckets(min(n, B * cfg.z_capacity), k)

  def body(c):
    l, arms, tabs = c
    ml = needy(arms, tabs) & (arms.lvl == l)
    arms, tabs = jax.lax.cond(jnp.any(ml), lambda s: _advance(g, cfg, s[0], s[1], ml, l, z_buckets), lambda s: s,
                              (arms, tabs))
    return l + 1, arms, tabs

  lmin = jnp.min(jnp.where(needy(arms, tabs), arms.lvl, L))
  _, arms, tabs = jax.lax.while_loop(lambda c: c[0] < L - 1, body, (lmin, arms, tabs))
  est, _ = est_var(arms, tabs)
  log_z = jax.nn.logsumexp(est, axis=1)
  win_logits = jnp.take_along_axis(est, win, 1)
  return arms, tabs, win_logits - log_z[:, None], log_z, win_logits, ~jnp.any(needy(arms, tabs), axis=1)


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


def _group(key, prep: PreparedMatrix, X, ctx: _Ctx, cfg: AdaptiveConfig) -> AdaptiveResult:
  """AdaptiveSoftmax for B queries X (B, d) sharing one order (its start drawn from `key`): the phases in turn."""
  offset = jax.random.randint(key, (), 0, cfg.d, dtype=jnp.int32)
  P = _plan(offset, X, prep.col_max, cfg)
  g = _Group(A=prep.A, At=prep.At, Ap=prep.Ap, perm=prep.perm, inv=prep.inv, col_max=prep.col_max, P=P)
  arms, tabs = _warm_up(g, cfg)
  s_warm = _samples(arms, tabs, P)
  arms, tabs, alive, rounds = _eliminate(g, cfg, ctx, arms, tabs)
  s_elim = _samples(arms, tabs, P)
  win, arms = _winners(g, cfg, ctx, arms, tabs, alive)
  s_win = _samples(arms, tabs, P)
  if cfg.mode == "paper" and cfg.normalization == "paper":
    arms, tabs, log_p, log_z, win_logits, ok = _paper_normalization(g, cfg, ctx, arms, tabs, win)
  else:
    arms, tabs, log_p, log_z, win_logits, ok = _bracket_normalization(g, cfg, ctx, arms, tabs, win)
  s_all = _samples(arms, tabs, P)
  finite_x = jnp.isfinite(P.margin)  # NaN/inf in a query reaches its weight sum (and every loop stays bounded)
  log_p = jnp.where(finite_x[:, None], log_p, jnp.nan)
  log_z = jnp.where(finite_x, log_z, jnp.nan)
  return _result(win, win_logits, log_p, log_z, (s_warm, s_elim, s_win, s_all), ok & finite_x, rounds)


def _exact_group(prep: PreparedMatrix, X, ctx: _Ctx, cfg: AdaptiveConfig) -> AdaptiveResult:
  """A small problem (`cfg.exact`): `beta * A x` in full (one GEMV / GEMM), its top-k and logsumexp.

  The product computes all `n * d` entries (samples, counted as warm-up); the probabilities are exact, so
  `certified` is True where log Z is finite (a NaN/inf query makes it NaN/inf: flagged)."""
  B = X.shape[0]
  if B == 1:  # 1-D: XLA:CPU reduces a (1, n) row far slower than an (n,) vector
    logits = ctx.beta * _mv(prep.A, X)[0]
    log_z = jax.nn.logsumexp(logits)[None]
    top, win = (a[None] for a in jax.lax.top_k(logits, cfg.k))
  else:
    logits = ctx.beta * _full_dot(prep.A, X)  # (B, n)
    log_z = jax.nn.logsumexp(logits, axis=1)
    top, win = jax.lax.top_k(logits, cfg.k)  # sorted, descending
  ok = jnp.isfinite(log_z)
  nan = jnp.asarray(jnp.nan, logits.dtype)
  all_read = jnp.full((B,), cfg.n * cfg.d, jnp.int32)
  zero = jnp.zeros((B,), jnp.int32)
  return AdaptiveResult(indices=win.astype(jnp.int32), probs=jnp.where(ok[:, None], jnp.exp(top - log_z[:, None]), nan),
                        log_z=jnp.where(ok, log_z, nan), samples=all_read,
                        phase_samples=jnp.stack([all_read, zero, zero, zero], axis=1), logits=top, certified=ok,
                        rounds=zero)


def _valid_scalars(eps, beta, fudge_b, fudge_z):
  """Traced scalars in range (eps in (0, 1), the others positive and finite)."""
  fin = lambda v: jnp.isfinite(v)  # noqa: E731
  return (eps > 0) & (eps < 1) & (beta > 0) & fin(beta) & (fudge_b > 0) & fin(fudge_b) & (fudge_z > 0) & fin(fudge_z)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _batched(key, prep: PreparedMatrix, x, eps, beta, fudge_b, fudge_z, cfg):
  """The whole call after the argument checks, one jitted program (one dispatch per call); x (d,) or (b, d).

  Shared order: one group with `key`. Per-query orders: query i is a group of one with `split(key, b)[i]` (a
  single query uses `key` itself, so batched and per-query calls agree query by query), run one after another
  (`lax.map`: real control flow per query, no lock-step over the batch).

  Invalid traced inputs (a scalar out of range, a non-finite query) run with neutral values and come back
  flagged: probabilities and log Z NaN, `certified` False.
  """
  single = x.ndim == 1
  ct = _compute_dtype(prep.A.dtype)  # 16-bit A: products and sums in float32
  X = _no_grad((x[None] if single else x).astype(ct))
  keys = key[None] if (single or cfg.shared_order) else jax.random.split(key, X.shape[0])
  eps, beta, fudge_b, fudge_z = (jnp.asarray(v, ct) for v in (eps, beta, fudge_b, fudge_z))
  ok = _valid_scalars(eps, beta, fudge_b, fudge_z)
  one = jnp.ones((), X.dtype)
  ctx = _Ctx(beta=jnp.where(ok, beta, one), fudge_b=jnp.where(ok, fudge_b, one), fudge_z=jnp.where(ok, fudge_z, one),
             eps=jnp.where(ok, eps, 0.5 * one), log_term=_log_term(cfg, X.dtype))
  if cfg.exact:
    res = _exact_group(prep, X, ctx, cfg)
  elif cfg.shared_order or X.shape[0] == 1:
    res = _group(keys[0], prep, X, ctx, cfg)
  else:
    res = jax.lax.map(lambda kx: jax.tree.map(lambda a: a[0], _group(kx[0], prep, kx[1][None], ctx, cfg)),
                      (keys, X))
  nan = jnp.asarray(jnp.nan, res.probs.dtype)
  res = res._replace(probs=jnp.where(ok, res.probs, nan), log_z=jnp.where(ok, res.log_z, nan),
                     certified=res.certified & ok)
  return jax.tree.map(lambda a: a[0], res) if single else res


@jax.custom_jvp
def _no_grad(x):
  return x


@_no_grad.defjvp
def _no_grad_jvp(primals, tangents):
  raise TypeError("adaptive_softmax is not differentiable: it returns sampled indices and probability "
                  "estimates from data-dependent loops. Differentiate the exact softmax of the returned indices "
                  "(e.g. jax.nn.log_softmax(beta * A @ x)[res.indices]) instead.")


def _scalar(name, value, check):
  """Checks a Python/concrete scalar with `check`; traced scalars pass through (checked by `_valid_scalars`)."""
  if checks.is_traced(value):
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
    head_size: int = 64,
    growth: float = 2.0,
    z_capacity: int | None = None,
    shared_order: bool = False,
    normalization: str = "bracket",
    exact_rows: bool = False,
    exact_below: int = EXACT_BELOW,
    check_finite: bool = True,
) -> AdaptiveResult:
  r"""PAC top-k softmax of `beta * A x` by adaptive sampling.

  In `mode="certified"` (default), for every `A` and every `x` chosen independently of the prepared order
  (`prepare_matrix`), with probability >= 1 - delta over the order and the call's key, the returned index set
  is the top-k of `mu = beta * A x` and every returned probability satisfies `|p_hat - p| <= epsilon * p`,
  where `p_i = exp(mu_i) / sum_j exp(mu_j)` (empirical Bernstein-Serfling intervals with ranges from the column
  maxima of `A`; see the module docstring). Up to float32 rounding of the sums: a margin of `2 u sqrt(d)`
  times `beta * sum_j |x_j| max_i |A_ij|` is added to every sampled arm's interval (an arm read in full is as
  exact as the float32 `A @ x`).

  In `mode="paper"` the intervals are the paper's sub-Gaussian radii around an estimated variance,
  scaled by fudge factors tuned on training queries (`tuning.tune_fudge`): the guarantee then holds
  only as far as the tuning split represents the test queries.

  Cost: two O(d) passes over `x` and O(256 * head_size) for the head, plus the products read (no sort
  of the d coordinates, no d random draws); prepare `A` once (`prepare_matrix`) and pass the result. Small
  problems (`n * d <= exact_below`, default 4e6) are computed exactly instead: there the rounds' fixed cost
  (about 0.3-0.7 ms on CPU) exceeds the whole `A @ x`.

  Args:
    key: a `jax.random.key`: the start of the tail order. A single query uses it directly; query i of a batch
      uses `jax.random.split(key, b)[i]`.
    A: (n, d) floating matrix, or a `PreparedMatrix` from `prepare_matrix(A)` (validate, transpose and order
      once, reuse across calls: recommended). A raw `A` is prepared with the default order key on every call.
    x: (d,) query or (b, d) batch of queries, floating, finite.
    k: size of the top set, 1 <= k <= n.
    epsilon: multiplicative accuracy of the probabilities, in (0, 1).
    delta: failure probability, in (0, 1).
    beta: inverse temperature (> 0).
    mode: "certified" (valid for every input, no tuning) or "paper" (tuned sub-Gaussian radii).
    order: "importance" (a head of dominant coordinates read first, then the uniformly ordered tail) or
      "uniform" (no head).
    fudge_bandit: paper mode: multiplies the variance in the identification radii.
    fudge_z: paper mode: multiplies the variance in the normalization radii.
    warmup: warm-up pulls per arm, an integer in [1, d] (default `d / (17 log(6n/delta))` clipped to
      [32, d/10]). In certified mode any warm-up keeps the guarantee.
    exact_winners: compute the k winners exactly (default); otherwise their logits are estimated to the
      accuracy the probabilities need.
    head_ratio: a head coordinate's `|x_j| max_i |A_ij|` exceeds `head_ratio` times the mean (> 0).
    head_size: most head coordinates (>= 0; at most the warm-up is used).
    growth: factor by which surviving arms' pulls grow per round (> 1).
    z_capacity: most arms refined per normalization round (default min(n, max(4k, 4096))).
    shared_order: a batch shares one order start and head, drawn from `key` (one slab read for all queries,
      rounds as small GEMMs over the union of the queries' surviving arms). Each query's statement still
      holds, but the queries' outcomes are not independent. The head uses `max_q |x_qj|`; each query's
      bounds use its own `|x_qj|`. Default False: queries run one after another.
    normalization: paper mode's partition function. "bracket" (default): every arm whose interval still
      moves a winner's probability bracket is refined until `p_hi / p_lo <= (1 + eps) / (1 - eps)`.
      "paper": the paper's Algorithm 2 (target variances from the first-pass estimates, then
      `log Z = logsumexp(mu_hat)`); `fudge_z` scales the variances.
    exact_rows: when True, a round reads the full rows of its moving arms (they become exact) whenever
      that costs less wall-clock than their new columns (`_READ_COST`): more samples, less time.
    exact_below: problems with `n * d <= exact_below` are computed exactly (`A x` in full: exact top-k,
      probabilities and log Z, `samples = n * d`, `rounds = 0`); default `EXACT_BELOW` (4e6 products,
      where a call's rounds cost more than the whole `A @ x` on XLA:CPU: configs/adaptive/wallclock.py).
      Any exact_below > 0 also turns on the fallback: if, after the warm-up, the survivors are predicted to
      read more than one `A @ x` costs (their intervals at the later levels), or, before a round, the reads
      spent plus the round's would pass that cost, every arm is computed exactly instead (time only; the
      answer is then exact). Pass 0 to always run the algorithm as published (studies of its
      sample complexity; the paper tables and tests do).
    check_finite: scan `x` for NaN/inf on the host when it is concrete (one pass; turn off inside
      timing loops).

  Returns:
    AdaptiveResult (a pytree of arrays); arrays carry a leading batch axis iff `x` is 2-D. Inside the user's
    `jax.jit`, out-of-range traced scalars or a non-finite query give NaN `probs`/`log_z` and
    `certified=False` for the queries concerned.

  Raises:
    ValueError: an argument is invalid (the message names it). Traced arrays (inside the user's
      `jax.jit`) get shape and dtype checks only.
    TypeError: under `jax.grad`/`jax.jvp` (not differentiable).

  Example:
    >>> import jax
    >>> from asoftmax import adaptive
    >>> A, x = adaptive.gaussian_problem(jax.random.key(0), 100, 10_000)  # paper Fig. 2b: row 0 stands out
    >>> prep = adaptive.prepare_matrix(A)  # once per matrix
    >>> res = adaptive.adaptive_softmax(jax.random.key(1), prep, x, k=1, exact_below=0)  # sample even when small
    >>> int(res.indices[0]), bool(res.certified)
    (0, True)
    >>> int(res.samples) < 0.5 * 100 * 10_000
    True
    >>> int(adaptive.adaptive_softmax(jax.random.key(1), prep, x).samples)  # default: n * d <= 4e6 is exact
    1000000
  """
  key = checks.prng_key("key", key)
  prep = prepare_matrix(A)
  n, d = prep.A.shape
  if prep.perm.shape[0] < d + big_chunk(n) or prep.At.shape[0] != prep.perm.shape[0]:
    raise ValueError(f"A is a PreparedMatrix whose order holds {prep.perm.shape[0]} positions, not d + big_chunk(n) = "
                     f"{d + big_chunk(n)} (prepared by another version, or edited): prepare it again with prepare_matrix")
  if getattr(x, "ndim", None) not in (1, 2):
    raise ValueError(f"x must have 1 or 2 dimensions, got shape {getattr(x, 'shape', None)}")
  if checks.is_traced(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"x must have a floating dtype, got {x.dtype}")
  elif check_finite:
    checks.floating_array("x", x, (1, 2))
  x = x if isinstance(x, jax.Array) else checks.as_array(x)  # jnp.asarray of an Array costs ~14 us per call
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
  for name, v in (("exact_winners", exact_winners), ("shared_order", shared_order), ("exact_rows", exact_rows),
                  ("check_finite", check_finite)):
    checks.boolean(name, v)
  if mode == "certified" and not (checks.is_traced(fudge_bandit) or checks.is_traced(fudge_z)):
    if fudge_bandit != 1.0 or fudge_z != 1.0:
      raise ValueError(
          f"fudge_bandit and fudge_z apply to mode='paper' only; got {fudge_bandit}, {fudge_z} with mode='certified'"
      )
  cfg = make_config(n, d, k=k, delta=delta, mode=mode, order=order, warmup=warmup, growth=growth,
                    z_capacity=z_capacity, exact_winners=exact_winners, head_ratio=head_ratio, head_size=head_size,
                    shared_order=bool(shared_order) and x.ndim == 2, normalization=normalization,
                    exact_rows=exact_rows, exact_below=exact_below)
  if normalization != "bracket" and mode != "paper":
    raise ValueError(f"normalization={normalization!r} applies to mode='paper' only (got mode={mode!r})")
  return _batched(key, prep, x, epsilon, beta, fudge_bandit, fudge_z, cfg)


# ============================================================================================ reference
class _RefPlan(NamedTuple):
  """A single-query plan with its whole order spelled out (reference and tests only: O(d log d))."""

  P: _Plan
  rank: jax.Array  # (d,) int32 rank of each tail coordinate in the order (d for non-tail coordinates)
  head_mask: jax.Array  # (d,) bool
  w: jax.Array  # (d,) range weights |x_j| M_j


def _make_plan(key, x, col_l1, col_max, cfg: AdaptiveConfig) -> _RefPlan:
  """Reference plan of one query x (d,): the order is a uniformly random permutation drawn from `key` (what a
  prepared order started anywhere is, in distribution), spelled out for `_level_stats`."""
  del col_l1
  d = cfg.d
  P = _plan(0, x[None], col_max, cfg)
  head_mask = jnp.zeros((d,), bool).at[P.head].set(P.head_ok)
  aw = jnp.abs(x) * col_max
  tail = (aw > 0) & ~head_mask
  perm = jax.random.permutation(key, d)
  tail_in_order = tail[perm]
  r = jnp.cumsum(tail_in_order) - 1
  rank = jnp.full((d,), d, jnp.int32).at[perm].set(jnp.where(tail_in_order, r, d).astype(jnp.int32))
  return _RefPlan(P=P, rank=rank, head_mask=head_mask, w=aw)


def _level_stats(rows, lev, R: _RefPlan, beta, log_term, cfg: AdaptiveConfig):
  """Reference (not on the hot path): (est, aux1, aux2) of full `rows` (r, d) at level `lev` under a reference
  plan, from d-long masks. Certified: aux = (lo, hi). Paper: aux = (variance, 0)."""
  P = R.P
  x = P.X[0]
  need = P.need[lev]
  tail_read = R.rank < need
  xh = jnp.where(R.head_mask, x, 0.0)
  xt = jnp.where(tail_read, x, 0.0)
  s_head, s1, s2 = rows @ xh, rows @ xt, (rows * rows) @ (xt * xt)
  mt = jnp.sum(tail_read & (x != 0))
  N = P.n_tail[0]
  if cfg.mode == "certified":
    unread = jnp.where(mt >= N, 0.0, jnp.maximum(P.tail_w[0] - jnp.sum(jnp.where(tail_read, R.w, 0.0)), 0.0))
    return _bounds_from_sums(s_head + s1, s1, s2, mt, N, unread, P.rng[0], P.margin[0], beta, log_term)
  est, var = _paper_estimate(s_head, s1, s2, mt, N)
  return beta * est, beta * beta * var, jnp.zeros_like(var)
