r"""Proposal distributions q for sampled softmax, all behind one interface.

A `Sampler` is a NamedTuple of pure functions (optax style):

  state = sampler.init(class_vectors)                  # [n, d]; rows are L2-normalized here
  ids, log_q = sampler.sample(state, key, h, m)        # h [B, d] unit rows -> [B, m] int32, [B, m] float32
  ids, log_q = sampler.sample(state, key, h, m, shared=True)   # one set for the batch: [m], [m]
  state = sampler.update(state, ids, class_vectors)    # refresh the touched classes (any-shape ids)
  log_q_all = sampler.log_probs(state, h)              # [B, n] dense log q (analysis and tests)
  log_q_bar = sampler.log_probs(state, h, shared=True) # [n] the batch-shared proposal
  state = refresh(sampler, state, class_vectors)       # rebuild after Adam & co. (see `refresh`)

**In a training step:** queries passed to `sample` / `log_probs` must be unit vectors (`normalize(h)`; an
unnormalised h raises `ValueError`, and under `jax.jit` gets NaN log q: the project's validity flag). Donate the
sampler state with the parameters (`jax.jit(step, donate_argnums=...)`): without donation XLA copies the whole
tree every step (issue 26 reports 60 / 216 ms per step instead of 10 / 13 ms at D = 64 / 256). Every `init`
returns fresh arrays, so a donated state never deletes the sampler's own copy. Optimizers with per-parameter
state (Adam, momentum, weight decay) move every class row: call `refresh(sampler, state, C)` (a rebuild), not
`update` on the touched rows only (tests/rff/test_loss_optax.py).

Samples are i.i.d. with replacement; `log_q` is the exact log-probability of each drawn class under the
distribution the sampler actually used (so the log-q correction in `loss.sampled_softmax_loss` is exact).
Without-replacement draws and TF-style expected counts are built on top in `negatives.py`.

Per-query (`shared=False`, the paper's form): each query b gets its own m classes from q(. | h_b).
Batch-shared (`shared=True`, as TF's `sampled_softmax_loss` and most production code): one set of m
classes for the whole batch from a query-independent q-bar, so the loss needs m class rows instead of
B*m. For the query-dependent proposals q-bar is the batch mixture:

| sampler      | q_i (per query)                        | q-bar (shared)                              | cost per sample |
|--------------|----------------------------------------|---------------------------------------------|-----------------|
| uniform      | 1/n                                    | same                                        | O(1)            |
| unigram      | (count_i + smoothing) / total          | same                                        | O(log n) search |
| quadratic    | alpha (h.c_i)^2 + 1 (tree of buckets)  | sum_b [alpha (h_b.c_i)^2 + 1], normalized   | O(d^2 log n)    |
| rff          | tree path product of max(phi(h).z, 0) + floor (see `tree.py`; NOT prop. to the leaf-clamped kernel) | same tree walk with psi-bar = mean_b phi(h_b) | O(D log n) |
| exact        | softmax(tau h.c)                       | mean_b softmax(tau h_b.c)                   | O(n d)          |

The rff q-bar is the kernel sum over the batch ($\sum_b K(h_b, c_i)$), a mixture weighting query b by its
kernel mass; the exact q-bar weights every query equally. Either way every class keeps q-bar > 0 wherever
some q(. | h_b) > 0, so the estimate of each query's Z stays unbiased.
References: Blanc & Rendle, ICML 2018 (quadratic); Rawat et al., NeurIPS 2019 (rff, "Exp" = exact).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from asoftmax import checks
from asoftmax.rff import features as features_lib
from asoftmax.rff import tree as tree_lib


class Sampler(NamedTuple):
  """A proposal distribution: `init`, `sample`, `update`, `log_probs` (see module docstring)."""

  init: Callable[[jax.Array], Any]
  sample: Callable[..., tuple[jax.Array, jax.Array]]
  update: Callable[..., Any]
  log_probs: Callable[..., jax.Array]
  name: str = ""


def normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / ||x|| along `axis` (with a tiny epsilon); x a non-empty floating array (finite when concrete)."""
  checks.floating_array("x", x)
  return _normalize(x, axis)


@functools.partial(jax.jit, static_argnames=("axis",))
def _normalize(x, axis=-1):
  """`normalize` without the checks; jitted (called eagerly by the samplers' `init`: one compiled program per shape
  instead of five one-op programs)."""
  return x / jnp.sqrt(jnp.sum(x * x, axis, keepdims=True) + 1e-12)


def _check_sample_args(h, m, d=None, shared=False):
  checks.unit_rows("h", h, 2)
  m = checks.int_in_range("m", m)
  checks.boolean("shared", shared)
  if d is not None:
    checks.same_dim("h", h, d, "the sampler's class_vectors")
  return m


def _unique_ids(ids, n):
  """Sorted unique ids padded with n; out-of-range ids (negative included, possible only under jit) become n."""
  flat = ids.reshape(-1).astype(jnp.int32)
  flat = jnp.where((flat >= 0) & (flat < n), flat, n)
  return jnp.unique(flat, size=flat.shape[0], fill_value=n)


def _changed_rows(stored, ids, class_vectors):
  """The rows an `update` rewrites: (unique ids padded with n, valid (ids < n), their new normalized vectors, their
  stored vectors), each of length `ids.size`; padding slots hold row n - 1 (masked by `valid`)."""
  n = stored.shape[0]
  uid = _unique_ids(ids, n)
  safe = jnp.minimum(uid, n - 1)
  return uid, uid < n, _normalize(class_vectors[safe]), stored[safe]


def _check_update_args(ids, class_vectors, shape):
  """ids: integer, in [0, n) when concrete; class_vectors: finite floating [n, d] like the sampler's."""
  checks.index_array("ids", ids, shape[0])
  checks.floating_array("class_vectors", class_vectors, 2)
  if tuple(class_vectors.shape) != tuple(shape):
    raise ValueError(f"class_vectors must have the sampler's shape {tuple(shape)}, got {tuple(class_vectors.shape)}")


def _unit_ok(h, lq):
  """Bool, broadcastable to `lq`: the query rows of h are unit vectors (the jit form of `checks.unit_rows`, same
  tolerance; a traced unnormalised h would otherwise give a silently wrong q). lq is per query ([B, ...]) or
  batch-shared ([1, m] or [n]: then every query counts)."""
  atol = max(1e-3, 2.0 * float(jnp.finfo(h.dtype).eps))
  ok = jnp.abs(jnp.sqrt(jnp.sum(jnp.square(h.astype(jnp.float32)), -1)) - 1.0) <= atol  # [B]
  if lq.ndim >= 2 and lq.shape[0] == h.shape[0]:
    return ok.reshape((-1,) + (1,) * (lq.ndim - 1))
  return jnp.all(ok)


def _flag_unit(h, lq):
  """log q (or log probs) with NaN where the query is not a unit vector (the jit validity flag)."""
  return jnp.where(_unit_ok(h, lq), lq, jnp.nan)


def _flag(ids, lq, n, h=None):
  """The jit validity flag: a draw whose log q is not finite (a NaN / inf query) or whose query is not a unit
  vector keeps an in-range id, log q NaN."""
  ok = jnp.isfinite(lq)
  if h is not None:
    ok = ok & _unit_ok(h, lq)
  return jnp.where(ok, jnp.clip(ids, 0, n - 1), n - 1).astype(jnp.int32), jnp.where(ok, lq, jnp.nan)


def _search(cdf, u):
  """Inverse-CDF lookup: smallest i with cdf[i] > u (clipped to the last index)."""
  return jnp.minimum(jnp.searchsorted(cdf, u, side="right"), cdf.shape[-1] - 1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------- uniform
@struct.dataclass
class CountState:
  log_q: jax.Array  # [n]
  cdf: jax.Array  # [n]


def uniform_sampler(num_classes: int) -> Sampler:
  """q_i = 1/n."""
  n = checks.int_in_range("num_classes", num_classes)

  def init(class_vectors=None):
    del class_vectors
    return CountState(log_q=jnp.full((n,), -np.log(n), jnp.float32), cdf=jnp.zeros((0,)))

  @functools.partial(jax.jit, static_argnames=("m", "shared"))
  def _sample(state, key, h, m, shared):
    ids = jax.random.randint(key, (m,) if shared else (h.shape[0], m), 0, n, jnp.int32)
    return ids, jnp.full(ids.shape, -np.log(n), jnp.float32)

  def sample(state, key, h, m, shared=False):
    m = _check_sample_args(h, m, shared=shared)
    return _sample(state, key, h, m, bool(shared))

  def log_probs(state, h, shared=False):
    checks.unit_rows("h", h, 2)
    return state.log_q if checks.boolean("shared", shared) else jnp.broadcast_to(state.log_q, (h.shape[0], n))

  return Sampler(init, sample, lambda state, ids, cv=None: state, log_probs, "uniform")


# ---------------------------------------------------------------------------------------------- unigram
def unigram_sampler(counts: Any, smoothing: float = 1.0) -> Sampler:
  """q_i = (counts_i + smoothing) / sum; inverse-CDF search (O(log n) per sample).

  Args:
    counts: [n] nonnegative class frequencies (e.g. training-token counts).
    smoothing: pseudo-count (>= 0) so every class keeps q > 0 (needed for an unbiased Z estimate).
  """
  if np.asarray(counts).dtype == np.bool_:
    raise ValueError("counts must be numbers (class frequencies), got a bool array")
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 1 or counts.size == 0 or not np.isfinite(counts).all() or (counts < 0).any():
    raise ValueError("counts must be a non-empty 1-D array of finite nonnegative numbers")
  smoothing = checks.positive("smoothing", smoothing, allow_zero=True)
  w = counts + smoothing
  if w.sum() <= 0:
    raise ValueError("counts + smoothing must have a positive sum")
  p = w / w.sum()
  n = p.size
  log_q = jnp.asarray(np.log(p), jnp.float32)
  cdf = jnp.asarray(np.cumsum(p), jnp.float32)

  def init(class_vectors=None):
    del class_vectors
    return CountState(log_q=jnp.array(log_q, copy=True), cdf=jnp.array(cdf, copy=True))  # fresh: donation-safe

  @functools.partial(jax.jit, static_argnames=("m", "shared"))
  def _sample(state, key, h, m, shared):
    u = jax.random.uniform(key, (m,) if shared else (h.shape[0], m)) * state.cdf[-1]
    ids = _search(state.cdf, u)
    return ids, state.log_q[ids]

  def sample(state, key, h, m, shared=False):
    m = _check_sample_args(h, m, shared=shared)
    return _sample(state, key, h, m, bool(shared))

  def log_probs(state, h, shared=False):
    checks.unit_rows("h", h, 2)
    return state.log_q if checks.boolean("shared", shared) else jnp.broadcast_to(state.log_q, (h.shape[0], n))

  return Sampler(init, sample, lambda state, ids, cv=None: state, log_probs, "unigram")


# ---------------------------------------------------------------------------------------------- exact
@struct.dataclass
class ExactState:
  class_vectors: jax.Array  # [n, d] unit rows


def exact_sampler(tau: float) -> Sampler:
  r"""The oracle q = softmax($\tau C h$) (O(nd) per query): the "Exp" baseline of the paper."""
  tau = checks.positive("tau", tau)

  def init(class_vectors):
    return ExactState(_normalize(jnp.asarray(checks.floating_array("class_vectors", class_vectors, 2), jnp.float32)))

  @functools.partial(jax.jit, static_argnames=("shared",))
  def _log_probs(state, h, shared=False):
    lp = jax.nn.log_softmax(tau * h @ state.class_vectors.T, -1)
    if shared:  # the batch mixture mean_b softmax(tau h_b.c)
      return jax.nn.logsumexp(lp, 0) - jnp.log(float(h.shape[0]))
    return lp

  @functools.partial(jax.jit, static_argnames=("m", "shared"))
  def _sample(state, key, h, m, shared):
    lp = _log_probs(state, h, shared)
    lp2 = lp[None] if shared else lp
    cdf = jnp.cumsum(jnp.exp(lp2), -1)
    u = jax.random.uniform(key, (lp2.shape[0], m)) * cdf[:, -1:]
    ids = jax.vmap(_search)(cdf, u)
    ids, lq = _flag(ids, jnp.take_along_axis(lp2, ids, 1), state.class_vectors.shape[0], h)
    return (ids[0], lq[0]) if shared else (ids, lq)

  def sample(state, key, h, m, shared=False):
    m = _check_sample_args(h, m, state.class_vectors.shape[1], shared)
    return _sample(state, key, h, m, bool(shared))

  def update(state, ids, class_vectors):
    _check_update_args(ids, class_vectors, state.class_vectors.shape)
    return _update(state, ids, class_vectors)

  @jax.jit
  def _update(state, ids, class_vectors):
    n = state.class_vectors.shape[0]
    uid = _unique_ids(ids, n)
    new = _normalize(class_vectors[jnp.minimum(uid, n - 1)])
    return ExactState(state.class_vectors.at[uid].set(new, mode="drop"))

  def log_probs(state, h, shared=False):
    checks.unit_rows("h", h, 2)
    return _flag_unit(h, _log_probs(state, h, checks.boolean("shared", shared)))

  return Sampler(init, sample, update, log_probs, "exact")


# ---------------------------------------------------------------------------------------------- kernel trees
def _auto_precompute(precompute, tree, m):
  if precompute == "auto":
    return tree.num_buckets <= m * max(tree.depth, 1)
  return precompute


@struct.dataclass
class RFFState:
  W: jax.Array  # [D, d]
  tree: tree_lib.KernelTree  # leaves hold phi(c_i)


def rff_sampler(key: jax.Array, num_features: int, nu: float, kappa: float = 0.01,
                precompute: Any = "auto") -> Sampler:
  r"""RF-softmax: q_i from a tree over $\phi(c_i)$ with $\phi$ the RFF map for $e^{-\nu\|h-c\|^2/2}$.

  q_i is the path probability of the tree walk in `tree.py`: each node mass is the clamped RFF kernel sum
  $\max(\phi(h)^\top z, 0)$ plus a uniform floor at rate kappa, and q_i is the product of the branch
  probabilities on class i's path. When a node sum is negative this is NOT $\propto \max(\phi(h)^\top
  \phi(c_i), 0)$ + floor (see `tree.py`, "What is sampled"); `log_q` is exact for what is drawn either way.
  Cost O(D log n) per sample. With `shared=True` the walk uses $\bar\psi = \mathrm{mean}_b \phi(h_b)$.
  Reference: Rawat et al., NeurIPS 2019, Sec. 3-4. Clamping and floor: ours (see asoftmax/rff/features.py)
  (the paper's exact handling of negative estimates was not verified: its full text was not available to us).

  Args:
    key: PRNG key for W (drawn once, shared by queries and classes).
    num_features: D (>= 1); features have 2D entries.
    nu: RFF kernel precision (> 0), kernel $e^{\nu(h^\top c - 1)}$. nu = tau targets the softmax itself;
      nu < tau a flatter proposal. (Bandwidth-form code calls 1/nu "nu"; see `features.py`.)
    kappa: defensive uniform-mixing rate (>= 0).
    precompute: True / False / "auto" (see `tree.tree_sample`).
  """
  D = checks.int_in_range("num_features (D)", num_features)
  nu = checks.positive("nu", nu)
  kappa = checks.positive("kappa", kappa, allow_zero=True)
  precompute = checks.boolean("precompute", precompute, also=("auto",))

  def init(class_vectors):
    c = _normalize(jnp.asarray(checks.floating_array("class_vectors", class_vectors, 2), jnp.float32))
    W = features_lib.init_rff(key, c.shape[1], D, nu)
    return RFFState(W=W, tree=tree_lib.build_tree(features_lib.rff_map(c, W), bucket=1))

  def _psi(state, h, shared):
    psi = features_lib.rff_map(h, state.W)
    return psi.mean(0, keepdims=True) if shared else psi

  @functools.partial(jax.jit, static_argnames=("m", "pre", "shared"))
  def _sample(state, key, h, m, pre, shared):
    ids, logq, _ = tree_lib.tree_sample(key, _psi(state, h, shared), state.tree, m, kappa, pre)
    ids, logq = _flag(ids, logq, state.tree.num_classes, h)
    return (ids[0], logq[0]) if shared else (ids, logq)

  def sample(state, key, h, m, shared=False):
    m = _check_sample_args(h, m, state.W.shape[1], shared)
    return _sample(state, key, h, m, _auto_precompute(precompute, state.tree, m), bool(shared))

  def update(state, ids, class_vectors):
    _check_update_args(ids, class_vectors, (state.tree.num_classes, state.W.shape[1]))
    return _update(state, ids, class_vectors)

  @jax.jit
  def _update(state, ids, class_vectors):
    t = state.tree
    n, P = t.num_classes, t.num_buckets
    uid = _unique_ids(ids, n)
    valid = uid < n
    new = features_lib.rff_map(_normalize(class_vectors[jnp.minimum(uid, n - 1)]), state.W)
    old = t.nodes[P + jnp.minimum(uid, n - 1)]
    delta = jnp.where(valid[:, None], new - old, 0.0)
    return state.replace(tree=tree_lib.tree_update(t, jnp.where(valid, uid, P), delta))

  @functools.partial(jax.jit, static_argnames=("shared",))
  def _log_probs(state, h, shared=False):
    lq, _ = tree_lib.tree_log_probs(_psi(state, h, shared), state.tree, kappa)
    lq = lq[:, : state.tree.num_classes]
    return lq[0] if shared else lq

  def log_probs(state, h, shared=False):
    checks.unit_rows("h", h, 2)
    return _flag_unit(h, _log_probs(state, h, checks.boolean("shared", shared)))

  return Sampler(init, sample, update, log_probs, "rff")


@struct.dataclass
class QuadraticState:
  class_vectors: jax.Array  # [n, d] unit rows (needed for in-bucket sampling and for updates)
  tree: tree_lib.KernelTree  # bucket sums of [sqrt(alpha) vec(c c^T), 1]


def quadratic_sampler(alpha: float = 100.0, bucket: int = 16, kappa: float = 0.0,
                      precompute: Any = "auto") -> Sampler:
  r"""Blanc & Rendle (ICML 2018) quadratic kernel $q_i \propto \alpha (h^\top c_i)^2 + 1$.

  A tree over buckets of `bucket` classes stores $\sum \sqrt\alpha\,\mathrm{vec}(cc^\top)$ and counts
  (F = d^2 + 1); inside the drawn bucket the exact kernel values pick the class. Cost O(d^2 log(n/b) + b d)
  per sample. The kernel is positive, so no clamping is ever active (kappa = 0 by default).
  """
  alpha = checks.positive("alpha", alpha)
  b = checks.int_in_range("bucket", bucket)
  kappa = checks.positive("kappa", kappa, allow_zero=True)
  precompute = checks.boolean("precompute", precompute, also=("auto",))
  sa = float(np.sqrt(alpha))

  def init(class_vectors):
    c = _normalize(jnp.asarray(checks.floating_array("class_vectors", class_vectors, 2), jnp.float32))
    n, d = c.shape
    P = tree_lib.num_buckets_for(n, b)
    cp = jnp.zeros((P * b, d), jnp.float32).at[:n].set(c).reshape(P, b, d)
    outer = jnp.einsum("pbi,pbj->pij", cp, cp).reshape(P, d * d) * sa
    cnt = (jnp.arange(P * b) < n).astype(jnp.float32).reshape(P, b).sum(1)
    sums = jnp.concatenate([outer, cnt[:, None]], 1)
    return QuadraticState(c, tree_lib.tree_from_buckets(sums, cnt, n, b))

  def _kernel(cm, h, shared):
    """alpha (h.c)^2 + 1 for class rows cm [..., d]; shared: alpha c^T M c + 1 with M = mean_b h_b h_b^T."""
    if shared:
      M = h.T @ h / h.shape[0]
      return alpha * jnp.einsum("...d,de,...e->...", cm, M, cm) + 1.0
    return alpha * jnp.einsum("bmjd,bd->bmj", cm, h) ** 2 + 1.0

  def _bucket_logits(state, h, members, shared):
    n = state.tree.num_classes
    cm = state.class_vectors[jnp.minimum(members, n - 1)]  # [B or 1, m, b, d]
    return jnp.where(members < n, jnp.log(_kernel(cm, h, shared)), -jnp.inf)

  def _psi(h, shared):
    psi = features_lib.quadratic_map(h, alpha)
    return psi.mean(0, keepdims=True) if shared else psi

  @functools.partial(jax.jit, static_argnames=("m", "pre", "shared"))
  def _sample(state, key, h, m, pre, shared):
    k1, k2 = jax.random.split(key)
    bids, logq, _ = tree_lib.tree_sample(k1, _psi(h, shared), state.tree, m, kappa, pre)
    members = bids[..., None] * b + jnp.arange(b, dtype=jnp.int32)
    lk = _bucket_logits(state, h, members, shared)
    lk = lk - jax.nn.logsumexp(lk, -1, keepdims=True)
    j = jax.random.categorical(k2, lk, -1)
    ids = bids * b + j.astype(jnp.int32)
    lq = logq + jnp.take_along_axis(lk, j[..., None], -1)[..., 0]
    ids, lq = _flag(ids, lq, state.tree.num_classes, h)
    return (ids[0], lq[0]) if shared else (ids, lq)

  def sample(state, key, h, m, shared=False):
    m = _check_sample_args(h, m, state.class_vectors.shape[1], shared)
    return _sample(state, key, h, m, _auto_precompute(precompute, state.tree, m), bool(shared))

  def update(state, ids, class_vectors):
    _check_update_args(ids, class_vectors, state.class_vectors.shape)
    return _update(state, ids, class_vectors)

  @jax.jit
  def _update(state, ids, class_vectors):
    t = state.tree
    P = t.num_buckets
    uid, valid, new, old = _changed_rows(state.class_vectors, ids, class_vectors)
    douter = (new[:, :, None] * new[:, None, :] - old[:, :, None] * old[:, None, :]).reshape(uid.shape[0], -1)
    delta = jnp.concatenate([sa * douter, jnp.zeros((uid.shape[0], 1))], 1)
    delta = jnp.where(valid[:, None], delta, 0.0)
    tree = tree_lib.tree_update(t, jnp.where(valid, uid // b, P), delta)
    return QuadraticState(state.class_vectors.at[uid].set(new, mode="drop"), tree)

  @functools.partial(jax.jit, static_argnames=("shared",))
  def _log_probs(state, h, shared=False):
    t = state.tree
    n, P = t.num_classes, t.num_buckets
    lqb, _ = tree_lib.tree_log_probs(_psi(h, shared), t, kappa)  # [B or 1, P]
    if shared:
      k = jnp.log(_kernel(state.class_vectors, h, True))[None]  # [1, n]
    else:
      k = jnp.log(alpha * (h @ state.class_vectors.T) ** 2 + 1.0)  # [B, n]
    k = jnp.pad(k, ((0, 0), (0, P * b - n)), constant_values=-jnp.inf).reshape(k.shape[0], P, b)
    lk = k - jax.nn.logsumexp(k, -1, keepdims=True)
    out = (lqb[:, :, None] + lk).reshape(k.shape[0], P * b)[:, :n]
    return out[0] if shared else out

  def log_probs(state, h, shared=False):
    checks.unit_rows("h", h, 2)
    return _flag_unit(h, _log_probs(state, h, checks.boolean("shared", shared)))

  return Sampler(init, sample, update, log_probs, "quadratic")


# ---------------------------------------------------------------------------------------------- refresh
def refresh(sampler: Sampler, state: Any, class_vectors: jax.Array, ids: jax.Array | None = None) -> Any:
  r"""The sampler state after an optimizer step moved the class vectors: a full rebuild, or the touched rows.

  Which one depends on the optimizer, not on the loss:

  * `ids=None` (**Adam, momentum, weight decay, any optimizer with per-parameter state**): they move *every* row
    of the class table at every step, even rows with zero gradient, so the whole state is rebuilt from
    `class_vectors` (`sampler.init`; the same random features W, since they come from the sampler's key):
    O(n D) for `rff_sampler`, O(n d^2) for `quadratic_sampler`. Updating only the touched rows after Adam leaves
    leaves stale (tests/rff/test_loss_optax.py: after 8 Adam steps on 64 classes, 52 % of the leaves differ from a
    rebuild by > 1e-3 of the largest node; with `refresh` the largest relative difference is 9e-8).
  * `ids` given (plain SGD on the gathered rows): only those rows moved; `sampler.update(state, ids,
    class_vectors)`, O(|ids| D log n).

  A stale state is still a valid proposal (log q is exact for what is drawn, and kappa > 0 keeps every class
  reachable), but a worse one (more variance); refresh every step, or every k steps to trade accuracy for time.
  Jittable; inside a step that donates the state (`jax.jit(step, donate_argnums=...)`) it writes new buffers.
  Samplers whose state does not depend on the class vectors (uniform, unigram) return `state` unchanged.

  Args:
    sampler: the `Sampler` that built `state`. state: its state.
    class_vectors: [n, d] the class table after the step (rows are normalized here).
    ids: optional int array of the rows that moved (any shape).

  Returns:
    The new state.

  Example:
    >>> s = rff_sampler(jax.random.key(0), num_features=8, nu=4.0)
    >>> C = jax.random.normal(jax.random.key(1), (20, 4))
    >>> state = refresh(s, s.init(C), C + 0.1)  # after e.g. an Adam step on C
    >>> bool(jnp.allclose(state.tree.nodes, s.init(C + 0.1).tree.nodes))
    True
  """
  if not isinstance(sampler, Sampler):
    raise ValueError(f"sampler must be a Sampler (e.g. rff_sampler(...)), got {type(sampler).__name__}")
  checks.floating_array("class_vectors", class_vectors, 2)
  if isinstance(state, CountState):  # uniform / unigram: no class vectors
    return state
  if ids is not None:
    return sampler.update(state, ids, class_vectors)
  return sampler.init(class_vectors)


# ---------------------------------------------------------------------------------------------- bucketed RF-softmax
@struct.dataclass
class RFFBucketState:
  W: jax.Array  # [D, d] RFF frequencies
  class_vectors: jax.Array  # [n, d] unit rows: scored exactly inside a drawn bucket, and the "old" rows of an update
  tree: tree_lib.KernelTree  # leaf j: sum of phi(c_i) over the bucket's classes i = j b ... j b + b - 1


def rff_bucket_sampler(key: jax.Array, num_features: int, nu: float, bucket: int = 32, kappa: float = 0.01,
                       precompute: Any = "auto", block_bytes: int = 1 << 26) -> Sampler:
  r"""RF-softmax with a tree over buckets of classes: node memory 2P x 2D floats, P ~ n / bucket.

  Two stages. (1) The tree walk of `tree.py` over bucket sums $z_j = \sum_{i \in j} \phi(c_i)$ draws bucket j with
  the path product $q_j$ of clamped RFF masses plus the kappa floor (exactly as `rff_sampler`, whose leaves are
  single classes). (2) Inside the drawn bucket the members are scored with the exact kernel,
  $q(i \mid j) = e^{\nu h^\top c_i} / \sum_{i' \in j} e^{\nu h^\top c_{i'}}$. So
  $\log q_i = \log q_{j(i)} + \log q(i \mid j(i))$ exactly, and with exact features the proposal would be the
  kernel softmax $q_i \propto e^{\nu h^\top c_i}$. The RFF noise (sd about $1/\sqrt{2D}$ per kernel value) enters
  only at bucket level, where a bucket's kernel sum is ~b times larger than one class's.
  Cost per draw O(D log(n / b) + b d); memory `tree.tree_nbytes(n, 2D, b)` for the nodes plus the [n, d] class
  rows (n = 1e6, D = 1024, b = 32: 0.5 GiB nodes, against 16 GiB for `rff_sampler`'s one-class leaves).
  With `shared=True` the walk uses $\bar\psi = \mathrm{mean}_b \phi(h_b)$ and the in-bucket score is the batch
  mixture $\log \sum_b e^{\nu h_b^\top c_i}$ (the kernel sum the tree estimates).

  Reference: Rawat et al., NeurIPS 2019, Sec. 3-4 (RFF proposal, tree sampling); the bucket-plus-exact-score form
  follows Blanc & Rendle, ICML 2018, Sec. 4 (the quadratic sampler here); clamping/floor: `tree.py`.

  Args:
    key: PRNG key for W (drawn once).
    num_features: D (>= 1); features have 2D entries.
    nu: kernel precision (> 0), kernel $e^{\nu(h^\top c - 1)}$ (see `rff_sampler`).
    bucket: classes per leaf (>= 1; bucket = 1 draws what `rff_sampler` draws).
    kappa: defensive uniform-mixing rate (>= 0) at the bucket level.
    precompute: True / False / "auto" (see `tree.tree_sample`).
    block_bytes: features held at once while building the tree (`tree.build_bucket_tree`).

  Example:
    >>> import jax
    >>> C = normalize(jax.random.normal(jax.random.key(0), (100, 8)))
    >>> s = rff_bucket_sampler(jax.random.key(1), num_features=16, nu=2.0, bucket=8)
    >>> state = s.init(C)
    >>> ids, log_q = s.sample(state, jax.random.key(2), C[:3], m=5)
    >>> ids.shape, state.tree.num_buckets
    ((3, 5), 16)
  """
  D = checks.int_in_range("num_features (D)", num_features)
  nu = checks.positive("nu", nu)
  b = checks.int_in_range("bucket", bucket)
  kappa = checks.positive("kappa", kappa, allow_zero=True)
  precompute = checks.boolean("precompute", precompute, also=("auto",))
  block_bytes = checks.int_in_range("block_bytes", block_bytes)

  @jax.jit
  def _init(c):
    c = _normalize(c)
    W = features_lib.init_rff(key, c.shape[1], D, nu)
    tree = tree_lib.build_bucket_tree(c, lambda x: features_lib.rff_map(x, W), 2 * D, b, block_bytes)
    return RFFBucketState(W=W, class_vectors=c, tree=tree)

  def init(class_vectors):
    return _init(jnp.asarray(checks.floating_array("class_vectors", class_vectors, 2), jnp.float32))

  def _psi(state, h, shared):
    psi = features_lib.rff_map(h, state.W)
    return psi.mean(0, keepdims=True) if shared else psi

  @functools.partial(jax.jit, static_argnames=("m", "pre", "shared"))
  def _sample(state, key, h, m, pre, shared):
    k1, k2 = jax.random.split(key)
    t = state.tree
    bids, lqb, _ = tree_lib.tree_sample(k1, _psi(state, h, shared), t, m, kappa, pre)  # [B or 1, m]
    members, _ = tree_lib.bucket_members(bids, t)  # [B or 1, m, b]
    if shared:
      cm = state.class_vectors[members[0]]  # [m, b, d]
      s = jax.nn.logsumexp(nu * jnp.einsum("mjd,bd->bmj", cm, h), 0)[None]  # [1, m, b]
    else:  # one query at a time: its [m, b, d] member rows stay small (a [B, m, b, d] gather was ~9x slower on CPU)
      s = jax.lax.map(lambda a: nu * jnp.einsum("mjd,d->mj", state.class_vectors[a[0]], a[1]), (members, h))
    ids, lq = tree_lib.sample_in_buckets(k2, bids, lqb, t, s)
    ids, lq = _flag(ids, lq, t.num_classes, h)
    return (ids[0], lq[0]) if shared else (ids, lq)

  def sample(state, key, h, m, shared=False):
    m = _check_sample_args(h, m, state.W.shape[1], shared)
    return _sample(state, key, h, m, _auto_precompute(precompute, state.tree, m), bool(shared))

  def update(state, ids, class_vectors):
    _check_update_args(ids, class_vectors, state.class_vectors.shape)
    return _update(state, ids, class_vectors)

  @jax.jit
  def _update(state, ids, class_vectors):
    t = state.tree
    P = t.num_buckets
    uid, valid, new, old = _changed_rows(state.class_vectors, ids, class_vectors)
    delta = jnp.where(valid[:, None], features_lib.rff_map(new, state.W) - features_lib.rff_map(old, state.W), 0.0)
    tree = tree_lib.tree_update(t, jnp.where(valid, uid // b, P), delta)  # duplicates within a bucket add up
    # The written rows depend on `old` (padding rows, dropped anyway, keep it): that orders the gather before the
    # in-place scatter; without it XLA:CPU copied the whole [n, d] table twice per update (seen in the HLO).
    cv = state.class_vectors.at[uid].set(jnp.where(valid[:, None], new, old), mode="drop")
    return state.replace(class_vectors=cv, tree=tree)

  @functools.partial(jax.jit, static_argnames=("shared",))
  def _log_probs(state, h, shared=False):
    lqb, _ = tree_lib.tree_log_probs(_psi(state, h, shared), state.tree, kappa)  # [B or 1, P]
    s = nu * h @ state.class_vectors.T  # [B, n]
    if shared:
      s = jax.nn.logsumexp(s, 0, keepdims=True)
    out = _flag_unit(h, tree_lib.bucketed_log_probs(lqb, state.tree, s))
    return out[0] if shared else out

  def log_probs(state, h, shared=False):
    checks.unit_rows("h", h, 2)
    return _log_probs(state, h, checks.boolean("shared", shared))

  return Sampler(init=init, sample=sample, update=update, log_probs=log_probs, name="rff_bucket")
