r"""Gaussian score model for the kept fraction.

Tzachristas et al., "Certified Top-k Attention via Total Variation", arXiv:2512.07647, Sec. 6.

If the logits are i.i.d. $N(\mu, \sigma^2)$ and the keys with $s > \mu + \sigma z$ are kept, then for large $n$ the
kept fraction is $\Phi_c(z)$ and the tail mass is $\Phi(z - \sigma)$ (exponential tilting: under weight $e^s$,
$s \sim N(\mu + \sigma^2, \sigma^2)$). Setting the tail mass to $\epsilon$ gives the rule
$k_\epsilon / n \approx \Phi_c(\sigma + \Phi^{-1}(\epsilon))$. It needs $n \gg e^{\sigma^2}$.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm
from jax.typing import ArrayLike

from asoftmax import checks
from asoftmax.topk import _core


def _float_arg(name, x):
  x = _core.as_float_array(name, x)
  checks.floating_array(name, x)
  return x


def _shapes(a, b, na, nb):
  try:
    jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
  except ValueError:
    raise ValueError(f"{na} and {nb} must broadcast, got shapes {jnp.shape(a)} and {jnp.shape(b)}") from None


@jax.jit
def _gaussian_tail_mass(rho, sigma):
  rho = jnp.asarray(rho, jnp.float32)  # jax's ndtri has no bfloat16 / float16 kernel
  sigma = jnp.asarray(sigma, jnp.float32)
  out = norm.cdf(norm.ppf(1.0 - rho) - sigma)
  return jnp.where((rho >= 0) & (rho <= 1) & (sigma >= 0) & jnp.isfinite(sigma), out, jnp.nan)


def gaussian_tail_mass(kept_fraction: ArrayLike, sigma: ArrayLike) -> jax.Array:
  r"""Large-$n$ tail mass when the top fraction $\rho$ of i.i.d. $N(\mu,\sigma^2)$ logits is kept:
  $\tau(\rho) = \Phi(\Phi^{-1}(1-\rho) - \sigma)$.

  Args:
    kept_fraction: float array $\rho \in [0, 1]$. sigma: float array $\sigma \ge 0$, broadcastable against it.

  Returns:
    Tail mass, float32, broadcast shape (computed in float32 for every input dtype). Under `jax.jit` an entry
    outside the domain (or NaN) gives NaN (outside jit it raises `ValueError`).

  Example:
    >>> gaussian_tail_mass(jnp.array([0.5, 1.0]), 0.0)  # sigma = 0: the tail mass is the dropped fraction
    Array([0.5, 0. ], dtype=float32)
  """
  kept_fraction = _float_arg("kept_fraction", kept_fraction)
  sigma = _float_arg("sigma", sigma)
  _shapes(kept_fraction, sigma, "kept_fraction", "sigma")
  checks.float_in_range("kept_fraction", kept_fraction, 0.0, 1.0)
  checks.float_in_range("sigma", sigma, 0.0, float("inf"))
  return _gaussian_tail_mass(kept_fraction, sigma)


@jax.jit
def _keep_fraction(sigma, epsilon):
  sigma = jnp.asarray(sigma, jnp.float32)
  epsilon = jnp.asarray(epsilon, jnp.float32)
  out = norm.sf(sigma + norm.ppf(epsilon))
  ok = (sigma >= 0) & jnp.isfinite(sigma) & (epsilon > 0) & (epsilon < 1)
  return jnp.where(ok, out, jnp.nan)


def predicted_keep_fraction(sigma: ArrayLike, epsilon: ArrayLike) -> jax.Array:
  r"""$k_\epsilon / n \approx \Phi_c(\sigma + \Phi^{-1}(\epsilon))$ (the paper's asymptotic rule, Sec. 6).

  Args:
    sigma: float array (or number), logit standard deviation ($\ge 0$).
    epsilon: TV budget in (0, 1), broadcastable against sigma.

  Returns:
    Predicted kept fraction, float32, broadcast shape. Under `jax.jit` a negative or NaN sigma, or an epsilon
    outside (0, 1), gives NaN (outside jit it raises `ValueError`).

  Example:
    >>> round(float(predicted_keep_fraction(2.0, 0.01)), 3)
    0.628
  """
  checks.open_unit("epsilon", epsilon)
  sigma = _float_arg("sigma", sigma)
  checks.float_in_range("sigma", sigma, 0.0, float("inf"))
  _shapes(sigma, epsilon, "sigma", "epsilon")
  return _keep_fraction(sigma, epsilon)


@jax.jit
def _row_sigma(x, valid):
  v = _core.effective_valid(x, valid) & ~jnp.isnan(x)
  x0 = jnp.where(v, x, 0.0)
  cnt = jnp.maximum(jnp.sum(v, -1, keepdims=True), 1)
  mu = jnp.sum(x0, -1, keepdims=True) / cnt
  sd = jnp.sqrt(jnp.sum(jnp.where(v, (x0 - mu) ** 2, 0.0), -1) / cnt[..., 0])
  return jnp.where(_core.bad_rows(x, valid), jnp.nan, sd)


def row_sigma(logits: ArrayLike, valid: ArrayLike | None = None) -> jax.Array:
  """Standard deviation (population, ddof=0) of each row's valid finite logits, (..., N) -> (...,).

  Args:
    logits: (..., N) float logits ($-\\infty$ = masked). valid: optional bool mask broadcastable to `logits`.

  Returns:
    (...,) float. Under `jax.jit` a row with a NaN or +inf logit, or no valid key, is NaN.

  Example:
    >>> row_sigma(jnp.array([[0.0, 2.0, -jnp.inf]]))
    Array([1.], dtype=float32)
  """
  _core.check_logits(logits, valid)
  return _row_sigma(_core.as_float(logits), None if valid is None else jnp.asarray(valid))


def gaussian_prediction(logits: ArrayLike, valid: ArrayLike | None, epsilon: float) -> jax.Array:
  r"""Predicted $k_\epsilon/n$ per row from the row's own $\hat\sigma$: $\Phi_c(\hat\sigma + \Phi^{-1}(\epsilon))$.

  Args:
    logits: (..., N) float logits ($-\infty$ = masked). valid: optional bool mask broadcastable to `logits`.
    epsilon: TV budget in (0, 1).

  Returns:
    (...,) float32 predicted kept fraction. Under `jax.jit` a row with a NaN or +inf logit, or no valid key, is
    NaN.

  Example:
    >>> np.asarray(gaussian_prediction(jnp.array([[0.0, 2.0, 4.0]]), None, 0.01), float).round(3)  # sigma 1.63
    array([0.756])
  """
  checks.open_unit("epsilon", epsilon)
  _core.check_logits(logits, valid)
  return _keep_fraction(_row_sigma(_core.as_float(logits), None if valid is None else jnp.asarray(valid)),
                        epsilon)
