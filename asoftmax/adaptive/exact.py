"""Exact reference: the full softmax of `beta * A x` and its top-k."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


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
  """
  A = getattr(A, "A", A)
  x = jnp.asarray(x)
  single = x.ndim == 1
  X = x[None] if single else x
  out = _softmax_topk(jnp.asarray(A), X.astype(A.dtype), k, jnp.asarray(beta, A.dtype))
  if single:
    out = jax.tree.map(lambda a: a[0], out)
  return out


@jax.jit
def exact_logits(A, X, beta=1.0):
  """(b, n) exact logits `beta * X A^T`."""
  return beta * (X @ A.T)
