r"""Certified top-k by progressive scoring in a fixed orthogonal basis: a search that saves multiply-adds.

Beyond the paper (issue 15). The cell search (`search.py`, paper Algorithm 2) bounds whole cells by
$q\cdot c + \|q\| r$ and, on real attention, ends up scoring almost every key. Here every key is bounded on its
own, cheaply, and refined only while it matters:

* **Basis.** Per head, a fixed orthogonal matrix $R$ and key offset $\mu$ fitted on held-out text
  (`fit_basis`): $\tilde q = R^\top q$, $\tilde k = R^\top (k - \mu)$. Then
  $q\cdot k = \tilde q\cdot\tilde k + q\cdot\mu$, and $q\cdot\mu$ is the same for every key of a query, so softmax
  (and every tail mass) is unchanged. Both maps fold into the projections: $W_q R$, $W_k R$, bias
  $(b_k - \mu)R$. $R$ holds the eigenvectors of $E[\tilde k\tilde k^\top]/E\|\tilde k\|^2 + E[qq^\top]/E\|q\|^2$,
  so the leading coordinates carry most of both.
* **Bounds.** The coordinates are split into blocks at `stages` (e.g. 8, 16, 32 of d = 32). After the first
  $r$ coordinates, $\tilde s^{(r)} = \sum_{j<r}\tilde q_j\tilde k_j$ and (Cauchy-Schwarz per later block $b$)
  $|\tilde s - \tilde s^{(r)}| \le \sum_{b} \|\tilde q_b\|\|\tilde k_b\|$; the key block norms are computed once
  per key when it enters the cache (`prepare_keys`).
* **Search** (per query; best-first refinement, evaluated as a threshold): refining the key with the largest
  current upper bound first, until the certificate holds, stops in the state where every key has been refined
  to the first stage whose upper bound falls below a threshold $t$ (or fully scored). The largest $t$ whose state
  certifies $\hat\tau(t) = R/(S + R) \le$ `search_fraction` $\cdot\epsilon$ is found by bisection
  (`lax.fori_loop`), with $R$ = the sum of $e^{\mathrm{upper}}$ over keys not fully scored and $S$ = the sum of
  $e^{\mathrm{lower}}$ over fully scored keys. The fully scored keys are then pruned lowest first while the
  certificate stays $\le \epsilon/(1+m)^2$ (dropped keys count in the tail); the head $H$ is what remains.
* **Certificate** (logit-only, blockwise eq. 4.4 with an exact head), recomputed in log space for the final state:
  $\mathrm{TV}(P, \hat P_H) = \tau_H \le \hat\tau = U_T / (L_H + U_T) \le \epsilon$ with $U_T$ the upper bound
  on the tail mass and $L_H$ the lower bound on the head mass.

Float32 safety: every bound carries a guard $g = 2(d+4)u\,\|q\|\,\max_i\nu_i\,|\mathrm{scale}|$ (u = unit
roundoff, $\nu_i = \|k_i\| + \|\tilde k_i\| + \|\mu\|$), which covers the rounding of the rotation, of our dot products and of
the reference logits $\mathrm{fl}(q\cdot k_i)$ the realised TV is measured on, so it grows with the magnitudes.

Cost model (multiply-adds per query, reported in `ProgressiveResult.macs`): $d$ for the query block norms; per key:
the coordinates it reaches, plus one product $\|\tilde q_b\|\|\tilde k_b\|$ per norm block after the first stage,
computed once when the key gets its first bound (accumulated from the last block, so the bound of every later stage
is one of the partial sums). Dense scoring costs $n d$. Sorting, comparisons and the bisection's exponentials and sums are not multiply-adds and
are not counted (they are O(n) per query per bisection step, ~40 steps).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from asoftmax import checks
from asoftmax.topk import _core


class Basis(NamedTuple):
  """Per-head orthogonal basis. rotation: (..., d, d), columns = basis vectors; key_mean: (..., d) offset mu."""

  rotation: jax.Array
  key_mean: jax.Array


class PreparedKeys(NamedTuple):
  """Keys in the rotated basis with what the bounds need (computed once per key, e.g. when it enters a cache).

  Attributes:
    keys: (..., N, d) rotated, centred keys $R^\\top(k - \\mu)$.
    block_norms: (..., N, B) $\\|\\tilde k_b\\|$ per coordinate block.
    guard_norm: (..., N) $\\nu_i = \\|k_i\\| + \\|\\tilde k_i\\| + \\|\\mu\\|$ (scales the rounding guard).
  """

  keys: jax.Array
  block_norms: jax.Array
  guard_norm: jax.Array


class ProgressiveResult(NamedTuple):
  r"""Per-query outcome (leading dims (..., Q)).

  Attributes:
    head: (..., Q, N) bool, the certified head $H$ (fully scored keys kept).
    head_logits: (..., Q, N) our logits $\tilde s\cdot$scale on $H$ (shifted by $q\cdot\mu$), $-\infty$ elsewhere;
      softmax of it is the truncated distribution $\hat P$.
    k: (..., Q) int32 $|H|$.
    certificate: (..., Q) $\hat\tau \ge \mathrm{TV}(P, \hat P_H)$, $\le \epsilon$.
    dims: (..., Q, N) int32 coordinates computed per key (0 for masked keys, d when fully scored).
    keys_full: (..., Q) int32 keys scored in all d coordinates.
    partial_dims: (..., Q) int32 total coordinates computed (sum of `dims`).
    macs: (..., Q) int32 multiply-adds of the search (cost model in the module docstring).
  """

  head: jax.Array
  head_logits: jax.Array
  k: jax.Array
  certificate: jax.Array
  dims: jax.Array
  keys_full: jax.Array
  partial_dims: jax.Array
  macs: jax.Array


def _stage_edges(stages, d, name="stages"):
  return checks.stage_edges(name, stages, d)


def _fit_one(keys, queries, kvalid, qvalid):
  kw = kvalid.astype(keys.dtype)[:, None]
  qw = qvalid.astype(queries.dtype)[:, None]
  mu = jnp.sum(keys * kw, 0) / jnp.maximum(jnp.sum(kw), 1.0)
  kc = (keys - mu) * kw
  qq = queries * qw
  ck = kc.T @ kc / jnp.maximum(jnp.sum(kc * kc), 1e-30)
  cq = qq.T @ qq / jnp.maximum(jnp.sum(qq * qq), 1e-30)
  w, v = jnp.linalg.eigh(ck + cq)
  # The jit validity flag: no valid key or no valid query (a traced mask the eager check could not see), or NaN
  # input, gives a NaN rotation, which `prepare_keys` / `rotate_queries` / `progressive_search` carry to the result.
  bad = ~jnp.any(kvalid) | ~jnp.any(qvalid)
  return Basis(jnp.where(bad, jnp.nan, v[:, ::-1]), jnp.where(bad, jnp.nan, mu))


@jax.jit
def _fit_basis(keys, queries, kv, qv):
  lead = keys.shape[:-2]
  kv = jnp.broadcast_to(kv, keys.shape[:-1]).reshape((-1, keys.shape[-2]))
  qv = jnp.broadcast_to(qv, queries.shape[:-1]).reshape((-1, queries.shape[-2]))
  out = jax.vmap(_fit_one)(keys.reshape((-1,) + keys.shape[-2:]), queries.reshape((-1,) + queries.shape[-2:]), kv,
                           qv)
  return jax.tree.map(lambda x: x.reshape(lead + x.shape[1:]), out)


def fit_basis(keys: ArrayLike, queries: ArrayLike, key_valid: ArrayLike, query_valid: ArrayLike) -> Basis:
  r"""Fits the per-head basis on held-out keys and queries (never on the text it is evaluated on).

  $\mu$ = mean valid key; $R$ = eigenvectors (descending) of $E[(k-\mu)(k-\mu)^\top]/E\|k-\mu\|^2 +
  E[qq^\top]/E\|q\|^2$.

  Args:
    keys: (..., N, d) held-out keys; queries: (..., Q, d) held-out queries (leading dims = heads, equal for both).
      Finite floating (computed in float32).
    key_valid: (..., N) bool; query_valid: (..., Q) bool; at least one True per head.

  Returns:
    `Basis(rotation (..., d, d), key_mean (..., d))`; `rotation` is orthogonal. Under `jax.jit` a head with NaN
    input or no valid key or query gets a NaN rotation and key mean.

  Example:
    >>> K = jax.random.normal(jax.random.key(0), (64, 8))
    >>> b = fit_basis(K, K, jnp.ones(64, bool), jnp.ones(64, bool))
    >>> bool(jnp.allclose(b.rotation.T @ b.rotation, jnp.eye(8), atol=1e-5))
    True
  """
  checks.vectors("keys", keys, "(..., L, d)")
  checks.vectors("queries", queries, "(..., L, d)")
  if keys.shape[-1] != queries.shape[-1] or keys.shape[:-2] != queries.shape[:-2]:
    raise ValueError(f"keys and queries must have the same leading dims and last dim d, got {tuple(keys.shape)} "
                     f"and {tuple(queries.shape)}")
  checks.valid(key_valid, keys.shape[:-1], "key_valid", against="keys[..., 0]")
  checks.valid(query_valid, queries.shape[:-1], "query_valid", against="queries[..., 0]")
  if key_valid is None or query_valid is None:
    raise ValueError("key_valid and query_valid must be bool arrays, got None")
  return _fit_basis(jnp.asarray(keys, jnp.float32), jnp.asarray(queries, jnp.float32), jnp.asarray(key_valid),
                    jnp.asarray(query_valid))


def _tol(d: int) -> float:
  """Relative tolerance 4(d + 4)u (float32 u) of the structure checks: R^T R = I, stored block / guard norms."""
  return 4.0 * (int(d) + 4) * float(jnp.finfo(jnp.float32).eps) / 2


def _check_basis(basis) -> None:
  """basis.rotation (..., d, d) orthogonal within `_tol(d)` and basis.key_mean (..., d) finite, when concrete."""
  R, mu = basis.rotation, basis.key_mean
  checks.floating_array("basis.rotation", R, finite=False)
  checks.floating_array("basis.key_mean", mu, finite=False)
  if R.ndim < 2 or R.shape[-1] != R.shape[-2] or tuple(mu.shape) != tuple(R.shape[:-1]):
    raise ValueError(f"basis.rotation must be (..., d, d) and basis.key_mean (..., d), got {tuple(R.shape)} and "
                     f"{tuple(mu.shape)}")
  if checks.is_traced(R, mu):
    return  # flagged in the jitted function (`_orthogonal`)
  if not np.isfinite(np.asarray(mu, np.float64)).all():
    raise ValueError("basis.key_mean must be finite")
  Rn = np.asarray(R, np.float64)
  if not np.isfinite(Rn).all():
    raise ValueError("basis.rotation must be finite")
  d = R.shape[-1]
  err = np.abs(np.einsum("...de,...df->...ef", Rn, Rn) - np.eye(d)).max()
  if not err <= _tol(d):
    raise ValueError(f"basis.rotation must be orthogonal (max |R^T R - I| <= {_tol(d):.1e}, as `fit_basis` gives), "
                     f"got {err:.3g}: the rotated logits would not equal q.k")


def _orthogonal(basis) -> jax.Array:
  """(...,) bool: the rotation is orthogonal within `_tol(d)` and the basis finite (the jit validity flag)."""
  R = basis.rotation
  d = R.shape[-1]
  rtr = jnp.einsum("...de,...df->...ef", R, R, precision="highest")
  ok = jnp.max(jnp.abs(rtr - jnp.eye(d, dtype=R.dtype)), (-2, -1)) <= _tol(d)
  return ok & jnp.all(jnp.isfinite(basis.key_mean), -1)


def _blocks(x, edges):
  starts = (0,) + edges[:-1]
  return jnp.stack([jnp.linalg.norm(x[..., a:b], axis=-1) for a, b in zip(starts, edges)], -1)


def _check_basis_dim(name, x, basis):
  checks.vectors(name, x, "(..., L, d)")
  _check_basis(basis)
  d = basis.rotation.shape[-1]
  if x.shape[-1] != d:
    raise ValueError(f"{name} must have last dim d = {d} (the basis'), got shape {tuple(x.shape)}")


def prepare_keys(keys: ArrayLike, basis: Basis, blocks: tuple[int, ...]) -> PreparedKeys:
  r"""Rotates and centres keys, $\tilde k = R^\top(k - \mu)$, and stores their block norms and guard norms.

  Args:
    keys: (..., N, d) keys in the model's basis. basis: `Basis` with leading dims (...) (one per head).
    blocks: increasing coordinate counts ending at d that delimit the norm blocks of the bound, e.g. (8, 16, 32);
      they must include the search's `stages` (finer blocks give tighter bounds at one multiply-add each).

  Returns:
    `PreparedKeys`. Under `jax.jit` a basis whose rotation is not orthogonal (or not finite) gives NaN keys and
    norms for its head, which `progressive_search` flags. Cost: $d^2 + 2d$ multiply-adds per key, paid once when the key is written (or free when $R$
    is folded into $W_k$), not per query.

  Example:
    >>> K = jax.random.normal(jax.random.key(0), (16, 4))
    >>> pk = prepare_keys(K, fit_basis(K, K, jnp.ones(16, bool), jnp.ones(16, bool)), (2, 4))
    >>> pk.keys.shape, pk.block_norms.shape
    ((16, 4), (16, 2))
  """
  _check_basis_dim("keys", keys, basis)
  edges = _stage_edges(blocks, keys.shape[-1], "blocks")
  return _prepare_keys(_core.as_float(keys), basis, edges)


@functools.partial(jax.jit, static_argnames=("edges",))
def _prepare_keys(keys, basis, edges):
  mu = basis.key_mean[..., None, :]
  kt = jnp.einsum("...nd,...de->...ne", keys - mu, basis.rotation, precision="highest")
  nu = (jnp.linalg.norm(keys, axis=-1) + jnp.linalg.norm(kt, axis=-1)
        + jnp.linalg.norm(basis.key_mean, axis=-1)[..., None])
  ok = _orthogonal(basis)[..., None]  # the jit validity flag, (..., 1)
  return PreparedKeys(jnp.where(ok[..., None], kt, jnp.nan), jnp.where(ok[..., None], _blocks(kt, edges), jnp.nan),
                      jnp.where(ok, nu, jnp.nan))


def rotate_queries(queries: ArrayLike, basis: Basis) -> jax.Array:
  r"""$\tilde q = R^\top q$ (..., Q, d) (free when $R$ is folded into $W_q$).

  Args:
    queries: (..., Q, d) finite floating queries (bfloat16 / float16 computed in float32). basis: `Basis`.

  Returns:
    (..., Q, d) rotated queries. Under `jax.jit` NaN entries propagate to the query's row, and a basis whose
    rotation is not orthogonal gives NaN rows for its head.

  Raises:
    ValueError: bad shapes or dtypes, non-finite queries, or a rotation that is not orthogonal (when concrete).

  Example:
    >>> b = Basis(jnp.eye(2)[::-1], jnp.zeros(2))
    >>> rotate_queries(jnp.array([[1.0, 2.0]]), b)
    Array([[2., 1.]], dtype=float32)
  """
  _check_basis_dim("queries", queries, basis)
  return _rotate_queries(_core.as_float(queries), basis)


@jax.jit
def _rotate_queries(queries, basis):
  out = jnp.einsum("...qd,...de->...qe", queries, basis.rotation, precision="highest")
  return jnp.where(_orthogonal(basis)[..., None, None], out, jnp.nan)


_BISECT_STEPS = 40


def _one_query(qt, qnorm, kt, block_norms, guard_max, valid, eps_search, eps_final, scale, edges, norm_edges):
  """One query against N keys. qt (d,), kt (N, d), block_norms (N, NB), guard_max (), valid (N,)."""
  N, d = kt.shape
  B = len(edges)
  starts = (0,) + edges[:-1]
  widths = np.array([b - a for a, b in zip(starts, edges)])
  u = jnp.finfo(kt.dtype).eps / 2
  nstarts = (0,) + norm_edges[:-1]
  qb = jnp.stack([jnp.linalg.norm(qt[a:b]) for a, b in zip(nstarts, norm_edges)])  # (NB,)
  # Partial dot products per stage block, cumulated: partial[:, l] = sum over the first edges[l] coordinates.
  bd = jnp.stack([kt[:, a:b] @ qt[a:b] for a, b in zip(starts, edges)], -1)  # (N, B)
  partial = jnp.cumsum(bd, -1)
  prod = block_norms * qb[None, :]  # (N, NB)
  # Bound after stage l: sum of ||q_b|| ||k_b|| over the norm blocks that start at or after edges[l].
  after = np.array([[a >= e for a in nstarts] for e in edges], np.float32)  # (B, NB)
  rest = prod @ jnp.asarray(after.T, prod.dtype)  # (N, B)
  sc = jnp.abs(scale)
  g = 2.0 * (d + 4) * u * qnorm * guard_max * sc  # one guard per query (max over the head's keys)
  mid = partial * scale
  rad = rest * sc + g
  # Shift by a per-query constant (the largest stage-0 upper bound) so exp/log-sum-exp run at O(1) magnitudes;
  # the shift's own rounding is covered by the 8u(|x| + |c|) term.
  hi0 = jnp.where(valid, mid[:, 0] + rad[:, 0], -jnp.inf)
  c = jax.lax.stop_gradient(jnp.max(hi0))
  c = jnp.where(jnp.isfinite(c), c, 0.0)
  mid = mid - c
  rad = rad + 8.0 * u * (jnp.abs(mid) + jnp.abs(c))
  # Upper bounds per stage, made nonincreasing across stages (each is a valid bound, so is their running min).
  hi = jax.lax.cummin(mid + rad, axis=1)
  hi = jnp.where(valid[:, None], hi, -jnp.inf)
  lo_full = jnp.where(valid, mid[:, -1] - rad[:, -1], -jnp.inf)
  hi_full = hi[:, -1]

  def level(t):
    # Best-first refinement stopped at threshold t: a key stops at the first stage whose bound is below t.
    return jnp.minimum(jnp.sum(hi[:, :-1] >= t, -1), B - 1)  # (N,) stage index, B - 1 = fully scored

  e_hi = jnp.exp(hi)  # linear-space copies for the bisection (its result is re-certified in log space below)
  e_lo = jnp.exp(lo_full)

  def cert_lin(t):
    lv = level(t)
    full = lv == B - 1
    r = jnp.sum(jnp.where(full, 0.0, jnp.take_along_axis(e_hi, lv[:, None], 1)[:, 0]))
    s = jnp.sum(jnp.where(full, e_lo, 0.0))
    return r / jnp.maximum(s + r, jnp.finfo(s.dtype).tiny)

  fin = jnp.isfinite(hi)
  t_lo = jnp.min(jnp.where(fin, hi, jnp.inf)) - 1.0  # everything fully scored: certificate 0
  t_hi = jnp.max(jnp.where(fin, hi, -jnp.inf)) + 1.0

  def bisect(_, ab):
    a, b = ab
    m = 0.5 * (a + b)
    ok = cert_lin(m) <= eps_search
    return jnp.where(ok, m, a), jnp.where(ok, b, m)

  t, _ = jax.lax.fori_loop(0, _BISECT_STEPS, bisect, (t_lo, t_hi))
  lv = level(t)
  # Fallback (never seen; keeps the guarantee if the linear-space bisection was fooled by underflow): score all.
  full = lv == B - 1
  log_r = jax.nn.logsumexp(jnp.where(full, -jnp.inf, jnp.take_along_axis(hi, lv[:, None], 1)[:, 0]))
  log_s = jax.nn.logsumexp(jnp.where(full, lo_full, -jnp.inf))
  bad = jax.nn.sigmoid(log_r - log_s) > eps_final
  lv = jnp.where(bad, B - 1, lv)
  full = (lv == B - 1) & valid
  log_r = jnp.where(bad, -jnp.inf, log_r)
  # Prune the fully scored keys: drop the lowest while the certificate stays <= eps_final (dropped keys count in
  # the tail with their upper bound, kept keys in the head with their lower bound).
  key = jnp.where(full, hi_full, jnp.inf)
  order = jnp.argsort(key, stable=True)
  fs = full[order]
  up = jnp.where(fs, hi_full[order], -jnp.inf)
  dn = jnp.where(fs, lo_full[order], -jnp.inf)
  r_j = jnp.logaddexp(log_r, jax.lax.cumlogsumexp(up))
  a_incl = _core.rcumlogsumexp(dn)
  a_post = jnp.concatenate([a_incl[1:], jnp.full((1,), -jnp.inf, dn.dtype)])
  ok = (jax.nn.sigmoid(r_j - a_post) <= eps_final) & fs
  j_star = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
  drop = jnp.zeros((N,), bool).at[order].set(jnp.arange(N) < j_star)
  head = full & ~drop
  log_r = jnp.where(j_star > 0, r_j[jnp.maximum(j_star - 1, 0)], log_r)
  log_a = jax.nn.logsumexp(jnp.where(head, lo_full, -jnp.inf))
  cert = jax.nn.sigmoid(log_r - log_a)
  # A tail mass below float32's smallest normal number would round to 0: report that number instead.
  cert = jnp.where(log_r > -jnp.inf, jnp.maximum(cert, jnp.finfo(cert.dtype).tiny), cert)
  dims = jnp.where(valid, jnp.asarray(edges, jnp.int32)[lv], 0)
  # Multiply-adds when a key reaches stage l: the stage's coordinates, plus, at the first stage only, one product
  # per norm block after it (accumulated from the last block, so every later stage's bound is a partial sum of them).
  per_stage = widths.copy()
  per_stage[0] += int(after[0].sum())
  per_stage = jnp.asarray(per_stage, jnp.int32)
  cum_cost = jnp.cumsum(per_stage)
  macs = d + jnp.sum(jnp.where(valid, cum_cost[lv], 0))
  head_logits = jnp.where(head, mid[:, -1], -jnp.inf)
  return head, head_logits, jnp.sum(head).astype(jnp.int32), cert, dims, macs


@functools.partial(jax.jit, static_argnames=("stages", "norm_stages"))
def _progressive(q_rot, prepared, valid, epsilon, scale, search_fraction, stages, norm_stages):
  d = q_rot.shape[-1]
  edges = _stage_edges(stages, d)
  norm_edges = _stage_edges(norm_stages, d)
  N = prepared.keys.shape[-2]
  m = _core.rounding_margin(N, q_rot.dtype)
  eps_final = epsilon / (1.0 + m) ** 2
  eps_search = search_fraction * eps_final
  lead = jnp.broadcast_shapes(q_rot.shape[:-2], prepared.keys.shape[:-2])
  Q = q_rot.shape[-2]
  qt = jnp.broadcast_to(q_rot, lead + q_rot.shape[-2:]).reshape((-1, Q, d))
  kt = jnp.broadcast_to(prepared.keys, lead + prepared.keys.shape[-2:]).reshape((-1, N, d))
  bn = jnp.broadcast_to(prepared.block_norms, lead + prepared.block_norms.shape[-2:]).reshape((-1, N,
                                                                                               len(norm_edges)))
  gn = jnp.max(jnp.broadcast_to(prepared.guard_norm, lead + (N,)).reshape((-1, N)), -1)
  v = jnp.broadcast_to(valid, lead + (Q, N)).reshape((-1, Q, N))
  qn = jnp.linalg.norm(qt, axis=-1)

  def per_head(qh, qnh, kh, bnh, gnh, vh):
    f = lambda q1, qn1, v1: _one_query(q1, qn1, kh, bnh, gnh, v1, eps_search, eps_final, scale, edges, norm_edges)
    return jax.vmap(f)(qh, qnh, vh)

  head, hl, k, cert, dims, macs = jax.lax.map(lambda a: per_head(*a), (qt, qn, kt, bn, gn, v))
  # The jit validity flag (k = 0, certificate NaN, empty head): a traced epsilon outside (0, 1), a query with a
  # non-finite entry or no valid key, or prepared keys that fail `_prepared_ok` (norms that do not bound).
  ok = (_core.eps_ok(epsilon) & _prepared_ok(kt, bn, jnp.broadcast_to(prepared.guard_norm, lead + (N,)).reshape(
      (-1, N)), norm_edges)[:, None] & jnp.all(jnp.isfinite(qt), -1) & jnp.any(v, -1))
  rs = lambda x: x.reshape(lead + x.shape[1:])
  ok = rs(ok)
  dims = rs(dims)
  head = rs(head) & ok[..., None]
  k, cert = jnp.where(ok, rs(k), 0), jnp.where(ok, rs(cert), jnp.nan)
  hl = jnp.where(ok[..., None], rs(hl), -jnp.inf)
  return ProgressiveResult(head, hl, k, cert, dims, jnp.sum(dims == d, -1).astype(jnp.int32),
                           jnp.sum(dims, -1).astype(jnp.int32), rs(macs))


def _prepared_ok(kt, bn, gn, norm_edges):
  """(H,) bool per head: keys, block norms and guard norms finite; block norms >= 0 and equal to the keys' within
  `_tol(d)` (never smaller: a smaller norm makes a bound that does not bound); guard norms >= the key norms."""
  d = kt.shape[-1]
  tol = _tol(d)
  true_bn = _blocks(kt, norm_edges)
  scale = jnp.max(jnp.linalg.norm(kt, axis=-1), -1)[:, None, None]
  fin = (jnp.all(jnp.isfinite(kt), (-2, -1)) & jnp.all(jnp.isfinite(bn), (-2, -1)) & jnp.all(jnp.isfinite(gn), -1))
  bn_ok = jnp.all((bn >= true_bn * (1 - tol)) & (bn <= true_bn * (1 + tol) + tol * scale), (-2, -1))
  gn_ok = jnp.all(gn >= jnp.linalg.norm(kt, axis=-1) * (1 - tol), -1)
  return fin & bn_ok & gn_ok


def _check_prepared(prepared, norm_edges) -> None:
  """Concrete `PreparedKeys`: the checks of `_prepared_ok`, raising ValueError naming the field."""
  kt = np.asarray(prepared.keys, np.float32)
  bn = np.asarray(prepared.block_norms, np.float32)
  gn = np.asarray(prepared.guard_norm, np.float32)
  for name, x in (("prepared.keys", kt), ("prepared.block_norms", bn), ("prepared.guard_norm", gn)):
    if not np.isfinite(x).all():
      raise ValueError(f"{name} must be finite")
  if tuple(gn.shape) != tuple(kt.shape[:-1]) or tuple(bn.shape[:-1]) != tuple(kt.shape[:-1]):
    raise ValueError(f"prepared.block_norms (..., N, B) and prepared.guard_norm (..., N) must match prepared.keys "
                     f"{tuple(kt.shape)}, got {tuple(bn.shape)} and {tuple(gn.shape)}")
  tol = _tol(kt.shape[-1])
  starts = (0,) + tuple(norm_edges[:-1])
  true_bn = np.stack([np.linalg.norm(kt[..., a:b], axis=-1) for a, b in zip(starts, norm_edges)], -1)
  scale = np.linalg.norm(kt, axis=-1).max(-1)[..., None, None]
  if (bn < 0).any() or (bn < true_bn * (1 - tol)).any() or (bn > true_bn * (1 + tol) + tol * scale).any():
    err = np.abs(bn - true_bn).max()
    raise ValueError(f"prepared.block_norms must be the block norms of prepared.keys (as `prepare_keys` computes "
                     f"them; max difference {err:.3g}); zeroed, negative or stale norms give bounds that do not bound")
  if (gn < np.linalg.norm(kt, axis=-1) * (1 - tol)).any():
    raise ValueError("prepared.guard_norm must be >= the norm of each prepared key (as `prepare_keys` computes it)")


def progressive_search(q_rot: ArrayLike, prepared: PreparedKeys, valid: ArrayLike | None, epsilon: float,
                       scale: float, stages: tuple[int, ...], blocks: tuple[int, ...] | None = None,
                       search_fraction: float = 0.9) -> ProgressiveResult:
  r"""Certified top-k by progressive scoring in a fixed orthogonal basis: $\mathrm{TV}(P, \hat P_H) \le \epsilon$.

  Args:
    q_rot: (..., Q, d) rotated queries (`rotate_queries`, or the output of $W_q R$).
    prepared: `PreparedKeys` with leading dims (...), from `prepare_keys`.
    valid: optional bool mask broadcastable to (..., Q, N); True = key may be attended.
    epsilon: TV budget in (0, 1).
    scale: logit scale, e.g. $1/\sqrt{d}$.
    stages: increasing coordinate counts ending at d, e.g. (8, 16, 32) for d = 32, (8, 16, 32, 64) for d = 64.
    blocks: the norm blocks `prepared` was built with (default: `stages`); must contain every stage edge.
    search_fraction: the share of epsilon the search may leave as unscored tail; the rest is used to prune the
      fully scored keys (smaller head, more scoring). In (0, 1].

  Returns:
    `ProgressiveResult`. For every query the true tail mass outside `head` of softmax(q.k * scale) (keys in the
    original basis, logits in float32) is $\le$ `certificate` $\le \epsilon$. Under `jax.jit` a query with no
    valid key or a non-finite entry, every query of a head whose `prepared` fails the checks below, and every query
    when a traced epsilon is outside (0, 1), get k = 0, certificate NaN and an empty head.

  Raises:
    ValueError: bad epsilon, stages, blocks, search_fraction, scale (must be > 0) or shapes; non-finite inputs or a
      query with no valid key (when concrete); `prepared` not as `prepare_keys` builds it (when concrete): block
      norms negative, zeroed or otherwise not the norms of `prepared.keys`' blocks, guard norms below the key norms.

  Example:
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> K, Qs = jax.random.normal(k1, (64, 8)) * 2, jax.random.normal(k2, (4, 8))
    >>> held = jax.random.normal(k3, (64, 8)) * 2  # held-out keys (and, here, queries) for the basis
    >>> basis = fit_basis(held, held, jnp.ones(64, bool), jnp.ones(64, bool))
    >>> pk = prepare_keys(K, basis, (4, 8))
    >>> r = progressive_search(rotate_queries(Qs, basis), pk, None, 0.1, 8 ** -0.5, (4, 8))
    >>> bool((r.certificate <= 0.1).all()), r.k.shape  # head sizes; r.macs / (64 * 8): cost vs dense scoring
    (True, (4,))
  """
  checks.open_unit("epsilon", epsilon)
  checks.floating_array("q_rot", q_rot, finite=False)
  if q_rot.ndim < 2:
    raise ValueError(f"q_rot must have shape (..., Q, d), got {tuple(q_rot.shape)}")
  d = q_rot.shape[-1]
  if prepared.keys.ndim < 2 or prepared.keys.shape[-1] != d or prepared.keys.shape[-2] == 0:
    raise ValueError(f"q_rot has d = {d} but prepared.keys must have shape (..., N >= 1, d), got "
                     f"{tuple(prepared.keys.shape)}")
  edges = _stage_edges(stages, d)
  blocks = edges if blocks is None else _stage_edges(blocks, d, "blocks")
  if not set(edges) <= set(blocks):
    raise ValueError(f"blocks {tuple(blocks)} must contain every stage edge {edges}")
  if prepared.block_norms.shape[-1] != len(blocks):
    raise ValueError(f"prepared.block_norms has {prepared.block_norms.shape[-1]} blocks, blocks= has {len(blocks)}")
  search_fraction = checks.positive("search_fraction", search_fraction)
  if not search_fraction <= 1.0:
    raise ValueError(f"search_fraction must be in (0, 1], got {search_fraction}")
  scale = checks.positive("scale", scale)
  q_rot = _core.as_float(q_rot)
  N = prepared.keys.shape[-2]
  lshape = jnp.broadcast_shapes(q_rot.shape[:-2], prepared.keys.shape[:-2]) + (q_rot.shape[-2], N)
  checks.valid(valid, lshape)
  v = jnp.ones(lshape, bool) if valid is None else jnp.broadcast_to(jnp.asarray(valid), lshape)
  if not checks.is_traced(q_rot) and not np.isfinite(np.asarray(q_rot, np.float32)).all():
    raise ValueError("q_rot must be finite")
  if not checks.is_traced(*prepared):
    _check_prepared(prepared, tuple(blocks))
  return _progressive(q_rot, prepared, v, epsilon, scale, search_fraction, tuple(edges), tuple(blocks))
