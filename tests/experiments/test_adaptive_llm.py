"""Tests for experiments/adaptive/llm.py: user-supplied heads end to end, the hidden-state cache, missing text.

The SmolLM2 smoke variant (`configs/adaptive/llm.py:smoke`) is run end to end by tests/test_smoke_configs.py.
"""

import json
import os

import numpy as np
import pytest

from experiments import registry, run
from experiments.adaptive import llm as adaptive_llm


def load_config(arg):
  return registry.load_config("configs/adaptive/llm.py", arg)


# A user head of 120 x 64: under 128 rows AdaptiveSoftmax keeps one survivor buffer (core._buckets), a smaller
# program to compile for each (mode, k) row than at 300 rows (two buffers), and these tests exercise the
# experiment's plumbing, not the buffers (tests/adaptive).
N_USER = 120


def _user_files(tmp_path, n=N_USER, d=64, q=40, seed=0):
  from safetensors.numpy import save_file

  rng = np.random.default_rng(seed)
  A = (rng.normal(size=(n, d)) / np.sqrt(d)).astype(np.float32)
  # Queries aligned with a few rows, so each has a clear winner (like an LM's peaked next-token softmax).
  X = (4 * A[rng.integers(0, n, q)] * np.sqrt(d) + 0.3 * rng.normal(size=(q, d))).astype(np.float32)
  save_file({"lm_head.weight": A, "bias": np.zeros(n, np.float32)}, str(tmp_path / "head.safetensors"))
  np.save(tmp_path / "hidden.npy", X)
  return A, X


def test_user_model_runs_end_to_end(tmp_path, monkeypatch):
  monkeypatch.delenv("ASOFTMAX_DATA_DIR", raising=False)
  A, X = _user_files(tmp_path)
  c = load_config("model=user")
  c.matrix_path = str(tmp_path / "head.safetensors")
  c.hidden_path = str(tmp_path / "hidden.npy")
  c.user_model_name = "toy"
  c.n_tune = 20
  c.deltas = (0.1,)
  c.ks = (1, 2)
  c.topk_deltas = (0.1,)
  res = run.execute(c, str(tmp_path / "out"))
  rows = res["rows"]
  assert [(r["k"], r["delta"], r["mode"]) for r in rows] == [
      (1, 0.1, "paper"), (1, 0.1, "paper-conformal"), (1, 0.1, "certified"),
      (2, 0.1, "paper"), (2, 0.1, "paper-conformal"), (2, 0.1, "certified")]
  for r in rows:
    assert r["status"] == "ok" and r["model"] == "toy" and (r["n"], r["d"]) == (N_USER, 64)
    assert r["n_eval"] == 20 and len(r["samples"]) == 20
    assert 0 <= r["success_lo"] <= r["success"] <= r["success_hi"] <= 1
    assert r["gain"] == pytest.approx(N_USER * 64 / np.mean(r["samples"]), rel=1e-6)
    assert r["meets_target"] == (r["success"] >= 0.9)
  saved = json.loads((tmp_path / "out" / "results.json").read_text())
  assert len(saved["rows"]) == 6  # 2 k x 3 modes
  # A second run reuses the cached rows (no tuning): same numbers.
  from asoftmax import adaptive

  monkeypatch.setattr(adaptive, "tune_and_evaluate", lambda *a, **k: pytest.fail("row cache not used"))
  again = run.execute(c, str(tmp_path / "out"))
  assert [r["samples"] for r in again["rows"]] == [r["samples"] for r in rows]


def test_user_inputs_are_validated(tmp_path):
  _user_files(tmp_path)
  c = load_config("model=user")
  c.matrix_path = str(tmp_path / "head.safetensors")
  c.hidden_path = str(tmp_path / "hidden.npy")
  c.matrix_key = "nope"
  with pytest.raises(ValueError, match="matrix_key"):
    adaptive_llm.load_user_problem(c)
  c.matrix_key = ""
  np.save(tmp_path / "bad.npy", np.zeros((50, 63), np.float32))
  c.hidden_path = str(tmp_path / "bad.npy")
  with pytest.raises(ValueError, match="hidden_path"):
    adaptive_llm.load_user_problem(c)
  c.hidden_path = str(tmp_path / "missing.npy")
  with pytest.raises(FileNotFoundError, match="hidden_path"):
    adaptive_llm.load_user_problem(c)


def test_missing_text_gives_not_run_rows(tmp_path):
  c = load_config("data=ptb")
  c.data_dir = str(tmp_path)  # empty: no ptb/ptb.test.txt
  out = adaptive_llm.run(c, str(tmp_path), None)
  assert len(out.rows) == 6  # 2 k x 3 delta
  assert all(r["status"].startswith("not run:") and "ptb/ptb.test.txt" in r["status"] for r in out.rows)


def test_hidden_state_cache_is_reused_and_resumed(tmp_path, monkeypatch, random_params):
  from asoftmax.models import llama

  p = random_params()
  ctx = np.random.default_rng(0).integers(0, p.config.vocab_size, size=(5, 7)).astype(np.int32)
  path = str(tmp_path / "h.npz")
  want = np.asarray(llama.last_hidden_state(p, ctx))
  X = adaptive_llm.cached_hidden_states(p, ctx, path, batch=2)
  np.testing.assert_allclose(X, want, rtol=1e-5, atol=1e-5)
  calls = []
  real = llama.last_hidden_state
  monkeypatch.setattr(llama, "last_hidden_state", lambda params, c: calls.append(len(c)) or real(params, c))
  np.testing.assert_array_equal(adaptive_llm.cached_hidden_states(p, ctx, path, batch=2), X)
  assert calls == []  # fully cached: no forward pass
  with np.load(path) as z:  # simulate an interrupted run after 2 windows (a valid, checksummed partial cache)
    partial = dict(X=z["X"], done=np.int64(2), fingerprint=z["fingerprint"], checksum=z["checksum"])
  np.savez(path, **partial)
  np.testing.assert_allclose(adaptive_llm.cached_hidden_states(p, ctx, path, batch=2), want, rtol=1e-5, atol=1e-5)
  assert calls == [2, 1]  # only windows 2..4 recomputed
  other = ctx.copy()
  other[0, 0] = (other[0, 0] + 1) % p.config.vocab_size  # other contexts: the cache is ignored
  calls.clear()
  adaptive_llm.cached_hidden_states(p, other, path, batch=5)
  assert calls == [5]


def test_closest_paper_model():
  gpt2 = adaptive_llm.closest_paper_model(49152, 576, "wikitext")
  assert gpt2["model"].startswith("GPT-2") and gpt2["gain"][0.01] == 6.9 and gpt2["success"][0.1] == 0.892
  assert adaptive_llm.closest_paper_model(32000, 4096, "ptb")["model"].startswith("Mistral-7B")
  assert adaptive_llm.closest_paper_model(100, 10, "builtin") is None


def test_untuned_evaluation_matches_its_own_counts(tmp_path):
  from asoftmax import adaptive
  import jax

  A, X = _user_files(tmp_path, q=30)
  prep = adaptive.prepare_matrix(A)
  r = adaptive_llm.evaluate_untuned(jax.random.key(0), prep, X, k=1, epsilon=0.3, delta=0.1)
  assert r.n_eval == 30 and r.fudge_bandit == r.fudge_z == 1.0
  assert r.gain_dense == pytest.approx(N_USER * 64 / np.mean(r.samples), rel=1e-6)
  assert r.success == r.successes / 30 and r.success_lo <= r.success <= r.success_hi
  assert all(0 < s <= N_USER * 64 for s in r.samples)
