"""The JAX BERT encoder reproduces PyTorch/transformers on all-MiniLM-L6-v2.

Fixture `tests/fixtures/minilm_reference.npz` was made once by `scripts/make_bert_fixture.py` (its docstring has the
exact command) with torch 2.13.0+cpu and transformers 5.23.0 `BertModel` (eager attention, float32, CPU) on three
sentences padded to 24 tokens.
"""

import os

import jax
import numpy as np
import pytest

from asoftmax.models import bert

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "minilm_reference.npz")


@pytest.fixture(scope="module")
def loaded():
  return bert.load_bert()


@pytest.fixture(scope="module")
def ref():
  return np.load(FIXTURE)


def _sentences():
  import importlib.util

  path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "make_bert_fixture.py")
  spec = importlib.util.spec_from_file_location("make_bert_fixture", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.SENTENCES, mod.MAX_LEN


def test_tokenize_matches_reference(loaded, ref):
  _, tok, _ = loaded
  sentences, max_len = _sentences()
  ids, mask = bert.tokenize(tok, sentences, max_len)
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_encoder_matches_reference(loaded, ref):
  model, _, cfg = loaded
  out = bert.encode(model, ref["input_ids"], ref["attention_mask"], return_attention=True)
  m = ref["attention_mask"].astype(bool)
  # Padded positions carry no meaning; compare real tokens. Tolerances: float32 with different op orders.
  np.testing.assert_allclose(np.asarray(out.hidden)[m], ref["last_hidden"][m], atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(out.hidden_states[3])[m], ref["hidden_3"][m], atol=2e-4, rtol=1e-4)
  probs = np.asarray(out.probs)  # (L, B, H, N, N)
  assert probs.shape == ref["attentions"].shape == (cfg.num_layers, 3, cfg.num_heads, 24, 24)
  qm = m[None, :, None, :, None]
  np.testing.assert_allclose(np.where(qm, probs, 0), np.where(qm, ref["attentions"], 0), atol=2e-5)
  emb = np.asarray(bert.sentence_embedding(out.hidden, ref["attention_mask"]))
  np.testing.assert_allclose(emb, ref["embedding"], atol=1e-5)


def test_topk_encoder_close_and_exact_at_tiny_epsilon(loaded, ref):
  model, _, _ = loaded
  ids, mask = ref["input_ids"], ref["attention_mask"]
  full = bert.sentence_embedding(bert.encode(model, ids, mask).hidden, mask)
  out = bert.encode(model, ids, mask, topk_epsilon=1e-6)
  np.testing.assert_allclose(np.asarray(bert.sentence_embedding(out.hidden, mask)), np.asarray(full), atol=1e-4)
  out = bert.encode(model, ids, mask, topk_epsilon=0.1)
  n = mask.sum(1)
  k = np.asarray(out.k_used)  # (L, B, H, N)
  assert (k >= 1).all() and (k <= n[None, :, None, None]).all()
  assert (k.mean() < n.mean())  # truncation really drops keys at epsilon = 0.1
  cos = np.sum(np.asarray(bert.sentence_embedding(out.hidden, mask)) * np.asarray(full), -1)
  assert (cos > 0.9).all()


def test_loader_rejects_bad_checkpoint(tmp_path, loaded):
  with pytest.raises(FileNotFoundError):
    bert.load_bert(str(tmp_path))
  model, _, _ = loaded
  with pytest.raises(ValueError, match="missing tensor"):
    bert.load_weights(model, {})


def test_loader_accepts_bert_prefix(tmp_path):
  """A user checkpoint in the bert-base layout ('bert.' prefix, gamma/beta names) loads through the same path."""
  import json
  import shutil

  from safetensors.numpy import load_file, save_file

  src = bert.minilm_dir()
  t = load_file(os.path.join(src, "model.safetensors"))
  renamed = {("bert." + k).replace("LayerNorm.weight", "LayerNorm.gamma"): v for k, v in t.items()}
  save_file(renamed, str(tmp_path / "model.safetensors"))
  shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
  shutil.copy(os.path.join(src, "vocab.txt"), tmp_path / "vocab.txt")  # no tokenizer.json: WordPiece fallback
  model, tok, cfg = bert.load_bert(str(tmp_path))
  ref = np.load(FIXTURE)
  ids, mask = bert.tokenize(tok, _sentences()[0], 24)
  np.testing.assert_array_equal(ids, ref["input_ids"])
  out = bert.encode(model, ids, mask)
  m = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(out.hidden)[m], ref["last_hidden"][m], atol=2e-4, rtol=1e-4)
  assert json.load(open(tmp_path / "config.json"))["num_hidden_layers"] == cfg.num_layers
