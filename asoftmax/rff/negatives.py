r"""Drawing the negatives for a step: per query or batch-shared, with or without replacement.

`draw_negatives(sampler, state, key, h, m, shared=..., unique=...)` wraps any `samplers.Sampler` and returns the
ids with their log proposal probability and their log **expected count** (what the loss divides by):

* with replacement (`unique=False`): m i.i.d. draws, $E_s = m q_s$ (the paper's form);
* without replacement (`unique=True`): TensorFlow's rule (`RangeSampler::SampleBatchGetExpectedCountAvoid`):
  draw from q one try at a time, keep a try only if its class is new, stop once m distinct classes are kept;
  with T = the number of tries this took, $E_s = 1 - (1 - q_s)^T$ (`ExpectedCountHelper`, computed as
  $-\mathrm{expm1}(T\,\mathrm{log1p}(-q_s))$). This is TF's approximation to the inclusion probability, not
  the exact one, so the Z estimate is not exactly unbiased; it is what TF's `sampled_softmax_loss` uses.
  The true class's expected count (TF subtracts its log from the true logit) is
  `expected_count(log_q_true, num_tries, m, unique)`.

Tries are drawn in chunks of `chunk` (vectorised over the chunk) inside a `lax.while_loop`; within a chunk a
try counts only if its class is not already kept and not equal to an earlier try of the chunk, so the kept
set and T are exactly those of the one-at-a-time loop on the same stream of tries (`unique_from_stream`).
`shared=True` draws one set for the whole batch (ids [m]); per query, each query runs its own loop (vmapped).
The loop is bounded (`max_tries`, and it stops at the first flagged try): a set it cannot complete -- fewer than m
classes with q > 0, or a NaN query under `jax.jit` -- comes back flagged (log q NaN), never as an endless loop.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from asoftmax import checks


class Negatives(NamedTuple):
  """ids [B, m] or [m] int32; log_q, log_expected same shape; num_tries [B] or [] int32 (m with replacement)."""

  ids: jax.Array
  log_q: jax.Array
  log_expected: jax.Array
  num_tries: jax.Array


def expected_count(log_q: jax.Array, num_tries: jax.Array, m: int, unique: bool) -> jax.Array:
  r"""Log expected count of a class with log proposal probability `log_q` (TF's `ExpectedCountHelper`).

  With replacement: $\log(m q)$. Without: $\log(1 - (1-q)^T)$, T = `num_tries` (broadcast against log_q's
  leading axis: [B] against [B, m], or a scalar), except $\log(m q)$ when T = m (TF's shortcut).
  `log_q` must be a floating array of log probabilities (<= 0, -inf allowed; no NaN when concrete); m >= 1.
  """
  checks.floating_array("log_q", log_q, None, finite=False)
  if not checks.is_traced(log_q):
    a = np.asarray(log_q, np.float32)
    if np.isnan(a).any() or (a > 0).any():
      raise ValueError("log_q must hold log probabilities (<= 0, no NaN)")
  m = checks.int_in_range("m", m)
  log_q = jnp.asarray(log_q)
  if not checks.boolean("unique", unique):
    return log_q + jnp.log(float(m))
  T = jnp.asarray(num_tries, jnp.float32)
  T = T.reshape(T.shape + (1,) * (log_q.ndim - T.ndim))
  q = jnp.exp(log_q)
  e = jnp.log(-jnp.expm1(T * jnp.log1p(-jnp.minimum(q, 1.0 - 1e-7))))
  return jnp.where(T == m, log_q + jnp.log(float(m)), e)  # TF's shortcut when no try was rejected


def unique_from_stream(tries: jax.Array, try_log_q: jax.Array, m: int, kept: jax.Array | None = None,
                       kept_log_q: jax.Array | None = None, count: jax.Array | int = 0):
  """Consumes one chunk of tries [K] of the one-at-a-time rejection loop.

  Args:
    tries: [K] int32 class ids, in the order drawn. try_log_q: [K] their log q.
    m: number of distinct classes wanted.
    kept, kept_log_q: [m] classes kept so far (first `count` valid; the rest -1) and their log q.
    count: how many are kept so far.

  Returns:
    (kept [m], kept_log_q [m], count, used) where `used` is the number of tries of this chunk the loop
    consumed: K if the set is still incomplete, else the 1-based position of the try that completed it.
  """
  K = tries.shape[0]
  if kept is None:
    kept = jnp.full((m,), -1, jnp.int32)
    kept_log_q = jnp.zeros((m,), jnp.float32)
  seen = jnp.any(tries[:, None] == kept[None, :], 1)
  earlier = jnp.tril(tries[:, None] == tries[None, :], -1).any(1)
  new = ~seen & ~earlier
  rank = count + jnp.cumsum(new.astype(jnp.int32))  # 1-based rank among kept after this try
  take = new & (rank <= m)
  slot = jnp.where(take, rank - 1, m)
  kept = kept.at[slot].set(tries.astype(jnp.int32), mode="drop")
  kept_log_q = kept_log_q.at[slot].set(try_log_q.astype(jnp.float32), mode="drop")
  done = rank[-1] >= m
  used = jnp.where(done, jnp.argmax(rank >= m) + 1, K)
  return kept, kept_log_q, jnp.minimum(rank[-1], m), used.astype(jnp.int32)


def _unique_loop(draw, key, m, chunk, max_tries, n):
  """Runs the rejection loop for one stream; draw(key, K) -> (ids [K], log_q [K]).

  The loop is bounded: it stops after `max_tries` tries (checked once per chunk) or at the first flagged try (log q
  NaN: a NaN / inf query, see `samplers._flag`). A set that is then still incomplete, or built from flagged tries,
  is flagged: log q NaN for the whole set, its empty slots hold class n - 1 (in range).
  """

  def cond(c):
    kept, klq, count, tries, key, bad = c
    return (count < m) & (tries < max_tries) & ~bad

  def body(c):
    kept, klq, count, tries, key, bad = c
    key, sub = jax.random.split(key)
    ids, lq = draw(sub, chunk)
    kept, klq, count, used = unique_from_stream(ids, lq, m, kept, klq, count)
    return kept, klq, count, tries + used, key, bad | jnp.any(jnp.isnan(lq))

  init = (jnp.full((m,), -1, jnp.int32), jnp.zeros((m,), jnp.float32), jnp.int32(0), jnp.int32(0), key,
          jnp.array(False))
  kept, klq, count, tries, _, bad = jax.lax.while_loop(cond, body, init)
  ok = (count >= m) & ~bad
  kept = jnp.where(kept >= 0, kept, n - 1).astype(jnp.int32)
  return kept, jnp.where(ok, klq, jnp.nan), tries


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 8, 9))
def _draw(sampler, state, key, h, m, shared, unique, chunk, max_tries, n):
  B = h.shape[0]
  if not unique:
    ids, lq = sampler.sample(state, key, h, m, shared=shared)
    tries = jnp.full(() if shared else (B,), m, jnp.int32)
    return Negatives(ids, lq, expected_count(lq, tries, m, False), tries)
  if shared:
    ids, lq, tries = _unique_loop(lambda k, K: sampler.sample(state, k, h, K, shared=True), key, m, chunk,
                                  max_tries, n)
  else:
    def one(k, hb):
      return _unique_loop(lambda kk, K: tuple(x[0] for x in sampler.sample(state, kk, hb[None], K)), k, m, chunk,
                          max_tries, n)
    ids, lq, tries = jax.vmap(one)(jax.random.split(key, B), h)
  return Negatives(ids, lq, expected_count(lq, tries, m, True), tries)


def _sampler_classes(sampler, state, h) -> int:
  """n, the number of classes the sampler draws from (the shape of its shared proposal; nothing is computed)."""
  return int(jax.eval_shape(functools.partial(sampler.log_probs, shared=True), state, h).shape[-1])


def _positive_classes(state) -> int | None:
  """For a query-independent proposal with concrete state (uniform, unigram): the classes with q > 0; else None."""
  log_q = getattr(state, "log_q", None)
  if log_q is None or getattr(state, "cdf", None) is None or checks.is_traced(log_q):
    return None
  return int(np.isfinite(np.asarray(log_q, np.float32)).sum())


def draw_negatives(sampler, state, key: jax.Array, h: jax.Array, m: int, *, shared: bool = False,
                   unique: bool = False, chunk: int | None = None, num_classes: int | None = None,
                   max_tries: int | None = None) -> Negatives:
  """Draws m negatives per query (or one set for the batch) with or without replacement.

  Args:
    sampler: a `samplers.Sampler`. state: its state. key: PRNG key.
    h: [B, d] unit-norm queries.
    m: classes per set (>= 1); with `unique=True` m must not exceed the number of classes (n, read from the
      sampler's state) nor, for a query-independent proposal (uniform, unigram), the classes with q > 0.
    shared: one set of m classes for the whole batch (ids [m]) instead of one per query ([B, m]). A bool.
    unique: without replacement (TF's rejection rule and expected counts, see module docstring). A bool.
    chunk: tries drawn per loop iteration when unique (default 2m).
    num_classes: optional n; if given it must equal the sampler's number of classes.
    max_tries: the rejection loop's bound when unique (default max(1000 m, 10,000) tries; checked once per chunk).

  Returns:
    `Negatives(ids, log_q, log_expected, num_tries)`; pass `log_expected` to `loss.corrected_sampled_loss`.
    With `unique=True` a set that could not be completed -- the loop hit `max_tries` (e.g. fewer than m classes
    have q > 0 under a traced state) or a try was flagged (a NaN / inf query under `jax.jit`) -- is flagged:
    `log_q` and `log_expected` NaN for the whole set, ids in range (empty slots hold class n - 1).

  Raises:
    ValueError: m, chunk, max_tries not positive integers; shared / unique not bools; h not unit rows (concrete);
      with `unique=True`, m > n or (concrete state) m > the classes with q > 0; num_classes != n.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from asoftmax.rff import corrected_sampled_loss, normalize, unigram_sampler
    >>> s = unigram_sampler(np.arange(1.0, 51.0))
    >>> C = normalize(jax.random.normal(jax.random.key(0), (50, 8)))
    >>> h, t = C[:4], jnp.arange(4)
    >>> neg = draw_negatives(s, s.init(), jax.random.key(1), h, 16, shared=True, unique=True, num_classes=50)
    >>> neg.ids.shape, len(set(neg.ids.tolist()))
    ((16,), 16)
    >>> corrected_sampled_loss(h, C, t, neg.ids, neg.log_expected, 5.0).shape
    (4,)
  """
  m = checks.int_in_range("m", m)
  checks.unit_rows("h", h, 2)
  shared = checks.boolean("shared", shared)
  unique = checks.boolean("unique", unique)
  chunk = 2 * m if chunk is None else checks.int_in_range("chunk", chunk)
  max_tries = max(1000 * m, 10_000) if max_tries is None else checks.int_in_range("max_tries", max_tries)
  n = _sampler_classes(sampler, state, h)
  if num_classes is not None and checks.int_in_range("num_classes", num_classes) != n:
    raise ValueError(f"num_classes = {num_classes} but the sampler draws from n = {n} classes")
  if unique:
    if m > n:
      raise ValueError(f"m = {m} distinct classes requested but the sampler has only n = {n} classes")
    pos = _positive_classes(state)
    if pos is not None and m > pos:
      raise ValueError(f"m = {m} distinct classes requested but the proposal gives q > 0 to only {pos} of {n} "
                       "classes (zero counts with smoothing = 0)")
  return _draw(sampler, state, key, h, m, shared, unique, chunk, max_tries, n)

