r"""RF-softmax over classes sharded in contiguous blocks (issue 29 item 4).

The one-device sampler (`rff.tree`) walks a heap over P = 2^L buckets; here the heap is cut at depth log2 S: shard
s holds the subtree under node S + s, i.e. buckets `[s P/S, (s+1) P/S)` (classes `[s P b/S, (s+1) P b/S)`, the
last ones padding with count 0), as its own local heap (`tree.tree_from_buckets`). The replicated top of log2 S
levels is rebuilt at every call from the S subtree roots (one `all_gather` of S x F floats), so updates touch only
the owners' subtrees. A draw picks shard s with the top's path probability (the product of the branch
probabilities from the root to node S + s, the same masses as one device: the clamped kernel sum plus the floor
`kappa max(psi . z_root, 0) / n` with the *global* root), then walks shard s's subtree; log q is the sum of the two
path logs. So ids have one device's distribution and log q is one device's exact log q (to float32 rounding of the
sums); the draws themselves differ (another use of the key). Every shard walks every draw (static shapes) and the
owner's result is kept (`psum` of masked values).

The sampled loss gathers each needed class row from its owner (masked gather, `psum`): its gradient lands on the
owners' rows only. Queries may be split over a data axis (a data-parallel step on a `(data, classes)` mesh).
Reference: Rawat et al., "Sampled Softmax with Random Fourier Features" (NeurIPS 2019), Sec. 4 (tree sampling).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from asoftmax import rff, sharded
  >>> mesh = sharded.make_mesh((1,), ("classes",))
  >>> feats = rff.rff_features(rff.normalize(jax.random.normal(jax.random.key(0), (10, 4))),
  ...                          rff.init_rff(jax.random.key(1), 4, 8, 2.0))
  >>> t = sharded.build_tree(feats, mesh)
  >>> ids, log_q = sharded.tree_sample(jax.random.key(2), feats[:2], t, 5, 0.01, mesh)
  >>> ids.shape, log_q.shape
  ((2, 5), (2, 5))
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec as P

from asoftmax import checks
from asoftmax.rff import tree as tree_lib
from asoftmax.sharded import _mesh


@struct.dataclass
class ShardedTree:
  """S local heaps stacked: nodes (S 2 P_s, F), counts (S 2 P_s,), split over `axis` (P_s = P / S buckets each).

  Attributes:
    nodes, counts: the local heaps (node 1 of each is its subtree root; node 0 unused), as `tree.KernelTree`'s.
    num_classes: n (global). bucket: classes per bucket. axis: the mesh axis of the class blocks.
  """

  nodes: jax.Array
  counts: jax.Array
  num_classes: int = struct.field(pytree_node=False)
  bucket: int = struct.field(pytree_node=False)
  axis: str = struct.field(pytree_node=False)
  shards: int = struct.field(pytree_node=False, default=0)  # the size of `axis` it was built for

  def local_buckets(self, S: int) -> int:
    return self.nodes.shape[0] // (2 * S)

  def class_block(self, S: int) -> int:
    """Classes per shard (the padded class count is S times this)."""
    return self.local_buckets(S) * self.bucket


def build_tree(leaf_features, mesh, *, axis: str = "classes", bucket: int = 1) -> ShardedTree:
  """The one-device tree of `rff.build_tree(leaf_features, bucket)`, cut into S subtrees over `axis`.

  Args:
    leaf_features: (n, F) per-class features (e.g. `rff.rff_features` of the normalized class vectors).
    mesh, axis: the mesh and its axis of class blocks; its size S must divide the number of buckets P (a power of
      two >= n / bucket).
    bucket: classes per bucket (>= 1).

  Returns:
    A `ShardedTree`; class block s is classes `[s B, (s+1) B)` with `B = tree.class_block(S)`.
  """
  mesh = _mesh.check_mesh(mesh)
  axis = _mesh.check_axis(mesh, "axis", axis)
  checks.floating_array("leaf_features", leaf_features, 2)
  bucket = checks.int_in_range("bucket", bucket)
  n, F = leaf_features.shape
  Pb = tree_lib.num_buckets_for(n, bucket)
  S = _mesh.axis_size(mesh, axis)
  if S > Pb or Pb % S:
    raise ValueError(f"the size {S} of mesh axis {axis!r} must divide the tree's {Pb} buckets (a power of two): "
                     f"use a power-of-two axis size <= {Pb}")
  feats = _mesh.pad_axis(jnp.asarray(leaf_features, jnp.float32), 0, Pb * bucket)
  counts = (jnp.arange(Pb * bucket) < n).astype(jnp.float32)
  nodes, cnt = _build(feats, counts, mesh, axis, bucket)
  return ShardedTree(nodes, cnt, n, bucket, axis, S)


@functools.partial(jax.jit, static_argnames=("mesh", "axis", "bucket"))
def _build(feats, counts, mesh, axis, bucket):
  def shard(f, c):
    F = f.shape[1]
    t = tree_lib.tree_from_buckets(f.reshape(-1, bucket, F).sum(1), c.reshape(-1, bucket).sum(1), 1, bucket)
    return t.nodes, t.counts

  spec = P(axis)
  g = jax.shard_map(shard, mesh=mesh, in_specs=(P(axis, None), spec), out_specs=(P(axis, None), spec))
  return g(_mesh.place(mesh, feats, P(axis, None)), _mesh.place(mesh, counts, spec))


def _top(nodes, counts, psi, kappa, n, axis):
  """The replicated top: floor (B,) and log path probabilities of the S subtree roots (B, S)."""
  roots = jax.lax.all_gather(nodes[1], axis, to="invarying")  # (S, F)
  rc = jax.lax.all_gather(counts[1], axis, to="invarying")  # (S,)
  top = tree_lib.tree_from_buckets(roots, rc, n, 1)
  floor = kappa * jnp.maximum(psi @ top.nodes[1], 0.0) / n + 1e-12
  floor = jnp.where((kappa >= 0) & jnp.isfinite(kappa), floor, jnp.nan)
  S = roots.shape[0]
  mass = jnp.maximum(psi @ top.nodes.T, 0.0) + floor[:, None] * top.counts[None, :]  # (B, 2S)
  k = jnp.arange(2 * S)
  logbranch = jnp.where(mass > 0, jnp.log(mass) - jnp.log(mass + mass[:, k ^ 1]), -jnp.inf)
  leaf = S + jnp.arange(S)
  acc = jnp.zeros((psi.shape[0], S), jnp.float32)
  for s in range(int(np.log2(S))):
    acc = acc + logbranch[:, leaf >> s]
  return floor, acc


def _local_log_probs(nodes, counts, psi, floor):
  """(B, P_s) log path probabilities inside this shard's subtree (as `tree.tree_log_probs`, floor given)."""
  Ps = nodes.shape[0] // 2
  mass = jnp.maximum(psi @ nodes.T, 0.0) + floor[:, None] * counts[None, :]
  k = jnp.arange(2 * Ps)
  logbranch = jnp.where(mass > 0, jnp.log(mass) - jnp.log(mass + mass[:, k ^ 1]), -jnp.inf)
  leaf = Ps + jnp.arange(Ps)
  acc = jnp.zeros((psi.shape[0], Ps), jnp.float32)
  for s in range(int(np.log2(Ps))):
    acc = acc + logbranch[:, leaf >> s]
  return acc


@functools.partial(jax.jit, static_argnames=("mesh", "axis", "data_axis", "n"))
def _log_probs(nodes, counts, psi, kappa, mesh, axis, data_axis, n):
  def shard(nodes, counts, psi, kappa):
    floor, top = _top(nodes, counts, psi, kappa, n, axis)
    me = jax.lax.axis_index(axis)
    out = top[:, me][:, None] + _local_log_probs(nodes, counts, psi, floor)
    ok = jnp.isfinite(psi).all(-1)[:, None] & jnp.isfinite(floor)[:, None]  # floor: NaN for a bad traced kappa
    return jnp.where(ok, out, jnp.nan)  # a non-finite query (under jit): flagged

  f = jax.shard_map(shard, mesh=mesh, in_specs=(P(axis), P(axis), P(data_axis, None), P()),
                    out_specs=P(data_axis, axis))
  return f(nodes, counts, _mesh.place(mesh, psi, P(data_axis, None)), kappa)


def tree_log_probs(query_features, tree: ShardedTree, kappa: float, mesh, *, data_axis: str | None = None):
  """(B, P) dense bucket log-probabilities of the sharded walk: one device's `rff.tree_log_probs` (padding -inf).

  For tests and analysis; O(P F) per query, split over the shards. Under `jax.jit` a query with non-finite
  features gets a NaN row (the flag).
  """
  mesh, S, D, psi, kappa = _check(query_features, tree, kappa, mesh, data_axis)
  B = psi.shape[0]
  psi = _mesh.pad_axis(psi, 0, _mesh.padded(B, D))
  return _log_probs(tree.nodes, tree.counts, psi, kappa, mesh, tree.axis, data_axis, tree.num_classes)[:B]


@functools.partial(jax.jit, static_argnames=("m", "mesh", "axis", "data_axis", "n", "bucket"))
def _sample(key_data, nodes, counts, psi, kappa, m, mesh, axis, data_axis, n, bucket):
  def shard(kd, nodes, counts, psi, kappa):
    key = jax.random.wrap_key_data(kd)
    if data_axis is not None:  # each data shard draws for its own queries
      key = jax.random.fold_in(key, jax.lax.axis_index(data_axis))
    B = psi.shape[0]
    Ps = nodes.shape[0] // 2
    floor, top = _top(nodes, counts, psi, kappa, n, axis)
    owner = jax.random.categorical(jax.random.fold_in(key, 0), top[:, None, :], shape=(B, m))  # (B, m) same on all
    me = jax.lax.axis_index(axis)
    L = int(np.log2(Ps))

    def body(l, carry):  # `tree._tree_sample`'s walk inside the local subtree, with the global floor
      idx, logq = carry
      kids = jnp.stack([2 * idx, 2 * idx + 1], -1)
      mass = jnp.maximum(jnp.einsum("bmcf,bf->bmc", nodes[kids], psi), 0.0) + floor[:, None, None] * counts[kids]
      tot = mass.sum(-1)
      u = jax.random.uniform(jax.random.fold_in(key, l + 1), (B, m))
      left = u * tot < mass[..., 0]
      idx = jnp.where(left, kids[..., 0], kids[..., 1])
      return idx, logq + jnp.log(jnp.where(left, mass[..., 0], mass[..., 1])) - jnp.log(tot)

    # Each shard walks with its own stream (fold in the shard index), the owner's walk is kept.
    key = jax.random.fold_in(key, 1 + me)
    idx, logq = jax.lax.fori_loop(0, L, body, (jnp.ones((B, m), jnp.int32), jnp.zeros((B, m), jnp.float32)))
    mine = owner == me
    ids = jax.lax.psum(jnp.where(mine, me * Ps + idx - Ps, 0), axis)
    lq = jax.lax.psum(jnp.where(mine, logq, 0.0), axis) + jnp.take_along_axis(top, owner, 1)
    ok = jnp.isfinite(psi).all(-1)[:, None] & jnp.isfinite(lq)
    last = -(-n // bucket) - 1  # the last bucket holding a real class (as on one device)
    return jnp.where(ok, ids, last).astype(jnp.int32), jnp.where(ok, lq, jnp.nan)

  f = jax.shard_map(shard, mesh=mesh, in_specs=(P(), P(axis), P(axis), P(data_axis, None), P()),
                    out_specs=(P(data_axis), P(data_axis)), check_vma=False)
  return f(key_data, nodes, counts, _mesh.place(mesh, psi, P(data_axis, None)), kappa)


def _check(query_features, tree, kappa, mesh, data_axis):
  mesh = _mesh.check_mesh(mesh)
  if not isinstance(tree, ShardedTree):
    raise ValueError(f"tree must come from sharded.build_tree, got {type(tree).__name__}")
  _mesh.check_axis(mesh, "tree.axis (the mesh it was built on)", tree.axis)
  data_axis = _mesh.check_axis(mesh, "data_axis", data_axis, optional=True)
  if data_axis == tree.axis:
    raise ValueError(f"data_axis must differ from the class axis, both are {data_axis!r}")
  S, D = _mesh.axis_size(mesh, tree.axis), _mesh.axis_size(mesh, data_axis)
  if tree.shards != S or tree.nodes.shape[0] % (2 * S) or tree.local_buckets(S) & (tree.local_buckets(S) - 1):
    raise ValueError(f"tree was built for {tree.shards} shards of mesh axis {tree.axis!r}, this mesh's has {S}: "
                     "rebuild it on this mesh")
  checks.floating_array("query_features", query_features, 2)
  if query_features.shape[1] != tree.nodes.shape[1]:
    raise ValueError(f"query_features has {query_features.shape[1]} features, the tree's nodes have "
                     f"{tree.nodes.shape[1]}")
  kappa = kappa if checks.is_traced(kappa) else checks.positive("kappa", kappa, allow_zero=True)
  return mesh, S, D, jnp.asarray(query_features, jnp.float32), jnp.asarray(kappa, jnp.float32)


def tree_sample(key, query_features, tree: ShardedTree, m: int, kappa: float, mesh, *,
                data_axis: str | None = None) -> tuple[jax.Array, jax.Array]:
  r"""m buckets per query from the sharded tree: one device's `rff.tree_sample` distribution and exact log q.

  Args:
    key: a `jax.random.key`. query_features: (B, F) $\psi = \phi(h)$. tree: from `build_tree`. m: draws per query.
    kappa: the floor rate (>= 0), as on one device. mesh: the mesh the tree was built on.
    data_axis: optional mesh axis that splits the queries (each data shard folds its index into the key).

  Returns:
    (bucket ids (B, m) int32 global, log q (B, m) float32). Under `jax.jit` a query with non-finite features gets
    log q NaN (the flag) and in-range ids.
  """
  mesh, S, D, psi, kappa = _check(query_features, tree, kappa, mesh, data_axis)
  m = checks.int_in_range("m", m)
  key = jax.random.key_data(key) if jnp.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key) else None
  if key is None:
    raise ValueError("key must be a PRNG key from jax.random.key(seed)")
  B = psi.shape[0]
  psi = _mesh.pad_axis(psi, 0, _mesh.padded(B, D))
  ids, lq = _sample(key, tree.nodes, tree.counts, psi, kappa, m, mesh, tree.axis, data_axis, tree.num_classes,
                    tree.bucket)
  return ids[:B], lq[:B]


# ------------------------------------------------------------------------------------------------ the sampled loss
def _norm(x):
  return x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)


def _gather_rows(C_s, ids, axis):
  """Rows `ids` (any shape) of the class matrix split over `axis` (this shard holds C_s): owners' rows, psum."""
  n_s = C_s.shape[0]
  local = ids - _mesh.shard_offset(axis, n_s)
  own = (local >= 0) & (local < n_s)
  rows = jnp.where(own[..., None], C_s[jnp.clip(local, 0, n_s - 1)], 0.0)
  return jax.lax.psum(rows, axis)


@functools.partial(jax.jit, static_argnames=("mesh", "axis", "data_axis", "n"))
def _sampled_loss(h, C, targets, ids, log_q, tau, mesh, axis, data_axis, n):
  def shard(h, C_s, targets, ids, log_q, tau):
    hn = _norm(h)
    o_t = tau * jnp.sum(hn * _norm(_gather_rows(C_s, targets, axis)), -1)
    o_s = tau * jnp.einsum("bd,bmd->bm", hn, _norm(_gather_rows(C_s, ids, axis)))
    m = ids.shape[-1]
    adj = o_s - jax.lax.stop_gradient(log_q + jnp.log(float(m)))
    adj = jnp.where(ids == targets[:, None], -jnp.inf, adj)
    loss = jax.nn.logsumexp(jnp.concatenate([o_t[:, None], adj], 1), 1) - o_t
    bad = (targets < 0) | (targets >= n) | ((ids < 0) | (ids >= n)).any(-1)
    bad = bad | ~((tau > 0) & jnp.isfinite(tau))  # a traced tau out of range: flagged
    return jnp.where(bad, jnp.nan, loss)

  d = P(data_axis)
  f = jax.shard_map(shard, mesh=mesh, in_specs=(P(data_axis, None), P(axis, None), d, P(data_axis, None),
                                               P(data_axis, None), P()), out_specs=d)
  return f(h, C, targets, ids, log_q, tau)


def sampled_softmax_loss(h, class_vectors, targets, ids, log_q, tau: float, mesh, *, axis: str = "classes",
                         data_axis: str | None = None) -> jax.Array:
  r"""One device's `rff.sampled_softmax_loss` (per-query ids, paper's form) with class rows split over `axis`.

  Differentiable: the gradient with respect to `class_vectors` is nonzero only on the rows used, each computed on
  its owner shard; with `data_axis` the batch is split and the gradient summed over it (a data-parallel step).

  Args:
    h: (B, d) queries. class_vectors: (n, d) or already padded to (S B_c, d) rows (padding rows are never gathered).
    targets: (B,) int. ids: (B, m) int sampled classes. log_q: (B, m) their log proposal probabilities.
    tau: inverse temperature. mesh, axis, data_axis: as in `tree_sample` (B must divide the data axis size).

  Returns:
    (B,) losses (NaN for a row with an id outside [0, n) under `jax.jit`).
  """
  mesh = _mesh.check_mesh(mesh)
  axis = _mesh.check_axis(mesh, "axis", axis)
  data_axis = _mesh.check_axis(mesh, "data_axis", data_axis, optional=True)
  checks.floating_array("h", h, 2)
  checks.floating_array("class_vectors", class_vectors, 2)
  checks.floating_array("log_q", log_q, 2)
  n = class_vectors.shape[0]
  if h.shape[1] != class_vectors.shape[1]:
    raise ValueError(f"h has shape {tuple(h.shape)} (B, d) and class_vectors {tuple(class_vectors.shape)} (n, d): "
                     "their d must match")
  checks.index_array("targets", targets, n, 1)
  checks.index_array("ids", ids, n, 2)
  if ids.shape != log_q.shape or ids.shape[0] != h.shape[0] or targets.shape[0] != h.shape[0]:
    raise ValueError(f"shapes do not match: h {h.shape}, targets {targets.shape}, ids {ids.shape}, log_q "
                     f"{log_q.shape}")
  S, D = _mesh.axis_size(mesh, axis), _mesh.axis_size(mesh, data_axis)
  if h.shape[0] % D:
    raise ValueError(f"h has {h.shape[0]} rows, not a multiple of the data axis size {D}")
  tau = tau if checks.is_traced(tau) else checks.positive("tau", tau)
  C = _mesh.pad_axis(jnp.asarray(class_vectors), 0, _mesh.padded(n, S))
  return _sampled_loss(jnp.asarray(h), C, jnp.asarray(targets), jnp.asarray(ids), jnp.asarray(log_q, jnp.float32),
                       jnp.asarray(tau, jnp.float32), mesh, axis, data_axis, n)
