"""Synthetic AdaptiveSoftmax problems (paper Fig. 2, and planted-gap problems for tests).

All generators are pure functions of a PRNG key and return float32 `(A, x)` with `A` (n, d),
`x` (d,). Batched over queries by `jax.vmap` over keys.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from asoftmax import checks


def _sizes(n, d) -> tuple[int, int]:
  """Checks the problem sizes: integers n >= 1 arms, d >= 1 coordinates."""
  return checks.int_in_range("n", n), checks.int_in_range("d", d)


def toy_problem(key: jax.Array, n: int, d: int) -> tuple[jax.Array, jax.Array]:
  """Paper Fig. 2(a) "toy": `A_ij ~ N(0, s^2)` with `s = 1/(sqrt(10) d)`, row 0 shifted by +1/d,
  `x = 1`. So `mu_0 = 1 + O(d^-1/2)` and the other logits are O(d^-1/2): a planted best arm.

  Baharav et al., "Adaptive Sampling for Efficient Softmax Approximation" (NeurIPS 2024), Fig. 2, write
  the noise as N(0, 1/(sqrt(10) d)); we read the second argument as the standard deviation (numpy's `scale`),
  which is what makes row 0 a clear winner.
  """
  n, d = _sizes(n, d)
  A = jax.random.normal(key, (n, d)) / (jnp.sqrt(10.0) * d)
  A = A.at[0].add(1.0 / d)
  return A, jnp.ones((d,), jnp.float32)


def gaussian_problem(key: jax.Array, n: int, d: int) -> tuple[jax.Array, jax.Array]:
  """Paper Fig. 2(b) "gaussian": `A_ij ~ N(0, 1/d)` (variance 1/d), `x = sign(A_0)`.

  Then `mu_0 = sum_j |A_0j| ~ sqrt(2d/pi)` stands out while the other logits are ~N(0, 1).
  """
  n, d = _sizes(n, d)
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
  n, d = _sizes(n, d)
  k = checks.int_in_range("k", k, 1, n)
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


def problem_with_logits(key: jax.Array, mu: jax.Array, d: int, *, noise: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """A random `(A, x)` whose exact logits `A x` equal `mu` (n,): `x ~ N(0, I_d)`, `A = noise * N(0, 1/d)`
  moved along `x`.

  Returns:
    (A, x): (n, d) float32 and (d,) float32.
  """
  kx, ka = jax.random.split(key)
  x = jax.random.normal(kx, (d,))
  A = noise * jax.random.normal(ka, (mu.shape[0], d)) / jnp.sqrt(d)
  A = A + jnp.outer(mu - A @ x, x) / jnp.dot(x, x)
  return A, x


_T_CHUNK = 1 << 22  # above this many entries `_student_t` uses the polar method in row blocks


def _polar_t(key, df, shape):
  """Student-t(df) draws by Bailey's polar method (Bailey 1994, "Polar generation of random variates with the
  t-distribution", Math. Comp. 62(206)): for (U, V) uniform on the unit disc, W = U^2 + V^2,
  `T = U sqrt(df (W^(-2/df) - 1) / W)` is exactly t(df). The pairs outside the disc (1 - pi/4 of them) are
  rejected; 1.5x the needed pairs are drawn and the first accepted kept (a shortfall, probability below
  e^-1000 for blocks of 1e5 or more, would repeat accepted draws)."""
  size = math.prod(shape)
  m = int(1.5 * size) + 64
  uv = jax.random.uniform(key, (2, m), minval=-1.0, maxval=1.0)
  w = uv[0] ** 2 + uv[1] ** 2
  ok = (w < 1.0) & (w > 0.0)
  idx = jnp.nonzero(ok, size=size, fill_value=jnp.argmax(ok))[0]
  u, w = uv[0][idx], w[idx]
  return (u * jnp.sqrt(df * (w ** (-2.0 / df) - 1.0) / w)).reshape(shape)


def _student_t(key, df, n, d):
  """(n, d) Student-t(df) draws: `jax.random.t` up to `_T_CHUNK` entries; above, the polar method in row blocks
  (block b from `fold_in(key, b)`): `jax.random.t`'s gamma rejection sampler took about 5 us per entry on CPU
  and held several (n, d) buffers (1e8 entries: ~16 GB, killed)."""
  if n * d <= _T_CHUNK:
    return jax.random.t(key, df, (n, d))
  rows = max(1, _T_CHUNK // d)
  nb = -(-n // rows)
  blocks = jax.jit(lambda k: jax.lax.map(lambda b: _polar_t(jax.random.fold_in(k, b), df, (rows, d)),
                                         jnp.arange(nb)))(key)
  return blocks.reshape(nb * rows, d)[:n]


def heavy_tailed_problem(key: jax.Array, n: int, d: int, *, df: float = 2.5, planted_gap: float | None = None
                         ) -> tuple[jax.Array, jax.Array]:
  """Student-t(df) entries in `A` (scaled by 1/sqrt(d)) and in `x`: heavy-tailed products `A_ij x_j`.

  With `planted_gap`, a random row gets `planted_gap` added to its logit along `x` (a planted top-1).

  Returns:
    (A, x): (n, d) and (d,) float32.

  Example (shapes only: `jax.eval_shape` traces without compiling):
    >>> make = lambda key: heavy_tailed_problem(key, 10, 16, df=3.0, planted_gap=1.0)
    >>> A, x = jax.eval_shape(make, jax.random.key(0))
    >>> A.shape, x.shape
    ((10, 16), (16,))
  """
  n, d = _sizes(n, d)
  df = checks.positive("df", df)
  ka, kx, kp = jax.random.split(key, 3)
  A = _student_t(ka, df, n, d) / jnp.sqrt(d)
  x = jax.random.t(kx, df, (d,))
  if planted_gap is not None:
    mu = A @ x
    i = jax.random.randint(kp, (), 0, n)
    A = A.at[i].add((jnp.max(mu) - mu[i] + planted_gap) * x / jnp.dot(x, x))
  return A, x


def dominant_coordinate_problem(key: jax.Array, n: int, d: int, *, factor: float = 200.0, k: int = 1
                                ) -> tuple[jax.Array, jax.Array]:
  """A planted-gap problem whose query has one random coordinate multiplied by `factor`.

  The logits change with it (they are whatever `A x` gives); one product per arm dominates its sum.
  """
  k1, k2 = jax.random.split(key)
  A, x = planted_problem(k1, n, d, k=k)
  j = jax.random.randint(k2, (), 0, d)
  return A, x.at[j].multiply(factor)


def sparse_query_problem(key: jax.Array, n: int, d: int, *, density: float = 0.1, k: int = 1
                         ) -> tuple[jax.Array, jax.Array]:
  """A planted-gap problem whose query keeps a random `density` fraction of its coordinates (rest 0).

  Returns:
    (A, x): (n, d) and (d,) float32 (`planted_problem`'s, with x sparsified).

  Example (shapes only: `jax.eval_shape` traces without compiling):
    >>> A, x = jax.eval_shape(lambda key: sparse_query_problem(key, 10, 200, density=0.1), jax.random.key(0))
    >>> A.shape, x.shape
    ((10, 200), (200,))
  """
  density = checks.positive("density", density)
  k1, k2 = jax.random.split(key)
  A, x = planted_problem(k1, n, d, k=k)
  keep = jax.random.uniform(k2, (d,)) < density
  return A, jnp.where(keep, x, 0.0)


def near_tie_problem(key: jax.Array, n: int, d: int, *, k: int = 1, tie_gap: float = 0.01, gap: float = 1.0
                     ) -> tuple[jax.Array, jax.Array]:
  """Logits with a near tie at the k-th place: `mu_(k) - mu_(k+1) = tie_gap`, the rest `gap` below.

  The top k-1 logits sit `gap` above the k-th; the (k+1)-th sits `tie_gap` below it; the others are
  N(0, 1) at least `gap` below the (k+1)-th.
  """
  km, kp, kprob = jax.random.split(key, 3)
  others = jax.random.normal(km, (n,))
  base = jnp.max(others) + gap
  # ranks 0..k-2: above; rank k-1: base; rank k: base - tie_gap
  top = base + gap * (1.0 + jnp.arange(k - 1, dtype=jnp.float32))
  special = jnp.concatenate([top, jnp.stack([base, base - tie_gap])])
  perm = jax.random.permutation(kp, n)
  mu = others.at[perm[: k + 1]].set(special)
  return problem_with_logits(kprob, mu, d)


class Family(NamedTuple):
  """A family of problems for statistical tests: a generator `make(key) -> (A, x)` and call options."""

  make: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
  k: int = 1
  options: tuple[tuple[str, object], ...] = ()


def families(n: int = 100, d: int = 1000) -> dict[str, Family]:
  """The input families AdaptiveSoftmax's guarantee is tested on (friendly and hard), at size (n, d).

  `n_much_larger_than_d` is always 50,000 x 64.

  Returns:
    {name: Family(make, k, options)}; `make(key)` returns (A (n, d), x (d,)).

  Example (shapes only: `jax.eval_shape` traces without compiling):
    >>> fam = families(10, 32)["near_tie_k3"]
    >>> A, x = jax.eval_shape(fam.make, jax.random.key(0))
    >>> A.shape, x.shape, fam.k
    ((10, 32), (32,), 3)
  """
  n, d = _sizes(n, d)
  return {
      "gaussian_planted": Family(lambda key: planted_problem(key, n, d)),
      "heavy_tailed": Family(lambda key: heavy_tailed_problem(key, n, d, df=2.5)),
      "student_t3_planted": Family(lambda key: heavy_tailed_problem(key, n, d, df=3.0, planted_gap=1.0)),
      "dominant_coordinate": Family(lambda key: dominant_coordinate_problem(key, n, d)),
      "sparse_query": Family(lambda key: sparse_query_problem(key, n, d, density=0.1)),
      "near_tie_k3": Family(lambda key: near_tie_problem(key, n, d, k=3), k=3),
      "n_much_larger_than_d": Family(lambda key: planted_problem(key, 50_000, 64)),
      "planted_k5": Family(lambda key: planted_problem(key, n, d, k=5), k=5),
      "warmup_1": Family(lambda key: planted_problem(key, n, d), options=(("warmup", 1),)),
  }


def llm_head_problem(key: jax.Array, n: int, d: int, n_queries: int, *, top1: tuple[float, float] = (0.2, 0.6),
                     logit_std: float = 3.0, x_spread: float = 0.8, massive: tuple[float, float] = (0.001, 25.0),
                     col_spread: float = 0.3, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  r"""An LLM-like output head `A` (n, d) and queries `X` (q, d) whose top-1 probability is prescribed.

  Shaped after SmolLM2-135M's head and final-norm hidden states (measured on WikiText-2 windows: a few
  hidden dimensions 10-27x the median |x_j|, column RMS of `A` log-normal with sd 0.29, logits with sd
  3.1 over the vocabulary, median top-1 probability 0.32-0.375):

  * `A_ij = s_j N(0, 1) / sqrt(d)`, column scales `s_j = exp(col_spread N(0, 1))`, `mean(s^2) = 1`;
  * hidden dimensions with scales `r_j = exp(x_spread N(0, 1))`, a fraction `massive[0]` of them (at least
    2) multiplied by `massive[1]` ("massive activations"), shared by all queries;
  * query q is `x_q = c (r * g_q) + a_q A_t / |A_t|^2`, `g_q ~ N(0, I_d)`, t a random row: the
    background logits `A_i x_q` have sd `logit_std` (c normalizes), and the target's boost `a_q` is
    solved by bisection so that `softmax(A x_q)_t` equals `p_q ~ U(top1)` exactly, so the median top-1
    probability is the midpoint of `top1` (0.4 by default).

  Returns:
    (A, X): (n, d) and (n_queries, d) arrays of `dtype` (the softmax is calibrated in float32).

  Example:
    >>> A, X = llm_head_problem(jax.random.key(0), 1000, 64, 8)
    >>> A.shape, X.shape
    ((1000, 64), (8, 64))
  """
  n, d = _sizes(n, d)
  n_queries = checks.int_in_range("n_queries", n_queries)
  logit_std = checks.positive("logit_std", logit_std)
  ks, ka, kg, kt, kp, kr, km = jax.random.split(key, 7)
  s = jnp.exp(col_spread * jax.random.normal(ks, (d,)))
  s = s / jnp.sqrt(jnp.mean(s * s))
  A = jax.random.normal(ka, (n, d)) * (s / jnp.sqrt(d))
  r = jnp.exp(x_spread * jax.random.normal(kr, (d,)))
  n_massive = max(2, int(round(massive[0] * d)))
  r = r.at[jax.random.permutation(km, d)[:n_massive]].multiply(massive[1])
  c = logit_std / jnp.sqrt(jnp.mean((s * r) ** 2))  # sd of A_i . (c r g) is logit_std
  G = c * r * jax.random.normal(kg, (n_queries, d))
  t = jax.random.randint(kt, (n_queries,), 0, n)
  p = jax.random.uniform(kp, (n_queries,), minval=top1[0], maxval=top1[1])
  U = A[t] / jnp.sum(A[t] * A[t], axis=1, keepdims=True)  # (q, d): A_t . u = 1
  C = G @ A.T  # (q, n) background logits
  V = U @ A.T  # (q, n) effect of one unit of boost

  def solve(c, v, t, p):
    def log_pt(a):
      mu = c + a * v
      return mu[t] - jax.nn.logsumexp(mu)

    def step(_, lohi):
      lo, hi = lohi
      mid = 0.5 * (lo + hi)
      up = log_pt(mid) < jnp.log(p)
      return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

    lo, hi = jax.lax.fori_loop(0, 60, step, (jnp.float32(-50.0), jnp.float32(100.0)))
    return 0.5 * (lo + hi)

  a = jax.vmap(solve)(C, V, t, p)
  X = G + a[:, None] * U
  return A.astype(dtype), X.astype(dtype)
