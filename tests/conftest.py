"""Shared test set-up: a persistent XLA compilation cache for the whole suite.

Many tests build `jax.jit(lambda ...)` afresh or run the launcher in a subprocess, which re-traces and re-compiles
programs whose HLO another test (or the other pytest-xdist worker) already compiled. JAX's persistent cache keys
each executable by its HLO, compile options and jax/jaxlib version, so a hit is the same program; it only skips
XLA's compile step (tracing still runs). The directory is kept between local runs (`ASOFTMAX_TEST_JAX_CACHE` to
move it; delete it at will); a fresh clone starts empty. Child processes inherit it through the environment.
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np
import pytest

# XLA:CPU's LLVM optimization level 0 for the suite: its programs are compile-bound (small shapes, many distinct
# static configurations), and level 0 cuts compile CPU by about a quarter (tests/adaptive/test_core_jit.py:
# 34 s -> 26 s user); HLO-level passes (fusion, buffer assignment) are unchanged. Benchmarks do not use it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# XLA:CPU's older (non-MLIR) fusion emitters: about half the compile CPU of the suite's programs (test_bad_input.py
# cold 93 -> 50 s user; four AdaptiveSoftmax programs 12.6 -> 5.8 s). Under it a certified AdaptiveSoftmax call once
# returned a wrong winner: not a miscompile but an exact arm's bounds rounded one ulp apart (fixed in
# `core._elimination_rule`); codegen-sensitive rounding like that is what running the suite under other flags finds.
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()

_CACHE = os.environ.setdefault(
    "ASOFTMAX_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), f"asoftmax-jax-cache-{os.getuid()}"))
# Environment first, so that subprocesses started by tests (launcher, multi-device runs) use the same cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


# ------------------------------------------------------------------------------------------------ shared fixtures
def _random_params(seed=0, vocab=97, dim=48, layers=2, heads=6, kv=2, hidden=80):
  """A small random Llama (`asoftmax.models.llama.LlamaParams`) from numpy-drawn GGUF-named tensors."""
  from asoftmax.models import llama

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


@pytest.fixture(scope="session", autouse=True)
def _smollm2_read_once():
  """Within one pytest process, SmolLM2-135M's GGUF is read once per `n_layers` (~8 s each: metadata parsing and
  dequantization), not once per test or smoke run that loads it. The cached params are immutable jax arrays."""
  import functools

  from asoftmax.models import llama

  original = llama.load_smollm2
  llama.load_smollm2 = functools.cache(original)
  yield
  llama.load_smollm2 = original
