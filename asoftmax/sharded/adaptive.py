r"""AdaptiveSoftmax on a vocab-sharded head, and on a batch sharded over a data axis (issue 29 item 3).

**Vocab-sharded** (`axis`): A's rows are split in S contiguous blocks of $n_s = \lceil n/S \rceil$ rows (zero rows
pad the last block). Each shard runs the one-device algorithm (`adaptive.adaptive_softmax`, unchanged) on its rows,
with

* the failure budget $\delta_s = \delta / S$ ($= \delta n_s / (S n_s)$): the shards' statements hold together with
  probability $\ge 1 - \sum_s \delta_s = 1 - \delta$ (a union bound), and each shard's per-arm budget
  $\delta_s / (10 n_s L_s)$ equals one device's $\delta / (10 n L)$ up to the number of levels, so intervals are no
  wider;
* one coordinate order for all shards: the same `prepare_matrix` key (the same permutation) and the same call key
  (the same start), so every shard reads the same coordinates at every level;
* $k_s = \min(k + n_{pad}, n_s)$ local winners with exact logits (`exact_winners=True`); the global top-k is merged
  exactly from the S $k_s$ candidates (padding rows excluded), as in `sharded.softmax_topk`;
* the partition function **bracket** summed across shards. A shard's statement, $|\hat p_w - p_w| \le \epsilon p_w$
  for its winners with $p_w = e^{\mu_w} / Z_s$ and $\mu_w$ exact, gives
  $Z_s \in [(1 - \epsilon) e^{\mu_w} / \hat p_w,\ (1 + \epsilon) e^{\mu_w} / \hat p_w]$ (intersected over its
  winners); the padding rows' mass (exactly 1 each: their logits are 0) is subtracted, and a padded shard whose
  bracket then becomes wider than $(1+\epsilon)/(1-\epsilon)$ computes its $Z_s$ exactly ($n_s d$ products,
  counted). $Z = \sum_s Z_s$ lies in $[\sum_s Z_s^{lo}, \sum_s Z_s^{hi}]$, whose ratio is at most the largest
  shard's, $(1+\epsilon)/(1-\epsilon)$, so the harmonic mean $\hat p_w = 2 e^{\mu_w} / (Z^{lo} + Z^{hi})$ is within
  $1 \pm \epsilon$ of $p_w$: the stopping rule holds globally. (Each shard stops on its own bracket; a shard whose
  $Z_s$ is a small part of Z could stop earlier -- not done: the one-device code does not take an outside budget.)

**Batch-sharded** (`data_axis`): queries split over the data axis, A replicated over it; query i's key is
`jax.random.split(key, b)[i]` from its *global* index (a single query uses `key`), exactly as one device's batch
call, so results do not depend on the device count.

Reference: Baharav et al., "Adaptive Sampling for Efficient Softmax Approximation" (NeurIPS 2024), Algorithms 1-2.

Example (not a doctest: a compile of the algorithm costs ~10 s; `tests/sharded/test_sharded.py` runs it on 8 devices):

    A, x = adaptive.gaussian_problem(jax.random.key(0), 64, 256)
    mesh = sharded.make_mesh((8,), ("vocab",))
    prep = sharded.prepare_matrix(A, mesh)                        # once per matrix and mesh
    r = sharded.adaptive_softmax(jax.random.key(1), prep, x, mesh, k=1, epsilon=0.3, delta=0.1)
    r.indices, r.probs, (r.log_z_lo, r.log_z_hi), r.certified, r.max_shard_samples
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from asoftmax import adaptive as adaptive_lib
from asoftmax import checks
from asoftmax.adaptive.core import PreparedMatrix
from asoftmax.sharded import _mesh
from asoftmax.sharded.exact import merge_topk


@struct.dataclass
class ShardedMatrix:
  """A `PreparedMatrix` per shard, stacked along the rows (A, Ap, col_l1, col_max split; At split along its columns;
  perm / inv, the one order, replicated).

  Attributes:
    prep: the stacked `PreparedMatrix` (global shapes: A (S n_s, d), At (d + C, S n_s), col_max (S d,)).
    num_rows: n, the real rows (S n_s - n zero rows pad the last shard).
    axis: the mesh axis that splits the rows.
    shards: the size of that axis when it was prepared (the per-shard statistics depend on it).
  """

  prep: PreparedMatrix
  num_rows: int = struct.field(pytree_node=False)
  axis: str = struct.field(pytree_node=False)
  shards: int = struct.field(pytree_node=False, default=0)


def _prep_specs(axis):
  return PreparedMatrix(A=P(axis, None), At=P(None, axis), Ap=P(axis, None), perm=P(), inv=P(), col_l1=P(axis),
                        col_max=P(axis))


def prepare_matrix(A, mesh, *, axis: str = "vocab", key: jax.Array | None = None) -> ShardedMatrix:
  """`adaptive.prepare_matrix` on every shard of A's rows, with one order key for all shards.

  Args:
    A: (n, d) floating matrix (finite when concrete); n need not divide the axis size.
    mesh: a `jax.sharding.Mesh`; axis: its axis that splits the rows (replicated over the other axes).
    key: the order key (default `jax.random.key(0)`, as on one device): every shard gets the same permutation.

  Returns:
    A `ShardedMatrix` (each device holds 3 copies of its n_s x d block, as one device holds 3 of A).
  """
  mesh = _mesh.check_mesh(mesh)
  axis = _mesh.check_axis(mesh, "axis", axis)
  checks.floating_array("A", A, 2)
  key = jax.random.key(0) if key is None else checks.prng_key("key", key)
  n = A.shape[0]
  S = _mesh.axis_size(mesh, axis)
  A = _mesh.pad_axis(jnp.asarray(A), 0, _mesh.padded(n, S))
  return ShardedMatrix(_prepare(A, jax.random.key_data(key), mesh, axis), n, axis, S)


@functools.partial(jax.jit, static_argnames=("mesh", "axis"))
def _prepare(A, key_data, mesh, axis):
  def shard(A_s, kd):
    return adaptive_lib.prepare_matrix(A_s, jax.random.wrap_key_data(kd))

  f = jax.shard_map(shard, mesh=mesh, in_specs=(P(axis, None), P()), out_specs=_prep_specs(axis))
  return f(_mesh.place(mesh, A, P(axis, None)), key_data)


class ShardedAdaptiveResult(NamedTuple):
  """Output of `sharded.adaptive_softmax` (leading batch axis iff the query was 2-D).

  Attributes:
    indices: (..., k) int32 global top-k ids, by logit descending.
    probs: (..., k) estimated probabilities `2 e^mu / (Z_lo + Z_hi)` (within 1 +- epsilon of the true ones when
      `certified`).
    log_z: (...,) `log((Z_lo + Z_hi) / 2)`.
    log_z_lo, log_z_hi: (...,) the partition-function bracket, the sum of the shards' brackets.
    logits: (..., k) the winners' exact logits.
    certified: (...,) bool: every shard met its stopping rule (certified mode: the statement holding with
      probability >= 1 - delta).
    samples: (...,) products read over all shards.
    max_shard_samples: (...,) products read by the busiest shard (per-device work).
  """

  indices: jax.Array
  probs: jax.Array
  log_z: jax.Array
  log_z_lo: jax.Array
  log_z_hi: jax.Array
  logits: jax.Array
  certified: jax.Array
  samples: jax.Array
  max_shard_samples: jax.Array


def _plse(x, axis):
  """log sum over the mesh axis of exp(x) (x (...,), -inf allowed)."""
  m = jax.lax.pmax(x, axis)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  return m + jnp.log(jax.lax.psum(jnp.exp(x - m), axis))


def _shard_bracket(res, A_s, x, beta, eps, n: int, S: int, axis: str):
  """(log Z_s lo, log Z_s hi, extra products) of this shard's real rows, for one query, from the statement on its
  winners; a padded shard whose bracket is too wide after removing the padding's mass computes Z_s exactly."""
  n_s = A_s.shape[0]
  log_ph = jnp.log(res.probs)
  lz_lo = jnp.max(jnp.log1p(-eps) + res.logits - log_ph)
  lz_hi = jnp.min(jnp.log1p(eps) + res.logits - log_ph)
  if S * n_s == n:  # no padding anywhere
    return lz_lo, lz_hi, jnp.zeros((), jnp.int32)
  ids = _mesh.shard_offset(axis, n_s) + jnp.arange(n_s, dtype=jnp.int32)
  log_pad = jnp.log(jnp.sum(ids >= n).astype(lz_lo.dtype))  # padding rows here: logit 0, mass exactly 1 each
  lo = lz_lo + jnp.log1p(-jnp.exp(log_pad - lz_lo))  # log(Z_s - pad), -inf / NaN when the bracket allows <= 0
  hi = lz_hi + jnp.log1p(-jnp.exp(log_pad - lz_hi))
  ok = jnp.isfinite(log_pad) & jnp.isfinite(lo) & ((hi - lo) <= jnp.log1p(eps) - jnp.log1p(-eps))
  ok = ok | ~jnp.isfinite(log_pad)

  def exact(_):
    z = jax.nn.logsumexp(jnp.where(ids < n, beta * (A_s @ x), -jnp.inf))
    return z, z, jnp.asarray(n_s * x.shape[0], jnp.int32)

  lo = jnp.where(jnp.isfinite(log_pad), lo, lz_lo)
  hi = jnp.where(jnp.isfinite(log_pad), hi, lz_hi)
  return jax.lax.cond(ok, lambda _: (lo, hi, jnp.zeros((), jnp.int32)), exact, None)


@functools.partial(jax.jit, static_argnames=("mesh", "n", "axis", "data_axis", "k", "opts"))
def _sharded(key_data, prep, X, eps, beta, mesh, n, axis, data_axis, k, opts):
  S = _mesh.axis_size(mesh, axis)
  opts = dict(opts)
  delta = opts.pop("delta") / S

  def shard(kd, prep_s, X_s, eps, beta):
    n_s = prep_s.A.shape[0]
    k_s = min(k + (S * n_s - n), n_s)

    def one(args):
      kd_i, x_i = args
      res = adaptive_lib.adaptive_softmax(jax.random.wrap_key_data(kd_i), prep_s, x_i, k=k_s, epsilon=eps,
                                          delta=delta, beta=beta, exact_winners=True, check_finite=False, **opts)
      return res, _shard_bracket(res, prep_s.A, x_i, beta, eps, n, S, axis)

    res, (lz_lo, lz_hi, extra) = jax.lax.map(one, (kd, X_s))
    gid = _mesh.shard_offset(axis, n_s) + res.indices
    vals = jnp.where(gid < n, res.logits, -jnp.inf)
    top, idx = merge_topk(vals, gid, k, axis)
    lo, hi = _plse(lz_lo, axis), _plse(lz_hi, axis)
    log_z = jnp.logaddexp(lo, hi) - math.log(2.0)
    own = res.samples + extra
    ok = jax.lax.psum((~res.certified).astype(jnp.int32), axis) == 0
    return ShardedAdaptiveResult(idx.astype(jnp.int32), jnp.exp(top - log_z[:, None]), log_z, lo, hi, top, ok,
                                 jax.lax.psum(own, axis), jax.lax.pmax(own, axis))

  specs = _prep_specs(axis)
  f = jax.shard_map(shard, mesh=mesh, in_specs=(P(data_axis), specs, P(data_axis, None), P(), P()),
                    out_specs=ShardedAdaptiveResult(*([P(data_axis)] * 9)),
                    # The one-device loops start from unvarying carries that become shard-varying; the outputs are
                    # replicated over `axis` by the collectives above (psum / pmax / all_gather).
                    check_vma=False)
  return f(_mesh.place(mesh, key_data, P(data_axis)), prep, _mesh.place(mesh, X, P(data_axis, None)), eps, beta)


def adaptive_softmax(key: jax.Array, prep: ShardedMatrix, x, mesh, *, k: int = 1, epsilon: float = 0.3,
                     delta: float = 0.1, beta: float = 1.0, data_axis: str | None = None,
                     **options) -> ShardedAdaptiveResult:
  r"""PAC top-k softmax of `beta * A x` with A's rows sharded (module docstring): one device's statement.

  In certified mode, with probability >= 1 - delta (over the order and the key, for x independent of the order):
  `indices` is the top-k of `beta * A x` and every returned probability is within a factor 1 +- epsilon of the
  true one; `[log_z_lo, log_z_hi]` contains log Z.

  Args:
    key: a `jax.random.key` (query i of a batch uses `jax.random.split(key, b)[i]`, a single query `key`).
    prep: `sharded.prepare_matrix(A, mesh, axis=...)` (its axis is the vocab axis).
    x: (d,) or (b, d) queries.
    mesh: the mesh `prep` was built on.
    k, epsilon, delta, beta: as in `adaptive.adaptive_softmax` (delta is the total over all shards).
    data_axis: optional mesh axis that splits the queries (b padded to a multiple of its size).
    **options: passed to every shard's `adaptive.adaptive_softmax` (mode, order, warmup, head_size, growth,
      z_capacity, fudge_bandit, fudge_z, normalization, exact_rows, exact_below: a shard with
      `n_s * d <= exact_below` computes its rows exactly); `exact_winners` is always True, and
      `shared_order` is not supported (keys are per query).

  Returns:
    `ShardedAdaptiveResult` (leading batch axis iff `x` is 2-D).

  Raises:
    ValueError: naming the argument (key, prep, x, mesh, data_axis, k, epsilon, delta, beta, options).
  """
  mesh = _mesh.check_mesh(mesh)
  if not isinstance(prep, ShardedMatrix):
    raise ValueError(f"prep must come from sharded.prepare_matrix(A, mesh), got {type(prep).__name__}")
  axis = _mesh.check_axis(mesh, "prep.axis (the mesh it was prepared on)", prep.axis)
  data_axis = _mesh.check_axis(mesh, "data_axis", data_axis, optional=True)
  if data_axis == axis:
    raise ValueError(f"data_axis must differ from the vocab axis, both are {axis!r}")
  for name in ("exact_winners", "shared_order", "check_finite", "key"):
    if name in options:
      raise ValueError(f"{name} cannot be set for the sharded call (exact winners and per-query keys are required)")
  key = checks.prng_key("key", key)
  n, d = prep.num_rows, prep.prep.A.shape[1]
  S, D = _mesh.axis_size(mesh, axis), _mesh.axis_size(mesh, data_axis)
  if prep.prep.A.shape[0] != _mesh.padded(n, S) or prep.shards != S:
    raise ValueError(f"prep was prepared for {prep.shards} shards of axis {axis!r} ({prep.prep.A.shape[0]} rows), "
                     f"this mesh's axis has size {S}: prepare it on this mesh")
  checks.floating_array("x", x, (1, 2))
  if x.shape[-1] != d:
    raise ValueError(f"x has shape {tuple(x.shape)} but A has shape {(n, d)}: x must be (d,) or (b, d) with d={d}")
  k = checks.int_in_range("k", k, 1, n)
  eps = epsilon if checks.is_traced(epsilon) else checks.open_unit("epsilon", epsilon)
  delta = checks.open_unit("delta", delta)
  beta = beta if checks.is_traced(beta) else checks.positive("beta", beta)
  # The options' own checks: one host-side call of the one-device config builder.
  opt_cfg = {kk: v for kk, v in options.items() if kk in ("mode", "order", "warmup", "growth", "z_capacity",
                                                         "head_ratio", "head_size", "normalization", "exact_rows",
                                                         "exact_below")}
  unknown = set(options) - set(opt_cfg) - {"fudge_bandit", "fudge_z"}
  if unknown:
    raise ValueError(f"unknown options {sorted(unknown)}")
  adaptive_lib.make_config(-(-n // S), d, k=1, delta=delta / S, **opt_cfg)
  single = x.ndim == 1
  ct = prep.prep.col_max.dtype
  X = jnp.asarray(x, ct)[None] if single else jnp.asarray(x, ct)
  b = X.shape[0]
  keys = key[None] if single else jax.random.split(key, b)
  bp = _mesh.padded(b, D)
  X = jnp.concatenate([X, jnp.broadcast_to(X[:1], (bp - b, d))]) if bp > b else X
  kd = jax.random.key_data(keys)
  kd = jnp.concatenate([kd, jnp.broadcast_to(kd[:1], (bp - b,) + kd.shape[1:])]) if bp > b else kd
  opts = tuple(sorted(dict(options, delta=delta).items()))
  out = _sharded(kd, prep.prep, X, jnp.asarray(eps, ct), jnp.asarray(beta, ct), mesh, n, axis, data_axis, k, opts)
  return jax.tree.map(lambda a: a[0] if single else a[:b], out)
