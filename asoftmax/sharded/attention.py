r"""Certified top-k attention over a sequence-sharded KV cache (issue 29 item 5).

Shard s holds keys and values at global positions `[s N_s, (s + 1) N_s)` (padded to `S N_s`, padding masked). The
head is the threshold set of `topk.threshold_topk_probs`, $H = \{i : s_i - \max s \ge t^\star\}$ with
$t^\star = \max\{t : \mathrm{tail}(t) \le \epsilon Z / (1 + m)\}$, found by the same bisection, except that every
row statistic is a collective over the sequence axis: the row max (`pmax`), $Z$ and the tail at each bisection step
(one `psum` per step), the bracket's start (`pmin`), the head size (`psum`). The rounding margin
$m = 4 (N + 4) u$ uses the **global** key count N, so the statement is one device's: $\tau_H \le \epsilon$ on
every row. Causal masks compare global key positions with the queries' positions.

The output is the flash-decoding merge (Dao et al., "Flash-Decoding for long-context inference", 2023): each
shard returns its head's partial output $o_s = \sum_{i \in H_s} e^{s_i - m_s} v_i / \ell_s$, $\ell_s = \sum_{i \in
H_s} e^{s_i - m_s}$ and $m_s$ (three small arrays), merged as $o = \sum_s e^{m_s - m} \ell_s o_s / \sum_s e^{m_s
- m} \ell_s$.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from asoftmax import sharded
  >>> mesh = sharded.make_mesh((1,), ("seq",))
  >>> q, K, V = jnp.ones((1, 2)), jnp.array([[2.0, 2.0], [0.0, 0.0], [-2.0, -2.0]]), jnp.eye(3)
  >>> r = sharded.threshold_attention(q, K, V, 0.1, mesh)
  >>> r.k.tolist()
  [1]
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from asoftmax import checks
from asoftmax.sharded import _mesh
from asoftmax.topk.decode import sum_margin


class ShardedAttention(NamedTuple):
  r"""Per query (leading dims of q, then Q).

  Attributes:
    out: (..., Q, dv) attention output on the certified head (flash-decoding merge of the shards' partial outputs).
    k: (..., Q) int32 head size $|H|$ (global); 0 on a flagged row.
    tv: (..., Q) realised tail mass $\tau_H = \mathrm{TV}(P, \hat P_H) \le \epsilon$ (NaN on a flagged row: a NaN
      or +inf logit, no valid key, or a traced epsilon outside (0, 1)).
    threshold: (..., Q) $t^\star$ relative to the row max.
  """

  out: jax.Array
  k: jax.Array
  tv: jax.Array
  threshold: jax.Array


def flash_merge(o_s, l_s, m_s, axis: str):
  """Merges per-shard softmax partials: o_s (..., dv) normalized local outputs, l_s (...) local sums of
  exp(s - m_s), m_s (...) local maxima (-inf for an empty shard). Returns the global normalized output (..., dv)."""
  m = jax.lax.pmax(m_s, axis)
  w = jnp.where(jnp.isfinite(m_s), l_s * jnp.exp(m_s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  return jax.lax.psum(w[..., None] * o_s, axis) / jax.lax.psum(w, axis)[..., None]


def _shard_heads(q, keys, values, kv, qpos, eps, scale, n_keys, iters, axis):
  """One shard: q (B, Q, d), keys (B, N_s, d), values (B, N_s, dv), kv (B, N_s) bool, qpos (Q,) int or None."""
  N_s = keys.shape[1]
  pos = _mesh.shard_offset(axis, N_s) + jnp.arange(N_s, dtype=jnp.int32)  # global key positions
  s = jnp.einsum("bqd,bnd->bqn", q, keys, preferred_element_type=jnp.float32) * scale
  v = kv[:, None, :] & (pos < n_keys)[None, None, :]
  if qpos is not None:
    v = v & (pos[None, None, :] <= qpos[None, :, None])
  # Masked slots may hold garbage (an unused cache slot); a NaN / +inf logit at a valid key flags the row.
  bad = jax.lax.psum(jnp.sum(v & (jnp.isnan(s) | (s == jnp.inf)), -1), axis) > 0
  v = v & (s > -jnp.inf) & ~jnp.isnan(s)
  bad = bad | (jax.lax.psum(jnp.sum(v, -1), axis) == 0) | ~checks.open_unit_ok(eps)
  bad = bad | ~((scale > 0) & jnp.isfinite(scale))  # a traced scale is checked here (flag)
  mx = jax.lax.pmax(jnp.max(jnp.where(v, s, -jnp.inf), -1), axis)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  sh = jnp.where(v, s - mx[..., None], -jnp.inf)
  e = jnp.exp(sh)
  z = jax.lax.psum(jnp.sum(e, -1), axis)
  target = eps * z / (1.0 + sum_margin(n_keys, jnp.float32))

  def tail(t):
    return jax.lax.psum(jnp.sum(jnp.where(sh < t[..., None], e, 0.0), -1), axis)

  lo0 = jax.lax.pmin(jnp.min(jnp.where(v, sh, jnp.inf), -1), axis)
  lo0 = jnp.where(jnp.isfinite(lo0), lo0, 0.0)
  lo = jnp.maximum(lo0, jnp.log(target) - jnp.log(jnp.float32(n_keys)))
  hi = jnp.ones_like(lo)

  def step(_, bracket):
    a, b = bracket
    mid = 0.5 * (a + b)
    ok = tail(mid) <= target
    return jnp.where(ok, mid, a), jnp.where(ok, b, mid)

  lo, _ = jax.lax.fori_loop(0, iters, step, (lo, hi))
  head = v & (sh >= lo[..., None])
  k = jax.lax.psum(jnp.sum(head, -1), axis).astype(jnp.int32)
  tv = tail(lo) / z
  # Flash-decoding partials of the head (local max, local sum, local normalized output).
  m_s = jnp.max(jnp.where(head, sh, -jnp.inf), -1)
  w = jnp.where(head, jnp.exp(sh - jnp.where(jnp.isfinite(m_s), m_s, 0.0)[..., None]), 0.0)
  l_s = jnp.sum(w, -1)
  vals = jnp.where(head.any(1)[..., None], values, 0.0).astype(jnp.float32)  # garbage in unused slots stays out
  o_s = jnp.einsum("bqn,bnd->bqd", w, vals) / jnp.maximum(l_s, jnp.finfo(jnp.float32).tiny)[..., None]
  out = flash_merge(o_s, l_s, m_s, axis)
  bad = bad | ~jnp.all(jnp.isfinite(out), -1)
  return ShardedAttention(checks.flag(bad, out), jnp.where(bad, 0, k), checks.flag(bad, tv), checks.flag(bad, lo))


@functools.partial(jax.jit, static_argnames=("mesh", "n_keys", "iters", "axis", "causal"))
def _threshold_attention(q, keys, values, kv, qpos, eps, scale, mesh, n_keys, iters, axis, causal):
  def shard(q, keys, values, kv, qpos, eps, scale):
    return _shard_heads(q, keys, values, kv, qpos if causal else None, eps, scale, n_keys, iters, axis)

  seq = P(None, axis, None)
  f = jax.shard_map(shard, mesh=mesh, in_specs=(P(), seq, seq, P(None, axis), P(), P(), P()),
                    out_specs=ShardedAttention(P(), P(), P(), P()))
  keys, values = _mesh.place(mesh, keys, seq), _mesh.place(mesh, values, seq)
  return f(q, keys, values, _mesh.place(mesh, kv, P(None, axis)), qpos, eps, scale)


def threshold_attention(q, keys, values, epsilon, mesh, *, axis: str = "seq", key_valid=None, q_positions=None,
                        scale: float | None = None, iters: int = 26) -> ShardedAttention:
  r"""Attention on the smallest certified head $H$ ($\tau_H \le \epsilon$) over a KV cache sharded along its length.

  One device's `topk.threshold_topk_probs` (the same bisection, the same rounding margin with the global key count)
  followed by $\hat P V$: the same head size k on every row (up to float rounding of sums at a threshold), tv within
  float32 rounding, the output within float32 rounding.

  Args:
    q: (Q, d) or (B, Q, d) queries (replicated). keys: (N, d) or (B, N, d); values: (N, dv) or (B, N, dv): the
      cache, split along N over `axis` (N need not divide the axis size: padding is masked).
    epsilon: TV budget in (0, 1) (may be traced).
    mesh: a `jax.sharding.Mesh`; axis: its axis that splits the sequence.
    key_valid: optional bool (N,) or (B, N): filled cache slots (unfilled slots may hold anything).
    q_positions: optional int (Q,) global positions of the queries: a causal mask, key j visible iff j <= position.
    scale: logit scale (default 1/sqrt(d)). iters: bisection steps (as in `topk.threshold_heads`).

  Returns:
    `ShardedAttention(out, k, tv, threshold)`; see there for the flag of invalid rows.

  Raises:
    ValueError: naming the argument (shapes, dtypes, epsilon, mesh, axis, a non-finite q, iters).
  """
  mesh = _mesh.check_mesh(mesh)
  axis = _mesh.check_axis(mesh, "axis", axis)
  checks.open_unit("epsilon", epsilon)
  iters = checks.int_in_range("iters", iters)
  for name, x in (("q", q), ("keys", keys), ("values", values)):
    checks.floating_array(name, x, (2, 3), finite=name == "q")
  if not q.ndim == keys.ndim == values.ndim:
    raise ValueError(f"q, keys and values must all be 2-D or all 3-D, got {q.shape}, {keys.shape}, {values.shape}")
  if q.shape[-1] != keys.shape[-1] or keys.shape[:-1] != values.shape[:-1] or q.shape[:-2] != keys.shape[:-2]:
    raise ValueError(f"shapes do not match: q {q.shape} (..., Q, d), keys {keys.shape} (..., N, d), values "
                     f"{values.shape} (..., N, dv)")
  single = q.ndim == 2
  q, keys, values = (jnp.asarray(a)[None] if single else jnp.asarray(a) for a in (q, keys, values))
  B, N = keys.shape[:2]
  if key_valid is None:
    kv = jnp.ones((B, N), bool)
  else:
    checks.valid(key_valid, (N,) if single else (B, N), "key_valid", against="keys' (..., N)")
    kv = jnp.broadcast_to(jnp.asarray(key_valid, bool), (B, N))
  for name, x in (("keys", keys), ("values", values)):  # unfilled slots may hold anything
    _mesh.finite_where(name, x, None if key_valid is None else kv)
  causal = q_positions is not None
  qpos = jnp.zeros((q.shape[1],), jnp.int32)
  if causal:
    checks.int_array("q_positions", q_positions, 0, None, shape=(q.shape[1],))
    qpos = jnp.asarray(q_positions, jnp.int32)
  scale = 1.0 / float(q.shape[-1]) ** 0.5 if scale is None else checks.positive_or_traced("scale", scale)
  S = _mesh.axis_size(mesh, axis)
  Np = _mesh.padded(N, S)
  keys, values = _mesh.pad_axis(keys, 1, Np), _mesh.pad_axis(values, 1, Np)
  kv = _mesh.pad_axis(kv, 1, Np, False)
  out = _threshold_attention(q, keys, values, kv, qpos, jnp.asarray(epsilon, jnp.float32),
                             jnp.asarray(scale, jnp.float32), mesh, N, iters, axis, causal)
  return jax.tree.map(lambda a: a[0], out) if single else out


# ------------------------------------------------------------------------------------------------ progressive
class ShardedProgressive(NamedTuple):
  r"""Per query (Q,) of `progressive_attention`.

  Attributes:
    out: (Q, dv) attention output on the certified head (flash-decoding merge).
    k: (Q,) int32 global head size (sum of the shards' heads).
    certificate: (Q,) $\max_s \hat\tau_s \ge \mathrm{TV}(P, \hat P_H)$, $\le \epsilon$ (NaN on a flagged row).
    head: (Q, N) bool, the global head (union of the shards' heads).
  """

  out: jax.Array
  k: jax.Array
  certificate: jax.Array
  head: jax.Array


@functools.partial(jax.jit, static_argnames=("mesh", "axis", "n_keys", "causal", "scale", "stages", "blocks",
                                             "search_fraction"))
def _progressive(q_rot, keys, block_norms, guard_norm, values, kv, qpos, eps, mesh, axis, n_keys, causal, scale,
                 stages, blocks, search_fraction):
  from asoftmax import topk  # noqa: PLC0415 (only here)

  def shard(q_rot, keys, block_norms, guard_norm, values, kv, qpos, eps):
    N_s = keys.shape[0]
    pos = _mesh.shard_offset(axis, N_s) + jnp.arange(N_s, dtype=jnp.int32)
    v = jnp.broadcast_to((kv & (pos < n_keys))[None, :], (q_rot.shape[0], N_s))
    if causal:
      v = v & (pos[None, :] <= qpos[:, None])
    has = jnp.any(v, -1)  # (Q,) this shard holds a visible key for the query
    # Every shard certifies its own part with the final budget of the *global* key count: the per-shard search uses
    # eps / (1 + m_local)^2, so scale eps to make that eps / (1 + m_global)^2.
    m_loc, m_glob = checks.rounding_margin(N_s), checks.rounding_margin(n_keys)
    eps_s = eps * ((1.0 + m_loc) / (1.0 + m_glob)) ** 2
    # The one-device search on this shard's keys (traced here: its value checks ran eagerly, see below).
    r = topk.progressive_search(q_rot, topk.PreparedKeys(keys, block_norms, guard_norm), v | ~has[:, None], eps_s,
                                scale, stages, blocks, search_fraction)
    head = r.head & has[:, None]
    cert = jnp.where(has, r.certificate, 0.0)
    bad = jax.lax.psum((has & jnp.isnan(r.certificate)).astype(jnp.int32), axis) > 0
    bad = bad | (jax.lax.psum(has.astype(jnp.int32), axis) == 0)
    # `head_logits` carry a per-shard shift (the shard's largest first-stage bound), so the merge recomputes the
    # head keys' logits in the common basis (a dense Q x N_s product here: the shift is not exposed).
    hl = jnp.where(head, (q_rot @ keys.T) * scale, -jnp.inf)
    m_s = jnp.max(hl, -1)
    w = jnp.where(head, jnp.exp(hl - jnp.where(jnp.isfinite(m_s), m_s, 0.0)[:, None]), 0.0)
    l_s = jnp.sum(w, -1)
    vals = jnp.where(head.any(0)[:, None], values, 0.0).astype(jnp.float32)
    o_s = (w @ vals) / jnp.maximum(l_s, jnp.finfo(jnp.float32).tiny)[:, None]
    out = flash_merge(o_s, l_s, m_s, axis)
    k = jax.lax.psum(jnp.sum(head, -1), axis).astype(jnp.int32)
    cert = jax.lax.pmax(cert, axis)
    bad = bad | ~jnp.all(jnp.isfinite(out), -1)
    return ShardedProgressive(checks.flag(bad, out), jnp.where(bad, 0, k), checks.flag(bad, cert), head & ~bad[:, None])

  seq = P(axis, None)
  f = jax.shard_map(shard, mesh=mesh, in_specs=(P(), seq, seq, P(axis), seq, P(axis), P(), P()),
                    out_specs=ShardedProgressive(P(), P(), P(), P(None, axis)), check_vma=False)
  return f(q_rot, keys, block_norms, guard_norm, values, kv, qpos, eps)


def progressive_attention(q_rot, prepared, values, epsilon, mesh, *, scale: float, stages: tuple[int, ...],
                          blocks: tuple[int, ...] | None = None, axis: str = "seq", key_valid=None,
                          q_positions=None, search_fraction: float = 0.9) -> ShardedProgressive:
  r"""`topk.progressive_search` on a sequence-sharded cache, the shards' certificates combined, and the output.

  Each shard runs the one-device progressive search on its keys (the same basis: rotated queries replicated,
  `topk.prepare_keys` output split along N) with the final budget $\epsilon/(1+m)^2$ of the **global** key count,
  and returns its certificate $\hat\tau_s = U_s/(L_s + U_s) \le \epsilon$. The global head is the union of the
  shards' heads and its tail mass is at most $\sum_s U_s / \sum_s (L_s + U_s) \le \max_s \hat\tau_s$ (the mediant
  of the shards' ratios), returned as the certificate. (The tighter mediant itself needs each shard's two scalars
  $\log L_s$, $\log U_s$, which `topk.ProgressiveResult` does not expose; nor the per-shard shift of its
  `head_logits`, so the output recomputes the head keys' logits with a dense Q x N_s product per shard.)

  Args:
    q_rot: (Q, d) rotated queries (`topk.rotate_queries`). prepared: `topk.PreparedKeys` of the N keys ((N, d),
      (N, B), (N,)). values: (N, dv). epsilon: TV budget in (0, 1).
    mesh, axis: the mesh and its sequence axis (N need not divide its size).
    scale, stages, blocks, search_fraction: as in `topk.progressive_search`.
    key_valid: optional bool (N,) filled slots. q_positions: optional int (Q,) global positions (causal mask).

  Returns:
    `ShardedProgressive(out, k, certificate, head)`.
  """
  from asoftmax import topk  # noqa: PLC0415

  mesh = _mesh.check_mesh(mesh)
  axis = _mesh.check_axis(mesh, "axis", axis)
  checks.open_unit("epsilon", epsilon)
  checks.floating_array("q_rot", q_rot, 2)
  checks.floating_array("values", values, 2, finite=False)
  if not isinstance(prepared, topk.PreparedKeys) or prepared.keys.ndim != 2:
    raise ValueError("prepared must be a topk.PreparedKeys of one head: keys (N, d), block_norms (N, B), "
                     "guard_norm (N,)")
  N, d = prepared.keys.shape
  if q_rot.shape[-1] != d or values.shape[0] != N:
    raise ValueError(f"shapes do not match: q_rot {q_rot.shape} (Q, d), prepared.keys {prepared.keys.shape} (N, d), "
                     f"values {values.shape} (N, dv)")
  edges = checks.stage_edges("stages", stages, d)
  blocks = edges if blocks is None else checks.stage_edges("blocks", blocks, d)
  if not set(edges) <= set(blocks) or prepared.block_norms.shape[-1] != len(blocks):
    raise ValueError(f"blocks {tuple(blocks)} must contain every stage edge {edges} and match prepared.block_norms")
  search_fraction = checks.positive("search_fraction", search_fraction)
  if search_fraction > 1.0:
    raise ValueError(f"search_fraction must be in (0, 1], got {search_fraction}")
  scale = checks.positive("scale", scale)
  if not checks.is_traced(q_rot, *prepared):
    # topk's own value checks of a prepared head (block norms that bound, guard norms), run on the concrete arrays
    # by tracing the one-device search abstractly (`jax.eval_shape` computes nothing).
    jax.eval_shape(lambda: topk.progressive_search(q_rot, prepared, None, epsilon, scale, edges, blocks,
                                                   search_fraction))
  kv = jnp.ones((N,), bool) if key_valid is None else jnp.asarray(key_valid, bool)
  if key_valid is not None:
    checks.valid(key_valid, (N,), "key_valid", against="keys' (N,)")
  _mesh.finite_where("values", values, None if key_valid is None else key_valid)
  causal = q_positions is not None
  qpos = jnp.zeros((q_rot.shape[0],), jnp.int32)
  if causal:
    checks.int_array("q_positions", q_positions, 0, None, shape=(q_rot.shape[0],))
    qpos = jnp.asarray(q_positions, jnp.int32)
  S = _mesh.axis_size(mesh, axis)
  Np = _mesh.padded(N, S)
  pad = lambda a, value=0: _mesh.pad_axis(jnp.asarray(a), 0, Np, value)  # noqa: E731
  q_rot = jnp.asarray(q_rot)
  q_rot = q_rot.astype(jnp.promote_types(q_rot.dtype, jnp.float32))  # bf16 / f16 computed in float32
  r = _progressive(q_rot, pad(prepared.keys), pad(prepared.block_norms), pad(prepared.guard_norm),
                   pad(values), pad(kv, False), qpos, jnp.asarray(epsilon, jnp.float32), mesh, axis, N, causal,
                   float(scale), tuple(edges), tuple(blocks), float(search_fraction))
  return r._replace(head=r.head[:, :N])
