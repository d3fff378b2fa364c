r"""Random Fourier features for the softmax (exponential) kernel on the unit sphere.

For unit vectors, $e^{\tau h^\top c} = e^{\tau} e^{-\tau \|h-c\|^2/2}$, so the softmax over classes is a Gaussian
kernel. With $w_1..w_D \sim N(0, \nu I_d)$ drawn once,

  $\phi(x) = D^{-1/2}[\cos(Wx), \sin(Wx)] \in R^{2D}$,  $E[\phi(x)^\top\phi(y)] = e^{-\nu\|x-y\|^2/2} =: K_\nu$.

**Parameterisation of nu.** Here nu is a precision (an inverse temperature on the sphere): $K_\nu(h, c) =
e^{-\nu} e^{\nu h^\top c}$, so nu = tau makes E[q] the softmax itself and nu < tau a flatter softmax. Other
code uses the bandwidth form $e^{-\|x-y\|^2/(2\sigma^2)}$ with $w \sim N(0, \sigma^{-2} I)$ and calls
$\sigma^2$ "nu" (the MIDX reimplementation draws w with std $\sqrt{1/\nu}$): its "nu = 4" is our nu = 0.25.
Which form the paper's reported "nu" (Rawat et al., NeurIPS 2019, Sec. 4) uses is unverified; sweep both ends.

**Error.** Each estimate is an average of D terms $\cos(w_i^\top(x-y))$, unbiased for K with
$\mathrm{Var} = (1 + K^4)/2 - K^2 = (1-K^2)^2/2$ per term, so the standard deviation of the estimate is

  $\mathrm{sd}[\phi(x)^\top\phi(y)] = (1 - K^2)/\sqrt{2D}$.

The error is additive, about $1/\sqrt{2D}$ whatever nu is (for K << 1), while a class's kernel value is
$e^{\nu(\cos\theta - 1)}$: classes whose K is below that noise are not resolved, and estimates can be
negative (see `tree.py` for what the sampler does with them).

Reference: Rawat et al., "Sampled Softmax with Random Fourier Features", NeurIPS 2019 (arXiv:1907.10747),
Sec. 3 (feature map); Rahimi & Recht 2007. The choice nu < tau (a flatter, defensive proposal) follows
Rawat et al., "Sampled Softmax with Random Fourier Features", NeurIPS 2019, Sec. 4 (recalled, not re-read offline).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from asoftmax import checks


def init_rff(key: jax.Array, d: int, num_features: int, nu: float) -> jax.Array:
  r"""Draws the fixed RFF projection $W \in R^{D \times d}$, $W_{ij} \sim N(0, \nu)$.

  Args:
    key: PRNG key.
    d: input dimension (>= 1).
    num_features: D, the number of frequencies (>= 1); the feature vector has 2D entries.
    nu: kernel precision (> 0); the kernel is $e^{-\nu\|x-y\|^2/2} = e^{-\nu} e^{\nu x^\top y}$ on the sphere
      (the bandwidth form $\sigma^2$ used elsewhere is 1/nu; see the module docstring).

  Returns:
    W: float32 [D, d].

  Example:
    >>> W = init_rff(jax.random.key(0), d=64, num_features=256, nu=4.0)
  """
  d = checks.int_in_range("d", d)
  D = checks.int_in_range("num_features (D)", num_features)
  nu = checks.positive("nu", nu)
  return jax.random.normal(key, (D, d), jnp.float32) * jnp.sqrt(jnp.float32(nu))


@jax.jit
def rff_map(x, W):
  """`rff_features` without the argument checks (x [..., d], W [D, d] -> [..., 2D]), for the samplers' traced paths.

  Package-internal (not in `asoftmax.rff.__all__`): the class vectors it maps may be zero rows that `rff_features`
  would reject as not unit-norm.
  """
  z = x @ W.T
  return jnp.concatenate([jnp.cos(z), jnp.sin(z)], -1) / jnp.sqrt(jnp.float32(W.shape[0]))


def rff_features(x: ArrayLike, W: ArrayLike) -> jax.Array:
  r"""$\phi(x) = D^{-1/2}[\cos(Wx), \sin(Wx)]$; $\|\phi(x)\| = 1$ exactly.

  Args:
    x: [..., d] float, unit-norm rows.
    W: [D, d] from `init_rff`.

  Returns:
    [..., 2D] float32.
  """
  checks.floating_array("W", W, 2)
  checks.unit_rows("x", x)
  checks.same_dim("x", x, W.shape[1], "W")
  return rff_map(jnp.asarray(x, jnp.float32), jnp.asarray(W, jnp.float32))


def rff_kernel(x: ArrayLike, y: ArrayLike, W: ArrayLike) -> jax.Array:
  r"""The RFF estimate $\phi(x)^\top\phi(y) = D^{-1}\sum_i \cos(w_i^\top(x-y))$ for [..., d] pairs.

  Unbiased for $K_\nu$ with standard deviation $(1 - K_\nu^2)/\sqrt{2D}$; can be < 0.
  """
  checks.unit_rows("y", y)
  checks.same_dim("y", y, x.shape[-1], "x")
  return jnp.sum(rff_features(x, W) * rff_features(y, W), -1)


def exact_kernel(x: ArrayLike, y: ArrayLike, nu: float) -> jax.Array:
  r"""$K_\nu(x, y) = e^{-\nu\|x-y\|^2/2}$, the kernel the RFF estimate converges to (x, y: finite [..., d])."""
  checks.floating_array("x", x)
  checks.floating_array("y", y)
  checks.same_dim("y", y, x.shape[-1], "x")
  nu = checks.positive("nu", nu)
  x = jnp.asarray(x)
  y = jnp.asarray(y)
  return jnp.exp(-0.5 * nu * jnp.sum((x - y) ** 2, -1))


def quadratic_features(x: ArrayLike, alpha: float) -> jax.Array:
  r"""Blanc & Rendle (ICML 2018) quadratic kernel map $\phi(u) = [\sqrt\alpha\,\mathrm{vec}(uu^\top), 1]$.

  $\phi(h)^\top\phi(c) = \alpha (h^\top c)^2 + 1 > 0$. Args: x [..., d] finite floating; alpha > 0.
  Returns [..., d*d + 1].
  """
  checks.floating_array("x", x)
  return quadratic_map(x, checks.positive("alpha", alpha))


@jax.jit
def quadratic_map(x, alpha):
  """`quadratic_features` without the argument checks (package-internal, for the samplers)."""
  x = jnp.asarray(x, jnp.float32)
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], -1)
  one = jnp.ones(x.shape[:-1] + (1,), jnp.float32)
  return jnp.concatenate([jnp.sqrt(alpha) * outer, one], -1)
