"""Wall-clock of certified top-k decode attention against dense attention (issue 15 part 3), same process.

One query against an n-key cache (d_h = 64), n from 2,048 to 32,768. Keys and values are synthetic: Gaussian with a
decaying spectrum (a learned head's keys are far from isotropic), the query drawn from the same head. Methods:

* dense: softmax(q K^T / sqrt(d)) V, jitted (the fastest honest exact path here);
* certified (exact / multi_gap): `topk.certified_topk_attention` (sort + tail mass or certificate, masked head);
* progressive: `topk.progressive_search` (basis fitted on a held-out draw of the same head) + attention over the
  certified head; its multiply-adds relative to dense scoring are printed beside the time.

Every method runs with static shapes (masks, no gather), as in the library, so the multiply-adds the searches save
are not skipped on CPU: see docs/topk.md for where and why certified top-k is slower.

    JAX_PLATFORMS=cpu python scripts/bench_topk.py                       # all n, eps = 0.01, 7 repeats
    JAX_PLATFORMS=cpu python scripts/bench_topk.py --ns 2048 --repeats 5  # quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from asoftmax import topk


def _head(rng, n, d):
  spec = np.exp(-np.arange(d) / (d / 6))
  A = rng.normal(size=(d, d)) * spec[None]
  K = rng.normal(size=(n, d)) @ A.T + 0.5
  V = rng.normal(size=(n, d))
  q = (rng.normal(size=(1, d)) @ A.T) * 0.5
  return K.astype(np.float32), V.astype(np.float32), q.astype(np.float32), A


def _time(f, *args, repeats):
  jax.block_until_ready(f(*args))  # compile
  jax.block_until_ready(f(*args))  # warm-up
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ns", default="2048,4096,8192,16384,32768")
  ap.add_argument("--d", type=int, default=64)
  ap.add_argument("--epsilon", type=float, default=0.01)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--stages", default="16,64")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  if args.repeats < 5:
    raise SystemExit("--repeats must be >= 5 (median of at least 5 timed runs)")
  stages = tuple(int(s) for s in args.stages.split(","))
  d, eps = args.d, args.epsilon
  scale = d ** -0.5
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"d_h = {d}, epsilon = {eps}, median of {args.repeats} after warm-up")

  dense = jax.jit(lambda q, K, V: jax.nn.softmax((q @ K.T) * scale, -1) @ V)
  cert = {m: jax.jit(lambda q, K, V, m=m: topk.certified_topk_attention(q, K, V, None, eps, m).out)
          for m in ("exact", "multi_gap")}

  @jax.jit
  def progressive(q_rot, pk, V):
    r = topk.progressive_search(q_rot, pk, None, eps, scale, stages)
    return jax.nn.softmax(r.head_logits, -1) @ V, r.macs

  print(f"{'n':>6} {'dense ms':>9} {'exact ms':>9} {'multi_gap ms':>12} {'progressive ms':>14} "
        f"{'prog. MACs/dense':>16} {'k_exact/n':>9}")
  for n in (int(x) for x in args.ns.split(",")):
    rng = np.random.default_rng(args.seed + n)
    K, V, q, A = _head(rng, n, d)
    held_K = (rng.normal(size=(min(n, 4096), d)) @ A.T + 0.5).astype(np.float32)
    held_q = ((rng.normal(size=(256, d)) @ A.T) * 0.5).astype(np.float32)
    basis = topk.fit_basis(held_K, held_q, np.ones(len(held_K), bool), np.ones(len(held_q), bool))
    pk = topk.prepare_keys(K, basis, stages)  # once per cache entry, not per query
    qr = topk.rotate_queries(q, basis)  # folded into W_q in a deployment
    Kj, Vj, qj = jnp.asarray(K), jnp.asarray(V), jnp.asarray(q)
    t_dense = _time(dense, qj, Kj, Vj, repeats=args.repeats)
    t_exact = _time(cert["exact"], qj, Kj, Vj, repeats=args.repeats)
    t_multi = _time(cert["multi_gap"], qj, Kj, Vj, repeats=args.repeats)
    t_prog = _time(progressive, qr, pk, Vj, repeats=args.repeats)
    _, macs = progressive(qr, pk, Vj)
    k_exact = int(topk.certified_k(np.asarray(dense_logits := (q @ K.T) * scale), None, eps).exact.k[0])
    del dense_logits
    print(f"{n:>6} {1e3 * t_dense:>9.3f} {1e3 * t_exact:>9.3f} {1e3 * t_multi:>12.3f} {1e3 * t_prog:>14.3f} "
          f"{float(macs[0]) / (n * d):>16.3f} {k_exact / n:>9.4f}", flush=True)


if __name__ == "__main__":
  main()
