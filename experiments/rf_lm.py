"""RF-softmax language-model table: sampled-softmax training of a word LSTM on Penn Treebank text.

Part (a): a one-layer word LSTM (`asoftmax.models.WordLSTM`, normalized output layer with inverse temperature
tau) trained with the full softmax (reference) or sampled softmax (log-q corrected, accidental hits masked)
under each proposal: uniform, unigram, quadratic (Blanc & Rendle), RF-softmax (tree, several D), exact softmax.
Only the PTB valid and test splits exist offline: we TRAIN ON ptb.valid AND REPORT PERPLEXITY ON (a prefix of)
ptb.test, always with the full softmax, on non-overlapping windows (LSTM state reset per window).
Part (b) (49,152-way SmolLM2 output layer) and the extreme-classification datasets are listed as rows that
were not run, with the reason. Reference: Rawat et al., NeurIPS 2019, PTB table ([R]: no verified numbers).
"""

from __future__ import annotations

import collections
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from asoftmax import rff
from asoftmax.models.lm import WordLSTM
from asoftmax.rff import paper_numbers
from experiments import registry


# ------------------------------------------------------------------------------------------------ data
def read_words(path: str) -> list[str]:
  """PTB text -> words, with <eos> at each line end."""
  out = []
  with open(path) as f:
    for line in f:
      out.extend(line.split() + ["<eos>"])
  return out


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
    tr = os.path.join(config.data_dir, "ptb", "ptb.valid.txt")
    te = os.path.join(config.data_dir, "ptb", "ptb.test.txt")
    if not (os.path.exists(tr) and os.path.exists(te)):
      raise FileNotFoundError(f"PTB not found under {config.data_dir!r}/ptb (set ASOFTMAX_DATA_DIR)")
    train_w, test_w, src = read_words(tr), read_words(te), "PTB: train = ptb.valid.txt, test = ptb.test.txt"
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
      else:
        runs.append((name, m, None))
  return runs


# ------------------------------------------------------------------------------------------------ training
def train_one(config, key, train, test_windows, n, counts, sampler_name, m, D):
  """Trains one model; returns (test perplexity, median step seconds, final train loss, model)."""
  k_model, k_sampler, k_data, k_steps = jax.random.split(key, 4)
  model = WordLSTM(n, config.embed, config.hidden, config.dim, rngs=nnx.Rngs(params=k_model))
  opt = nnx.Optimizer(model, optax.adam(config.learning_rate), wrt=nnx.Param)
  tau = config.tau
  full = sampler_name == "full"
  sampler = None if full else make_sampler(sampler_name, config, n, counts, D, k_sampler)
  sstate = None if full else sampler.init(model.classes[...])

  @nnx.jit
  def step(model, opt, sstate, x, y, key):
    t = y.reshape(-1)

    def loss_fn(model):
      h = model(x).reshape(-1, config.dim)
      if full:
        return rff.full_softmax_loss(h, model.classes[...], t, tau).mean(), t[:, None]
      ids, lq = sampler.sample(sstate, key, jax.lax.stop_gradient(rff.normalize(h)), m)
      return rff.sampled_softmax_loss(h, model.classes[...], t, ids, lq, tau).mean(), ids

    (loss, ids), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    if not full and config.tree_refresh == "touched":  # refresh the touched classes (targets and samples)
      sstate = sampler.update(sstate, jnp.concatenate([ids.reshape(-1), t]), model.classes[...])
    elif not full:  # "rebuild": O(n F) rebuild, cheaper than touched updates when m * batch >~ n
      sstate = sampler.init(model.classes[...])
    return loss, sstate

  starts = np.asarray(jax.random.randint(k_data, (config.steps, config.batch), 0, len(train) - config.bptt - 1))
  times, loss = [], float("nan")
  for s in range(config.steps):
    idx = starts[s][:, None] + np.arange(config.bptt + 1)[None, :]
    chunk = train[idx]
    if not full and config.rebuild_every and s > 0 and s % config.rebuild_every == 0:
      sstate = sampler.init(model.classes[...])  # full rebuild: Adam moves untouched rows too
    t0 = time.perf_counter()
    loss_a, sstate = step(model, opt, sstate, jnp.asarray(chunk[:, :-1]), jnp.asarray(chunk[:, 1:]),
                          jax.random.fold_in(k_steps, s))
    loss = float(loss_a)
    times.append(time.perf_counter() - t0)
  ppl = evaluate(model, test_windows, config)
  return ppl, float(np.median(times[1:] if len(times) > 1 else times)), loss, model


def evaluate(model, windows, config):
  """Full-softmax test perplexity over windows [W, T+1] (state reset per window)."""

  @nnx.jit
  def batch_nll(model, w):
    h = model(w[:, :-1]).reshape(-1, config.dim)
    return rff.full_softmax_loss(h, model.classes[...], w[:, 1:].reshape(-1), config.tau).sum()

  tot, cnt = 0.0, 0
  for i in range(0, len(windows), config.eval_batch):
    w = jnp.asarray(windows[i:i + config.eval_batch])
    tot += float(batch_nll(model, w))
    cnt += w.shape[0] * (w.shape[1] - 1)
  return float(np.exp(tot / cnt))


def snapshot(model, windows, config, counts, path, name):
  """Saves class vectors and held-out queries of a trained model for rf_bias (setting b)."""
  w = jnp.asarray(windows[: config.snapshot_windows])
  h = rff.normalize(model(w[:, :-1]).reshape(-1, config.dim))
  np.savez(path, class_vectors=np.asarray(rff.normalize(model.classes[...])), h=np.asarray(h),
           targets=np.asarray(w[:, 1:].reshape(-1)), tau=config.tau, counts=np.asarray(counts), name=name)


def run(config, workdir, rng) -> registry.Output:
  rows, notes = [], {"paper": paper_numbers.CLAIMS["lm"]}
  try:
    train, test, vocab, src = load_corpus(config)
  except FileNotFoundError as e:
    rows.append({"task": "ptb", "status": f"not run: {e}"})
    train = None
  if train is not None:
    n = len(vocab)
    counts = np.bincount(train, minlength=n).astype(np.float64)
    T = config.bptt
    test = test[: config.eval_tokens + 1]
    nw = (len(test) - 1) // T
    test_windows = np.stack([test[i * T: i * T + T + 1] for i in range(nw)])
    notes.update({"data": src, "vocab (n)": n, "train_tokens": len(train), "test_tokens_evaluated": nw * T,
                  "model": f"WordLSTM embed={config.embed} hidden={config.hidden} d={config.dim}, tau={config.tau}, "
                           f"adam lr={config.learning_rate}, batch {config.batch}x{config.bptt}",
                  "perplexity": "full softmax on test windows of length bptt, LSTM state reset per window",
                  "tree refresh": (f"touched classes every step + full rebuild every {config.rebuild_every} steps"
                                   if config.tree_refresh == "touched" else "full rebuild after every step"),
                  "tree precompute": str(config.tree_precompute)})
    runs = grid(config)
    for i, (name, m, D) in enumerate(tqdm(runs, desc="rf_lm runs")):
      key = jax.random.fold_in(rng, 0)  # same init and data order for every run; sampler keys differ by step
      t0 = time.perf_counter()
      ppl, step_s, loss, model = train_one(config, key, train, test_windows, n, counts, name, m, D)
      rows.append({"task": "ptb" if config.corpus == "ptb" else config.corpus, "n": n, "sampler": name, "m": m,
                   "D": D, "nu": config.rff_nu if name == "rff" else None, "tau": config.tau,
                   "test_perplexity": ppl, "step_ms": 1e3 * step_s, "steps": config.steps,
                   "final_train_loss": loss, "run_s": time.perf_counter() - t0, "status": "ok"})
      if name == "full" and config.write_snapshot:
        snapshot(model, test_windows, config, counts, os.path.join(workdir, "snapshot.npz"), "ptb-lstm full softmax")
  rows.append({"task": "smollm2-wikitext2 (n=49152)", "status": "not run: " + config.smollm2_status})
  for ds in paper_numbers.EXTREME_DATASETS:
    path = os.path.join(config.data_dir, ds) if config.data_dir else ""
    rows.append({"task": ds, "status": "not run: data not present" if not (path and os.path.exists(path))
                 else "not run: data present but XC training not implemented (loader: asoftmax.rff.load_sparse)"})
  return registry.Output(rows=rows, notes=notes)


def plot(rows, notes):
  import matplotlib.pyplot as plt

  ok = [r for r in rows if r.get("status") == "ok"]
  if not ok:
    return {}
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  series = collections.defaultdict(list)
  for r in ok:
    if r["sampler"] == "full":
      ax.axhline(r["test_perplexity"], color="k", ls="--", label="full softmax")
    else:
      lab = r["sampler"] if r["sampler"] != "rff" else f"rff D={r['D']}"
      series[lab].append((r["m"], r["test_perplexity"]))
  for lab, pts in sorted(series.items()):
    ax.semilogx(*zip(*sorted(pts)), "o-", label=lab)
  ms = sorted({r["m"] for r in ok if r["m"]})
  ax.set_xticks(ms, [str(m) for m in ms])
  ax.minorticks_off()
  ax.set_xlabel("m (sampled negatives)")
  ax.set_ylabel("test perplexity (full softmax)")
  ax.set_title(f"{ok[0]['task']} (n={ok[0]['n']}), {ok[0]['steps']} steps")
  ax.legend(fontsize=7)
  fig.tight_layout()
  return {"perplexity_vs_m": fig}


EXPERIMENT = registry.Experiment(
    name="rf_lm",
    run=run,
    columns=["task", "sampler", "m", "D", "nu", "tau", "test_perplexity", "step_ms", "steps", "final_train_loss",
             "status"],
    plot=plot,
    title="RF-softmax language modelling: sampled-softmax training, full-softmax test perplexity (Rawat et al. 2019)",
)
