"""Tests for asoftmax.models.hidden_cache (cached, resumable Llama hidden states)."""

import dataclasses

import numpy as np
import pytest

from asoftmax.models import hidden_cache, llama


def test_all_positions_match_forward_pass_and_resume(tmp_path, monkeypatch, random_params):
  p = random_params()
  ctx = np.random.default_rng(1).integers(0, p.config.vocab_size, size=(5, 6)).astype(np.int32)
  path = str(tmp_path / "f.npz")
  want = np.asarray(llama.hidden_states(p, ctx))
  X = hidden_cache.cached_hidden_states(p, ctx, path, batch=2, mode="all")
  assert X.shape == (5, 6, p.config.dim) and X.dtype == np.float32
  np.testing.assert_allclose(X, want, rtol=1e-5, atol=1e-5)
  # float16 storage: same values to half precision.
  X16 = hidden_cache.cached_hidden_states(p, ctx, str(tmp_path / "g.npz"), batch=5, mode="all", dtype=np.float16)
  assert X16.dtype == np.float16
  np.testing.assert_allclose(X16.astype(np.float32), want, rtol=2e-3, atol=2e-3)
  # Interrupted after 2 windows: only the rest is recomputed.
  with np.load(path) as z:
    np.savez(path, X=z["X"], done=np.int64(2), fingerprint=z["fingerprint"], checksum=z["checksum"])
  calls = []
  real = llama.hidden_states
  monkeypatch.setattr(llama, "hidden_states", lambda params, c: calls.append(len(c)) or real(params, c))
  np.testing.assert_allclose(hidden_cache.cached_hidden_states(p, ctx, path, batch=2, mode="all"), want,
                             rtol=1e-5, atol=1e-5)
  assert calls == [2, 1]


def test_last_and_all_caches_do_not_mix(tmp_path, random_params):
  p = random_params()
  ctx = np.random.default_rng(2).integers(0, p.config.vocab_size, size=(3, 4)).astype(np.int32)
  path = str(tmp_path / "h.npz")
  last = hidden_cache.cached_hidden_states(p, ctx, path, batch=3, mode="last")
  full = hidden_cache.cached_hidden_states(p, ctx, path, batch=3, mode="all")  # other mode: rebuilt, not reused
  assert last.shape == (3, p.config.dim) and full.shape == (3, 4, p.config.dim)
  np.testing.assert_allclose(full[:, -1], last, rtol=1e-5, atol=1e-5)
  assert hidden_cache.fingerprint(ctx, "last") != hidden_cache.fingerprint(ctx, "all")


def test_bad_arguments(tmp_path, random_params):
  p = random_params()
  ctx = np.zeros((2, 3), np.int32)
  with pytest.raises(ValueError, match="mode"):
    hidden_cache.cached_hidden_states(p, ctx, str(tmp_path / "a.npz"), 1, mode="first")
  with pytest.raises(ValueError, match="batch"):
    hidden_cache.cached_hidden_states(p, ctx, str(tmp_path / "a.npz"), 0)
  with pytest.raises(ValueError, match="contexts"):
    hidden_cache.cached_hidden_states(p, ctx.astype(np.float32), str(tmp_path / "a.npz"), 1)


def test_cache_keyed_by_weights_and_verified_on_load(tmp_path, random_params):
  """Issue 14: a cache built with other weights is not reused; a truncated or corrupted file is rebuilt with a
  warning naming it (before: other weights reused silently; truncation crashed with a traceback without the path)."""
  p = random_params()
  ctx = np.random.default_rng(3).integers(0, p.config.vocab_size, size=(3, 4)).astype(np.int32)
  path = str(tmp_path / "c.npz")
  want = hidden_cache.cached_hidden_states(p, ctx, path, batch=3)
  other = dataclasses.replace(p, final_norm=p.final_norm * 2.0)  # other weights, same shapes
  got = hidden_cache.cached_hidden_states(other, ctx, path, batch=3)
  assert not np.allclose(got, want)
  np.testing.assert_allclose(got, np.asarray(llama.last_hidden_state(other, ctx)), rtol=1e-5, atol=1e-5)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:  # truncated
    f.write(data[: len(data) // 2])
  with pytest.warns(UserWarning, match="c.npz"):
    again = hidden_cache.cached_hidden_states(other, ctx, path, batch=3)
  np.testing.assert_allclose(again, got, rtol=1e-6)
  with np.load(path) as z:  # flipped values under a valid zip: the checksum catches them
    np.savez(path, X=z["X"] + 1.0, done=z["done"], fingerprint=z["fingerprint"], checksum=z["checksum"])
  with pytest.warns(UserWarning, match="checksum"):
    again = hidden_cache.cached_hidden_states(other, ctx, path, batch=3)
  np.testing.assert_allclose(again, got, rtol=1e-6)
