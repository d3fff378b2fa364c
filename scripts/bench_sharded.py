"""Scale-out table (issue 29 item 6, as a script): the sharded methods on 1, 2, 4 and 8 devices.

Per device count S (a `(S,)` mesh of forced host devices, or real devices where there are enough):

* head (`--head N D`, default 128256 x 4096, an LLM-like head from `adaptive.llm_head_problem`, `--queries` of
  them): per-device bytes of A, exact sharded top-1 (`sharded.softmax_topk`) wall-clock and products per device,
  AdaptiveSoftmax (`sharded.adaptive_softmax`, certified, epsilon 0.3, delta 0.1) wall-clock, success (top-1 = the
  exact one) and products read by the busiest device;
* RF layer (`--classes`, default 10^6, D = `--rff_features`): per-device tree bytes, sampling wall-clock, max |log q
  - one device's log q| of the draws, a chi-square p-value of the draws against one device's q (buckets pooled
  into 64 contiguous cells), max |loss - one device's loss|;
* cache (`--keys`, default 32768, d 64, 64 decode queries, epsilon 0.01): rows whose k differs from one device's
  `topk.threshold_topk_probs`, max |tv - one device's|, wall-clock.

Writes `--out` (results.json: device, jax version, load average, command, rows). Run:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python scripts/bench_sharded.py \\
        --out docs/results/sharded/results.json

Forced host devices share the machine's CPU cores: wall-clock there measures overhead, not speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from asoftmax import rff, sharded, topk
from asoftmax.adaptive.synthetic import llm_head_problem
from experiments.adaptive.common import median_ms


def _bytes_per_device(x):
  return max(s.data.nbytes for s in jax.tree.leaves(x)[0].addressable_shards) if hasattr(x, "addressable_shards") \
      else sum(max(s.data.nbytes for s in leaf.addressable_shards) for leaf in jax.tree.leaves(x))


def head_rows(args, sizes):
  n, d = args.head
  A, X = llm_head_problem(jax.random.key(0), n, d, args.queries)
  A, X = np.asarray(A), np.asarray(X)
  one = np.argmax(X @ A.T, axis=1)  # one device's top-1 (numpy reference)
  rows = []
  for S in sizes:
    mesh = sharded.make_mesh((S,), ("vocab",))
    Ad = jax.device_put(A, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("vocab", None))) \
        if n % S == 0 else A
    ms_exact = median_ms(lambda i: sharded.softmax_topk(Ad, X, mesh, k=1).indices, args.repeats)
    ref = sharded.softmax_topk(Ad, X, mesh, k=1)
    row = {"workload": f"head {n}x{d}", "devices": S, "A_bytes_per_device": int(-(-n // S)) * d * 4,
           "exact_ms": ms_exact, "exact_ids_equal_one_device": bool((np.asarray(ref.indices[:, 0]) == one).all()),
           "exact_products_per_device": int(-(-n // S)) * d * args.queries}
    if not args.no_adaptive:
      prep = sharded.prepare_matrix(A, mesh)
      row["prepared_bytes_per_device"] = int(sum(leaf.addressable_shards[0].data.nbytes for leaf in
                                                 jax.tree.leaves(prep.prep)))
      t0 = time.perf_counter()
      res = sharded.adaptive_softmax(jax.random.key(1), prep, X, mesh, k=1, epsilon=0.3, delta=0.1)
      jax.block_until_ready(res)
      row["adaptive_first_call_s"] = time.perf_counter() - t0
      row["adaptive_ms"] = median_ms(lambda i: sharded.adaptive_softmax(jax.random.key(1 + i), prep, X, mesh, k=1,
                                                                        epsilon=0.3, delta=0.1).indices,
                                     args.repeats)
      row["adaptive_success"] = float(np.mean(np.asarray(res.indices[:, 0]) == one))
      row["adaptive_certified"] = float(np.mean(np.asarray(res.certified)))
      row["adaptive_products_max_device_mean"] = float(np.mean(np.asarray(res.max_shard_samples)))
      row["adaptive_products_total_mean"] = float(np.mean(np.asarray(res.samples)))
      del prep
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def rff_rows(args, sizes):
  n, dim, D = args.classes, 32, args.rff_features
  C = rff.normalize(jax.random.normal(jax.random.key(0), (n, dim)))
  W = rff.init_rff(jax.random.key(1), dim, D, 4.0)
  feats = rff.rff_features(C, W)
  h = rff.normalize(jax.random.normal(jax.random.key(2), (4, dim)))
  psi = rff.rff_features(h, W)
  lq1, _ = rff.tree_log_probs(psi, rff.build_tree(feats), 0.01)  # one device's q, [4, P]
  lq1 = np.asarray(lq1)
  ids1, lqs1 = rff.rff_sampler(jax.random.key(1), D, 4.0).sample(rff.rff_sampler(jax.random.key(1), D, 4.0).init(C),
                                                                  jax.random.key(3), h, 16)
  tg = jnp.arange(4)
  loss1 = np.asarray(rff.sampled_softmax_loss(h, C, tg, ids1, lqs1, 5.0))
  rows = []
  from scipy import stats
  for S in sizes:
    mesh = sharded.make_mesh((S,), ("classes",))
    tree = sharded.build_tree(feats, mesh)
    ms = median_ms(lambda i: sharded.tree_sample(jax.random.key(10 + i), psi, tree, args.draws, 0.01, mesh)[0],
                   args.repeats)
    ids, lq = sharded.tree_sample(jax.random.key(5), psi, tree, args.draws, 0.01, mesh)
    ids, lq = np.asarray(ids), np.asarray(lq)
    dlq = float(np.max(np.abs(lq - np.take_along_axis(lq1, ids, 1))))
    P = lq1.shape[1]
    cells = 64
    e = np.exp(lq1[0].astype(np.float64)).reshape(cells, -1).sum(1) * args.draws
    obs = np.bincount(ids[0] // (P // cells), minlength=cells)
    big = e >= 5  # cells with expected count >= 5, the rest pooled (padding cells have q = 0)
    obs, e = np.append(obs[big], obs[~big].sum()), np.append(e[big], e[~big].sum())
    obs, e = obs[e > 0], e[e > 0]
    p = float(stats.chisquare(obs, e * obs.sum() / e.sum()).pvalue)
    loss = np.asarray(sharded.sampled_softmax_loss(h, C, tg, ids1, lqs1, 5.0, mesh))
    row = {"workload": f"rff {n} classes D={D}", "devices": S,
           "tree_bytes_per_device": int(tree.nodes.addressable_shards[0].data.nbytes),
           "sample_ms": ms, "draws_per_query": args.draws, "max_abs_dlogq": dlq, "chi2_p_value": p,
           "max_abs_dloss": float(np.max(np.abs(loss - loss1)))}
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def cache_rows(args, sizes):
  N, d, Q = args.keys, 64, 64
  ks = jax.random.split(jax.random.key(0), 3)
  K, V = jax.random.normal(ks[0], (N, d)), jax.random.normal(ks[1], (N, d))
  q = 2.0 * jax.random.normal(ks[2], (Q, d))
  qpos = jnp.arange(Q) + N - Q
  valid = jnp.arange(N)[None, :] <= qpos[:, None]
  p1, k1, tv1 = topk.threshold_topk_probs((q @ K.T) / 8.0, valid, 0.01)
  rows = []
  for S in sizes:
    mesh = sharded.make_mesh((S,), ("seq",))
    ms = median_ms(lambda i: sharded.threshold_attention(q, K, V, 0.01, mesh, q_positions=qpos).out, args.repeats)
    r = sharded.threshold_attention(q, K, V, 0.01, mesh, q_positions=qpos)
    row = {"workload": f"cache {N} keys d={d} Q={Q}", "devices": S, "kv_bytes_per_device": -(-N // S) * d * 4 * 2,
           "ms": ms, "rows_k_differs": int(np.sum(np.asarray(r.k) != np.asarray(k1))),
           "max_abs_dtv": float(np.max(np.abs(np.asarray(r.tv) - np.asarray(tv1)))),
           "max_tv": float(np.max(np.asarray(r.tv)))}
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--devices", type=int, nargs="*", default=[1, 2, 4, 8])
  ap.add_argument("--workloads", nargs="*", default=["cache", "rff", "head"], choices=["cache", "rff", "head"])
  ap.add_argument("--head", type=int, nargs=2, default=[128256, 4096], metavar=("N", "D"))
  ap.add_argument("--queries", type=int, default=64)
  ap.add_argument("--no_adaptive", action="store_true")
  ap.add_argument("--classes", type=int, default=1_000_000)
  ap.add_argument("--rff_features", type=int, default=16)
  ap.add_argument("--draws", type=int, default=20_000)
  ap.add_argument("--keys", type=int, default=32768)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default="docs/results/sharded/results.json")
  args = ap.parse_args()
  dev = jax.devices()[0]
  sizes = [s for s in args.devices if s <= len(jax.devices())]
  meta = {"jax": jax.__version__, "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')} x{len(jax.devices())}",
          "cpus": os.cpu_count(), "load_start": os.getloadavg()[0], "command": " ".join(sys.argv),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}
  print(json.dumps(meta), flush=True)
  rows = []
  for w in args.workloads:
    rows += {"cache": cache_rows, "rff": rff_rows, "head": head_rows}[w](args, sizes)
  meta["load_end"] = os.getloadavg()[0]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
