r"""RF-softmax classification table: a teacher with a controlled class prior and peakedness.

Where can RF-softmax's claim hold? Its proposal is a kernel softmax $q_i \propto e^{\nu h^\top c_i}$ (through noisy
random features), so it can only beat a frequency proposal when the softmax is driven by the query-class
geometry rather than by the class prior. This experiment controls both:

* teacher: n unit class vectors $c^*_i$ on $S^{d-1}$, inputs $x \sim N(0, I_{d_x})$, query
  $h^*(x) = \mathrm{normalize}(A x)$, label $y \sim \mathrm{softmax}_i(\tau^* h^{*\top} c^*_i + \log \pi_i)$ with
  the prior $\pi$ flat or Zipf ($\pi_i \propto r_i^{-a}$, ranks shuffled) and the peakedness set by $\tau^*$;
* student (the paper's normalized form): $h = \mathrm{normalize}(W x)$, logits $\tau\,h^\top \hat c_i$ with
  learned $W$ and class vectors, $\tau = \tau^*$; trained from the same init on the same fresh teacher samples with
  the full softmax or sampled softmax (m negatives per query, log-q corrected, accidental hits masked) under
  each proposal: exact softmax (oracle), unigram (label counts of the training stream), uniform, RF-softmax
  (tree walk, rebuilt from the current class vectors every step);
* metrics on held-out teacher samples, always with the full softmax: perplexity, precision@1 and @5
  (single-label data: P@5 = P(label in top 5)/5, the extreme-classification definition); ms per step; the
  proposal's median KL(p || q) against the student's own softmax; for RF the total variation between what the
  tree samples and the leaf-clamped kernel, and the share of classes whose kernel value is below the RFF noise
  $1/\sqrt{2D}$.

Rows aggregate seeds: mean and the 95 % t-interval half-width. "Equal wall-clock" gives each sampler the
full softmax's training time of the same seed and reports the last evaluation checkpoint it would reach.
Reference: Rawat et al., NeurIPS 2019 (classification tables report precision@k; no numbers verified, see
`experiments/rff/paper.py`).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

from asoftmax import rff
from experiments import registry


# --------------------------------------------------------------------------------------------- teacher
def make_teacher(key, n, d, dx, prior, zipf_a):
  """Class vectors [n, d], projection A [d, dx], log prior [n]."""
  kc, ka, kp = jax.random.split(key, 3)
  C = rff.normalize(jax.random.normal(kc, (n, d)))
  A = jax.random.normal(ka, (d, dx))
  if prior == "flat":
    lp = jnp.zeros((n,))
  elif prior == "zipf":
    lp = -zipf_a * jnp.log(jnp.arange(1, n + 1, dtype=jnp.float32))[jax.random.permutation(kp, n)]
  else:
    raise ValueError(f"prior must be 'flat' or 'zipf', got {prior!r}")
  return C, A, jax.nn.log_softmax(lp)


def teacher_logits(teacher, X, tau):
  C, A, lp = teacher
  return tau * rff.normalize(X @ A.T) @ C.T + lp


def draw_data(key, teacher, tau, batches, batch, dx):
  """X [batches, batch, dx], y [batches, batch] from the teacher (one batch at a time)."""
  kx, ky = jax.random.split(key)
  X = jax.random.normal(kx, (batches, batch, dx))
  y = jax.lax.map(lambda a: jax.random.categorical(a[1], teacher_logits(teacher, a[0], tau)),
                  (X, jax.random.split(ky, batches)))
  return X, y.astype(jnp.int32)


# --------------------------------------------------------------------------------------------- student
def _query(params, X):
  return X @ params["W"].T


def make_sampler(spec, key, counts, n, tau):
  kind = spec["sampler"]
  if kind == "exact":
    return rff.exact_sampler(tau)
  if kind == "unigram":
    return rff.unigram_sampler(counts)
  if kind == "uniform":
    return rff.uniform_sampler(n)
  if kind == "rff":
    return rff.rff_sampler(key, spec["D"], spec["nu"], spec["kappa"], precompute=False)
  raise ValueError(f"unknown sampler {kind!r}; known: full, exact, unigram, uniform, rff")


@functools.lru_cache(maxsize=None)
def make_step(kind, D, nu, kappa, n, m, tau, lr, shared=False):
  """A jitted training step, shared by every seed: step(params, opt_state, x, y, key, aux).

  aux is the RFF key (rff: the sampler is built inside the step, so W is the same for every step of a run)
  or the unigram sampler's state (its counts); the tree is rebuilt from the current class vectors each step.
  """
  opt = optax.adam(lr)
  spec = {"sampler": kind, "D": D, "nu": nu, "kappa": kappa}

  @jax.jit
  def step(params, opt_state, x, y, key, aux):
    if kind == "full":
      loss_fn = lambda p: rff.full_softmax_loss(_query(p, x), p["C"], y, tau).mean()
    else:
      C = jax.lax.stop_gradient(params["C"])
      if kind == "unigram":
        sampler, state = make_sampler(spec, None, np.ones(n), n, tau), aux
      else:
        sampler = make_sampler(spec, aux, None, n, tau)
        state = sampler.init(C)
      h = jax.lax.stop_gradient(rff.normalize(_query(params, x)))
      ids, lq = sampler.sample(state, key, h, m, shared=shared)  # [B, m], or [m] for the whole batch
      loss_fn = lambda p: rff.sampled_softmax_loss(_query(p, x), p["C"], y, ids, lq, tau).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return opt, step


@jax.jit
def _eval(params, X, y, tau):
  logits = tau * rff.normalize(_query(params, X)) @ rff.normalize(params["C"]).T
  true = jnp.take_along_axis(logits, y[:, None], 1)[:, 0]
  nll = jax.nn.logsumexp(logits, -1) - true
  rank = jnp.sum(logits > true[:, None], -1)  # classes ranked above the label (no sort: top_k is slow on CPU)
  return nll.mean(), (rank == 0).mean(), (rank < 5).mean() / 5.0


def evaluate(params, X, y, tau):
  nll, p1, p5 = (float(v) for v in _eval(params, X, y, tau))
  return {"perplexity": float(np.exp(nll)), "p_at_1": p1, "p_at_5": p5}


def proposal_diagnostics(spec, sampler, params, Xq, tau):
  """Median KL(p || q) over queries; for RF also TV(tree q, leaf-clamped q), share below noise, share < 0."""
  if spec["sampler"] == "full":
    return {}
  C = params["C"]
  state = sampler.init(C)
  h = rff.normalize(_query(params, Xq))
  logits = tau * h @ rff.normalize(C).T
  lp = jax.nn.log_softmax(logits, -1)
  lq = sampler.log_probs(state, h)
  kl = jnp.sum(jnp.exp(lp) * (lp - lq), -1)
  out = {"KL": float(jnp.median(kl))}
  if spec["sampler"] == "rff":
    psi = rff.rff_features(h, state.W)
    leaf = rff.leaf_clamped_log_probs(psi, state.tree, spec["kappa"])[:, : C.shape[0]]
    out["TV_vs_leaf_clamp"] = float(jnp.median(0.5 * jnp.abs(jnp.exp(lq) - jnp.exp(leaf)).sum(-1)))
    cos = logits / tau
    kexact = jnp.exp(spec["nu"] * (cos - 1.0))
    out["below_noise"] = float((kexact < 1.0 / np.sqrt(2 * spec["D"])).mean())
    est = psi @ rff.rff_features(rff.normalize(C), state.W).T
    out["negative_estimates"] = float((est < 0).mean())
  return out


def train_one(config, spec, tau, seed_key, data, test, counts):
  """Trains one student; returns per-run metrics with the learning curve at config.eval_steps."""
  n = config.num_classes
  k_init, k_samp, k_steps = jax.random.split(seed_key, 3)
  kw, kc = jax.random.split(k_init)
  params = {"W": jax.random.normal(kw, (config.student_dim, config.input_dim)) / np.sqrt(config.input_dim),
            "C": jax.random.normal(kc, (n, config.student_dim))}
  kind = spec["sampler"]
  if config.negatives not in ("per_query", "shared"):
    raise ValueError(f"negatives must be 'per_query' or 'shared', got {config.negatives!r}")
  opt, step = make_step(kind, spec.get("D"), spec.get("nu"), spec.get("kappa"), n, config.m, float(tau),
                        float(config.learning_rate), config.negatives == "shared")
  opt_state = opt.init(params)
  sampler = None if kind == "full" else make_sampler(spec, k_samp, counts, n, tau)
  aux = sampler.init() if kind == "unigram" else (k_samp if kind == "rff" else None)
  X, y = np.asarray(data[0]), np.asarray(data[1])  # host arrays: X[s] must not compile a slice per step
  Xt, yt = test
  curve, times = [], []
  for s in range(config.steps):
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, X[s], y[s], jax.random.fold_in(k_steps, s), aux)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
    if s + 1 in config.eval_steps:
      curve.append({"step": s + 1, **evaluate(params, Xt, yt, tau)})
  ms = 1e3 * float(np.median(times[1:])) if len(times) > 1 else 1e3 * times[0]
  out = {**curve[-1], "ms_per_step": ms, "curve": curve}
  out.update(proposal_diagnostics(spec, sampler, params, Xt[: config.diag_queries], tau))
  return out


# --------------------------------------------------------------------------------------------- protocol
def _specs(config):
  known = ("full", "exact", "unigram", "uniform", "rff")
  bad = [s for s in config.samplers if s not in known]
  if bad:
    raise ValueError(f"unknown samplers {bad}; known: {known}")
  specs = [{"sampler": s} for s in known[:4] if s in config.samplers]
  if "rff" in config.samplers:
    specs += [{"sampler": "rff", "D": int(D), "nu": float(config.rff_nu), "kappa": float(config.rff_kappa)}
              for D in config.rff_D]
  return specs


def _label(spec):
  if spec["sampler"] == "rff":
    return f"rff D={spec['D']} nu={spec['nu']:g}"
  return spec["sampler"]


def _interval(vals):
  v = np.asarray(vals, np.float64)
  if len(v) < 2:
    return float(v.mean()), float("nan")
  return float(v.mean()), float(scipy.stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def _fmt(vals, digits):
  mean, half = _interval(vals)
  return f"{mean:.{digits}f} ± {half:.{digits}f}" if np.isfinite(half) else f"{mean:.{digits}f}"


def _equal_time(run, full_run, steps):
  """Last checkpoint the run reaches in the full softmax's training time (None: not even the first)."""
  budget = full_run["ms_per_step"] * steps
  reach = budget / run["ms_per_step"]
  ok = [c for c in run["curve"] if c["step"] <= reach]
  return ok[-1] if ok else None


def run(config, workdir, rng) -> registry.Output:
  del workdir
  n = config.num_classes
  blocks = [("main", p, float(t), _specs(config)) for p in config.priors for t in config.teacher_taus]
  nu_specs = [{"sampler": "rff", "D": int(config.nu_sweep_D), "nu": float(nu), "kappa": float(config.rff_kappa)}
              for nu in config.nu_sweep]
  for prior, t in config.nu_sweep_settings:
    blocks.append(("nu_sweep", prior, float(t), nu_specs))
  runs = {}  # (prior, tau, label) -> list over seeds
  teacher_stats = {}
  t_start = time.perf_counter()
  for s in range(config.seeds):
    for prior in sorted({b[1] for b in blocks}):
      for t in sorted({b[2] for b in blocks if b[1] == prior}):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, s), ("flat", "zipf").index(prior)),
                                 int(round(1000 * t)))
        kt, kd, ke, ks = jax.random.split(key, 4)
        teacher = make_teacher(kt, n, config.teacher_dim, config.input_dim, prior, config.zipf_a)
        data = draw_data(kd, teacher, t, config.steps, config.batch, config.input_dim)
        Xt, yt = draw_data(ke, teacher, t, 1, config.test_size, config.input_dim)
        test = (Xt[0], yt[0])
        counts = np.bincount(np.asarray(data[1]).reshape(-1), minlength=n).astype(np.float64)
        tl = teacher_logits(teacher, test[0], t)
        tnll = jax.nn.logsumexp(tl, -1) - jnp.take_along_axis(tl, test[1][:, None], 1)[:, 0]
        rank = jnp.sum(tl > jnp.take_along_axis(tl, test[1][:, None], 1), -1)
        teacher_stats.setdefault((prior, t), []).append(
            {"perplexity": float(jnp.exp(tnll.mean())), "p_at_1": float((rank == 0).mean()),
             "p_at_5": float((rank < 5).mean() / 5),
             "top1_prob": float(jax.nn.softmax(tl, -1).max(-1).mean())})
        seen = set()
        for kind, bp, bt, specs in blocks:
          if (bp, bt) != (prior, t):
            continue
          for spec in specs:
            lab = _label(spec)
            if lab in seen:
              continue
            seen.add(lab)
            r = train_one(config, spec, t, ks, data, test, counts)  # same student init and data for every sampler
            runs.setdefault((prior, t, lab), []).append(r)
            print(f"seed {s} {prior} tau={t:g} {lab}: ppl {r['perplexity']:.2f} p@1 {r['p_at_1']:.3f} "
                  f"{r['ms_per_step']:.1f} ms/step ({time.perf_counter() - t_start:.0f} s)", flush=True)

  rows = []
  for (prior, t), st in sorted(teacher_stats.items()):
    rows.append({"block": "teacher", "prior": prior, "tau": t, "sampler": "teacher (Bayes)", "m": "",
                 "perplexity": _fmt([x["perplexity"] for x in st], 2), "p_at_1": _fmt([x["p_at_1"] for x in st], 3),
                 "p_at_5": _fmt([x["p_at_5"] for x in st], 3),
                 "top1_prob": float(np.mean([x["top1_prob"] for x in st])), "status": "ok"})
  for kind, prior, t, specs in blocks:
    for spec in specs:
      rs = runs[(prior, t, _label(spec))]
      full = runs.get((prior, t, "full"))
      row = {"block": kind, "prior": prior, "tau": t, "sampler": _label(spec),
             "m": "" if spec["sampler"] == "full" else config.m, "seeds": len(rs),
             "perplexity": _fmt([r["perplexity"] for r in rs], 2), "p_at_1": _fmt([r["p_at_1"] for r in rs], 3),
             "p_at_5": _fmt([r["p_at_5"] for r in rs], 3),
             "ms_per_step": float(np.median([r["ms_per_step"] for r in rs])),
             "perplexity_seeds": [r["perplexity"] for r in rs], "p_at_1_seeds": [r["p_at_1"] for r in rs],
             "p_at_5_seeds": [r["p_at_5"] for r in rs], "curves": [r["curve"] for r in rs], "status": "ok"}
      for k in ("KL", "TV_vs_leaf_clamp", "below_noise", "negative_estimates"):
        if k in rs[0]:
          row[k] = float(np.median([r[k] for r in rs]))
      if full is not None:
        eq = [_equal_time(r, f, config.steps) for r, f in zip(rs, full)]
        if all(e is not None for e in eq):
          row["equal_time_perplexity"] = _fmt([e["perplexity"] for e in eq], 2)
          row["equal_time_steps"] = int(np.median([e["step"] for e in eq]))
        else:
          row["equal_time_perplexity"] = f"< {config.eval_steps[0]} steps in full's time"
      rows.append(row)
  notes = {
      "teacher": (f"n = {n} classes on S^{config.teacher_dim - 1}, inputs N(0, I_{config.input_dim}), "
                  f"Zipf exponent {config.zipf_a} (ranks shuffled); student dim {config.student_dim}, tau = teacher tau"),
      "training": (f"{config.steps} steps of Adam {config.learning_rate}, batch {config.batch} fresh teacher samples, "
                   f"m = {config.m} negatives ({config.negatives}, with replacement); evaluation on {config.test_size} held-out "
                   f"samples with the full softmax; {config.seeds} seeds (teacher, data, init and sampler keys)"),
      "intervals": "mean ± 95 % t-interval half-width over seeds",
      "equal wall-clock": ("each run gets the full softmax's training time of its seed (steps x median ms/step); "
                           f"perplexity at the last checkpoint reached (checkpoints {tuple(config.eval_steps)})"),
      "rff": f"kappa = {config.rff_kappa}, tree walk (O(D log n)), tree rebuilt from the current class vectors every step",
  }
  return registry.Output(rows=rows, notes=notes)


def plot(rows, notes):
  del notes
  import matplotlib.pyplot as plt

  out = {}
  sweep = [r for r in rows if r.get("block") == "nu_sweep"]
  if sweep:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (prior, t) in sorted({(r["prior"], r["tau"]) for r in sweep}):
      rs = [r for r in sweep if (r["prior"], r["tau"]) == (prior, t)]
      nus = [float(r["sampler"].split("nu=")[1]) for r in rs]
      ppl = [np.mean(r["perplexity_seeds"]) for r in rs]
      ax.plot(nus, ppl, "o-", label=f"RF, {prior} prior, tau={t:g}")
      for base in ("unigram", "full"):
        b = [r for r in rows if r.get("block") == "main" and (r["prior"], r["tau"]) == (prior, t)
             and r["sampler"] == base]
        if b:
          ax.axhline(np.mean(b[0]["perplexity_seeds"]), ls="--" if base == "unigram" else ":", lw=1,
                     label=f"{base}, {prior}, tau={t:g}")
    ax.set_xscale("log")
    ax.set_xlabel("nu (kernel precision)")
    ax.set_ylabel("test perplexity")
    ax.legend(fontsize=6)
    fig.tight_layout()
    out["nu_sweep"] = fig
  return out


def readme(res: dict):
  """README row: the peaked Zipf setting, RF-softmax (largest D) against unigram and full, perplexity and P@1."""
  from experiments import tables
  from experiments.rff import paper

  main = [r for r in res["rows"] if r.get("block") == "main" and r.get("prior") == "zipf"]
  if not main:
    return []
  t = max(r["tau"] for r in main)
  rs = {r["sampler"]: r for r in main if r["tau"] == t}
  rf = max((r for r in rs.values() if r["sampler"].startswith("rff")), key=lambda r: int(r["sampler"].split("D=")[1]
                                                                                           .split()[0]))
  diff = [d for d in paired_differences(res["rows"]) if d["prior"] == "zipf" and d["tau"] == t
          and d["sampler"] == rf["sampler"]][0]
  m = rf["m"]
  return [tables.ReadmeRow(
      f"RF-softmax, classification with a teacher (Zipf prior, τ = {t:g}, n = 1,024, m = {m}): test perplexity / P@1",
      f"{rf['sampler']}: **{rf['perplexity'].split(' ±')[0]}** / {rf['p_at_1'].split(' ±')[0]}, unigram "
      f"{rs['unigram']['perplexity'].split(' ±')[0]} / {rs['unigram']['p_at_1'].split(' ±')[0]} (paired RF − unigram "
      f"{diff['perplexity']}), full {rs['full']['perplexity'].split(' ±')[0]}; flat prior: unigram ahead or tied",
      paper.CLAIMS["lm"].split(" [")[0].replace("(PTB perplexity)", "").strip() + " (qualitative)")]


EXPERIMENT = registry.Experiment(
    name="rf_classification",
    run=run,
    readme=readme,
    columns=["block", "prior", "tau", "sampler", "m", "perplexity", "p_at_1", "p_at_5", "ms_per_step",
             "equal_time_perplexity", "KL", "TV_vs_leaf_clamp", "below_noise", "negative_estimates", "top1_prob",
             "status"],
    plot=plot,
    title="RF-softmax: classification with a controlled teacher (prior x peakedness), perplexity and precision@k",
)


def paired_differences(rows, base="unigram", metrics=("perplexity", "p_at_1")):
  """Per setting, each sampler minus `base` on the same seeds (same teacher, data and init): mean ± 95 % t.

  Seeds share the teacher within a setting, so the paired difference removes the teacher-to-teacher spread
  that dominates the unpaired intervals. Built from saved rows only.
  """
  out = []
  for r in rows:
    if r.get("block") not in ("main", "nu_sweep"):
      continue
    b = [x for x in rows if x.get("block") == "main" and x["prior"] == r["prior"] and x["tau"] == r["tau"]
         and x["sampler"] == base]
    if not b or r["sampler"] == base:
      continue
    row = {"prior": r["prior"], "tau": r["tau"], "sampler": r["sampler"], "base": base}
    for k in metrics:
      diff = np.asarray(r[f"{k}_seeds"]) - np.asarray(b[0][f"{k}_seeds"])
      row[k] = _fmt(diff, 3 if k != "perplexity" else 2)
    out.append(row)
  return out


if __name__ == "__main__":
  import json
  import sys

  # python -m experiments.rff.classification docs/results/rf_classification/results.json [base]
  with open(sys.argv[1]) as f:
    saved = json.load(f)["rows"]
  base_name = sys.argv[2] if len(sys.argv) > 2 else "unigram"
  print(f"| prior | tau | sampler | perplexity - {base_name} | P@1 - {base_name} |\n|---|---|---|---|---|")
  for d in paired_differences(saved, base_name):
    print(f"| {d['prior']} | {d['tau']:g} | {d['sampler']} | {d['perplexity']} | {d['p_at_1']} |")
