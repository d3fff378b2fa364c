"""Exact reference: the full softmax of `beta * A x` and its top-k."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from asoftmax import checks


class ExactResult(NamedTuple):
  """Exact top-k softmax.

  Attributes:
    indices: (..., k) int32, top-k arms by logit, descending.
    probs: (..., k) softmax probabilities of those arms.
    log_z: (...,) log partition function, log sum_i exp(beta * (A x)_i).
  """

  indices: jax.Array
  probs: jax.Array
  log_z: jax.Array


@functools.partial(jax.jit, static_argnames=("k",))
def _softmax_topk(A, X, k, beta):
  # (b, d) @ (d, n) is slow on XLA:CPU at batch 1; `A @ x` is the fast GEMV. For batches,
  # `X @ A.T` is a GEMM and fine. Either way the result is (b, n).
  logits = beta * (X @ A.T) if X.shape[0] > 1 else beta * (A @ X[0])[None]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  top, idx = jax.lax.top_k(logits, k)
  return ExactResult(idx.astype(jnp.int32), jnp.exp(top - log_z[:, None]), log_z)


def softmax_topk(A, x, k: int = 1, beta: float = 1.0) -> ExactResult:
  """Exact top-k of `softmax(beta * A x)`, the reference every approximation is checked against.

  Args:
    A: (n, d) floating matrix (or an `adaptive.PreparedMatrix`).
    x: (d,) or (b, d) query/queries.
    k: number of top entries, 1 <= k <= n.
    beta: inverse temperature.

  Returns:
    ExactResult with leading batch axis iff `x` is 2-D.

  Raises:
    ValueError: naming the argument: `A` not a finite floating (n, d) array, `x` not a finite floating (d,) or
      (b, d) array, `k` not an integer in [1, n], `beta` not a positive finite number. Inside the user's
      `jax.jit` the values of traced arrays are not checked; a NaN there gives NaN probabilities.

  Example:
    >>> import jax.numpy as jnp
    >>> from asoftmax import adaptive
    >>> A = jnp.eye(3)
    >>> r = adaptive.softmax_topk(A, jnp.array([0.0, 2.0, 1.0]), k=2)
    >>> r.indices.tolist()
    [1, 2]
  """
  A = checks.floating_array("A", getattr(A, "A", A), 2)
  x = checks.floating_array("x", x, (1, 2))
  n, d = A.shape
  if x.shape[-1] != d:
    raise ValueError(f"x has shape {tuple(x.shape)} but A has shape {(n, d)}: x must be (d,) or (b, d) with d={d}")
  k = checks.int_in_range("k", k, 1, n)
  beta = beta if checks.is_traced(beta) else checks.positive("beta", beta)
  A = jnp.asarray(A)
  x = jnp.asarray(x)
  single = x.ndim == 1
  X = x[None] if single else x
  ct = jnp.promote_types(A.dtype, jnp.float32)  # 16-bit inputs: logits and softmax in float32
  out = _softmax_topk(A.astype(ct), X.astype(ct), k, jnp.asarray(beta, ct))
  if single:
    out = jax.tree.map(lambda a: a[0], out)
  return out


@jax.jit
def exact_logits(A, X, beta=1.0):
  """(b, n) exact logits `beta * X A^T`."""
  return beta * (X @ A.T)
