"""Synthetic AdaptiveSoftmax problems (paper Fig. 2, and planted-gap problems for tests).

All generators are pure functions of a PRNG key and return float32 `(A, x)` with `A` (n, d),
`x` (d,). Batched over queries by `jax.vmap` over keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def toy_problem(key: jax.Array, n: int, d: int) -> tuple[jax.Array, jax.Array]:
  """Paper Fig. 2(a) "toy": `A_ij ~ N(0, s^2)` with `s = 1/(sqrt(10) d)`, row 0 shifted by +1/d,
  `x = 1`. So `mu_0 = 1 + O(d^-1/2)` and the other logits are O(d^-1/2): a planted best arm.

  The spec writes the noise as N(0, 1/(sqrt(10) d)); we read the second argument as the
  standard deviation (numpy's `scale`), which is what makes row 0 a clear winner.
  """
  A = jax.random.normal(key, (n, d)) / (jnp.sqrt(10.0) * d)
  A = A.at[0].add(1.0 / d)
  return A, jnp.ones((d,), jnp.float32)


def gaussian_problem(key: jax.Array, n: int, d: int) -> tuple[jax.Array, jax.Array]:
  """Paper Fig. 2(b) "gaussian": `A_ij ~ N(0, 1/d)` (variance 1/d), `x = sign(A_0)`.

  Then `mu_0 = sum_j |A_0j| ~ sqrt(2d/pi)` stands out while the other logits are ~N(0, 1).
  """
  A = jax.random.normal(key, (n, d)) / jnp.sqrt(d)
  return A, jnp.sign(A[0])


def planted_problem(
    key: jax.Array, n: int, d: int, *, k: int = 1, gap: float = 1.0, spread: float = 1.0, noise: float = 1.0
) -> tuple[jax.Array, jax.Array]:
  """A random problem whose exact logits `mu = A x` are prescribed, with a planted top-k gap.

  `x ~ N(0, I_d)`, `A = noise * N(0, 1/d)` entries, then each row is moved along `x` so that
  `A x = mu`, where the non-top logits are `spread * N(0, 1)` and the top-k logits sit at
  `max(others) + gap + spread * U(0, 1)`.

  Returns:
    (A, x): (n, d) float32 and (d,) float32.
  """
  kx, ka, km, kt = jax.random.split(key, 4)
  x = jax.random.normal(kx, (d,))
  A = noise * jax.random.normal(ka, (n, d)) / jnp.sqrt(d)
  others = spread * jax.random.normal(km, (n,))
  top = jnp.max(others) + gap + spread * jax.random.uniform(kt, (n,))
  perm = jax.random.permutation(jax.random.fold_in(key, 7), n)
  is_top = jnp.zeros((n,), bool).at[perm[:k]].set(True)
  mu = jnp.where(is_top, top, others)
  A = A + jnp.outer(mu - A @ x, x) / jnp.dot(x, x)
  return A, x
