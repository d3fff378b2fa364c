r"""Per-training-step cost: full softmax vs sampled softmax (RF-softmax tree, quadratic, uniform) vs n.

One run measures, for n in {1e4, 1e5, 1e6} synthetic unit-norm classes, d = 128, m = 100, batch 256:
  - the median wall-clock of one output-layer training step (forward, backward, SGD update; for sampled
    softmax also drawing the negatives and refreshing the tree for the touched classes; the class-vector
    update is a sparse scatter into a donated buffer, so nothing is O(n) per step), and the ratio to full softmax;
  - the median time of the sampling call alone and the tree depth L = log2(#leaves), to show the tree samplers'
    cost grows like log n (time / L roughly constant) while full softmax grows like n.

    JAX_PLATFORMS=cpu nice -n 10 python scripts/bench_rff.py --out results/bench_rff/bench.json
    JAX_PLATFORMS=cpu python scripts/bench_rff.py --ns 1000,4000 --reps 2      # quick check

Quadratic (Blanc & Rendle) features have d^2 + 1 = 16,385 entries at d = 128, so its tree is over buckets and
its steps are slow on CPU; a sampler whose first (compiled) step exceeds --max_step_s is measured once only.
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


def make_sampled_step(sampler, m, tau, lr, rebuild=False):
  """rebuild=False: refresh only the touched classes (sampler.update); True: rebuild the tree (sampler.init)."""

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(C, sstate, h, t, key):
    B, d = h.shape
    ids, lq = sampler.sample(sstate, key, rff.normalize(h), m)
    lq = jnp.where(ids == t[:, None], jnp.inf, lq)  # accidental hits -> adjusted logit -inf
    rows_t, rows_s = C[t], C[ids]
    local_ids = B + jnp.arange(B * m).reshape(B, m)

    def f(h, rt, rs):
      Cl = jnp.concatenate([rt, rs.reshape(-1, d)])
      return rff.sampled_softmax_loss(h, Cl, jnp.arange(B), local_ids, lq, tau).mean()

    loss, (gh, gt, gs) = jax.value_and_grad(f, argnums=(0, 1, 2))(h, rows_t, rows_s)
    C = C.at[t].add(-lr * gt).at[ids.reshape(-1)].add(-lr * gs.reshape(-1, d))
    if rebuild:
      sstate = sampler.init(C)
    else:
      sstate = sampler.update(sstate, jnp.concatenate([ids.reshape(-1), t]), C)
    return C, sstate, loss + 0 * gh.sum()
  return step


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--ns", default="10000,100000,1000000")
  ap.add_argument("--d", type=int, default=128)
  ap.add_argument("--m", type=int, default=100)
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--D", type=int, default=64, help="RFF frequencies (features 2D); tree memory 2*n_pad*2D floats")
  ap.add_argument("--nu", type=float, default=4.0)
  ap.add_argument("--tau", type=float, default=10.0)
  ap.add_argument("--quadratic_bucket", type=int, default=64)
  ap.add_argument("--samplers", default="full,rff,quadratic,uniform")
  ap.add_argument("--quadratic_max_n", type=int, default=10000,
                  help="larger n: quadratic skipped (d^2-wide bucket tree and touched updates do not fit CPU time/memory)")
  ap.add_argument("--quadratic_refresh", choices=("touched", "rebuild"), default="touched",
                  help="quadratic tree refresh per step: scatter the touched classes' d^2-wide outer products, or "
                       "rebuild all bucket sums with one einsum (O(n d^2), far cheaper than touched at batch*m >> n/bucket)")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--max_step_s", type=float, default=20.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="results/bench_rff/bench.json")
  a = ap.parse_args()
  key = jax.random.key(a.seed)
  rows = []
  for n in [int(x) for x in a.ns.split(",")]:
    kc, kh, kt, ks = jax.random.split(jax.random.fold_in(key, n), 4)
    h = jax.random.normal(kh, (a.batch, a.d))
    t = jax.random.randint(kt, (a.batch,), 0, n)
    full_s = None
    for name in a.samplers.split(","):
      C = rff.normalize(jax.random.normal(kc, (n, a.d)))
      row = {"n": n, "d": a.d, "m": a.m, "batch": a.batch, "sampler": name}
      if name == "quadratic" and n > a.quadratic_max_n:
        row["status"] = f"skipped: n > --quadratic_max_n={a.quadratic_max_n} (CPU time/memory)"
        rows.append(row)
        print(json.dumps(row), flush=True)
        continue
      if name == "full":
        step = make_full_step(a.tau, 0.1)
        state = {"C": C}
        def call():
          state["C"], loss = step(state["C"], h, t)
          return loss
      else:
        if name == "rff":
          sampler = rff.rff_sampler(ks, a.D, a.nu, 0.01)
          row.update(D=a.D, nu=a.nu)
        elif name == "quadratic":
          sampler = rff.quadratic_sampler(100.0, a.quadratic_bucket)
          row.update(bucket=a.quadratic_bucket)
        elif name == "uniform":
          sampler = rff.uniform_sampler(n)
        else:
          raise ValueError(f"unknown sampler {name!r}")
        sstate = sampler.init(C)
        if hasattr(sstate, "tree"):
          row["tree_depth"] = sstate.tree.depth
          row["tree_bytes"] = int(sstate.tree.nodes.size * 4)
        hn = rff.normalize(h)
        sample_fn = jax.jit(lambda s, k: sampler.sample(s, k, hn, a.m))
        jax.block_until_ready(sample_fn(sstate, ks))
        row["sample_ms"] = 1e3 * _median_time(lambda: sample_fn(sstate, ks), a.reps)[0]
        rebuild = name == "quadratic" and a.quadratic_refresh == "rebuild"
        if name == "quadratic":
          row["refresh"] = a.quadratic_refresh
        step = make_sampled_step(sampler, a.m, a.tau, 0.1, rebuild=rebuild)
        state = {"C": C, "s": sstate, "i": 0}
        def call():
          state["i"] += 1
          state["C"], state["s"], loss = step(state["C"], state["s"], h, t, jax.random.fold_in(ks, state["i"]))
          return loss
      t0 = time.perf_counter()
      jax.block_until_ready(call())  # compile + first step
      first = time.perf_counter() - t0
      reps = a.reps if first < a.max_step_s else 1
      med, ts = _median_time(call, reps)
      row.update(step_ms=1e3 * med, step_reps=reps, compile_and_first_s=first)
      if name == "full":
        full_s = med
      row["ratio_to_full"] = med / full_s if full_s else None
      rows.append(row)
      print(json.dumps(row), flush=True)
      del state, C
  print("\n| n | sampler | step ms | ratio to full | sample ms | tree depth L | sample ms / L |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    if "step_ms" not in r:
      print(f"| {r['n']} | {r['sampler']} | {r['status']} | | | | |")
      continue
    L = r.get("tree_depth")
    s = r.get("sample_ms")
    print(f"| {r['n']} | {r['sampler']} | {r['step_ms']:.1f} | {r['ratio_to_full'] or float('nan'):.3f} | "
          f"{'' if s is None else f'{s:.1f}'} | {'' if L is None else L} | "
          f"{'' if (s is None or not L) else f'{s / L:.2f}'} |")
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  dev = jax.devices()[0]
  with open(a.out, "w") as f:
    json.dump({"args": vars(a), "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
               "jax": jax.__version__, "rows": rows}, f, indent=2)
  print("wrote", a.out)


if __name__ == "__main__":
  main()
