r"""How far a proposal q is from the softmax p, and the bias of the sampled-softmax gradient it gives.

Rawat et al., NeurIPS 2019 (bias analysis); Sec. 3 (the bias of sampled softmax). For one query with logits
$o$ (e.g. $\tau h^\top c_i$), true class $t$, $p = \mathrm{softmax}(o)$, $e_i = \exp(o_i - \max o)$, and m i.i.d.
negatives $s_j \sim \tilde q$ (the proposal restricted to the negatives $N_t$ and renormalized), the sampled-softmax
logit gradient is

$$g'_i = \frac{e_t 1[i=t] + \sum_j w_j 1[s_j=i]}{\hat Z} - 1[i=t], \quad
  w_j = \frac{e_{s_j}}{m \tilde q_{s_j}}, \quad \hat Z = e_t + \sum_j w_j,$$

whose bias is $\lVert E[g'] - (p - e_t)\rVert_2$ (zero when $\tilde q = \tilde p$).

>>> import jax, jax.numpy as jnp
>>> from asoftmax import rff
>>> logits = jnp.array([2.0, 1.0, 0.0, -1.0])
>>> exact = rff.gradient_bias(jax.random.key(0), logits, jax.nn.log_softmax(logits), 0, m=2, reps=1000, chunk=500)
>>> bool(exact.bias < 3 * exact.noise_floor), float(exact.first_order) < 1e-6
(True, True)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from asoftmax import checks


class GradientBias(NamedTuple):
  """Scalars for one query: the Monte-Carlo bias, its noise floor sqrt(sum Var / R), the first-order prediction."""

  bias: jax.Array
  noise_floor: jax.Array
  first_order: jax.Array


class DistributionMetrics(NamedTuple):
  """Per query [Q]: KL(p||q), TV(p, q), chi^2(p~||q~) on the negatives, entropy H(p), the top-1 probability."""

  kl: jax.Array
  tv: jax.Array
  chi2: jax.Array
  entropy: jax.Array
  top1: jax.Array


@functools.partial(jax.jit, static_argnames=("m", "reps", "chunk"))
def _gradient_bias(key, logits, log_q, t, m, reps, chunk):
  n = logits.shape[0]
  e = jnp.exp(logits - logits.max())
  p = e / e.sum()
  g_full = p.at[t].add(-1.0)
  q = jnp.exp(log_q).at[t].set(0.0)  # q~ = q restricted to the negatives N_t, renormalized
  q = q / q.sum()
  cdf = jnp.cumsum(q)

  def one_chunk(k):
    u = jax.random.uniform(k, (chunk, m)) * cdf[-1]
    s = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), n - 1)
    w = jnp.where(s == t, 0.0, e[s] / (m * q[s]))
    zhat = e[t] + w.sum(1)
    g = jax.vmap(lambda si, wi: jnp.zeros(n).at[si].add(wi))(s, w / zhat[:, None])
    g = g.at[:, t].add(e[t] / zhat - 1.0)
    return g.sum(0), (g * g).sum(0)

  sums, sqs = jax.lax.map(one_chunk, jax.random.split(key, reps // chunk))
  mean = sums.sum(0) / reps
  var = jnp.maximum(sqs.sum(0) / reps - mean**2, 0.0)
  bias = jnp.linalg.norm(mean - g_full)
  floor = jnp.sqrt(var.sum() / reps)
  # First-order (delta-method) prediction: bias_i ~ (1/m)[e_i V/Z^3 - 1[i!=t](e_i^2/q_i - Z_t e_i)/Z^2].
  neg = jnp.arange(n) != t
  Z = e.sum()
  Zt = Z - e[t]
  V = jnp.sum(jnp.where(neg, e**2 / q, 0.0)) - Zt**2
  pred = (e * V / Z**3 - jnp.where(neg, (e**2 / q - Zt * e) / Z**2, 0.0)) / m
  return GradientBias(bias, floor, jnp.linalg.norm(pred))


def gradient_bias(key: jax.Array, logits: ArrayLike, log_q: ArrayLike, t, m: int, reps: int,
                  chunk: int | None = None) -> GradientBias:
  """Monte-Carlo bias of the sampled-softmax logit gradient for one query.

  Draws `reps` replicates of m i.i.d. negatives from q~ by inverse-CDF search on the dense q (the tree samplers
  draw exactly this distribution, checked by chi-square in tests/rff/test_lib.py).

  Args:
    key: PRNG key.
    logits: [n] float logits of the query.
    log_q: [n] float log-proposal (e.g. `Sampler.log_probs`); the true class's entry is ignored.
    t: the true class (int scalar).
    m: negatives per replicate (>= 1).
    reps: replicates (a multiple of `chunk`).
    chunk: replicates per vectorized step (default: reps).

  Returns:
    GradientBias(bias, noise_floor, first_order) scalars; a bias below the noise floor is not resolved.
  """
  checks.floating_array("logits", logits, 1)
  checks.floating_array("log_q", log_q, 1, finite=False)
  checks.log_probs("log_q", log_q, logits.shape)
  if checks.is_traced(t):
    raise ValueError("t must be a Python int (static: the true class indexes the replicates), got a traced value")
  if getattr(t, "ndim", None) == 0 and jnp.issubdtype(t.dtype, jnp.integer):
    t = int(t)  # a numpy / jax integer scalar
  t = checks.int_in_range("t", t, 0, logits.shape[0] - 1)
  m = checks.int_in_range("m", m)
  reps = checks.int_in_range("reps", reps)
  chunk = reps if chunk is None else checks.int_in_range("chunk", chunk)
  if reps % chunk:
    raise ValueError(f"reps ({reps}) must be a multiple of chunk ({chunk})")
  return _gradient_bias(key, jnp.asarray(logits), jnp.asarray(log_q), t, m, reps, chunk)


def distribution_metrics(logits: ArrayLike, log_q: ArrayLike, t: ArrayLike) -> DistributionMetrics:
  """KL(p||q), TV(p,q), chi^2(p~||q~) on the negatives, entropy H(p) and top-1 p, per query.

  Args:
    logits: [Q, n] float logits; p = softmax(logits).
    log_q: [Q, n] float log-proposal; each row must be normalised: |logsumexp(log_q)| <= 1e-4 (the samplers'
      `log_probs` are, to ~1e-6; half-precision input is allowed its rounding, see `_norm_tol`).
    t: [Q] int true classes (excluded from the negatives for chi^2).

  Returns:
    DistributionMetrics of [Q] arrays. Under jit a row whose t is out of range or whose log q does not normalise is
    NaN (the validity flag).
  """
  checks.floating_array("logits", logits, 2)
  checks.floating_array("log_q", log_q, 2, finite=False)
  checks.log_probs("log_q", log_q, logits.shape)
  checks.index_array("t", t, logits.shape[-1], 1)
  if t.shape[0] != logits.shape[0]:
    raise ValueError(f"t must have shape ({logits.shape[0]},), got {t.shape}")
  if not checks.is_traced(log_q):
    a = np.asarray(log_q, np.float32).astype(np.float64)
    lse = np.logaddexp.reduce(a, axis=-1)
    eps = float(jnp.finfo(log_q.dtype).eps)
    tol = np.maximum(1e-4, 4.0 * eps * (1.0 + np.where(np.isfinite(a), np.abs(a), 0.0).max(-1)))  # `_norm_tol`
    if not (np.abs(lse) <= tol).all():
      raise ValueError(f"log_q must be normalised per row (|logsumexp(log_q)| <= {float(tol.max()):.2g}), got "
                       f"logsumexp in [{lse.min():.4g}, {lse.max():.4g}]")
  return _distribution_metrics(jnp.asarray(logits), jnp.asarray(log_q), jnp.asarray(t))


def _norm_tol(log_q):
  """Per row: the |logsumexp(log_q)| allowed, max(1e-4, 4 eps (1 + max |log q|)) with eps of log_q's dtype (float32
  samplers reach ~1e-6 at n = 5e4; a bfloat16 log q is only good to ~eps |log q| per entry)."""
  eps = float(jnp.finfo(log_q.dtype).eps)
  big = jnp.max(jnp.where(jnp.isfinite(log_q), jnp.abs(log_q), 0.0), -1).astype(jnp.float32)
  return jnp.maximum(1e-4, 4.0 * eps * (1.0 + big))


@jax.jit
def _distribution_metrics(logits, log_q, t):
  logp = jax.nn.log_softmax(logits, -1)
  p = jnp.exp(logp)
  q = jnp.exp(log_q)
  kl = jnp.sum(jnp.where(p > 0, p * (logp - log_q), 0.0), -1)
  tv = 0.5 * jnp.abs(p - q).sum(-1)
  neg = jnp.arange(logits.shape[-1])[None, :] != t[:, None]
  pt = jnp.where(neg, p, 0.0)
  pt = pt / pt.sum(-1, keepdims=True)
  qt = jnp.where(neg, q, 0.0)
  qt = qt / qt.sum(-1, keepdims=True)
  chi2 = jnp.sum(jnp.where(neg, pt**2 / qt, 0.0), -1) - 1.0
  ent = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), -1)
  lse = jax.nn.logsumexp(log_q.astype(jnp.float32), -1)
  bad = (t < 0) | (t >= logits.shape[-1]) | ~(jnp.abs(lse) <= _norm_tol(log_q))
  return DistributionMetrics(*(jnp.where(bad, jnp.nan, v) for v in (kl, tv, chi2, ent, p.max(-1))))
