r"""Exact softmax top-k and log-partition of `beta * A x` with A's rows (classes) sharded over a mesh axis.

The reference every sharded method is checked against (issue 29 item 2). Shard s holds rows
`[s n_s, (s + 1) n_s)` of A padded to `S n_s` rows (padding rows are masked to $-\infty$). Per shard: local logits,
`lax.top_k`, ids offset by `axis_index * n_s`; the S x k candidates are all-gathered and a second `top_k` picks the
global top-k (ties go to the lower id, as on one device). $\log Z = m + \log \sum_s \sum_{i \in s} e^{\ell_i - m}$
with $m$ the global max (`pmax`, then one `psum`). Under plain `jit`, `lax.top_k` of vocab-sharded logits would
all-gather the whole operand (Auto mesh) or raise (Explicit mesh); here only S k candidates move.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from asoftmax import sharded
  >>> mesh = sharded.make_mesh((1,), ("vocab",))
  >>> r = sharded.softmax_topk(jnp.eye(3), jnp.array([0.0, 2.0, 1.0]), mesh, k=2)
  >>> r.indices.tolist()
  [1, 2]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from asoftmax import checks
from asoftmax.adaptive.exact import ExactResult
from asoftmax.sharded import _mesh


def local_logits(A_s, X, beta, n: int, axis: str):
  """(b, n_s) logits of this shard's rows, padding rows (global id >= n) at -inf, and their global ids (n_s,)."""
  n_s = A_s.shape[0]
  ids = _mesh.shard_offset(axis, n_s) + jnp.arange(n_s, dtype=jnp.int32)
  logits = beta * jnp.einsum("bd,nd->bn", X, A_s)
  return jnp.where(ids[None] < n, logits, -jnp.inf), ids


def merge_topk(vals, ids, k: int, axis: str):
  """Global top-k from each shard's (b, k_s) candidate values and global ids: all_gather S k_s, then top_k."""
  gv = jax.lax.all_gather(vals, axis, axis=1, tiled=True, to="invarying")  # (b, S k_s), shard order = id order
  gi = jax.lax.all_gather(ids, axis, axis=1, tiled=True, to="invarying")
  top, j = jax.lax.top_k(gv, k)
  return top, jnp.take_along_axis(gi, j, 1)


def global_logsumexp(logits, axis: str):
  """(b,) log sum over all shards of exp(logits) (b, n_s): global max by pmax, one psum of the shifted sums."""
  m = jax.lax.pmax(jnp.max(logits, -1), axis)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  return m + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(logits - m[:, None]), -1), axis))


@functools.partial(jax.jit, static_argnames=("mesh", "k", "n", "axis", "data_axis"))
def _softmax_topk(A, X, beta, mesh, k, n, axis, data_axis):
  def shard(A_s, X_s, beta):
    logits, ids = local_logits(A_s, X_s, beta, n, axis)
    k_s = min(k, A_s.shape[0])
    v, j = jax.lax.top_k(logits, k_s)
    top, idx = merge_topk(v, ids[j], k, axis)
    log_z = global_logsumexp(logits, axis)
    log_z = jnp.where((beta > 0) & jnp.isfinite(beta), log_z, jnp.nan)  # a traced beta out of range: flagged
    return ExactResult(idx.astype(jnp.int32), jnp.exp(top - log_z[:, None]), log_z)

  out_spec = ExactResult(P(data_axis), P(data_axis), P(data_axis))
  f = jax.shard_map(shard, mesh=mesh, in_specs=(P(axis, None), P(data_axis, None), P()), out_specs=out_spec)
  A = _mesh.place(mesh, A, P(axis, None))
  X = _mesh.place(mesh, X, P(data_axis, None))
  return f(A, X, beta)


def softmax_topk(A, x, mesh, k: int = 1, beta: float = 1.0, *, axis: str = "vocab",
                 data_axis: str | None = None, check_finite: bool = True) -> ExactResult:
  r"""Exact top-k of `softmax(beta * A x)` with A's rows sharded over `mesh` axis `axis`: one device's answer.

  Args:
    A: (n, d) floating matrix (or an `adaptive.PreparedMatrix`); n need not be divisible by the axis size (rows are
      padded and masked).
    x: (d,) or (b, d) queries.
    mesh: a `jax.sharding.Mesh` (e.g. `sharded.make_mesh((8,), ("vocab",))`).
    k: number of top entries, 1 <= k <= n.
    beta: inverse temperature (> 0).
    axis: the mesh axis that splits A's rows.
    data_axis: optional mesh axis that splits the batch of queries (A replicated over it); b is padded to a
      multiple of its size.
    check_finite: scan a concrete A for NaN/inf on the host (a gather of A: turn off in timing loops).

  Returns:
    `adaptive.ExactResult(indices, probs, log_z)` with a leading batch axis iff `x` is 2-D: the ids are one device's
    `adaptive.softmax_topk` ids exactly; probs and log Z agree to float32 rounding of the sum's order.

  Raises:
    ValueError: naming the argument (A, x, k, beta; mesh not a Mesh; axis / data_axis not one of its axes).
  """
  mesh = _mesh.check_mesh(mesh)
  axis = _mesh.check_axis(mesh, "axis", axis)
  data_axis = _mesh.check_axis(mesh, "data_axis", data_axis, optional=True)
  if data_axis == axis:
    raise ValueError(f"data_axis must differ from axis, both are {axis!r}")
  A = checks.floating_array("A", getattr(A, "A", A), 2, finite=checks.boolean("check_finite", check_finite))
  x = checks.floating_array("x", x, (1, 2))
  n, d = A.shape
  if x.shape[-1] != d:
    raise ValueError(f"x has shape {tuple(x.shape)} but A has shape {(n, d)}: x must be (d,) or (b, d) with d={d}")
  k = checks.int_in_range("k", k, 1, n)
  beta = beta if checks.is_traced(beta) else checks.positive("beta", beta)
  ct = jnp.promote_types(A.dtype, jnp.float32)
  S, D = _mesh.axis_size(mesh, axis), _mesh.axis_size(mesh, data_axis)
  A = _mesh.pad_axis(jnp.asarray(A, ct), 0, _mesh.padded(n, S))
  single = x.ndim == 1
  X = jnp.asarray(x, ct)[None] if single else jnp.asarray(x, ct)
  b = X.shape[0]
  X = _mesh.pad_axis(X, 0, _mesh.padded(b, D))
  out = _softmax_topk(A, X, jnp.asarray(beta, ct), mesh, k, n, axis, data_axis)
  return jax.tree.map(lambda a: a[0] if single else a[:b], out)


def logsumexp(A, x, mesh, beta: float = 1.0, *, axis: str = "vocab", data_axis: str | None = None) -> jax.Array:
  r"""$\log \sum_i e^{\beta (A x)_i}$ with A's rows sharded over `axis` (same arguments as `softmax_topk`).

  Returns:
    (,) or (b,) log partition functions (one device's value to float32 rounding).
  """
  return softmax_topk(A, x, mesh, 1, beta, axis=axis, data_axis=data_axis).log_z
