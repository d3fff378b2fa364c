r"""Per-training-step cost of the output layer: full softmax vs sampled softmax (RF-softmax tree walk, unigram,
uniform; optionally quadratic), per-query and batch-shared negatives, vs n and the RFF dimension D.

For n in {1e4, 1e5, 1e6} synthetic unit-norm classes, d = 128, m = 100, batch 256, it measures the median
wall-clock (>= 5 repetitions after compilation and one warm-up step) of:
  - the full-softmax step: logits of all n classes, value_and_grad through the normalisation of h and C, an SGD
    update of the donated [n, d] class matrix (the fastest honest exact step we have: one [B, d] x [d, n] matmul
    forward, two back); timed before AND after the sampled rows of each n, so drifting machine load shows;
  - the sampled step: draw the negatives (per query: [B, m], B*m gathers; shared: one [m] set for the batch, a
    [B, d] x [d, m] matmul), the corrected sampled loss and its gradient, a sparse scatter update of the touched
    class rows, and the touched-class tree refresh (`sampler.update`). RF-softmax uses the O(D log n) tree walk
    (`precompute=False`), never the O(nD) all-node scoring;
  - the sampling call alone, and the tree's memory (2P nodes x 2D float32, P = 2^ceil(log2 n)).
A cell whose tree would exceed --max_tree_gb is skipped and the reason printed (building it needs ~2.5x that).

    JAX_PLATFORMS=cpu taskset -c 1 .venv/bin/python scripts/bench_rff.py     # writes docs/results/bench_rff
    JAX_PLATFORMS=cpu .venv/bin/python scripts/bench_rff.py --ns 1000,4000 --Ds 16 --reps 2 --workdir /tmp/b  # quick
    .venv/bin/python scripts/bench_rff.py --render docs/results/bench_rff/results.json   # print its tables

Writes `--workdir`/results.json and table.md (`experiments.benchlib`; rewritten after every n): table `full_step`
(one row per n and measurement, before / after the sampled rows) and table `sampled_step` (one row per sampler,
negatives mode and D; a skipped cell says why in `status`), which docs/rff.md includes.

Bucketed RF-softmax (`rff_bucket`, issue 27): a tree over buckets of --rff_bucket classes (node memory
2P x 2D float32 with P ~ n / bucket; the drawn bucket's members are scored with the exact kernel), timed like `rff`
and with its build time (`init`, chunked) and measured node memory. At n = 1e6, D = 1024, bucket 32 the nodes take
0.5 GiB (one-class leaves: 16 GiB). E.g. (issue 27):

    JAX_PLATFORMS=cpu taskset -c 1 .venv/bin/python scripts/bench_rff.py --ns 100000,1000000 \
      --samplers full,rff_bucket,unigram --Ds 64,256,1024 --reps 3 --max_step_s 60

Quadratic (Blanc & Rendle) features have d^2 + 1 = 16,385 entries at d = 128 (tree over buckets, slow on CPU):
add `quadratic` to --samplers to time it (per-query only), see --quadratic_refresh.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from asoftmax import rff
from experiments import benchlib

FULL_COLUMNS = ["n", "when", "step_ms", "step_min_ms", "step_max_ms", "compile_and_first_s"]
SAMPLED_COLUMNS = ["n", "sampler", "mode", "D", "bucket", "tree_MB", "init_s", "step_ms", "ratio_to_full",
                   "ratio_to_full_after", "sample_ms", "status"]


def _median_time(fn, reps):
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts)), ts


def make_full_step(tau, lr):
  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(C, h, t):
    f = lambda h, C: rff.full_softmax_loss(h, C, t, tau).mean()
    loss, (gh, gC) = jax.value_and_grad(f, argnums=(0, 1))(h, C)
    return C - lr * gC, loss + 0 * gh.sum()
  return step


def make_sampled_step(sampler, m, tau, lr, shared, rebuild=False):
  """One sampled-softmax step; rebuild=True rebuilds the tree (sampler.init) instead of the touched refresh."""

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(C, sstate, h, t, key):
    B, d = h.shape
    ids, lq = sampler.sample(sstate, key, rff.normalize(h), m, shared=shared)
    flat = ids.reshape(-1)
    rows_t, rows_s = C[t], C[flat]
    local_t = jnp.arange(B)
    if shared:
      local_s = B + jnp.arange(m)
      # accidental hits are found on the global ids and passed through the local ones
      hit = ids[None, :] == t[:, None]
    else:
      local_s = B + jnp.arange(B * m).reshape(B, m)
      hit = ids == t[:, None]

    def f(h, rt, rs):
      Cl = jnp.concatenate([rt, rs])
      log_e = jnp.broadcast_to(lq + jnp.log(float(m)), hit.shape)
      log_e = jnp.where(hit, jnp.inf, log_e)  # accidental hit: adjusted logit -> -inf
      return rff.corrected_sampled_loss(h, Cl, local_t, local_s, log_e, tau).mean()

    loss, (gh, gt, gs) = jax.value_and_grad(f, argnums=(0, 1, 2))(h, rows_t, rows_s)
    C = C.at[t].add(-lr * gt).at[flat].add(-lr * gs)
    if rebuild:
      sstate = sampler.init(C)
    else:
      sstate = sampler.update(sstate, jnp.concatenate([flat, t]), C)
    return C, sstate, loss + 0 * gh.sum()
  return step


def tree_bytes(n, features, bucket=1):
  return rff.tree_nbytes(n, features, bucket)


def render(path):
  """Markdown rows from a saved results file: a benchlib snapshot's table.md text, or (files written before
  benchlib) memory per (n, D) and step time per sampler."""
  with open(path) as f:
    res = json.load(f)
  if "bench" in res:
    return benchlib.render_markdown(res)
  full = {}
  for r in res["rows"]:
    if r["sampler"] == "full" and r.get("step_ms"):
      full.setdefault(r["n"], []).append(r["step_ms"])
  out = [f"Measured by `{res.get('command', '?')}` ({res['device']}, jax {res['jax']}, load average "
         f"{res.get('loadavg_start', ['?'])[0]:.1f} -> {res.get('loadavg_end', ['?'])[0]:.1f}; shared CPU: noisy).", "",
         "| n | sampler | D | bucket | tree memory | one-class-leaf tree | build s | negatives | step ms | / full step | sample ms |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in res["rows"]:
    if r["sampler"] == "full":
      continue
    mem = f"{r['tree_MB']:.4g} MiB" if "tree_MB" in r else ""
    one = f"{r['tree_MB_one_class_leaves']:.4g} MiB" if "tree_MB_one_class_leaves" in r else (
        mem if r["sampler"] == "rff" else "")
    if "step_ms" not in r:
      step, ratio, samp = r.get("status", "not run"), "", ""
    else:
      step = f"{r['step_ms']:,.1f}"
      ratio = "/".join(f"{r['step_ms'] / x:.3g}" for x in full.get(r["n"], []))
      samp = f"{r['sample_ms']:,.1f}"
    build = f"{r['init_s']:.1f}" if r.get("tree_MB") and "init_s" in r else ""
    out.append(f"| {r['n']:.0e} | {r['sampler']} | {r.get('D', '')} | {r.get('bucket', 1 if r['sampler'] == 'rff' else '')}"
               f" | {mem} | {one} | {build} | {r['mode']} | {step} | {ratio} | {samp} |")
  fl = "; ".join(f"n = {n:.0e}: " + " / ".join(f"{x:,.0f}" for x in v) for n, v in full.items())
  out += ["", f"Full-softmax step ms (before / after the sampled rows): {fl}."]
  return "\n".join(out)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--render", metavar="RESULTS_JSON", help="only print the tables of a saved results file")
  ap.add_argument("--ns", default="10000,100000,1000000")
  ap.add_argument("--d", type=int, default=128)
  ap.add_argument("--m", type=int, default=100)
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--Ds", default="64,256,1024", help="RFF frequencies (features 2D)")
  ap.add_argument("--nu", type=float, default=4.0)
  ap.add_argument("--tau", type=float, default=10.0)
  ap.add_argument("--modes", default="per_query,shared")
  ap.add_argument("--samplers", default="full,rff,unigram,uniform")
  ap.add_argument("--max_tree_gb", type=float, default=1.2,
                  help="skip an RF cell whose tree exceeds this (4 agents share 24 GiB here; build peak ~2.5x)")
  ap.add_argument("--rff_bucket", type=int, default=32, help="classes per leaf of the rff_bucket sampler")
  ap.add_argument("--quadratic_bucket", type=int, default=64)
  ap.add_argument("--quadratic_max_n", type=int, default=10000)
  ap.add_argument("--quadratic_refresh", choices=("touched", "rebuild"), default="touched")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--max_step_s", type=float, default=30.0, help="a first step slower than this is timed once")
  ap.add_argument("--seed", type=int, default=0)
  benchlib.add_flags(ap, "rff")
  ap.add_argument("--out", default="", help="write the results JSON to this file instead of WORKDIR/results.json")
  a = ap.parse_args()
  if a.render:
    print(render(a.render))
    return
  run = benchlib.start("rff")
  device = run["device"]
  print(f"device {device}; jax {jax.__version__}; load average {run['load_average'][0]}", flush=True)
  key = jax.random.key(a.seed)
  rows = []

  def emit(row):
    row["loadavg_1m"] = os.getloadavg()[0]
    rows.append(row)
    print(json.dumps(row), flush=True)

  for n in [int(x) for x in a.ns.split(",")]:
    kc, kh, kt, ks = jax.random.split(jax.random.fold_in(key, n), 4)
    h = jax.random.normal(kh, (a.batch, a.d))
    t = jax.random.randint(kt, (a.batch,), 0, n)
    counts = 1e6 / np.arange(1, n + 1)  # Zipf class counts for the unigram sampler
    full_ms = []

    def time_full(when):
      C = rff.normalize(jax.random.normal(kc, (n, a.d)))
      step = make_full_step(a.tau, 0.1)
      state = {"C": C}
      def call():
        state["C"], loss = step(state["C"], h, t)
        return loss
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      first = time.perf_counter() - t0
      jax.block_until_ready(call())  # warm-up
      med, ts = _median_time(call, a.reps)
      full_ms.append(1e3 * med)
      emit({"n": n, "sampler": "full", "mode": f"full ({when})", "when": when, "step_ms": 1e3 * med,
            "step_ms_all": [1e3 * x for x in ts], "step_min_ms": 1e3 * min(ts), "step_max_ms": 1e3 * max(ts),
            "compile_and_first_s": first, "ratio_to_full": None})
      del state, C

    if "full" in a.samplers.split(","):
      time_full("before")
    cells = []
    for name in a.samplers.split(","):
      if name == "full":
        continue
      for mode in a.modes.split(","):
        if name in ("rff", "rff_bucket"):
          cells += [(name, mode, int(D)) for D in a.Ds.split(",")]
        elif name == "quadratic":
          if mode == "per_query":
            cells.append((name, mode, None))
        else:
          cells.append((name, mode, None))
    for name, mode, D in cells:
      shared = mode == "shared"
      row = {"n": n, "d": a.d, "m": a.m, "batch": a.batch, "sampler": name, "mode": mode}
      if name == "rff":
        row.update(D=D, nu=a.nu, tree_MB=tree_bytes(n, 2 * D) / 2**20)
        if tree_bytes(n, 2 * D) > a.max_tree_gb * 2**30:
          row["status"] = (f"skipped: tree needs {tree_bytes(n, 2 * D) / 2**30:.2f} GiB (2P x 2D float32, "
                           f"P = {tree_bytes(n, 2 * D) // (2 * 2 * D * 4)}) > --max_tree_gb={a.max_tree_gb}")
          emit(row)
          continue
        sampler = rff.rff_sampler(ks, D, a.nu, 0.01, precompute=False)
      elif name == "rff_bucket":
        nbytes = tree_bytes(n, 2 * D, a.rff_bucket)
        row.update(D=D, nu=a.nu, bucket=a.rff_bucket, tree_MB=nbytes / 2**20,
                   tree_MB_one_class_leaves=tree_bytes(n, 2 * D) / 2**20)
        if nbytes > a.max_tree_gb * 2**30:
          row["status"] = (f"skipped: tree needs {nbytes / 2**30:.2f} GiB (2P x 2D float32, "
                           f"P = {nbytes // (2 * 2 * D * 4)}) > --max_tree_gb={a.max_tree_gb}")
          emit(row)
          continue
        sampler = rff.rff_bucket_sampler(ks, D, a.nu, a.rff_bucket, 0.01, precompute=False)
      elif name == "quadratic":
        if n > a.quadratic_max_n:
          row["status"] = f"skipped: n > --quadratic_max_n={a.quadratic_max_n} (CPU time)"
          emit(row)
          continue
        sampler = rff.quadratic_sampler(100.0, a.quadratic_bucket)
        row.update(bucket=a.quadratic_bucket, refresh=a.quadratic_refresh)
      elif name == "uniform":
        sampler = rff.uniform_sampler(n)
      elif name == "unigram":
        sampler = rff.unigram_sampler(counts)
      else:
        raise ValueError(f"unknown sampler {name!r}")
      C = rff.normalize(jax.random.normal(kc, (n, a.d)))
      t0 = time.perf_counter()
      sstate = jax.block_until_ready(sampler.init(C))
      row["init_s"] = time.perf_counter() - t0  # build (compile included for the jitted builds)
      if hasattr(sstate, "tree"):
        row["tree_depth"] = sstate.tree.depth
        row["tree_MB"] = sstate.tree.nodes.size * 4 / 2**20
      hn = rff.normalize(h)
      sample_fn = jax.jit(lambda s, k: sampler.sample(s, k, hn, a.m, shared=shared))
      jax.block_until_ready(sample_fn(sstate, ks))
      row["sample_ms"] = 1e3 * _median_time(lambda: sample_fn(sstate, ks), a.reps)[0]
      step = make_sampled_step(sampler, a.m, a.tau, 0.1, shared,
                               rebuild=name == "quadratic" and a.quadratic_refresh == "rebuild")
      state = {"C": C, "s": sstate, "i": 0}
      def call():
        state["i"] += 1
        state["C"], state["s"], loss = step(state["C"], state["s"], h, t, jax.random.fold_in(ks, state["i"]))
        return loss
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      first = time.perf_counter() - t0
      reps = a.reps if first < a.max_step_s else 1
      if reps > 1:
        jax.block_until_ready(call())  # warm-up
      med, ts = _median_time(call, reps)
      row.update(step_ms=1e3 * med, step_ms_all=[1e3 * x for x in ts], step_reps=reps, compile_and_first_s=first,
                 ratio_to_full=(1e3 * med / full_ms[0]) if full_ms else None)
      emit(row)
      del state, C, sstate
    if "full" in a.samplers.split(","):
      time_full("after")
      for r in rows:
        if r["n"] == n and r.get("step_ms") and r["sampler"] != "full":
          r["ratio_to_full_after"] = r["step_ms"] / full_ms[-1]
    write(a, run, rows)

  print(f"\ndevice {device}; jax {jax.__version__}; median of {a.reps} steps after compile + 1 warm-up; "
        f"d={a.d}, m={a.m}, batch={a.batch}, nu={a.nu}")
  print("\n| n | sampler | negatives | D | tree MB | step ms | / full (before, after) | sample ms |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    D = r.get("D", "")
    mb = f"{r['tree_MB']:.0f}" if "tree_MB" in r else ""
    if "step_ms" not in r:
      print(f"| {r['n']} | {r['sampler']} | {r['mode']} | {D} | {mb} | {r['status']} | | |")
      continue
    ratio = ""
    if r.get("ratio_to_full") is not None:
      ratio = f"{r['ratio_to_full']:.2f}, {r.get('ratio_to_full_after', float('nan')):.2f}"
    s = r.get("sample_ms")
    print(f"| {r['n']} | {r['sampler']} | {r['mode']} | {D} | {mb} | {r['step_ms']:.1f} | {ratio} | "
          f"{'' if s is None else f'{s:.1f}'} |")
  print("wrote", write(a, run, rows))


def write(a, run, rows):
  """Writes the snapshot (benchlib) of the rows so far; returns its path."""
  full = [r for r in rows if r["sampler"] == "full"]
  sampled = [r for r in rows if r["sampler"] != "full"]
  notes = {"setup": f"per output-layer training step, d = {a.d}, m = {a.m}, batch {a.batch}, tau = {a.tau}, "
                    f"nu = {a.nu}, kappa = 0.01; RF-softmax by the O(D log n) tree walk (precompute=False); "
                    f"step_ms = median of {a.reps} steps after compilation and one warm-up step (one step where the "
                    f"first took more than --max_step_s={a.max_step_s} s; every step's time in step_ms_all)",
           "columns": "mode per_query: B x m negatives per step (B m gathered rows), shared: one set of m for the batch; "
                      "tree_MB: node memory (2P x 2D float32, measured where built); init_s: sampler build, compile "
                      "included; ratio_to_full(_after): step_ms / the full step measured before (after) the sampled "
                      "rows of the same n; sample_ms: the sampling call alone",
           "skipped": f"cells whose tree exceeds --max_tree_gb={a.max_tree_gb} are skipped (building one peaks at "
                      "~2.5x its size); their status says why"}
  return benchlib.write(a.workdir, run, {"full_step": benchlib.table(FULL_COLUMNS, full),
                                         "sampled_step": benchlib.table(SAMPLED_COLUMNS, sampled)}, notes,
                        path=a.out or None)


if __name__ == "__main__":
  main()
