"""Wall-clock of certified top-k *decode* attention against dense attention, same process (issue 15 part 3).

One query against an n-key cache, d_h = 64, n in {2048, ..., 32768}. Each method is one jitted function from the
query (and the cache) to the attention output, timed as the median of `--repeats` (>= 5) calls after a compile
call and a warm-up call:

* dense: softmax(q K^T / sqrt(d)) V, jitted (the fastest honest exact path: two matrix-vector products);
* sorted oracle: `topk.certified_topk_attention(..., "exact")` (sort, exact tail mass, masked head);
* multi_gap: the same with the logit-only multi-gap certificate;
* bisection oracle: `topk.threshold_topk_probs` (the oracle head without sorting: 30 bisection passes);
* progressive: `topk.progressive_search` (the library's certified search; basis fitted on a held-out draw of
  the same head, keys prepared once as when they enter the cache) + attention over the certified head.

Besides time, it prints the head size k/n (same for both oracles) and the progressive search's multiply-adds
relative to dense scoring (n d) and its fraction of keys fully scored. Keys and values are synthetic (Gaussian with
a decaying spectrum plus an offset, as a learned head's keys are far from isotropic; a temperature `--tau`
sets how peaked attention is): SmolLM2's context is 8,192 tokens, so a real 32,768-key cache does not exist here.

    JAX_PLATFORMS=cpu python scripts/bench_topk_decode.py                      # all n, eps = 0.01, 7 repeats
    JAX_PLATFORMS=cpu python scripts/bench_topk_decode.py --ns 2048 --repeats 5
    JAX_PLATFORMS=cpu taskset -c 1 python scripts/bench_topk_decode.py --tau 0.25,0.1   # one table per tau

Writes `--workdir` (default docs/results/bench_topk_decode)/results.json and table.md (`experiments.benchlib`):
one table `tau_<tau>` per `--tau`, one row per n, times in ms.

`--step` (issue 28) times a *whole decode step* of SmolLM2-135M (all 30 layers, LM head included;
`llama.decode_step` over a KV cache) at n = 2,048 / 8,192 cached positions, batch 1 and 8, for: dense attention,
the certified sketch search in every layer (`asoftmax.topk.sketch_search` via
`asoftmax.models.cache_attention.SketchCacheAttention`, 4-bit key sketch, for each `--step_epsilons`) and dense
attention over an 8-bit quantized KV cache (`QuantizedKVAttention`). The cache holds real keys: one prefill of
the first max(ns) tokens of WikiText-2 test at batch 1 (the first n positions serve every n, the rows are
repeated for batch 8). Times: median of `--repeats` decode steps after a compile call and a warm-up call, all in
one process; each step also reports the sketch search's mean keys read / n and its fallback rate. Writes
`--workdir` (default docs/results/bench_topk_decode_step)/results.json and table.md, table `step` (rewritten after
every row, so a run killed for memory keeps the rows before it):

    ASOFTMAX_DATA_DIR=/work/shared/data JAX_PLATFORMS=cpu taskset -c 1 python scripts/bench_topk_decode.py --step
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from asoftmax import topk
from experiments import benchlib


def _head(seed, n, d, tau, n_queries=1):
  """One head for every n (same spectrum A and queries q from `seed`); its n keys and values drawn per n."""
  rng = np.random.default_rng(seed)
  spec = np.exp(-np.arange(d) / (d / 6))
  A = rng.normal(size=(d, d)) * spec[None]
  q = (rng.normal(size=(n_queries, d)) @ A.T) * tau
  rng = np.random.default_rng([seed, n])
  K = rng.normal(size=(n, d)) @ A.T + 0.5
  V = rng.normal(size=(n, d))
  return K.astype(np.float32), V.astype(np.float32), q.astype(np.float32), A, rng


def _time(f, *args, repeats):
  jax.block_until_ready(f(*args))  # compile
  jax.block_until_ready(f(*args))  # warm-up
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _tile(x, b, room):
  """(L, 1, Hkv, n, hd) -> (L, b, Hkv, n + room, hd): the batch-1 cache repeated b times, `room` empty slots."""
  L, _, Hkv, n, hd = x.shape
  return jnp.zeros((L, b, Hkv, n + room, hd), x.dtype).at[:, :, :, :n].set(jnp.broadcast_to(x, (L, b, Hkv, n, hd)))


def _step_bench(args):
  """Whole decode steps of SmolLM2 (module docstring, `--step`); writes results.json."""
  import json

  from asoftmax import configlib
  from asoftmax.data import text
  from asoftmax import models
  from asoftmax.models import llama

  ns = [int(x) for x in args.step_ns.split(",")]
  batches = [int(x) for x in args.batches.split(",")]
  eps_list = [float(x) for x in args.step_epsilons.split(",")]
  run = benchlib.start("topk_decode_step")
  params, tok = llama.load_smollm2()
  data_dir = configlib.default_data_dir()
  raw = text.read_text(data_dir, "wikitext", "test") if data_dir else text.BUILTIN_TEXT * 200
  ids = text.tokenize(tok, raw)
  nmax, room = max(ns), -(-(args.repeats + 4) // args.page_size) * args.page_size
  notes = dict(
      setup=f"SmolLM2-135M, all 30 layers and the LM head (llama.decode_step) over a KV cache holding the first n "
            f"tokens of {'WikiText-2 test' if data_dir else 'built-in text (no data dir)'} (batch rows repeated); "
            f"sketch {args.bits}-bit, page size {args.page_size}, capacity {args.capacity} n; ms = median of "
            f"{args.repeats} decode steps after a compile and a warm-up step, one process; ratio_to_dense: ms / the "
            "dense row's ms at the same n, batch and cache dtype")
  print(json.dumps({k: run[k] for k in ("device", "jax_version", "load_average", "command")} | notes), flush=True)
  methods = [("dense", None), ("int8 KV", models.QuantizedKVAttention(8, args.page_size))]
  methods += [(f"sketch eps={e}", models.SketchCacheAttention(e, args.bits, args.page_size, args.capacity))
              for e in eps_list]
  if args.methods:
    keep = [m.strip() for m in args.methods.split(",")]
    methods = [m for m in methods if m[0] in keep]
  rows = []
  for cache_name in args.cache_dtype.split(","):
    t0 = time.perf_counter()
    cache = llama.init_cache(params.config, 1, nmax, dtype=jnp.dtype(cache_name))
    _, cache, _ = llama.prefill(params, ids[None, :nmax], cache, chunk=args.chunk)
    jax.block_until_ready(cache)
    notes[f"prefill_s_{cache_name}"] = round(time.perf_counter() - t0, 1)
    for n in ns:
      base = {"k": cache.layers["k"][:, :, :, :n], "v": cache.layers["v"][:, :, :, :n]}
      for b in batches:
        for name, att in methods:
          c = llama.LlamaCache({k: _tile(v, b, room) for k, v in base.items()}, jnp.asarray(n, jnp.int32))
          if att is not None:
            c = models.prepare_cache(c, att)
          toks = jnp.asarray(np.repeat(ids[n:n + room][None], b, 0))
          ts, auxes = [], []
          for i in range(args.repeats + 2):  # compile + warm-up, then timed steps
            t1 = time.perf_counter()
            logits, c, aux = llama.decode_step(params, toks[:, i], c, att)
            jax.block_until_ready(logits)
            if i >= 2:
              ts.append(time.perf_counter() - t1)
              auxes.append(aux)
          row = dict(n=n, batch=b, cache=cache_name, method=name, ms=round(1e3 * statistics.median(ts), 1),
                     ms_min=round(1e3 * min(ts), 1), loadavg_1m=os.getloadavg()[0])
          if auxes and auxes[0]:
            row["keys_read_over_n"] = round(float(np.mean([np.mean(a["k"]) for a in auxes])) / n, 4)
            row["fallback_rate"] = round(float(np.mean([np.mean(a["fallback"]) for a in auxes])), 4)
          rows.append(row)
          print(json.dumps(row), flush=True)
          del c
          dense_ms = {(r["n"], r["batch"], r["cache"]): r["ms"] for r in rows if r["method"] == "dense"}
          for r in rows:
            r["ratio_to_dense"] = dense_ms.get((r["n"], r["batch"], r["cache"]))
            r["ratio_to_dense"] = r["ms"] / r["ratio_to_dense"] if r["ratio_to_dense"] else None
          cols = ["n", "batch", "cache", "method", "ms", "ratio_to_dense", "keys_read_over_n", "fallback_rate"]
          # Rewritten after every row (a later row may run out of memory).
          benchlib.write(args.workdir, run, {"step": benchlib.table(cols, rows)}, notes, path=args.out or None)
    del cache


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ns", default="2048,4096,8192,16384,32768")
  ap.add_argument("--d", type=int, default=64)
  ap.add_argument("--epsilon", type=float, default=0.01)
  ap.add_argument("--tau", default="0.25", help="query scale (smaller = flatter attention); a comma-separated list "
                                                 "runs each (one table per tau)")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--stages", default="16,64")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--queries", type=int, default=1,
                  help="queries against the same cache in one call (1: single-query decode; e.g. 3 for SmolLM2's "
                       "grouped-query heads, or more to fill a GPU); k/n, MACs and full keys are means over them")
  ap.add_argument("--step", action="store_true", help="time whole SmolLM2 decode steps (module docstring)")
  ap.add_argument("--step_ns", default="2048,8192")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--step_epsilons", default="0.1,0.01")
  ap.add_argument("--bits", type=int, default=4)
  ap.add_argument("--page_size", type=int, default=16)
  ap.add_argument("--capacity", type=float, default=0.5, help="sketch search: candidates read at most, / n")
  ap.add_argument("--chunk", type=int, default=512, help="prefill chunk")
  ap.add_argument("--methods", default="", help="--step: comma-separated subset, e.g. 'int8 KV,sketch eps=0.1'")
  ap.add_argument("--cache_dtype", default="bfloat16", help="--step: K/V storage of the cache (attention runs in "
                                                              "float32); a comma-separated list runs each")
  benchlib.add_flags(ap, "topk_decode", default=None, note="; --step: docs/results/bench_topk_decode_step")
  ap.add_argument("--out", default="", help="write the results JSON to this file instead of WORKDIR/results.json")
  args = ap.parse_args()
  if args.repeats < 5:
    raise SystemExit("--repeats must be >= 5 (median of at least 5 timed runs)")
  if args.workdir is None:
    args.workdir = benchlib.default_workdir("topk_decode_step" if args.step else "topk_decode")
  if args.step:
    return _step_bench(args)
  run = benchlib.start("topk_decode")
  stages = tuple(int(s) for s in args.stages.split(","))
  d, eps = args.d, args.epsilon
  scale = d ** -0.5
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}; {os.cpu_count()} CPUs visible, "
        f"{platform.processor() or platform.machine()}), jax {jax.__version__}, load average "
        f"{run['load_average'][0]:.2f} (start)", flush=True)
  print(f"queries per call = {args.queries}, d_h = {d}, epsilon = {eps}, tau = {args.tau}, progressive stages {stages}, median of {args.repeats} "
        "after compile + warm-up; times in ms")

  dense = jax.jit(lambda q, K, V: jax.nn.softmax((q @ K.T) * scale, -1) @ V)
  sorted_exact = jax.jit(lambda q, K, V: topk.certified_topk_attention(q, K, V, None, eps, "exact").out)
  multi_gap = jax.jit(lambda q, K, V: topk.certified_topk_attention(q, K, V, None, eps, "multi_gap").out)

  @jax.jit
  def bisection(q, K, V):
    p, _, _ = topk.threshold_topk_probs((q @ K.T) * scale, None, eps, row_block=1)
    return p @ V

  @jax.jit
  def progressive(q_rot, pk, V):
    r = topk.progressive_search(q_rot, pk, None, eps, scale, stages)
    return jax.nn.softmax(r.head_logits, -1) @ V, r.macs, r.keys_full

  names = {"dense": "dense_ms", "sorted": "sorted_oracle_ms", "multi_gap": "multi_gap_ms",
           "bisection": "bisection_oracle_ms", "progressive": "progressive_ms"}
  cols = ["n", *names.values(), "k_over_n", "progressive_macs_over_dense", "progressive_full_keys_over_n",
          "max_truncation_error"]
  print(" | ".join(cols))
  notes = {"setup": f"{args.queries} query(ies) per call against an n-key cache, d_h = {d}, epsilon = {eps}, "
                    f"progressive stages {stages}, seed {args.seed}; one synthetic head per n (decaying spectrum + "
                    "offset), tau = query scale; every method jitted, ms = median of "
                    f"{args.repeats} calls after a compile and a warm-up call, one process",
           "columns": "k_over_n: certified head size k_eps / n (both oracles); progressive_macs_over_dense: the "
                      "progressive search's multiply-adds / n d; progressive_full_keys_over_n: keys it scored in "
                      "full / n; max_truncation_error: max |out - dense| of the sorted and bisection oracles"}
  tables = {}
  for tau in (float(x) for x in args.tau.split(",")):
    rows = []
    for n in (int(x) for x in args.ns.split(",")):
      K, V, q, A, rng = _head(args.seed, n, d, tau, args.queries)
      held_K = (rng.normal(size=(min(n, 4096), d)) @ A.T + 0.5).astype(np.float32)
      held_q = ((rng.normal(size=(256, d)) @ A.T) * tau).astype(np.float32)
      basis = topk.fit_basis(held_K, held_q, np.ones(len(held_K), bool), np.ones(len(held_q), bool))
      pk = topk.prepare_keys(K, basis, stages)  # once per cache entry, not per query
      qr = topk.rotate_queries(q, basis)  # folded into W_q in a deployment
      Kj, Vj, qj = jnp.asarray(K), jnp.asarray(V), jnp.asarray(q)
      t = {"dense": _time(dense, qj, Kj, Vj, repeats=args.repeats),
           "sorted": _time(sorted_exact, qj, Kj, Vj, repeats=args.repeats),
           "multi_gap": _time(multi_gap, qj, Kj, Vj, repeats=args.repeats),
           "bisection": _time(bisection, qj, Kj, Vj, repeats=args.repeats),
           "progressive": _time(progressive, qr, pk, Vj, repeats=args.repeats)}
      ref = np.asarray(dense(qj, Kj, Vj))
      _, macs, full = progressive(qr, pk, Vj)
      k = float(np.mean(np.asarray(topk.threshold_heads((q @ K.T) * scale, None, (eps,)).k)))
      err = max(float(np.abs(np.asarray(f(qj, Kj, Vj)) - ref).max()) for f in (sorted_exact, bisection))
      row = {"n": n, **{names[m]: 1e3 * t[m] for m in names}, "k_over_n": k / n,
             "progressive_macs_over_dense": float(np.mean(macs)) / (n * d),
             "progressive_full_keys_over_n": float(np.mean(full)) / n, "max_truncation_error": err}
      rows.append(row)
      print(" | ".join(_fmt(row[c]) for c in cols), flush=True)
      tables[f"tau_{tau:g}"] = benchlib.table(cols, rows)
      # Rewritten after every row (a run cut by a time limit keeps the rows before it).
      path = benchlib.write(args.workdir, run, tables, notes, path=args.out or None)
  print(f"wrote {path}")


def _fmt(v):
  return f"{v:.4g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
  main()
