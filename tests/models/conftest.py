"""Fixtures shared by the model tests."""

import numpy as np
import pytest

from asoftmax.models import llama


def _random_params(seed=0, vocab=97, dim=48, layers=2, heads=6, kv=2, hidden=80):
  cfg = llama.LlamaConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                          hidden_dim=hidden, rope_theta=10000.0, norm_eps=1e-5)
  rng = np.random.default_rng(seed)
  hd = dim // heads
  t = {"token_embd.weight": rng.normal(size=(vocab, dim)), "output_norm.weight": 1 + 0.1 * rng.normal(size=dim)}
  for i in range(layers):
    t[f"blk.{i}.attn_norm.weight"] = 1 + 0.1 * rng.normal(size=dim)
    t[f"blk.{i}.ffn_norm.weight"] = 1 + 0.1 * rng.normal(size=dim)
    t[f"blk.{i}.attn_q.weight"] = rng.normal(size=(heads * hd, dim)) / np.sqrt(dim)
    t[f"blk.{i}.attn_k.weight"] = rng.normal(size=(kv * hd, dim)) / np.sqrt(dim)
    t[f"blk.{i}.attn_v.weight"] = rng.normal(size=(kv * hd, dim)) / np.sqrt(dim)
    t[f"blk.{i}.attn_output.weight"] = rng.normal(size=(dim, heads * hd)) / np.sqrt(dim)
    t[f"blk.{i}.ffn_gate.weight"] = rng.normal(size=(hidden, dim)) / np.sqrt(dim)
    t[f"blk.{i}.ffn_up.weight"] = rng.normal(size=(hidden, dim)) / np.sqrt(dim)
    t[f"blk.{i}.ffn_down.weight"] = rng.normal(size=(dim, hidden)) / np.sqrt(hidden)
  t = {k: v.astype(np.float32) for k, v in t.items()}
  return llama.params_from_tensors(t, cfg)


@pytest.fixture(scope="session")
def random_params():
  """`random_params(seed=0, vocab=97, dim=48, layers=2, heads=6, kv=2, hidden=80)`: a small random Llama."""
  return _random_params
