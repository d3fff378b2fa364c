r"""Gaussian score model for the kept fraction (paper Sec. 6; spec Sec. 5).

If the logits are i.i.d. $N(\mu, \sigma^2)$ and the keys with $s > \mu + \sigma z$ are kept, then for large $n$ the
kept fraction is $\Phi_c(z)$ and the tail mass is $\Phi(z - \sigma)$ (exponential tilting: under weight $e^s$,
$s \sim N(\mu + \sigma^2, \sigma^2)$). Setting the tail mass to $\epsilon$ gives the rule
$k_\epsilon / n \approx \Phi_c(\sigma + \Phi^{-1}(\epsilon))$. It needs $n \gg e^{\sigma^2}$.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm
from jax.typing import ArrayLike

from asoftmax import checks


@jax.jit
def gaussian_tail_mass(kept_fraction: ArrayLike, sigma: ArrayLike) -> jax.Array:
  r"""Large-$n$ tail mass when the top fraction $\rho$ of i.i.d. $N(\mu,\sigma^2)$ logits is kept:
  $\tau(\rho) = \Phi(\Phi^{-1}(1-\rho) - \sigma)$."""
  rho = jnp.asarray(kept_fraction)
  return norm.cdf(norm.ppf(1.0 - rho) - jnp.asarray(sigma))


@jax.jit
def _keep_fraction(sigma, epsilon):
  return norm.sf(jnp.asarray(sigma) + norm.ppf(jnp.asarray(epsilon)))


def predicted_keep_fraction(sigma: ArrayLike, epsilon: ArrayLike) -> jax.Array:
  r"""$k_\epsilon / n \approx \Phi_c(\sigma + \Phi^{-1}(\epsilon))$ (paper's asymptotic rule; spec Sec. 5).

  Args:
    sigma: float array, logit standard deviation ($\ge 0$).
    epsilon: TV budget in (0, 1), broadcastable against sigma.

  Returns:
    Predicted kept fraction, broadcast shape.

  Example:
    >>> predicted_keep_fraction(2.0, 0.01)  # ~0.628
  """
  checks.epsilon(epsilon)
  return _keep_fraction(sigma, epsilon)


@jax.jit
def row_sigma(logits: ArrayLike, valid: ArrayLike | None = None) -> jax.Array:
  """Standard deviation (population, ddof=0) of each row's valid finite logits, (..., N) -> (...,)."""
  x = jnp.asarray(logits)
  v = x > -jnp.inf
  if valid is not None:
    v = v & jnp.asarray(valid)
  v = jnp.broadcast_to(v, x.shape)
  x0 = jnp.where(v, x, 0.0)
  cnt = jnp.maximum(jnp.sum(v, -1, keepdims=True), 1)
  mu = jnp.sum(x0, -1, keepdims=True) / cnt
  return jnp.sqrt(jnp.sum(jnp.where(v, (x0 - mu) ** 2, 0.0), -1) / cnt[..., 0])


def gaussian_prediction(logits: ArrayLike, valid: ArrayLike | None, epsilon: float) -> jax.Array:
  r"""Predicted $k_\epsilon/n$ per row from the row's own $\hat\sigma$: $\Phi_c(\hat\sigma + \Phi^{-1}(\epsilon))$."""
  checks.epsilon(epsilon)
  checks.logits(logits)
  return _keep_fraction(row_sigma(logits, valid), epsilon)
