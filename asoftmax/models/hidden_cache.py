r"""Cached, resumable Llama hidden states of many token windows (computed once, reused by later runs).

Used by the AdaptiveSoftmax LLM table (last position of each window: the query of the next-token head) and
by the RF-softmax frozen-feature table (every position: training and test features of a new output layer).

The cache is one `.npz` file holding `X`, the number of windows done, a fingerprint of everything X depends
on (the token windows, the mode, the model's weights, the storage dtype and the format version) and a
checksum of X. A cache built from other inputs is ignored and rebuilt; one that cannot be read (truncated) or
whose checksum does not match (flipped bytes) is rebuilt with a warning naming the file. The file is written
atomically (temp file + rename), so an interrupted run leaves either the previous or the new state, and the
next call resumes after the last saved window.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from typing import Callable

import numpy as np

from asoftmax import results

MODES = ("last", "all")
FORMAT = 2  # bump when the meaning of a cached X changes


def save_npz_atomic(path: str, **arrays) -> None:
  """np.savez to `path` via a temp file and a rename (never a half-written file under `path`)."""
  with results.atomic_path(path, suffix=".npz") as tmp:
    np.savez(tmp, **arrays)


def params_hash(params) -> str:
  """A short hash of every array leaf of the model's parameters (and their shapes and dtypes)."""
  import jax

  h = hashlib.sha1()
  for leaf in jax.tree_util.tree_leaves(params):
    if hasattr(leaf, "shape"):
      a = np.ascontiguousarray(np.asarray(leaf))
      h.update(f"{a.shape}{a.dtype}".encode())
      h.update(a.tobytes())
  return h.hexdigest()[:16]


def fingerprint(contexts: np.ndarray, mode: str = "last", model: str = "", dtype=np.float32) -> str:
  """A short hash of what a cache depends on: the (q, t) int windows, the mode, the model hash, the dtype, FORMAT."""
  h = hashlib.sha1(np.ascontiguousarray(contexts, np.int32).tobytes())
  h.update(f"|{mode}|{model}|{np.dtype(dtype).str}|format{FORMAT}".encode())
  return h.hexdigest()[:16]


def checksum(X: np.ndarray) -> str:
  """sha1 of X's bytes (verified on load)."""
  return hashlib.sha1(np.ascontiguousarray(X).tobytes()).hexdigest()


def _load(cache_path: str, fp: str, shape, dtype):
  """(X, done) from a valid cache, or None; an unreadable or corrupted file is reported (by name) and ignored."""
  try:
    with np.load(cache_path) as z:
      if str(z["fingerprint"]) != fp or z["X"].shape != shape:
        return None  # built from other inputs: rebuilt
      X, done, stored = z["X"], int(z["done"]), str(z["checksum"])
  except Exception as e:  # pylint: disable=broad-except -- truncated zip, missing key, bad pickle, ...
    warnings.warn(f"hidden-state cache {cache_path} is unreadable ({type(e).__name__}: {e}); rebuilding it")
    return None
  if checksum(X) != stored:
    warnings.warn(f"hidden-state cache {cache_path} fails its checksum (corrupted); rebuilding it")
    return None
  return X.astype(dtype), done


def cached_hidden_states(params, contexts: np.ndarray, cache_path: str, batch: int, *,
                         mode: str = "last", dtype=np.float32, save_every_s: float = 0.0,
                         progress: Callable[[int, int], None] | None = None) -> np.ndarray:
  """Final-norm hidden states of (q, t) token windows, cached in (and resumed from) `cache_path`.

  Args:
    params: `asoftmax.models.llama.LlamaParams`.
    contexts: (q, t) int token windows (no padding).
    cache_path: the `.npz` cache file (created or resumed).
    batch: windows per forward pass (>= 1).
    mode: "last" -> (q, d), the state at each window's last position (the next-token query);
      "all" -> (q, t, d), every position (position i predicts token i + 1 of the window).
    dtype: storage dtype of X (float32, or float16 to halve the memory of "all").
    save_every_s: write the cache at most this often (0: after every batch); the final state is always
      written. Large "all" caches are slow to rewrite, so use e.g. 60 there.
    progress: optional `progress(done, total)` called after every batch (e.g. a progress bar's update).

  Returns:
    X as a numpy array of `dtype`, shape (q, d) or (q, t, d).

  Raises:
    ValueError: bad mode, batch or contexts.
  """
  from asoftmax.models import llama

  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if int(batch) < 1:
    raise ValueError(f"batch must be >= 1, got {batch}")
  contexts = np.asarray(contexts)
  if contexts.ndim != 2 or not np.issubdtype(contexts.dtype, np.integer):
    raise ValueError(f"contexts must be a (q, t) integer array, got shape {contexts.shape} dtype {contexts.dtype}")
  q, t = contexts.shape
  d = params.config.dim
  shape = (q, d) if mode == "last" else (q, t, d)
  fp = fingerprint(contexts, mode, params_hash(params), dtype)
  X, done = np.zeros(shape, dtype), 0
  if os.path.exists(cache_path):
    loaded = _load(cache_path, fp, shape, dtype)
    if loaded is not None:
      X, done = loaded
  if done >= q:
    return X
  forward = llama.last_hidden_state if mode == "last" else llama.hidden_states
  last_save = time.monotonic()
  for i in range(done, q, batch):
    j = min(q, i + batch)
    X[i:j] = np.asarray(forward(params, contexts[i:j])).astype(dtype)
    if j == q or time.monotonic() - last_save >= save_every_s:
      save_npz_atomic(cache_path, X=X, done=np.int64(j), fingerprint=np.str_(fp), checksum=np.str_(checksum(X)))
      last_save = time.monotonic()
    if progress is not None:
      progress(j, q)
  return X
