r"""Benchmark: AdaptiveSoftmax (jitted, batched) vs the fastest exact softmax, in one run.

    python scripts/bench_adaptive.py                          # default problem set
    python scripts/bench_adaptive.py --problem gaussian --n 100 --d 100000 --batch 1

Prints, per problem: device, samples used (mean per query) vs n*d, and the median wall-clock of
(a) our jitted `adaptive_softmax` path and (b) the jitted exact baseline, both on the same
device in the same process. The exact baseline is the fastest honest exact path we know:
`softmax(A @ x)` (GEMV) at batch 1 and the faster of `X @ A.T` and `vmap(A @ x)` for batches
(on XLA:CPU `x[None] @ A.T` is ~18x slower than `A @ x` at batch 1 and is NOT used).
Both paths compute top-k indices and probabilities; compile time is excluded (one warm-up call).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from asoftmax import adaptive

PROBLEMS = {
    "toy": adaptive.toy_problem,
    "gaussian": adaptive.gaussian_problem,
}


def _median_time(fn, repeats):
  jax.block_until_ready(fn())  # compile + warm up
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def exact_baselines(k):
  @jax.jit
  def gemv(A, x):
    logits = A @ x
    top, idx = jax.lax.top_k(logits, k)
    return idx, jnp.exp(top - jax.nn.logsumexp(logits))

  @jax.jit
  def gemm(A, X):
    logits = X @ A.T
    top, idx = jax.lax.top_k(logits, k)
    return idx, jnp.exp(top - jax.nn.logsumexp(logits, axis=-1, keepdims=True))

  vgemv = jax.jit(jax.vmap(gemv, in_axes=(None, 0)))
  return gemv, gemm, vgemv


def bench_one(name, A, X, k, repeats, **kw):
  n, d = A.shape
  prep = adaptive.prepare_matrix(A)
  b = X.shape[0]
  key = jax.random.key(0)
  single = b == 1
  xin = X[0] if single else X
  run = lambda: adaptive.adaptive_softmax(key, prep, xin, k=k, check_finite=False, **kw)  # noqa: E731
  res = run()
  samples = float(np.mean(np.asarray(res.samples)))
  t_ada = _median_time(lambda: run().probs, repeats)
  gemv, gemm, vgemv = exact_baselines(k)
  if single:
    t_exact, how = _median_time(lambda: gemv(prep.A, X[0]), repeats), "A @ x"
  else:
    t1 = _median_time(lambda: gemm(prep.A, X), repeats)
    t2 = _median_time(lambda: vgemv(prep.A, X), repeats)
    t_exact, how = (t1, "X @ A.T") if t1 <= t2 else (t2, "vmap(A @ x)")
  dev = jax.devices()[0]
  row = dict(problem=name, n=n, d=d, batch=b, k=k, samples_mean=samples, naive=n * d, gain=n * d / samples,
             adaptive_ms=1e3 * t_ada, exact_ms=1e3 * t_exact, exact_path=how, speedup=t_exact / t_ada,
             device=f"{dev.platform}:{getattr(dev, 'device_kind', '')}")
  print(f"{name:10s} n={n:6d} d={d:8d} batch={b:4d} k={k} samples/query={samples:12.0f} (n*d={n*d:.3g}, "
        f"gain {n*d/samples:6.2f}x) | adaptive {1e3*t_ada:9.3f} ms | exact [{how}] {1e3*t_exact:9.3f} ms | "
        f"wall-clock ratio exact/adaptive {t_exact/t_ada:6.3f} | {row['device']}", flush=True)
  return row


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--problem", choices=sorted(PROBLEMS) + ["all"], default="all")
  ap.add_argument("--n", type=int, default=None)
  ap.add_argument("--d", type=int, default=None)
  ap.add_argument("--batch", type=int, nargs="*", default=[1, 64])
  ap.add_argument("--k", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=10)
  args = ap.parse_args()
  cases = []
  if args.problem == "all" and args.n is None:
    cases = [("gaussian", 100, 100_000), ("gaussian", 100, 1_000_000), ("toy", 100, 100_000),
             ("gaussian", 10, 25_088), ("gaussian", 8192, 576)]
  else:
    names = sorted(PROBLEMS) if args.problem == "all" else [args.problem]
    cases = [(p, args.n or 100, args.d or 100_000) for p in names]
  print(f"jax {jax.__version__}, devices {jax.devices()}")
  for name, n, d in cases:
    A, x = PROBLEMS[name](jax.random.key(1), n, d)
    for b in args.batch:
      if b * d > 64_000_000:
        continue
      X = jnp.tile(x, (b, 1))
      bench_one(name, A, X, args.k, args.repeats)


if __name__ == "__main__":
  main()
