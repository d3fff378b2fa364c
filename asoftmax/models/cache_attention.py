r"""Cache attentions for `llama.extend` / `decode_step` beyond exact softmax (issue 28).

Both follow the protocol of `llama.DenseCacheAttention` (init / write / attend), plus `prepare(layers, filled)`, which
builds their per-key state from a cache that was filled densely (equal to having written it key by key, since a
write re-quantizes the whole page a key enters from the exact keys):

* `SketchCacheAttention`: decode steps (t = 1) use the certified sketch search `asoftmax.topk.sketch_search`
  (quantized key sketch, exact keys and values read only where the bounds require); prefill chunks (t > 1) attend
  densely. Per layer, `aux` holds the head size / keys read per key-value head, the fallback flag, the certificate
  and, with `measure=True`, the realised TV of every query head (computed densely, for experiments).
* `QuantizedKVAttention`: the baseline at equal bytes: keys and values stored as b-bit codes on per page and
  channel ranges (the same quantizer), decode steps attend densely over the dequantized cache.

Codes of b <= 4 bits are stored two per byte along head_dim (`*_codes` is (..., N, head_dim / 2) uint8; head_dim
must be even), 8-bit codes one per byte; the dequantization unpacks them by shift and mask.

Example:
  >>> att = SketchCacheAttention(epsilon=0.01, bits=4, page_size=4, capacity=0.5)
  >>> cache = llama.init_cache(params.config, 1, 64, att)                         # doctest: +SKIP
  >>> h, cache, _ = llama.prefill(params, prompt, cache, att)                      # doctest: +SKIP
  >>> logits, cache, aux = llama.decode_step(params, tok, cache, att)             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from asoftmax import checks
from asoftmax.models import llama
from asoftmax.topk import sketch as sk


def _capacity(capacity, N: int) -> int:
  if isinstance(capacity, float):
    if not 0 < capacity <= 1:
      raise ValueError(f"capacity as a fraction of the cache must be in (0, 1], got {capacity}")
    return max(1, min(N, math.ceil(capacity * N)))
  if not 1 <= int(capacity) <= N:
    raise ValueError(f"capacity must be in [1, {N}], got {capacity}")
  return int(capacity)


def _state_shapes(layer_cache, names, bits, page_size, stat_dtype):
  k = layer_cache["k"]
  b, Hkv, N, hd = k.shape
  if N % page_size:
    raise ValueError(f"page_size ({page_size}) must divide the cache's max_len {N}")
  if bits <= 4 and hd % 2:
    raise ValueError(f"bits = {bits} <= 4 stores two codes per byte: the head_dim ({hd}) must be even")
  out = dict(layer_cache)
  for n in names:
    out[f"{n}_codes"] = jnp.zeros((b, Hkv, N, sk.code_width(hd, bits)), jnp.uint8)
    out[f"{n}_lo"] = jnp.zeros((b, Hkv, N // page_size, hd), stat_dtype)
    out[f"{n}_step"] = jnp.zeros((b, Hkv, N // page_size, hd), stat_dtype)
  return out


def _requantize(cache_layers, layer, names, pos, t, bits, page_size, stat_dtype):
  """Re-quantizes the pages that slots pos..pos+t-1 fall in (one page when t = 1, the whole layer otherwise)."""
  out = dict(cache_layers)
  N = cache_layers["k"].shape[3]
  P = page_size
  for n in names:
    x = jax.lax.dynamic_index_in_dim(cache_layers[n], layer, 0, keepdims=False)  # (b, Hkv, N, hd)
    b, Hkv, _, hd = x.shape
    if t == 1:
      page = pos // P
      xp = jax.lax.dynamic_slice_in_dim(x, page * P, P, axis=2)
      vp = (page * P + jnp.arange(P)) <= pos
      codes, lo, step = sk.quantize_pages(xp.astype(jnp.float32).reshape(-1, P, hd),
                                          jnp.broadcast_to(vp, (b * Hkv, P)), bits, P, stat_dtype)
      out = llama.write_slots(out, layer, f"{n}_codes", codes.reshape(b, Hkv, P, -1), page * P)
      out = llama.write_slots(out, layer, f"{n}_lo", lo.reshape(b, Hkv, 1, hd), page)
      out = llama.write_slots(out, layer, f"{n}_step", step.reshape(b, Hkv, 1, hd), page)
    else:
      v = jnp.arange(N) < pos + t
      codes, lo, step = sk.quantize_pages(x.astype(jnp.float32).reshape(-1, N, hd),
                                          jnp.broadcast_to(v, (b * Hkv, N)), bits, P, stat_dtype)
      out = llama.write_slots(out, layer, f"{n}_codes", codes.reshape(b, Hkv, N, -1), 0)
      out = llama.write_slots(out, layer, f"{n}_lo", lo.reshape(b, Hkv, N // P, hd), 0)
      out = llama.write_slots(out, layer, f"{n}_step", step.reshape(b, Hkv, N // P, hd), 0)
  return out


def _prepare_all(cache_layers, filled, names, bits, page_size, stat_dtype):
  """Builds every layer's codes for the first `filled` slots of a densely filled stacked cache (one layer at a time,
  `lax.map`, so the float32 temporaries stay the size of one layer)."""
  out = dict(cache_layers)
  for n in names:
    x = cache_layers[n]
    L, b, Hkv, N, hd = x.shape
    if N % page_size:
      raise ValueError(f"page_size ({page_size}) must divide the cache's max_len {N}")
    v = jnp.broadcast_to(jnp.arange(N) < filled, (b * Hkv, N))

    def one(xl):
      codes, lo, step = sk.quantize_pages(xl.astype(jnp.float32).reshape(-1, N, hd), v, bits, page_size, stat_dtype)
      return (codes.reshape(b, Hkv, N, -1), lo.reshape(b, Hkv, N // page_size, hd),
              step.reshape(b, Hkv, N // page_size, hd))

    out[f"{n}_codes"], out[f"{n}_lo"], out[f"{n}_step"] = jax.lax.map(one, x)
  return out


def _dequantize(codes, lo, step):
  """codes (..., N, hd / 2) packed or (..., N, hd) uint8, lo / step (..., N / P, hd) -> (..., N, hd) float32."""
  P = codes.shape[-2] // lo.shape[-2]
  rep = lambda a: jnp.repeat(a.astype(jnp.float32), P, axis=-2)
  return rep(lo) + rep(step) * sk.unpack_codes(codes, lo.shape[-1]).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class SketchCacheAttention:
  r"""Certified sketch-search decode attention (`asoftmax.topk.sketch_search`) in every layer.

  Attributes:
    epsilon: TV budget per query head and layer, in (0, 1).
    bits: code width of the key sketch (4 or 8).
    page_size: slots per page (divides the cache's max_len).
    capacity: candidates read at most per key-value head: an int, or a float in (0, 1] (fraction of max_len).
    stat_dtype: storage of the page ranges ("float32", "float16" or "bfloat16").
    measure: also compute, densely, the realised TV of every query head (aux "tv"; for experiments).
  """

  epsilon: float
  bits: int = 4
  page_size: int = 16
  capacity: float | int = 1.0
  stat_dtype: str = "float32"
  measure: bool = False

  def init(self, layer_cache):
    return _state_shapes(layer_cache, ("k",), self.bits, self.page_size, jnp.dtype(self.stat_dtype))

  def prepare(self, cache_layers, filled):
    return _prepare_all(cache_layers, filled, ("k",), self.bits, self.page_size, jnp.dtype(self.stat_dtype))

  def write(self, cache_layers, layer, k_new, v_new, pos):
    out = llama.write_kv(cache_layers, layer, k_new, v_new, pos)
    return _requantize(out, layer, ("k",), pos, k_new.shape[2], self.bits, self.page_size,
                       jnp.dtype(self.stat_dtype))

  def attend(self, q, cache_layers, layer, valid):
    c = llama.layer_of(cache_layers, layer)
    b, Hkv, G, t, hd = q.shape
    if t > 1:  # prefill: dense
      return llama.dense_cache_attention(q, c["k"], c["v"], valid, None)
    N = c["k"].shape[2]
    v = jnp.broadcast_to(valid[0], (b, Hkv, N))
    r = sk.sketch_search(q[:, :, :, 0], c["k"], c["v"], sk.KeySketch(c["k_codes"], c["k_lo"], c["k_step"]), v,
                         self.epsilon, hd ** -0.5, _capacity(self.capacity, N))
    aux = dict(k=r.k, fallback=r.fallback, certificate=jnp.max(r.certificate, -1))
    if self.measure:
      s = jnp.einsum("bgrh,bgnh->bgrn", q[:, :, :, 0], c["k"].astype(jnp.float32)) * hd ** -0.5
      p = jax.nn.softmax(jnp.where(v[:, :, None, :], s, -jnp.inf), -1)
      C = r.indices.shape[-1]
      head_c = jnp.arange(C) < r.k[..., None]  # (b, Hkv, C)
      head = jnp.zeros((b, Hkv, N), bool).at[
          jnp.arange(b)[:, None, None], jnp.arange(Hkv)[None, :, None], r.indices].set(head_c)
      head = head | r.fallback[..., None]
      aux["tv"] = jnp.sum(jnp.where(head[:, :, None, :], 0.0, p), -1)  # (b, Hkv, G)
      dense = jnp.einsum("bgrn,bgnh->bgrh", p, c["v"].astype(jnp.float32))
      aux["out_err"] = jnp.max(jnp.abs(dense - r.out), -1)
    return r.out[:, :, :, None], aux


@dataclasses.dataclass(frozen=True)
class QuantizedKVAttention:
  """Dense decode attention over a b-bit quantized cache (keys and values; same per page-channel quantizer).

  Prefill chunks (t > 1) attend over the exact keys and values, as `SketchCacheAttention` does.
  """

  bits: int = 8
  page_size: int = 16
  stat_dtype: str = "float32"

  def init(self, layer_cache):
    return _state_shapes(layer_cache, ("k", "v"), self.bits, self.page_size, jnp.dtype(self.stat_dtype))

  def prepare(self, cache_layers, filled):
    return _prepare_all(cache_layers, filled, ("k", "v"), self.bits, self.page_size, jnp.dtype(self.stat_dtype))

  def write(self, cache_layers, layer, k_new, v_new, pos):
    out = llama.write_kv(cache_layers, layer, k_new, v_new, pos)
    return _requantize(out, layer, ("k", "v"), pos, k_new.shape[2], self.bits, self.page_size,
                       jnp.dtype(self.stat_dtype))

  def attend(self, q, cache_layers, layer, valid):
    c = llama.layer_of(cache_layers, layer)
    if q.shape[3] > 1:
      return llama.dense_cache_attention(q, c["k"], c["v"], valid, None)
    kh = _dequantize(c["k_codes"], c["k_lo"], c["k_step"])
    vh = _dequantize(c["v_codes"], c["v_lo"], c["v_step"])
    return llama.dense_cache_attention(q, kh, vh, valid, None)[0], ()


def prepare_cache(cache: llama.LlamaCache, attention) -> llama.LlamaCache:
  """A cache filled densely (`llama.prefill` with the default attention) with `attention`'s state added.

  Equal to having prefilled with `attention` (a write re-quantizes whole pages from the exact keys). The cache is
  *donated* (as in `llama.extend`): keep the returned one."""
  checks.methods("attention", attention, ("init", "prepare", "write", "attend"))
  layers = {"k": cache.layers["k"], "v": cache.layers["v"]}
  return llama.LlamaCache(_prepare_jit(layers, cache.pos, attention), cache.pos)


_prepare_jit = jax.jit(lambda layers, pos, attention: attention.prepare(layers, pos), static_argnums=2,
                       donate_argnums=0)
