r"""A binary tree over classes storing kernel-feature sums: O(F log n) sampling with exact log q.

Layout: a heap over P = 2^L buckets of `bucket` classes each (bucket = 1 is the plain per-class tree of the
paper). `nodes[1]` is the root, the children of node k are 2k and 2k+1, and `nodes[P + j]` holds
$z_j = \sum_{i \in \text{bucket } j} \phi(c_i)$. `counts` holds the number of real classes under each node.

Sampling for a query feature $\psi = \phi(h)$ descends from the root. A node's mass is

  $\mathrm{mass}(k) = \max(\psi^\top z_k, 0) + \bar\kappa\,\mathrm{count}(k)$,
  $\bar\kappa = \kappa \max(\psi^\top z_{root}, 0)/n + 10^{-12}$,

the clamped kernel sum plus a defensive uniform floor (RFF estimates can be negative). The walk goes left
with probability mass(2k)/(mass(2k)+mass(2k+1)) and adds the log of the branch probability it actually
took, so `log_q` is the exact probability of the path drawn (every real class has q > 0, padding has
q = 0).

**What is sampled.** The distribution of a leaf (bucket) j is the product of the branch probabilities on
its path,

  $q_j = \prod_{k \in \mathrm{path}(j),\,k \ne 1} \frac{\mathrm{mass}(k)}{\mathrm{mass}(k) + \mathrm{mass}(k \oplus 1)}$,

($k \oplus 1$ is the sibling) which `tree_log_probs` returns densely. Without clamping the masses are additive
(mass(2k) + mass(2k+1) = mass(k)), the product telescopes and $q_j \propto \psi^\top z_j + \bar\kappa
\,\mathrm{count}(j)$. Once any node on the way has a negative kernel sum, the clamp breaks additivity, the
product no longer telescopes, and q is **not** $\propto \max(\psi^\top\phi(c_j), 0) + \bar\kappa$ (the
leaf-clamped kernel, `leaf_clamped_log_probs`): a subtree whose kernel sum is negative is entered only
through the floor, even when it holds leaves with positive estimates, and a subtree with a positive sum
shares out its net sum, which is less than the sum of its positive leaves. The two distributions differ by
a total variation measured in `docs/rff.md` (section "What is sampled"; `tests/rff/test_lib.py`
checks the sampled frequencies against the path product and rejects the leaf-clamped form). The log-q
correction uses the path product, so the sampled softmax estimate of Z stays unbiased whatever the clamp
does. Reference: Rawat et al. NeurIPS 2019, Sec. 4 (tree sampling); the clamping/floor scheme is ours
(the paper's own treatment of negative estimates could not be checked offline).

Updates add $\phi(c_{new}) - \phi(c_{old})$ to the L+1 ancestors of each touched bucket (one scatter-add).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from asoftmax import checks


@struct.dataclass
class KernelTree:
  """Heap of feature sums. nodes: [2P, F] float32; counts: [2P] float32 (real classes under a node)."""

  nodes: jax.Array
  counts: jax.Array
  num_classes: int = struct.field(pytree_node=False)
  bucket: int = struct.field(pytree_node=False)

  @property
  def num_buckets(self) -> int:
    return self.nodes.shape[0] // 2

  @property
  def depth(self) -> int:
    return int(np.log2(self.num_buckets))


def num_buckets_for(num_classes: int, bucket: int) -> int:
  """P = the power of two >= ceil(num_classes / bucket) (at least 1)."""
  nb = -(-num_classes // bucket)
  return 1 << max(0, int(np.ceil(np.log2(max(nb, 1)))))


def tree_from_buckets(bucket_sums: jax.Array, bucket_counts: jax.Array, num_classes: int,
                      bucket: int) -> KernelTree:
  """Builds the heap from per-bucket feature sums [P, F] (P a power of two) and counts [P]."""
  P, F = bucket_sums.shape
  if P & (P - 1):
    raise ValueError(f"bucket_sums must have a power-of-two number of rows, got {P}")
  nodes, counts = _heap(bucket_sums, bucket_counts)
  return KernelTree(nodes=nodes, counts=counts, num_classes=int(num_classes), bucket=int(bucket))


@jax.jit
def _heap(bucket_sums, bucket_counts):
  """(nodes, counts) of the heap over P = 2^depth buckets (node 0 unused, node 1 the root); one compiled program
  per shape (eagerly, its per-level sums compiled one by one: two dozen small programs per new tree size)."""
  F = bucket_sums.shape[1]
  levels, cnts = [bucket_sums], [bucket_counts.astype(jnp.float32)]
  while levels[0].shape[0] > 1:
    levels.insert(0, levels[0].reshape(-1, 2, F).sum(1))
    cnts.insert(0, cnts[0].reshape(-1, 2).sum(1))
  nodes = jnp.concatenate([jnp.zeros((1, F), bucket_sums.dtype)] + levels, 0)
  counts = jnp.concatenate([jnp.zeros((1,), jnp.float32)] + cnts, 0)
  return nodes, counts


def build_tree(leaf_features: jax.Array, bucket: int = 1) -> KernelTree:
  """Builds the tree from per-class features [n, F] (bucket sums are formed here; finite floating, bucket >= 1)."""
  checks.floating_array("leaf_features", leaf_features, 2)
  bucket = checks.int_in_range("bucket", bucket)
  n, F = leaf_features.shape
  return tree_from_buckets(*_bucket_sums(leaf_features, bucket), n, bucket)


@functools.partial(jax.jit, static_argnames=("bucket",))
def _bucket_sums(leaf_features, bucket: int):
  """Per-bucket feature sums [P, F] and class counts [P] of `build_tree` (classes padded to P * bucket)."""
  n, F = leaf_features.shape
  P = num_buckets_for(n, bucket)
  padded = jnp.zeros((P * bucket, F), jnp.float32).at[:n].set(leaf_features.astype(jnp.float32))
  sums = padded.reshape(P, bucket, F).sum(1)
  counts = (jnp.arange(P * bucket) < n).astype(jnp.float32).reshape(P, bucket).sum(1)
  return sums, counts


def _check_query_features(query_features, tree):
  checks.floating_array("query_features", query_features, 2)
  if query_features.shape[1] != tree.nodes.shape[1]:
    raise ValueError(f"query_features has {query_features.shape[1]} features, the tree's nodes have "
                     f"{tree.nodes.shape[1]}")


def tree_update(tree: KernelTree, bucket_ids: jax.Array, delta: jax.Array) -> KernelTree:
  """Adds delta [u, F] to bucket_ids [u] and all their ancestors.

  Duplicate bucket ids add up (use one row per changed class, each with its own delta). `bucket_ids` must lie in
  [0, P) and `delta` be finite (ValueError when concrete); under `jax.jit` out-of-range ids (negative ones
  included) are dropped, so the tree is never corrupted by them.
  """
  checks.index_array("bucket_ids", bucket_ids, tree.num_buckets, 1)
  checks.floating_array("delta", delta, 2)
  if delta.shape != (bucket_ids.shape[0], tree.nodes.shape[1]):
    raise ValueError(f"delta must have shape {(bucket_ids.shape[0], tree.nodes.shape[1])} (one row of F features "
                     f"per bucket id), got {delta.shape}")
  return _tree_update(tree, bucket_ids, delta)


@jax.jit
def _tree_update(tree, bucket_ids, delta):
  P = tree.num_buckets
  L = tree.depth
  ok = (bucket_ids >= 0) & (bucket_ids < P)
  heap = (P + jnp.where(ok, bucket_ids, 0).astype(jnp.int32))[:, None] >> jnp.arange(L + 1, dtype=jnp.int32)[None, :]
  heap = jnp.where(ok[:, None], heap, 2 * P)  # out of range (negative included) -> dropped
  upd = jnp.broadcast_to(delta[:, None, :], heap.shape + delta.shape[-1:])
  nodes = tree.nodes.at[heap.reshape(-1)].add(upd.reshape(-1, delta.shape[-1]), mode="drop")
  return tree.replace(nodes=nodes)


def _floor(query_features, tree, kappa):
  root = jnp.maximum(query_features @ tree.nodes[1], 0.0)
  floor = kappa * root / tree.num_classes + 1e-12  # [B]
  # A traced kappa the eager check could not see: negative, NaN or inf flags every query (NaN floor -> NaN log q).
  return jnp.where((kappa >= 0) & jnp.isfinite(kappa), floor, jnp.nan)


def tree_sample(key: jax.Array, query_features: jax.Array, tree: KernelTree, m: int, kappa: float,
                precompute: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Draws m buckets per query by descending the tree; returns exact log path probabilities.

  Args:
    key: PRNG key.
    query_features: [B, F] float32, $\psi = \phi(h)$ for each query.
    tree: a `KernelTree` with F-dim node features.
    m: samples per query (static).
    kappa: defensive-floor rate (>= 0), see module docstring.
    precompute: a bool: score all 2P nodes once per query ([B, 2P] matmul, cost O(P F) per query) instead of
      gathering node features per sample per level (cost O(m F log P)). Same distribution either way.

  Returns:
    (bucket_ids [B, m] int32, log_q [B, m] float32, floor [B] float32). Under `jax.jit` a query whose features are
    not finite is flagged: its log_q is NaN and its ids point at the last real bucket; a traced kappa < 0 (or NaN)
    flags every query.
  """
  _check_query_features(query_features, tree)
  m = checks.int_in_range("m", m)
  kappa = kappa if checks.is_traced(kappa) else checks.positive("kappa", kappa, allow_zero=True)
  return _tree_sample(key, query_features, tree, m, kappa, checks.boolean("precompute", precompute))


@functools.partial(jax.jit, static_argnames=("m", "precompute"))
def _tree_sample(key, query_features, tree, m, kappa, precompute):
  B = query_features.shape[0]
  P = tree.num_buckets
  L = tree.depth
  floor = _floor(query_features, tree, kappa)
  if precompute:
    scores = query_features @ tree.nodes.T  # [B, 2P]
    def child_scores(kids):
      return jnp.take_along_axis(scores, kids.reshape(B, -1), axis=1).reshape(kids.shape)
  else:
    def child_scores(kids):
      return jnp.einsum("bmcf,bf->bmc", tree.nodes[kids], query_features)

  def body(l, carry):
    idx, logq = carry
    kids = jnp.stack([2 * idx, 2 * idx + 1], -1)  # [B, m, 2]
    mass = jnp.maximum(child_scores(kids), 0.0) + floor[:, None, None] * tree.counts[kids]
    tot = mass.sum(-1)
    u = jax.random.uniform(jax.random.fold_in(key, l), (B, m))
    left = u * tot < mass[..., 0]
    idx = jnp.where(left, kids[..., 0], kids[..., 1])
    logq = logq + jnp.log(jnp.where(left, mass[..., 0], mass[..., 1])) - jnp.log(tot)
    return idx, logq

  idx0 = jnp.ones((B, m), jnp.int32)
  idx, logq = jax.lax.fori_loop(0, L, body, (idx0, jnp.zeros((B, m), jnp.float32)))
  ok = jnp.isfinite(query_features).all(-1)[:, None] & jnp.isfinite(logq)
  last = -(-tree.num_classes // tree.bucket) - 1  # the last bucket holding a real class
  return jnp.where(ok, idx - P, last), jnp.where(ok, logq, jnp.nan), floor


def tree_log_probs(query_features: jax.Array, tree: KernelTree, kappa: float) -> tuple[jax.Array, jax.Array]:
  """Dense bucket log-probabilities the sampler implies (product of branch probabilities), [B, P].

  For analysis and tests; O(P F) per query. Padding buckets get -inf.

  Returns:
    (log_q [B, P], floor [B]); under `jax.jit` a query with non-finite features gets a NaN row (the flag).
  """
  _check_query_features(query_features, tree)
  kappa = kappa if checks.is_traced(kappa) else checks.positive("kappa", kappa, allow_zero=True)
  return _tree_log_probs(query_features, tree, kappa)


@jax.jit
def _tree_log_probs(query_features, tree, kappa):
  P = tree.num_buckets
  L = tree.depth
  floor = _floor(query_features, tree, kappa)
  mass = jnp.maximum(query_features @ tree.nodes.T, 0.0) + floor[:, None] * tree.counts[None, :]
  k = jnp.arange(2 * P)
  sib = k ^ 1
  logbranch = jnp.where(mass > 0, jnp.log(mass) - jnp.log(mass + mass[:, sib]), -jnp.inf)  # k=0,1 unused
  leaf = P + jnp.arange(P)
  acc = jnp.zeros((query_features.shape[0], P), jnp.float32)
  for s in range(L):
    acc = acc + logbranch[:, leaf >> s]
  ok = jnp.isfinite(query_features).all(-1, keepdims=True)  # the jit validity flag: NaN rows
  return jnp.where(ok, acc, jnp.nan), floor


def leaf_clamped_log_probs(query_features: jax.Array, tree: KernelTree, kappa: float) -> jax.Array:
  r"""log of $q_j \propto \max(\psi^\top z_j, 0) + \bar\kappa\,\mathrm{count}(j)$ over buckets, [B, P].

  This is NOT what `tree_sample` draws when clamping is active (see the module docstring); it is the
  distribution a dense sampler clamping each leaf would draw, kept to measure the difference.
  """
  _check_query_features(query_features, tree)
  kappa = kappa if checks.is_traced(kappa) else checks.positive("kappa", kappa, allow_zero=True)
  return _leaf_clamped_log_probs(query_features, tree, kappa)


@jax.jit
def _leaf_clamped_log_probs(query_features, tree, kappa):
  P = tree.num_buckets
  floor = _floor(query_features, tree, kappa)
  mass = jnp.maximum(query_features @ tree.nodes[P:].T, 0.0) + floor[:, None] * tree.counts[None, P:]
  ok = jnp.isfinite(query_features).all(-1, keepdims=True)  # the jit validity flag: NaN rows
  return jnp.where(ok, jnp.log(mass) - jnp.log(mass.sum(-1, keepdims=True)), jnp.nan)


# ---------------------------------------------------------------------------------------------- bucketed trees
# A tree whose leaves are buckets of `bucket` classes: nodes hold 2P = 2^{L+1} feature sums (P ~ n / bucket), so the
# node memory is 2P F floats instead of ~2n F; a drawn bucket is resolved by scoring its members exactly. Used by
# `samplers.rff_bucket_sampler` (and the same two-stage form as `samplers.quadratic_sampler`).
def tree_nbytes(num_classes: int, num_features: int, bucket: int = 1) -> int:
  """Bytes of a tree's float32 nodes, 2P x F (P = `num_buckets_for(num_classes, bucket)`), without building it.

  >>> tree_nbytes(10**6, 2 * 1024, bucket=32) / 2**30   # n = 1e6, D = 1024 frequencies (F = 2D)
  0.5
  """
  n = checks.int_in_range("num_classes", num_classes)
  F = checks.int_in_range("num_features", num_features)
  b = checks.int_in_range("bucket", bucket)
  return 2 * num_buckets_for(n, b) * F * 4


def bucket_for_budget(num_classes: int, num_features: int, max_bytes: float) -> int:
  """The smallest power-of-two bucket whose tree (`tree_nbytes`) fits in max_bytes (ValueError if none does)."""
  n = checks.int_in_range("num_classes", num_classes)
  F = checks.int_in_range("num_features", num_features)
  max_bytes = checks.positive("max_bytes", max_bytes)
  b = 1
  while tree_nbytes(n, F, b) > max_bytes:
    if b >= n:
      raise ValueError(f"max_bytes={max_bytes:g} is below the smallest tree ({tree_nbytes(n, F, b)} bytes, one bucket)")
    b *= 2
  return b


def _block_buckets(P, bucket, F, block_bytes):
  """Buckets per build block: a power of two dividing P, whose [block * bucket, F] float32 features fit block_bytes."""
  blk = 1
  while blk < P and 2 * blk * bucket * F * 4 <= block_bytes:
    blk *= 2
  return blk


def build_bucket_tree(class_vectors: jax.Array, feature_fn, num_features: int, bucket: int,
                      block_bytes: int = 1 << 26) -> KernelTree:
  r"""Builds a tree over buckets of `bucket` classes without ever holding the [n, F] feature table.

  Leaf j holds $z_j = \sum_{i \in \text{bucket } j} f(c_i)$ (classes $jb, \dots, jb + b - 1$; padding rows add 0),
  computed block by block (`block_bytes` of features at a time) and written into a preallocated heap; the
  levels above are summed in place. Peak memory is about the [2P, F] nodes plus one block. Traceable: call it
  inside `jax.jit` (the feature map is a Python callable, e.g. a closure over the RFF matrix W).

  Args:
    class_vectors: [n, d] floating (finite).
    feature_fn: maps [k, d] rows to [k, F] features (jax-traceable).
    num_features: F, the width feature_fn returns.
    bucket: classes per leaf (>= 1).
    block_bytes: size of one block of features during the build (>= 1).

  Returns:
    A `KernelTree` with `bucket` classes per leaf; memory `tree_nbytes(n, F, bucket)`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from asoftmax.rff import features
    >>> W = features.init_rff(jax.random.key(0), 4, 8, 1.0)
    >>> C = jax.random.normal(jax.random.key(1), (10, 4)); C = C / jnp.linalg.norm(C, axis=1, keepdims=True)
    >>> t = build_bucket_tree(C, lambda x: features.rff_features(x, W), 16, bucket=4)
    >>> t.nodes.shape, t.num_buckets, [float(c) for c in t.counts[4:]]
    ((8, 16), 4, [4.0, 4.0, 2.0, 0.0])

  Reference: Rawat et al., NeurIPS 2019, Sec. 4 (tree of kernel feature sums); the buckets follow the quadratic
  sampler's tree of Blanc & Rendle, ICML 2018, Sec. 4.
  """
  checks.floating_array("class_vectors", class_vectors, 2)
  F = checks.int_in_range("num_features", num_features)
  b = checks.int_in_range("bucket", bucket)
  block_bytes = checks.int_in_range("block_bytes", block_bytes)
  n = class_vectors.shape[0]
  P = num_buckets_for(n, b)
  L = int(np.log2(P))
  blk = _block_buckets(P, b, F, block_bytes)
  rows = blk * b
  c = class_vectors.astype(jnp.float32)

  def body(i, nodes):
    start = i * rows
    idx = start + jnp.arange(rows)
    real = idx < n
    x = c[jnp.minimum(idx, n - 1)]  # a gather: no padded copy of the class table
    f = jnp.where(real[:, None], feature_fn(x).astype(jnp.float32), 0.0)
    return jax.lax.dynamic_update_slice(nodes, f.reshape(blk, b, F).sum(1), (P + i * blk, 0))

  nodes = jax.lax.fori_loop(0, P // blk, body, jnp.zeros((2 * P, F), jnp.float32))
  for lev in range(L - 1, -1, -1):  # level lev holds nodes [2^lev, 2^{lev+1}); its children are the next level
    lo = 1 << lev
    kids = jax.lax.dynamic_slice(nodes, (2 * lo, 0), (2 * lo, F))
    nodes = jax.lax.dynamic_update_slice(nodes, kids.reshape(lo, 2, F).sum(1), (lo, 0))
  cnt = jnp.clip(n - jnp.arange(P) * b, 0, b).astype(jnp.float32)
  levels = [cnt]
  while levels[0].shape[0] > 1:
    levels.insert(0, levels[0].reshape(-1, 2).sum(1))
  counts = jnp.concatenate([jnp.zeros((1,), jnp.float32)] + levels, 0)
  return KernelTree(nodes=nodes, counts=counts, num_classes=int(n), bucket=int(b))


def bucket_members(bucket_ids: jax.Array, tree: KernelTree) -> tuple[jax.Array, jax.Array]:
  """Class ids of the drawn buckets' members [..., b] (clipped to n - 1) and a mask of the real ones [..., b]."""
  b, n = tree.bucket, tree.num_classes
  members = bucket_ids[..., None].astype(jnp.int32) * b + jnp.arange(b, dtype=jnp.int32)
  return jnp.minimum(members, n - 1), members < n


def sample_in_buckets(key: jax.Array, bucket_ids: jax.Array, bucket_log_q: jax.Array, tree: KernelTree,
                      member_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  r"""Second stage of a bucketed draw: one member per drawn bucket, with its exact log-probability.

  $q_i = q_{\text{bucket}(i)} \cdot \mathrm{softmax}_{j \in \text{bucket}}(s_j)_i$ with s = member_logits (any
  finite score; padding members are masked here), so $\log q_i$ = bucket_log_q + the in-bucket log-softmax.

  Args:
    key: PRNG key.
    bucket_ids: [...] int32 buckets drawn by `tree_sample`; bucket_log_q: [...] their log-probabilities.
    tree: the `KernelTree` they were drawn from (its `bucket` and `num_classes`).
    member_logits: [..., b] scores of the members `bucket_members(bucket_ids, tree)`.

  Returns:
    (class ids [...] int32, log_q [...] float32). A NaN score gives a NaN log_q (the jit flag).
  """
  _, real = bucket_members(bucket_ids, tree)
  lk = jnp.where(real, member_logits, -jnp.inf)
  lk = lk - jax.nn.logsumexp(lk, -1, keepdims=True)
  j = jax.random.categorical(key, jnp.where(jnp.isnan(lk), 0.0, lk), -1).astype(jnp.int32)
  ids = bucket_ids.astype(jnp.int32) * tree.bucket + j
  return jnp.minimum(ids, tree.num_classes - 1), bucket_log_q + jnp.take_along_axis(lk, j[..., None], -1)[..., 0]


def bucketed_log_probs(bucket_log_q: jax.Array, tree: KernelTree, class_logits: jax.Array) -> jax.Array:
  """Dense class log q [R, n] of the two-stage draw: bucket log q [R, P] + in-bucket log-softmax of class_logits [R, n]."""
  R = class_logits.shape[0]
  n, P, b = tree.num_classes, tree.num_buckets, tree.bucket
  k = jnp.pad(class_logits, ((0, 0), (0, P * b - n)), constant_values=-jnp.inf).reshape(R, P, b)
  lk = k - jax.nn.logsumexp(k, -1, keepdims=True)
  return (bucket_log_q[:, :, None] + lk).reshape(R, P * b)[:, :n]
