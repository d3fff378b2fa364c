r"""Certified search that scores keys cell by cell (paper Algorithm 2 "MC-Search", Theorem 7.2).

Keys are grouped into cells with centre $c_j$, radius $r_j = \max_{k \in j}\|k - c_j\|$ and size $n_j$. By
Cauchy-Schwarz every key in cell $j$ has logit at most $U_j(q) = (q\cdot c_j + \|q\| r_j)\,\mathrm{scale}$. Cells are
opened best-first by $U_j$ and their keys scored exactly; with $S$ the scored mass and $R = \sum_{\text{unopened}}
n_j e^{U_j}$ the certificate is $\hat\tau = R / (S + R) \ge$ the true tail mass of the scored set. The search stops
at the first prefix with $\hat\tau \le \epsilon$; this is the only procedure here that reduces the number of keys
scored. The head can then be pruned to the top $k$ scored keys, counting the dropped scored mass as known tail.

`mc_search` evaluates that stopping rule for all queries at once (it sees all logits, but uses them only as the
search would: per opened cell). How the paper builds its cells is not in what we could read of it; we offer k-means and
contiguous chunks.
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


class Cells(NamedTuple):
  """A partition of N keys into M cells.

  Attributes:
    cell_of_key: (..., N) int32 in [0, M]; M marks a masked key (in no cell).
    centres: (..., M, d) float.
    radii: (..., M) float, max distance of a member key to its centre (0 for empty cells).
    sizes: (..., M) int32, member count.
  """

  cell_of_key: jax.Array
  centres: jax.Array
  radii: jax.Array
  sizes: jax.Array


def _finish_cells(keys, valid, assign, num_cells) -> Cells:
  assign = jnp.where(valid, assign, num_cells).astype(jnp.int32)
  onehot = jax.nn.one_hot(assign, num_cells, dtype=keys.dtype)  # (N, M); masked rows are 0
  sizes = jnp.sum(onehot, 0)
  centres = (onehot.T @ keys) / jnp.maximum(sizes, 1)[:, None]
  dist = jnp.linalg.norm(keys[:, None, :] - centres[None], axis=-1)  # (N, M)
  radii = jnp.max(jnp.where(onehot > 0, dist, 0.0), 0)
  # Guard the radius against float rounding in the Cauchy-Schwarz bound.
  radii = radii * (1 + 1e-5) + 1e-6
  # The jit validity flag: a head with no valid key (a traced mask the eager check could not see) gets NaN centres
  # and radii; NaN keys give NaN centres and radii by themselves.
  bad = ~jnp.any(valid)
  return Cells(assign, jnp.where(bad, jnp.nan, centres), jnp.where(bad, jnp.nan, radii), sizes.astype(jnp.int32))


def _kmeans_one(keys, valid, rng, num_cells, iters):
  N = keys.shape[0]
  p = valid.astype(keys.dtype)
  # Distinct valid keys as initial centres (Gumbel top-k sampling without replacement).
  g = jax.random.gumbel(rng, (N,)) + jnp.where(valid, 0.0, -jnp.inf)
  init = keys[jax.lax.top_k(g, num_cells)[1]]

  def step(_, centres):
    d2 = jnp.sum((keys[:, None, :] - centres[None]) ** 2, -1)
    a = jnp.argmin(d2, -1)
    oh = jax.nn.one_hot(a, num_cells, dtype=keys.dtype) * p[:, None]
    cnt = jnp.sum(oh, 0)
    new = (oh.T @ keys) / jnp.maximum(cnt, 1)[:, None]
    return jnp.where(cnt[:, None] > 0, new, centres)

  centres = jax.lax.fori_loop(0, iters, step, init)
  assign = jnp.argmin(jnp.sum((keys[:, None, :] - centres[None]) ** 2, -1), -1)
  return _finish_cells(keys, valid, assign, num_cells)


def _check_keys(keys, valid, num_cells) -> int:
  """keys (..., N, d) finite floating, valid (..., N) bool with a valid key per head, 1 <= num_cells <= N."""
  checks.vectors("keys", keys)
  checks.valid(valid, keys.shape[:-1], against="keys[..., 0]")
  if valid is None:
    raise ValueError("valid must be a bool array of shape (..., N), got None")
  return checks.int_in_range("num_cells", num_cells, 1, keys.shape[-2])


@functools.partial(jax.jit, static_argnames=("num_cells", "iters"))
def _kmeans_cells(keys, valid, rng, num_cells, iters):
  lead = keys.shape[:-2]
  flat_k = keys.reshape((-1,) + keys.shape[-2:])
  flat_v = valid.reshape((-1, keys.shape[-2]))
  rngs = jax.random.split(rng, flat_k.shape[0])
  out = jax.vmap(lambda k, v, r: _kmeans_one(k, v, r, num_cells, iters))(flat_k, flat_v, rngs)
  return jax.tree.map(lambda x: x.reshape(lead + x.shape[1:]), out)


def kmeans_cells(keys: ArrayLike, valid: ArrayLike, rng: jax.Array, num_cells: int, iters: int = 10) -> Cells:
  """k-means cells over the keys of one or many heads (Lloyd's algorithm, `iters` rounds, `lax.fori_loop`).

  Args:
    keys: (..., N, d) float key vectors (bfloat16 / float16 computed in float32). valid: (..., N) bool.
    rng: a PRNG key (split over leading dims).
    num_cells: M, the number of cells (e.g. ceil(sqrt(N))), 1 <= M <= N. With fewer than M valid keys in a head
      the extra cells stay empty.
    iters: Lloyd iterations, >= 1.

  Returns:
    `Cells` with leading dims of `keys`. Under `jax.jit` a head with NaN keys or no valid key has NaN centres and
    radii.

  Example:
    >>> K = jnp.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    >>> c = kmeans_cells(K, jnp.ones(4, bool), jax.random.key(0), 2, iters=3)
    >>> sorted(c.sizes.tolist())
    [2, 2]
  """
  num_cells = _check_keys(keys, valid, num_cells)
  iters = checks.int_in_range("iters", iters)
  keys = _core.as_float(keys)
  valid = jnp.broadcast_to(jnp.asarray(valid), keys.shape[:-1])
  return _kmeans_cells(keys, valid, rng, num_cells, iters)


@functools.partial(jax.jit, static_argnames=("num_cells",))
def _chunk_cells(keys, valid, num_cells):
  N = keys.shape[-2]
  c = -(-N // num_cells)
  assign = jnp.arange(N) // c
  f = lambda k, v: _finish_cells(k, v, assign, num_cells)
  for _ in keys.shape[:-2]:
    f = jax.vmap(f)
  return f(keys, valid)


def chunk_cells(keys: ArrayLike, valid: ArrayLike, num_cells: int) -> Cells:
  """Contiguous chunks of ceil(N / M) keys as cells (positions 0..c-1, c..2c-1, ...).

  Args:
    keys: (..., N, d) float (bfloat16 / float16 computed in float32); valid: (..., N) bool; num_cells: M in [1, N].

  Returns:
    `Cells` with leading dims of `keys`. Under `jax.jit` a head with NaN keys or no valid key has NaN centres and
    radii.

  Example:
    >>> c = chunk_cells(jnp.arange(8.0).reshape(4, 2), jnp.ones(4, bool), 2)
    >>> c.cell_of_key, c.sizes
    (Array([0, 0, 1, 1], dtype=int32), Array([2, 2], dtype=int32))
  """
  num_cells = _check_keys(keys, valid, num_cells)
  keys = _core.as_float(keys)
  return _chunk_cells(keys, jnp.broadcast_to(jnp.asarray(valid), keys.shape[:-1]), num_cells)


def cell_upper_bounds(queries: ArrayLike, cells: Cells, scale: float) -> jax.Array:
  r"""$U_j(q) = (q \cdot c_j + \|q\| r_j)\cdot \mathrm{scale}$, an upper bound on every logit in cell $j$.

  Args:
    queries: (..., Q, d) float; cells: `Cells` with leading dims (...); scale: e.g. $1/\sqrt{d_h}$.

  Returns:
    (..., Q, M) float; $-\infty$ for empty cells. Each entry includes a float32 rounding guard
    $2(d+4)u\,\|q\|(\|c_j\| + r_j)\,|\mathrm{scale}|$, so it bounds logits computed in float32 as
    $\mathrm{fl}(q\cdot k)\cdot\mathrm{scale}$ even when keys sit far from the origin. Under `jax.jit` a
    query with a NaN or infinite entry, or a traced scale <= 0 or not finite, gives NaN bounds.

  Example:
    >>> cells = chunk_cells(jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.ones(2, bool), 2)
    >>> cell_upper_bounds(jnp.array([[2.0, 0.0]]), cells, 0.5).round(4)  # logits 1 and 0 (+ a rounding guard)
    Array([[1., 0.]], dtype=float32)
  """
  checks.floating_array("queries", queries)
  d = cells.centres.shape[-1]
  if queries.ndim < 2 or queries.shape[-1] != d:
    raise ValueError(f"queries must have shape (..., Q, {d}) (d from cells.centres), got {tuple(queries.shape)}")
  scale = _core.check_scale(scale)
  return _cell_upper_bounds(_core.as_float(queries), cells, scale)


@jax.jit
def _cell_upper_bounds(q, cells, scale):
  qn = jnp.linalg.norm(q, axis=-1)[..., None]
  cn = jnp.linalg.norm(cells.centres, axis=-1)[..., None, :]
  u = (jnp.einsum("...qd,...md->...qm", q, cells.centres, precision="highest")
       + qn * cells.radii[..., None, :]) * scale
  # Rounding guard that grows with the magnitudes: a float dot product of length d errs by at most
  # ~d u |q| |x|, both in q.c here and in the caller's q.k (|k| <= |c| + r); 2 (d + 4) u |q| (|c| + r) covers both.
  d = q.shape[-1]
  guard = 2.0 * (d + 4) * (jnp.finfo(u.dtype).eps / 2) * qn * (cn + cells.radii[..., None, :]) * jnp.abs(scale)
  ok = jnp.all(jnp.isfinite(q), -1, keepdims=True) & (scale > 0) & jnp.isfinite(scale)
  return jnp.where(ok, jnp.where(cells.sizes[..., None, :] > 0, u + guard, -jnp.inf), jnp.nan)


class SearchResult(NamedTuple):
  r"""Per-query outcome of the best-first cell search (all (...,) arrays).

  Attributes:
    cells_opened: cells scored before the certificate met epsilon.
    keys_scored: keys in those cells (the paper's k_mc; exact logits computed).
    centroid_evals: cell bounds evaluated (every non-empty cell, once per query).
    certificate: $\hat\tau = R/(S+R)$ at stopping, with the head = all scored keys.
    tv: true tail mass when the head is all scored keys (<= certificate).
    k_pruned: smallest head (top keys among the scored) whose certificate (known scored tail + R)/(S + R) <= eps.
    certificate_pruned, tv_pruned: that certificate and the true tail mass for the pruned head.
  """

  cells_opened: jax.Array
  keys_scored: jax.Array
  centroid_evals: jax.Array
  certificate: jax.Array
  tv: jax.Array
  k_pruned: jax.Array
  certificate_pruned: jax.Array
  tv_pruned: jax.Array


def _mc_search_impl(logits, valid, upper, cell_of_key, sizes, epsilon) -> SearchResult:
  M = upper.shape[-1]
  v = _core.effective_valid(logits, valid) & ~jnp.isnan(logits)
  s = jnp.where(v, logits, -jnp.inf)
  log_z = jax.nn.logsumexp(s, -1)
  memb = jax.nn.one_hot(cell_of_key, M, dtype=s.dtype)  # (..., N, M), shared by the queries of a head
  m = jax.lax.stop_gradient(jnp.max(s, -1, keepdims=True))
  mass = jnp.einsum("...qn,...nm->...qm", jnp.exp(s - m), memb, precision="highest")
  lc = jnp.log(mass) + m  # (..., Q, M) log of each cell's exact mass (underflow only lowers S: conservative)
  sizes_b = jnp.broadcast_to(jnp.expand_dims(sizes, -2), upper.shape)
  order = jnp.argsort(-upper, -1, stable=True)
  us = jnp.take_along_axis(upper, order, -1)
  ls = jnp.take_along_axis(lc, order, -1)
  ns = jnp.take_along_axis(sizes_b, order, -1)
  log_ub = jnp.where(ns > 0, jnp.log(jnp.maximum(ns, 1).astype(s.dtype)) + jnp.where(ns > 0, us, 0.0), -jnp.inf)
  log_s = jax.lax.cumlogsumexp(ls, axis=ls.ndim - 1)  # scored mass after opening r = 1..M cells
  incl = _core.rcumlogsumexp(log_ub)
  log_r = jnp.concatenate([incl[..., 1:], jnp.full_like(incl[..., :1], -jnp.inf)], -1)
  tail_hat = jax.nn.sigmoid(log_r - log_s)  # R / (S + R)
  # Stop at epsilon / (1 + m)^2 (m = tail.rounding_margin): float32 rounding of the sums cannot then push the
  # realised TV above epsilon when the certificate is tight (R ~ 0).
  mrg = _core.rounding_margin(logits.shape[-1], s.dtype)
  eps_stop = epsilon / (1.0 + mrg) ** 2
  r_star = (1 + jnp.argmax(tail_hat <= eps_stop, -1)).astype(jnp.int32)
  at = lambda x: jnp.take_along_axis(x, (r_star - 1)[..., None], -1)[..., 0]
  keys_scored = at(jnp.cumsum(ns, -1))
  cert = at(tail_hat)
  log_r_star, log_s_star = at(log_r), at(log_s)
  # Which keys were scored: their cell's position in the opening order is < r_star.
  pos = jnp.argsort(order, -1)  # (..., Q, M) position of each cell
  pos_k = jnp.take_along_axis(
      pos, jnp.broadcast_to(jnp.expand_dims(jnp.minimum(cell_of_key, M - 1), -2), s.shape), -1)
  scored = v & (pos_k < r_star[..., None]) & jnp.broadcast_to(jnp.expand_dims(cell_of_key < M, -2), s.shape)
  log_unscored = jax.nn.logsumexp(jnp.where(scored, -jnp.inf, s), -1)
  tv = jnp.exp(jnp.minimum(log_unscored - log_z, 0.0))
  # Pruned head: top-k scored keys; certificate (known scored tail + R) / (S + R).
  ssc = -jnp.sort(-jnp.where(scored, s, -jnp.inf), -1)
  t_incl = _core.rcumlogsumexp(ssc)
  log_tk = jnp.concatenate([t_incl[..., 1:], jnp.full_like(t_incl[..., :1], -jnp.inf)], -1)
  log_tot = jnp.logaddexp(log_s_star, log_r_star)
  cert_k = jnp.exp(jnp.minimum(jnp.logaddexp(log_tk, log_r_star[..., None]) - log_tot[..., None], 0.0))
  k_pruned = (1 + jnp.argmax(cert_k <= eps_stop, -1)).astype(jnp.int32)
  atk = lambda x: jnp.take_along_axis(x, (k_pruned - 1)[..., None], -1)[..., 0]
  tv_pruned = jnp.exp(jnp.minimum(jnp.logaddexp(log_unscored, atk(log_tk)) - log_z, 0.0))
  centroid_evals = jnp.broadcast_to(jnp.sum(sizes > 0, -1)[..., None], r_star.shape).astype(jnp.int32)
  # `upper` must bound every valid logit of its cell; where it does not, the certificate is void: NaN.
  u_key = jnp.take_along_axis(upper, jnp.broadcast_to(jnp.expand_dims(jnp.minimum(cell_of_key, M - 1), -2),
                                                      s.shape), -1)
  bound_ok = jnp.all(~v | (s <= u_key), -1)
  # Validity flag (values unseen under jit): NaN / +inf logits, no valid key, or epsilon outside (0, 1).
  ok = ~_core.bad_rows(logits, valid) & _core.eps_ok(epsilon)
  bound_ok = bound_ok & ok
  nan = jnp.asarray(jnp.nan, cert.dtype)
  return SearchResult(r_star, keys_scored.astype(jnp.int32), centroid_evals, jnp.where(bound_ok, cert, nan),
                      jnp.where(ok, tv, nan), k_pruned, jnp.where(bound_ok, atk(cert_k), nan),
                      jnp.where(ok, tv_pruned, nan))


_mc_search = jax.jit(_mc_search_impl)


def mc_search(logits: ArrayLike, valid: ArrayLike | None, upper: ArrayLike, cells: Cells,
              epsilon: float) -> SearchResult:
  r"""Best-first certified cell search (Algorithm 2), evaluated for every query.

  Args:
    logits: (..., Q, N) exact scaled logits (used only per opened cell, as the search would compute them).
    valid: optional bool mask broadcastable to logits.
    upper: (..., Q, M) cell bounds from `cell_upper_bounds` (must bound every logit in the cell).
    cells: `Cells` with leading dims (...), i.e. one partition per head shared by its queries.
    epsilon: TV budget in (0, 1).

  Returns:
    `SearchResult`; on termination $\mathrm{TV}(P, \hat P) \le$ certificate $\le \epsilon/(1+m)^2$
    (Theorem 7.2; $m$, the rounding margin of `certified_k`, absorbs float32 rounding). Under `jax.jit`, a query
    whose `upper` fails to bound some logit of its cell gets certificate (and certificate_pruned) NaN; a query with
    a NaN or +inf logit or no valid key, and every query when a traced epsilon is outside (0, 1), also gets tv and
    tv_pruned NaN.

  Raises:
    ValueError: bad epsilon / shapes, a row with no valid key, or (concrete inputs) an `upper` entry below a valid
      logit of its cell: such an `upper` would make the certificate meaningless.
  """
  checks.open_unit("epsilon", epsilon)
  _core.check_logits(logits, valid)
  if logits.ndim < 2:
    raise ValueError(f"logits must have shape (..., Q, N), got {tuple(logits.shape)}")
  checks.floating_array("upper", upper, finite=False)
  if tuple(upper.shape[:-1]) != tuple(logits.shape[:-1]) or upper.shape[-1] != cells.sizes.shape[-1]:
    raise ValueError(f"upper must have shape {tuple(logits.shape[:-1]) + (cells.sizes.shape[-1],)} (logits' rows "
                     f"x cells), got {tuple(upper.shape)}")
  if not checks.is_traced(upper) and np.isnan(np.asarray(upper, np.float32)).any():
    raise ValueError("upper contains NaN")
  if tuple(cells.cell_of_key.shape) != tuple(logits.shape[:-2]) + (logits.shape[-1],):
    raise ValueError(f"cells.cell_of_key has shape {tuple(cells.cell_of_key.shape)} but logits of shape "
                     f"{tuple(logits.shape)} need {tuple(logits.shape[:-2]) + (logits.shape[-1],)}")
  logits, upper = _core.as_float(logits), _core.as_float(upper)
  v = jnp.ones(logits.shape, bool) if valid is None else jnp.asarray(valid)
  if not checks.is_traced(logits, upper, v, cells.cell_of_key):
    s = np.asarray(logits)
    ck = np.asarray(cells.cell_of_key)
    M = upper.shape[-1]
    u_key = np.take_along_axis(np.asarray(upper), np.broadcast_to(np.minimum(ck, M - 1)[..., None, :], s.shape), -1)
    vv = np.broadcast_to(np.asarray(v), s.shape) & (np.broadcast_to(ck[..., None, :], s.shape) < M)
    bad = vv & ~(s <= u_key)
    if bad.any():
      i = np.argwhere(bad)[0]
      raise ValueError(f"upper does not bound the logits of its cell: logit {s[tuple(i)]!r} > upper "
                       f"{u_key[tuple(i)]!r} at index {tuple(int(j) for j in i)} (use cell_upper_bounds)")
  return _mc_search(logits, v, upper, cells.cell_of_key, cells.sizes, epsilon)
