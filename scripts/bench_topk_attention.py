r"""Forward wall-clock of `topk.dot_product_attention` (certified top-k, flax `attention_fn`) against dense attention.

Shape [batch, length, heads, dim] = [4, 512, 8, 64] by default (issue 26's target: <= 1.5x dense on CPU), self
attention, `--q_scale` times N(0, 1) queries (larger = peakier attention, smaller heads). Each method is one
jitted function of (q, k, v); times are medians of `--repeats` (>= 5) calls after a compile + warm-up call, all in
one process. Dense paths (the fastest is the reference):

* `jax.nn.dot_product_attention` (what flax's `nnx.dot_product_attention` calls without dropout);
* einsum -> softmax -> einsum on the full [batch, heads, q, kv] logits;
* the same dense softmax computed in the blocks ours uses (`lax.map` over (batch, head) blocks of queries), so
  that blocking is not credited to truncation.

Ours: `topk.dot_product_attention(epsilon=--epsilon, iters=...)` for each `--iters`; its mean head size k / kv_len
and max certificate are printed next to the time. `--causal` adds the causal mask to every method.

    JAX_PLATFORMS=cpu taskset -c 1 python scripts/bench_topk_attention.py   # docs/results/bench_topk_attention

Writes `--workdir`/results.json and table.md (`experiments.benchlib`): table `forward`, one row per method (ms,
median of the interleaved rounds; every round's time in `ms_all`), which README's Benchmarks section includes.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from asoftmax import topk
from experiments import benchlib


def _time_interleaved(fns, args, repeats):
  """{name: (median ms, all ms)}: every function compiled and warmed up, then timed in `repeats` rounds that call
  each function once in turn (so that drifting machine load hits every method alike)."""
  for f in fns.values():
    jax.block_until_ready(f(*args))  # compile
    jax.block_until_ready(f(*args))  # warm-up
  ts = {name: [] for name in fns}
  for _ in range(repeats):
    for name, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      ts[name].append(1e3 * (time.perf_counter() - t0))
  return {name: (statistics.median(t), t) for name, t in ts.items()}


def dense_einsum(q, k, v, causal):
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if causal:
    s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -1e30)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)


def dense_blocked(q, k, v, causal, query_block):
  """Dense softmax attention in the same lax.map blocks as topk.dot_product_attention."""
  B, Q, H, D = q.shape
  N = k.shape[1]
  nc = Q // query_block
  qt = jnp.transpose(q, (0, 2, 1, 3)).reshape(B * H * nc, query_block, D)
  kt = jnp.transpose(k, (0, 2, 1, 3)).reshape(B * H, N, D)
  vt = jnp.transpose(v, (0, 2, 1, 3)).reshape(B * H, N, -1)

  def block(a):
    i, qq = a
    c = i % nc
    s = qq @ jax.lax.dynamic_index_in_dim(kt, i // nc, keepdims=False).T / np.sqrt(D)
    if causal:
      s = jnp.where(jnp.arange(N)[None] <= (c * query_block + jnp.arange(query_block))[:, None], s, -1e30)
    return jax.nn.softmax(s, -1) @ jax.lax.dynamic_index_in_dim(vt, i // nc, keepdims=False)

  out = jax.lax.map(block, (jnp.arange(B * H * nc), qt))
  return out.reshape(B, H, Q, -1).transpose(0, 2, 1, 3)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shape", default="4,512,8,64", help="batch,length,heads,dim")
  ap.add_argument("--epsilon", type=float, default=0.01)
  ap.add_argument("--iters", default="0,4,6,8,16", help="bisection steps of ours (8 is the default)")
  ap.add_argument("--q_scale", type=float, default=2.0)
  ap.add_argument("--causal", action="store_true")
  ap.add_argument("--repeats", type=int, default=9)
  benchlib.add_flags(ap, "topk_attention")
  ap.add_argument("--out", default="", help="write the results JSON to this file instead of WORKDIR/results.json")
  args = ap.parse_args()
  if args.repeats < 5:
    raise SystemExit("--repeats must be >= 5")
  B, L, H, D = (int(x) for x in args.shape.split(","))
  run = benchlib.start("topk_attention")
  print(f"jax {run['jax_version']}, device {run['device']}, {run['cpu_count']} CPUs, affinity {run['cpu_affinity']} "
        f"cores, load average {run['load_average'][0]:.2f} (start)", flush=True)
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = args.q_scale * jax.random.normal(kq, (B, L, H, D))
  k = jax.random.normal(kk, (B, L, H, D))
  v = jax.random.normal(kv, (B, L, H, D))
  qb = max(1, min(L, 2 ** 18 // L))  # ours' default block
  rows = []
  dense = {
      "dense: jax.nn.dot_product_attention": jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=args.causal)),
      "dense: einsum-softmax-einsum": jax.jit(functools.partial(dense_einsum, causal=args.causal)),
      f"dense: same lax.map blocks ({qb} queries)": jax.jit(functools.partial(dense_blocked, causal=args.causal,
                                                                              query_block=qb)),
  }
  ours = {f"topk.dot_product_attention iters={it}": (it, jax.jit(functools.partial(
      topk.dot_product_attention, epsilon=args.epsilon, iters=it, is_causal=args.causal, return_certificate=True)))
      for it in (int(x) for x in args.iters.split(","))}
  times = _time_interleaved({**dense, **{n: (lambda f: lambda *a: f(*a)[0])(f) for n, (_, f) in ours.items()}},
                            (q, k, v), args.repeats)
  ref = None
  for name, f in dense.items():
    out = f(q, k, v)
    ref = out if ref is None else ref
    ms, all_ms = times[name]
    rows.append(dict(method=name, ms=ms, ms_all=all_ms, mean_k_over_n=1.0,
                     max_abs_diff_vs_first=float(jnp.max(jnp.abs(out - ref)))))
    print(f"{name}: {ms:.1f} ms", flush=True)
  best = min(r["ms"] for r in rows)
  for r in rows:
    r.update(ratio_to_jax_nn=r["ms"] / rows[0]["ms"], ratio_to_fastest_dense=r["ms"] / best)
  for name, (it, f) in ours.items():
    ms, all_ms = times[name]
    out, cert = f(q, k, v)
    rows.append(dict(method=name, ms=ms, ms_all=all_ms, iters=it,
                     mean_k_over_n=float(jnp.mean(cert.k)) / L, max_certificate=float(jnp.max(cert.certificate)),
                     max_abs_diff_vs_first=float(jnp.max(jnp.abs(out - ref))), ratio_to_fastest_dense=ms / best,
                     ratio_to_jax_nn=ms / rows[0]["ms"]))
    print(f"ours iters={it}: {ms:.1f} ms ({ms / best:.2f}x the fastest dense, {ms / rows[0]['ms']:.2f}x "
          f"jax.nn), mean k/n {rows[-1]['mean_k_over_n']:.3f}, max certificate {rows[-1]['max_certificate']:.4f} "
          f"(epsilon {args.epsilon})", flush=True)
  columns = ["method", "ms", "mean_k_over_n", "max_certificate", "ratio_to_jax_nn", "ratio_to_fastest_dense"]
  notes = {"setup": f"forward, [batch, length, heads, dim] = [{B}, {L}, {H}, {D}], self attention, queries "
                    f"{args.q_scale} x N(0, 1), keys and values N(0, 1), epsilon {args.epsilon}, causal {args.causal}; "
                    f"ms = median of {args.repeats} interleaved rounds after a compile and a warm-up call, one process",
           "ratios": "ratio_to_jax_nn = ms / ms of jax.nn.dot_product_attention; ratio_to_fastest_dense = ms / the "
                     "fastest dense method's ms (both from the same rounds)"}
  path = benchlib.write(args.workdir, run, {"forward": benchlib.table(columns, rows)}, notes, path=args.out or None)
  print(f"wrote {path}")

if __name__ == "__main__":
  main()
