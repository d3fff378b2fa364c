r"""Certified decode attention that reads less: a quantized key sketch with per-key logit bounds (issue 28).

Beyond the paper (Tzachristas et al., arXiv:2512.07647, certify a head from logits it has already computed).
Page-level bounds (per-channel min/max boxes as in Quest, or centre-radius cells as in `search.py`) sit far above a
page's true max logit, so a certificate built on them reads every page. Here every key gets its own bound:

* **Sketch** (`build_key_sketch`; a cache re-quantizes a page with `quantize_pages` when a key enters it): keys are
  split into pages of P consecutive slots; per page $p$ and channel $c$ a range $[\ell_{pc},
  \ell_{pc} + L\,\Delta_{pc}]$ holding every valid key ($L = 2^b - 1$, b = 4 or 8 bits; $\ell$ rounded down and
  $\Delta$ rounded up in the stat dtype), and per key the code $u_{ic} = \mathrm{round}((k_{ic} - \ell_{pc}) /
  \Delta_{pc}) \in \{0..L\}$. The reconstruction $\hat k_{ic} = \ell_{pc} + \Delta_{pc} u_{ic}$ satisfies
  $|k_{ic} - \hat k_{ic}| \le E_{pc} = \tfrac12\Delta_{pc}(1 + 2^{-10}) + 16u(|\ell_{pc}| + 255\Delta_{pc})$
  ($u$ = float32 unit roundoff; the second term covers the float32 rounding of quantizing and reconstructing).
* **Bounds** (`sketch_bounds`): for a query $q$ and key $i$ on page $p$, with $\hat s_i = q\cdot\hat k_i\,
  \mathrm{scale}$, $|q\cdot k_i\,\mathrm{scale} - \hat s_i| \le r_p = \mathrm{scale}\sum_c |q_c| E_{pc}$ (Hoelder),
  widened by a float guard $g_p = 2(d+4)u\,\mathrm{scale}\sum_c |q_c| A_{pc}$, $A_{pc} = |\ell_{pc}| + 255\Delta_{pc}
  + E_{pc} \ge |k_{ic}|, |\hat k_{ic}|$, which covers the rounding of both $\mathrm{fl}(q\cdot\hat k)$ and of any
  float32 evaluation of $q\cdot k$: $\mathrm{lo}_i = \hat s_i - r_p - g_p \le s_i \le \hat s_i + r_p + g_p =
  \mathrm{hi}_i$.
* **Search** (`sketch_search`; one selection per key/value head serving its G query heads, GQA): keys are ranked
  by $\pi_i = \max_g (\mathrm{hi}_{gi} - \log\sum_j e^{\mathrm{hi}_{gj}})$; the top `capacity` are the candidates,
  read exactly (keys and values) in that order. After reading the first m, with $S_g(m) = \sum_{j \le m}
  e^{s_{gj} - g}$ (exact logits, lowered by the guard) and $U_g(m) = \sum_{\text{unread}} e^{\mathrm{hi}_{gi}}$, the
  certificate $\hat\tau_g(m) = U_g / (S_g + U_g)$ bounds $\mathrm{TV}(P_g, \hat P_{g,H})$ of the head $H$ = the m
  read keys, since the true tail mass $T \le U$ and $T / (S + T)$ grows with $T$. The head is the shortest prefix
  with $\max_g\hat\tau_g \le \epsilon / (1 + m_\Sigma)^2$ ($m_\Sigma = 4(N+4)u$, the float-sum margin of
  `decode.py`), so the realised TV is $\le \epsilon$ on every row. If no prefix within `capacity` certifies, the
  row falls back to dense attention over all keys and is flagged (`fallback`).

Bytes (`sketch_bytes`): per valid key $d/2$ bytes of codes for $b \le 4$ -- the codes are stored packed, two 4-bit
codes per byte along the channel axis (d even), and `_bounds` unpacks them by shift and mask, so the array held and
read is the packed one -- and $d$ bytes for $b$ in 5..8 (one per byte); this is $b\,d/8$ at 4 and 8 bits. Per page
$2\,d$ stats; then K and V of the keys read. The bytes counted are the bytes the code stores and reads.
Reads: this XLA implementation gathers all `capacity` candidates (static shapes) and scores the whole sketch; the
algorithm needs only the first `keys_read` of them, which a kernel reading them in order (e.g. a paged decode
kernel that stops when the certificate holds) would read. `keys_read` counts those.

Example:
  >>> rng = np.random.default_rng(0)
  >>> K, V = rng.normal(size=(64, 8)).astype(np.float32), rng.normal(size=(64, 8)).astype(np.float32)
  >>> sk = build_key_sketch(K, None, bits=8, page_size=16)
  >>> r = sketch_search(4 * K[:1], K, V, sk, None, epsilon=0.01, scale=8 ** -0.5, capacity=32)
  >>> bool(r.certificate.max() <= 0.01), bool(r.fallback)
  (True, False)
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


_U = float(np.finfo(np.float32).eps) / 2  # float32 unit roundoff
_MAX_CODE = 255.0  # codes are uint8: every bound below holds for any bits <= 8


class KeySketch(NamedTuple):
  r"""A per-key quantized copy of a key cache, with per page and channel ranges (leading dims (...)).

  Attributes:
    codes: (..., N, d / 2) uint8 for b <= 4: two codes per byte, $u_{i,2j} + 16\,u_{i,2j+1}$ (d even); (..., N, d)
      uint8, one per byte, for b > 4. $u_{ic} \in \{0..2^b - 1\}$ (0 at invalid slots). Consumers accept either
      layout (the shape against `page_lo`'s d tells which).
    page_lo: (..., N / P, d) range start $\ell_{pc}$ (stat dtype; rounded down).
    page_step: (..., N / P, d) $\Delta_{pc} \ge 0$ (stat dtype; rounded up; 0 on a page with no valid key).
  """

  codes: jax.Array
  page_lo: jax.Array
  page_step: jax.Array


class SketchResult(NamedTuple):
  r"""Outcome of `sketch_search` per key/value head (leading dims (...), G query heads).

  Attributes:
    out: (..., G, dv) float32 attention output over the head $H$ (dense output on a fallback row).
    k: (...,) int32 head size $|H|$ (shared by the G query heads; the valid keys on a fallback row).
    keys_read: (...,) int32 keys whose exact key and value the search needs (= k; all valid keys on fallback).
    certificate: (..., G) float32 $\hat\tau_g \ge \mathrm{TV}(P_g, \hat P_{g,H})$, $\le \epsilon$ (0 on fallback);
      NaN on a row flagged under `jax.jit` (non-finite query, no valid key, or a traced epsilon outside (0, 1)).
    fallback: (...,) bool, no prefix of the `capacity` candidates certified: dense attention was used.
    indices: (..., C) int32 candidate slots in reading order; the head is `indices[..., :k]` (unless fallback).
  """

  out: jax.Array
  k: jax.Array
  keys_read: jax.Array
  certificate: jax.Array
  fallback: jax.Array
  indices: jax.Array


# ------------------------------------------------------------------------------------------------ sketch
def _round_out(x, dtype, up: bool):
  """x (float32) converted to `dtype`, rounded outward (down for range starts, up for steps)."""
  y = x.astype(dtype)
  far = jnp.asarray(jnp.inf if up else -jnp.inf, dtype)
  bad = (y.astype(jnp.float32) < x) if up else (y.astype(jnp.float32) > x)
  return jnp.where(bad, jnp.nextafter(y, far), y)


def code_width(d: int, bits: int) -> int:
  """Bytes of one key's codes: d / 2 for bits <= 4 (two codes per byte, d must be even), else d (one per byte)."""
  if bits > 4:
    return d
  if d % 2:
    raise ValueError(f"the key dimension d = {d} must be even for bits = {bits} <= 4 (two codes per byte)")
  return d // 2


def pack_codes(u):
  """(..., d) uint8 codes < 16 -> (..., d / 2) uint8, two per byte: channel 2j in the low nibble, 2j + 1 the high.

  d must be even (unchecked, traceable; not exported)."""
  return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_codes(codes, d: int):
  """Codes as stored -> (..., d) uint8, one per channel: packed (..., d / 2) are split by shift and mask (an
  elementwise op XLA can fuse into its consumer); (..., d) are returned as they are (not exported)."""
  if codes.shape[-1] == d:
    return codes
  return jnp.stack([codes & 15, codes >> 4], -1).reshape(codes.shape[:-1] + (d,))


def quantize_pages(keys, valid, bits, page_size, stat_dtype):
  """keys (R, N, d) float32, valid (R, N) -> codes (R, N, `code_width(d, bits)`) uint8, lo, step (R, N/P, d).

  The sketch of N / P pages (module docstring), codes packed two per byte for bits <= 4 (d even, else ValueError);
  traceable and unchecked otherwise, for caches that re-quantize the page a new key enters (not exported)."""
  R, N, d = keys.shape
  P = page_size
  code_width(d, bits)  # d even for packed codes
  levels = float(2 ** bits - 1)
  kp = keys.reshape(R, N // P, P, d)
  vp = valid.reshape(R, N // P, P, 1)
  mn = jnp.min(jnp.where(vp, kp, jnp.inf), 2)
  mx = jnp.max(jnp.where(vp, kp, -jnp.inf), 2)
  empty = ~jnp.any(vp, 2)
  mn, mx = jnp.where(empty, 0.0, mn), jnp.where(empty, 0.0, mx)
  lo = _round_out(mn, stat_dtype, up=False)
  step = _round_out((mx - lo.astype(jnp.float32)) / levels, stat_dtype, up=True)
  lo32, st32 = lo.astype(jnp.float32)[:, :, None], step.astype(jnp.float32)[:, :, None]
  u = jnp.where(st32 > 0, jnp.round((kp - lo32) / jnp.where(st32 > 0, st32, 1.0)), 0.0)
  u = jnp.where(vp & jnp.isfinite(u), jnp.clip(u, 0.0, levels), 0.0)
  u = u.astype(jnp.uint8).reshape(R, N, d)
  return (pack_codes(u) if bits <= 4 else u), lo, step


def _check_sketch_args(keys, valid, bits, page_size):
  checks.vectors("keys", keys)
  checks.valid(valid, keys.shape[:-1], against="keys[..., 0]")
  bits = checks.int_in_range("bits", bits, 1, 8)
  page_size = checks.int_in_range("page_size", page_size)
  if bits <= 4 and keys.shape[-1] % 2:
    raise ValueError(f"keys: the key dimension d = {keys.shape[-1]} must be even for bits = {bits} <= 4 (codes "
                     "are stored two per byte)")
  if keys.shape[-2] % page_size:
    raise ValueError(f"page_size ({page_size}) must divide the number of slots N = {keys.shape[-2]}")
  return bits, page_size


@functools.partial(jax.jit, static_argnames=("bits", "page_size", "stat_dtype"))
def _build(keys, valid, bits, page_size, stat_dtype):
  lead, (N, d) = keys.shape[:-2], keys.shape[-2:]
  k = keys.astype(jnp.float32).reshape((-1, N, d))
  v = jnp.broadcast_to(valid, keys.shape[:-1]).reshape((-1, N))
  codes, lo, step = quantize_pages(k, v, bits, page_size, stat_dtype)
  un = lambda x: x.reshape(lead + x.shape[1:])
  return KeySketch(un(codes), un(lo), un(step))


def build_key_sketch(keys: ArrayLike, valid: ArrayLike | None, bits: int = 4, page_size: int = 16,
                     stat_dtype=jnp.float32) -> KeySketch:
  r"""Quantizes every key to `bits` bits on its page's per-channel range (module docstring).

  Args:
    keys: (..., N, d) float keys (e.g. a KV cache after RoPE; bfloat16 / float16 computed in float32).
    valid: optional bool (..., N): filled slots (others are ignored for the ranges, code 0).
    bits: code width in [1, 8] (4 or 8 in practice).
    page_size: P slots per page (divides N); ranges are per page and channel.
    stat_dtype: storage of the page ranges: float32, float16 or bfloat16 (rounded outward, so the bounds hold).

  Returns:
    `KeySketch`. A key whose channel is outside the stat dtype's range makes that page's bounds infinite (the
    search then reads it: still certified).

  Example:
    >>> sk = build_key_sketch(jnp.array([[0.0, 1.0], [1.0, -1.0]]), None, bits=4, page_size=2)
    >>> sk.codes.tolist(), sk.page_step.tolist()  # codes [[0, 15], [15, 0]], packed: 0 + 16 * 15, 15 + 16 * 0
    ([[240], [15]], [[0.06666667014360428, 0.13333334028720856]])
  """
  bits, page_size = _check_sketch_args(keys, valid, bits, page_size)
  dt = checks.dtype_in("stat_dtype", stat_dtype, (jnp.float32, jnp.float16, jnp.bfloat16))
  v = jnp.ones((), bool) if valid is None else checks.as_array(valid)
  return _build(checks.as_array(keys), v, bits, page_size, dt)


def sketch_bytes(num_keys, num_pages, d: int, bits: int, stat_bytes: int = 4):
  """Bytes of the sketch as stored for `num_keys` keys on `num_pages` pages: codes + 2 d stats per page.

  Codes take d / 2 bytes per key for bits <= 4 (two codes per byte, as `build_key_sketch` stores them; = bits d / 8
  at 4 bits) and d bytes for bits in 5..8 (one per byte; = bits d / 8 at 8 bits).

  Args:
    num_keys, num_pages: counts >= 0 (Python ints, or integer arrays that broadcast).
    d: key dimension >= 1 (even for bits <= 4); bits: code width in [1, 8]; stat_bytes: bytes of one page statistic
      (4 for float32, 2 for float16 / bfloat16).

  Returns:
    Bytes, a float (an array of the broadcast shape for array counts).

  Example:
    >>> sketch_bytes(2048, 128, 64, 4, stat_bytes=2)  # 4-bit codes, 16-key pages, 16-bit stats
    98304.0
  """
  for name, count in (("num_keys", num_keys), ("num_pages", num_pages)):  # Python ints or integer arrays
    checks.int_array(name, count, 0) if np.ndim(count) else checks.int_in_range(name, count, 0)
  d = checks.int_in_range("d", d)
  bits = checks.int_in_range("bits", bits, 1, 8)
  stat_bytes = checks.int_in_range("stat_bytes", stat_bytes)
  return num_keys * float(code_width(d, bits)) + num_pages * 2 * d * stat_bytes


# ------------------------------------------------------------------------------------------------ bounds
def _page_terms(q, lo, step, scale):
  """q (R, G, d); lo, step (R, NP, d) -> radius r and guard g (R, G, NP), both already times scale."""
  lo, step = lo.astype(jnp.float32), step.astype(jnp.float32)
  err = 0.5 * step * (1 + 2.0 ** -10) + 16 * _U * (jnp.abs(lo) + _MAX_CODE * step)
  amax = jnp.abs(lo) + _MAX_CODE * step + err
  qa = jnp.abs(q)
  d = q.shape[-1]
  r = jnp.einsum("rgd,rpd->rgp", qa, err, precision="highest") * (1 + 2.0 ** -12)
  g = 2.0 * (d + 4) * _U * jnp.einsum("rgd,rpd->rgp", qa, amax, precision="highest") * (1 + 2.0 ** -12)
  return r * scale, g * scale


def _bounds(q, codes, lo, step, scale):
  """q (R, G, d), codes (R, N, d / 2) packed or (R, N, d) -> s_hat, radius+guard per key, guard per key: (R, G, N)."""
  R, N = codes.shape[:2]
  NP, d = lo.shape[1:]
  P = N // NP
  u = unpack_codes(codes, d)  # shift / mask of the packed array read
  khat = (lo.astype(jnp.float32)[:, :, None] + step.astype(jnp.float32)[:, :, None]
          * u.reshape(R, NP, P, d).astype(jnp.float32)).reshape(R, N, d)
  s_hat = jnp.einsum("rgd,rnd->rgn", q, khat, precision="highest") * scale
  r, g = _page_terms(q, lo, step, scale)
  rep = lambda x: jnp.repeat(x, P, axis=-1)
  return s_hat, rep(r + g), rep(g)


def _check_sketch(sketch, shape) -> None:
  """`sketch` fits keys (..., N, d): codes (..., N, d) or packed (..., N, d / 2) uint8, ranges (..., N / P, d)."""
  shape = tuple(shape)
  ok = {shape} | ({shape[:-1] + (shape[-1] // 2,)} if shape and shape[-1] % 2 == 0 else set())
  if tuple(sketch.codes.shape) not in ok or sketch.codes.dtype != jnp.uint8:
    raise ValueError(f"sketch.codes must be uint8 of the keys' shape {shape} (or {shape[:-1]} + (d / 2,), two codes "
                     f"per byte), got {sketch.codes.dtype}{tuple(sketch.codes.shape)}")
  lo, st = tuple(sketch.page_lo.shape), tuple(sketch.page_step.shape)
  ok = (lo == st and len(lo) == len(shape) and lo[:-2] == tuple(shape[:-2]) and lo[-1] == shape[-1]
        and lo[-2] >= 1 and shape[-2] % lo[-2] == 0)
  if not ok:
    raise ValueError(f"sketch.page_lo / page_step must have shape {tuple(shape[:-2])} + (N / P, {shape[-1]}) "
                     f"with N = {shape[-2]}, got {lo} / {st}")


def sketch_bounds(queries: ArrayLike, sketch: KeySketch, scale: float) -> tuple[jax.Array, jax.Array]:
  r"""Certified float32 logit bounds $\mathrm{lo}_i \le q\cdot k_i\,\mathrm{scale} \le \mathrm{hi}_i$ from the sketch.

  Args:
    queries: (..., G, d) float; sketch: `KeySketch` with leading dims (...); scale: e.g. $1/\sqrt{d}$.

  Returns:
    (lo, hi), each (..., G, N) float32; they bound the real-arithmetic logit and its float32 evaluation (module
    docstring). Unmasked: the caller applies its valid mask.

  Example:
    >>> sk = build_key_sketch(jnp.array([[0.0, 1.0], [1.0, -1.0]]), None, bits=8, page_size=2)
    >>> lo, hi = sketch_bounds(jnp.array([[1.0, 2.0]]), sk, 1.0)   # true logits 2 and -1
    >>> bool(lo[0, 0] <= 2 <= hi[0, 0]) and bool(lo[0, 1] <= -1 <= hi[0, 1])
    True
  """
  checks.floating_array("queries", queries)
  d = sketch.page_lo.shape[-1] if sketch.page_lo.ndim else 0
  _check_sketch(sketch, tuple(sketch.codes.shape[:-1]) + (d,))
  if queries.ndim < 2 or queries.shape[-1] != d or tuple(queries.shape[:-2]) != tuple(sketch.codes.shape[:-2]):
    raise ValueError(f"queries must have shape {tuple(sketch.codes.shape[:-2])} + (G, {d}), got "
                     f"{tuple(queries.shape)}")
  scale = _core.check_scale(scale)
  return _sketch_bounds(_core.as_float(queries), sketch, scale)


@jax.jit
def _sketch_bounds(q, sketch, scale):
  lead, (N, width) = sketch.codes.shape[:-2], sketch.codes.shape[-2:]
  G, d = q.shape[-2:]
  s_hat, w, _ = _bounds(q.reshape(-1, G, d), sketch.codes.reshape(-1, N, width),
                        sketch.page_lo.reshape((-1,) + sketch.page_lo.shape[-2:]),
                        sketch.page_step.reshape((-1,) + sketch.page_step.shape[-2:]), scale)
  ok = jnp.all(jnp.isfinite(q.reshape(-1, G, d)), -1, keepdims=True) & (scale > 0) & jnp.isfinite(scale)
  lo, hi = jnp.where(ok, s_hat - w, jnp.nan), jnp.where(ok, s_hat + w, jnp.nan)
  return lo.reshape(lead + (G, N)), hi.reshape(lead + (G, N))


# ------------------------------------------------------------------------------------------------ search
def _search(q, keys, values, codes, lo, step, valid, epsilon, scale, capacity):
  """Flat inputs: q (R, G, d), keys (R, N, d), values (R, N, dv), codes (R, N, d / 2 or d), lo/step (R, NP, d),
  valid (R, N)."""
  R, G, d = q.shape
  N = keys.shape[1]
  C = capacity
  s_hat, w, guard = _bounds(q, codes, lo, step, scale)
  vk = valid[:, None, :]
  hi = jnp.where(vk, s_hat + w, -jnp.inf)  # (R, G, N)
  top = jnp.max(hi, -1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  # Rank keys by their largest normalized upper bound over the G query heads.
  lse = jax.nn.logsumexp(jnp.where(vk, hi - top, -jnp.inf), -1, keepdims=True)
  prio = jnp.max(jnp.where(vk, hi - top - lse, -jnp.inf), 1)  # (R, N)
  _, idx = jax.lax.top_k(prio, C)  # (R, C) reading order
  idx = idx.astype(jnp.int32)
  take = lambda x: jnp.take_along_axis(x, idx[:, :, None], 1)  # (R, C, .)
  kc, vc = take(keys).astype(jnp.float32), take(values).astype(jnp.float32)
  cval = jnp.take_along_axis(valid, idx, 1)  # (R, C)
  s = jnp.einsum("rgd,rcd->rgc", q, kc, precision="highest") * scale
  s = jnp.where(cval[:, None, :], s, -jnp.inf)
  at = lambda x: jnp.take_along_axis(x, jnp.broadcast_to(idx[:, None, :], (R, G, C)), 2)
  hi_c, g_c = at(hi), at(guard)
  e_hi = jnp.exp(hi - top)  # (R, G, N), <= 1
  in_cand = jnp.zeros((R, N), bool).at[jnp.arange(R)[:, None], idx].set(True)
  rest = jnp.sum(jnp.where(in_cand[:, None, :], 0.0, e_hi), -1, keepdims=True)  # unread beyond the candidates
  e_c = jnp.exp(hi_c - top)
  unread_c = jnp.flip(jnp.cumsum(jnp.flip(e_c, -1), -1), -1)  # sum_{j >= m}
  unread = jnp.concatenate([unread_c[..., 1:], jnp.zeros_like(unread_c[..., :1])], -1) + rest  # after m = 1..C
  unread = unread + N * float(np.finfo(np.float32).tiny)  # underflowed bounds still count
  S = jnp.cumsum(jnp.where(cval[:, None, :], jnp.exp(s - g_c - top), 0.0), -1)
  cert = unread / (S + unread)  # (R, G, C) for heads of size m = 1..C
  mrg = 4.0 * (N + 4) * _U
  eps_stop = epsilon / (1.0 + mrg) ** 2
  okm = jnp.all(cert <= eps_stop, 1)  # (R, C)
  fallback = ~jnp.any(okm, -1)
  m = (1 + jnp.argmax(okm, -1)).astype(jnp.int32)
  cert_m = jnp.take_along_axis(cert, jnp.broadcast_to((m - 1)[:, None, None], (R, G, 1)), 2)[..., 0]
  head = jnp.arange(C)[None, None, :] < m[:, None, None]
  sh = jnp.where(head & cval[:, None, :], s, -jnp.inf)
  p = jax.nn.softmax(sh, -1)
  out = jnp.einsum("rgc,rce->rge", p, vc, precision="highest")

  def dense(out):
    sd = jnp.einsum("rgd,rnd->rgn", q, keys.astype(jnp.float32), precision="highest") * scale
    pd = jax.nn.softmax(jnp.where(vk, sd, -jnp.inf), -1)
    od = jnp.einsum("rgn,rne->rge", pd, values.astype(jnp.float32), precision="highest")
    return jnp.where(fallback[:, None, None], od, out)

  out = jax.lax.cond(jnp.any(fallback), dense, lambda o: o, out)
  nvalid = jnp.sum(valid, -1).astype(jnp.int32)
  k = jnp.where(fallback, nvalid, jnp.minimum(m, nvalid))
  cert_m = jnp.where(fallback[:, None], 0.0, cert_m)
  bad = (~jnp.all(jnp.isfinite(q), (-1, -2)) | (nvalid == 0) | ~_core.eps_ok(epsilon) | ~(scale > 0)
         | ~jnp.isfinite(scale) | ~jnp.all(jnp.isfinite(out), (-1, -2)))
  cert_m = _core.flag(bad, cert_m)
  out = _core.flag(bad, out)
  return SketchResult(out, k, k, cert_m, fallback, idx)


@functools.partial(jax.jit, static_argnames=("capacity",))
def _sketch_search(q, keys, values, sketch, valid, epsilon, scale, capacity):
  lead, (G, d) = q.shape[:-2], q.shape[-2:]
  N, dv = keys.shape[-2], values.shape[-1]
  flat = lambda x, tail: x.reshape((-1,) + tail)
  v = jnp.broadcast_to(valid, keys.shape[:-1]).reshape((-1, N))
  res = _search(flat(q, (G, d)), flat(keys, (N, d)), flat(values, (N, dv)),
                flat(sketch.codes, (N, sketch.codes.shape[-1])), flat(sketch.page_lo, sketch.page_lo.shape[-2:]),
                flat(sketch.page_step, sketch.page_step.shape[-2:]), v, epsilon, scale, capacity)
  return jax.tree.map(lambda x: x.reshape(lead + x.shape[1:]), res)


def sketch_search(queries: ArrayLike, keys: ArrayLike, values: ArrayLike, sketch: KeySketch,
                  valid: ArrayLike | None, epsilon: float, scale: float, capacity: int) -> SketchResult:
  r"""Certified attention of G query heads over their shared keys, reading exact keys only where bounds require.

  Args:
    queries: (..., G, d) float: the G query heads that share one key/value head (GQA), one position.
    keys: (..., N, d) and values (..., N, dv): the cache (float; bfloat16 computed in float32).
    sketch: the keys' `KeySketch` (`build_key_sketch`, leading dims (...)).
    valid: optional bool (..., N) (causal mask: the filled slots up to the query's position).
    epsilon: TV budget in (0, 1) (may be traced).
    scale: logit scale, e.g. $1/\sqrt{d}$.
    capacity: C, candidates read at most (static, 1 <= C <= N); a row needing more falls back to dense.

  Returns:
    `SketchResult`. On every row and query head, $\mathrm{TV}(\mathrm{softmax}(s_g), \hat P_{g,H}) \le$
    certificate $\le \epsilon$ (module docstring), or the row is flagged `fallback` and attends densely.

  Raises:
    ValueError: bad shapes / dtypes, epsilon, scale or capacity, or (concrete input) a non-finite query or key at a
      valid slot, or a row with no valid key.

  Example:
    >>> K = np.eye(4, dtype=np.float32)
    >>> r = sketch_search(np.array([[20.0, 0, 0, 0]], np.float32), K, K, build_key_sketch(K, None, 8, 4), None,
    ...                   epsilon=0.01, scale=1.0, capacity=2)
    >>> int(r.k), r.indices.tolist()[:1], r.out.round(3).tolist()
    (1, [0], [[1.0, 0.0, 0.0, 0.0]])
  """
  checks.open_unit("epsilon", epsilon)
  checks.floating_array("queries", queries)
  checks.floating_array("keys", keys, finite=False)
  checks.floating_array("values", values, finite=False)
  if queries.ndim < 2 or keys.ndim != queries.ndim or queries.shape[-1] != keys.shape[-1]:
    raise ValueError(f"queries must have shape (..., G, d) matching keys (..., N, d) {tuple(keys.shape)}, got "
                     f"{tuple(queries.shape)}")
  if tuple(queries.shape[:-2]) != tuple(keys.shape[:-2]):
    raise ValueError(f"queries: leading dims {tuple(queries.shape[:-2])} must equal the keys' "
                     f"{tuple(keys.shape[:-2])} (vmap over query positions)")
  if values.ndim != keys.ndim or tuple(values.shape[:-1]) != tuple(keys.shape[:-1]):
    raise ValueError(f"values must have shape {tuple(keys.shape[:-1])} + (dv,), got {tuple(values.shape)}")
  _check_sketch(sketch, keys.shape)
  checks.valid(valid, keys.shape[:-1], against="keys[..., 0]")
  scale = _core.check_scale(scale)
  capacity = checks.int_in_range("capacity", capacity, 1, keys.shape[-2])
  v = jnp.ones((), bool) if valid is None else jnp.asarray(valid)
  if not checks.is_traced(v):
    if not np.broadcast_to(np.asarray(v), keys.shape[:-1]).any(-1).all():
      raise ValueError("valid: a row has no valid key")
  # Keys and values are checked where concrete (a traced one: a non-finite *read* key or value flags the row; an
  # unread key is certified by its sketch and never looked at -- the point of the search).
  used = None if checks.is_traced(v) else np.broadcast_to(np.asarray(v), keys.shape[:-1])[..., None, :]
  for name, x in (("keys", keys), ("values", values)):
    if not checks.is_traced(x):
      _core.check_finite_at_used_keys(name, x, used, tuple(keys.shape[:-2]) + (1, keys.shape[-2]))
  return _sketch_search(_core.as_float(queries), jnp.asarray(keys), jnp.asarray(values), sketch, v,
                        jnp.asarray(epsilon, jnp.float32), scale, capacity)
