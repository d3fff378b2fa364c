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
a total variation measured in `docs/rff.md` (section "What is sampled"; `tests/test_rff_lib.py`
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
  levels, cnts = [bucket_sums], [bucket_counts.astype(jnp.float32)]
  while levels[0].shape[0] > 1:
    levels.insert(0, levels[0].reshape(-1, 2, F).sum(1))
    cnts.insert(0, cnts[0].reshape(-1, 2).sum(1))
  nodes = jnp.concatenate([jnp.zeros((1, F), bucket_sums.dtype)] + levels, 0)
  counts = jnp.concatenate([jnp.zeros((1,), jnp.float32)] + cnts, 0)
  return KernelTree(nodes=nodes, counts=counts, num_classes=int(num_classes), bucket=int(bucket))


def build_tree(leaf_features: jax.Array, bucket: int = 1) -> KernelTree:
  """Builds the tree from per-class features [n, F] (bucket sums are formed here; finite floating, bucket >= 1)."""
  checks.floating_array("leaf_features", leaf_features, 2)
  bucket = checks.pos_int("bucket", bucket)
  n, F = leaf_features.shape
  P = num_buckets_for(n, bucket)
  padded = jnp.zeros((P * bucket, F), jnp.float32).at[:n].set(leaf_features.astype(jnp.float32))
  sums = padded.reshape(P, bucket, F).sum(1)
  counts = (jnp.arange(P * bucket) < n).astype(jnp.float32).reshape(P, bucket).sum(1)
  return tree_from_buckets(sums, counts, n, bucket)


def _check_query_features(query_features, tree):
  checks.floating_array("query_features", query_features, 2)
  if query_features.shape[1] != tree.nodes.shape[1]:
    raise ValueError(f"query_features has {query_features.shape[1]} features, the tree's nodes have "
                     f"{tree.nodes.shape[1]}")


def _check_kappa(kappa):
  """kappa >= 0 and finite (a traced kappa is passed through unchecked)."""
  return kappa if checks.is_traced(kappa) else checks.pos_float("kappa", kappa, allow_zero=True)


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
  m = checks.pos_int("m", m)
  kappa = _check_kappa(kappa)
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
  kappa = _check_kappa(kappa)
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
  kappa = _check_kappa(kappa)
  return _leaf_clamped_log_probs(query_features, tree, kappa)


@jax.jit
def _leaf_clamped_log_probs(query_features, tree, kappa):
  P = tree.num_buckets
  floor = _floor(query_features, tree, kappa)
  mass = jnp.maximum(query_features @ tree.nodes[P:].T, 0.0) + floor[:, None] * tree.counts[None, P:]
  ok = jnp.isfinite(query_features).all(-1, keepdims=True)  # the jit validity flag: NaN rows
  return jnp.where(ok, jnp.log(mass) - jnp.log(mass.sum(-1, keepdims=True)), jnp.nan)
