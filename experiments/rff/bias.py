"""RF-softmax bias: how close each proposal's distribution and sampled-softmax gradient are to the softmax's.

For each setting (synthetic unit-sphere vectors, or class/query vectors of a model trained by `rf_lm`), each
sampler (uniform, unigram, quadratic, RF-softmax at several D and nu, exact) and each m, we compute from the
dense proposal q that the sampler implies (`Sampler.log_probs`, equal to its tree path probabilities):
KL(p||q), TV(p, q), chi^2(p~||q~) on the negatives, and the bias of the sampled-softmax logit gradient

  g'_i = (e_t 1[i=t] + sum_j w_j 1[s_j=i]) / Zhat - 1[i=t],  w_j = e_{s_j} / (m q_{s_j}) (hits masked),

  bias = || mean_R g' - (p - e_t) ||_2,  noise floor = sqrt(sum_i Var g'_i / R),

by Monte Carlo with R replicates of m i.i.d. draws from q~, the proposal restricted to the negatives N_t and
renormalized (the form the bias theory uses: with q~ = p~ every w_j = Z_t/m and the gradient is unbiased; drawing
from q over all n and masking hits, as training does, is also unbiased for Z_t but not zero-variance) (drawn by inverse-CDF search on the dense q; the
tree samplers draw exactly this distribution, which `tests/rff/test_lib.py` checks by chi-square).
Reference: Rawat et al., "Sampled Softmax with Random Fourier Features", NeurIPS 2019, Sec. 3 (bias analysis;
the exact theorem statement was not verified: the full text was not available to us).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from asoftmax import rff

from experiments import registry, tables
from experiments.rff import paper as paper_numbers


class BiasRow(NamedTuple):
  """One (setting, sampler, D, nu, m, tau): closeness of the proposal to softmax and gradient bias."""

  setting: str | None = None
  sampler: str | None = None
  D: int | None = None
  nu: float | None = None
  m: int | None = None
  tau: float | None = None
  TV: float | None = None  # TV(p, q), mean over queries
  bias: float | None = None  # ||E[g'] - (p - e_t)||_2, mean over queries
  noise_floor: float | None = None  # sqrt(sum Var / R): bias below this is not resolved
  bias_first_order: float | None = None  # delta-method prediction
  status: str | None = None


TABLE = tables.Table("bias", BiasRow, hidden=(
    "n", "d", "entropy", "top1", "KL", "chi2", "bias_over_floor", "queries", "reps"))


def synthetic_problem(key, n, d, num_queries, noise):
  """Unit class vectors c_i ~ U(S^{d-1}); queries h = normalize(c_t + noise * g / sqrt(d)), t random."""
  kc, kt, kn = jax.random.split(key, 3)
  C = rff.normalize(jax.random.normal(kc, (n, d)))
  t = jax.random.randint(kt, (num_queries,), 0, n)
  h = rff.normalize(C[t] + noise * jax.random.normal(kn, (num_queries, d)) / np.sqrt(d))
  return C, h, t


def make_samplers(config, key, n, tau, counts):
  """[(label, sampler, D, nu)] for the configured sampler list."""
  out = []
  for name in config.samplers:
    if name == "uniform":
      out.append(("uniform", rff.uniform_sampler(n), None, None))
    elif name == "unigram":
      out.append(("unigram", rff.unigram_sampler(counts), None, None))
    elif name == "quadratic":
      out.append(("quadratic", rff.quadratic_sampler(config.quadratic_alpha, config.quadratic_bucket), None, None))
    elif name == "exact":
      out.append(("exact", rff.exact_sampler(tau), None, None))
    elif name == "rff":
      for i, D in enumerate(config.rff_D):
        for nu in config.rff_nu:
          nu_v = tau if nu <= 0 else min(float(nu), tau)
          if nu > 0 and nu > tau:
            continue
          out.append(("rff", rff.rff_sampler(jax.random.fold_in(key, i), D, nu_v, config.rff_kappa), D, nu_v))
    else:
      raise ValueError(f"unknown sampler {name!r}; known: uniform, unigram, quadratic, exact, rff")
  return out


def _settings(config, rng):
  """Yields (setting, C, h, t, taus, counts, status)."""
  for i, d in enumerate(config.synthetic_d):
    C, h, t = synthetic_problem(jax.random.fold_in(rng, 100 + i), config.synthetic_n, d, config.num_queries,
                                config.synthetic_noise)
    # Unigram counts for synthetic classes: Zipf frequencies over a random order (independent of h).
    ranks = np.asarray(jax.random.permutation(jax.random.fold_in(rng, 200 + i), config.synthetic_n)) + 1
    yield f"synthetic d={d}", C, h, t, list(config.taus), 1.0 / ranks, ""
  if config.snapshot:
    path = config.snapshot
    if not os.path.exists(path):
      yield "trained (rf_lm)", None, None, None, [], None, f"not run: no snapshot at {path} (run configs/rff/lm.py first)"
      return
    z = np.load(path)
    q = min(config.num_queries, z["h"].shape[0])
    yield (f"trained {str(z['name'])}", jnp.asarray(z["class_vectors"]), jnp.asarray(z["h"][:q]),
           jnp.asarray(z["targets"][:q]), [float(z["tau"])], z["counts"], "")


def run(config, workdir, rng) -> registry.Output:
  del workdir
  rows = []
  settings = list(_settings(config, rng))
  bar = tqdm(desc="rf_bias rows")
  for si, (setting, C, h, t, taus, counts, status) in enumerate(settings):
    if status:
      rows.append(TABLE.row(setting=setting, status=status))
      continue
    n, d = C.shape
    for ti, tau in enumerate(taus):
      logits = tau * h @ C.T
      for label, sampler, D, nu in make_samplers(config, jax.random.fold_in(rng, 1000 * si + ti), n, tau, counts):
        state = sampler.init(C)
        log_q = sampler.log_probs(state, h)
        kl, tv, chi2, ent, top1 = (np.asarray(v) for v in rff.distribution_metrics(logits, log_q, t))
        for mi, m in enumerate(config.ms):
          key = jax.random.fold_in(jax.random.fold_in(rng, 7 + si * 1000 + ti), mi)
          res = [rff.gradient_bias(jax.random.fold_in(key, q), logits[q], log_q[q], t[q], m, config.reps, config.chunk)
                 for q in range(h.shape[0])]
          bias, floor, pred = (np.asarray(v) for v in zip(*res))  # GradientBias fields
          rows.append(TABLE.row(**{
              "setting": setting, "n": n, "d": d, "sampler": label, "D": D, "nu": nu, "m": m, "tau": tau,
              "entropy": float(ent.mean()), "top1": float(top1.mean()), "KL": float(kl.mean()),
              "TV": float(tv.mean()), "chi2": float(chi2.mean()), "bias": float(bias.mean()),
              "noise_floor": float(floor.mean()), "bias_over_floor": float(np.mean(bias / floor)),
              "bias_first_order": float(pred.mean()), "queries": int(h.shape[0]), "reps": config.reps,
              "status": "ok",
          }))
          bar.update()
  bar.close()
  notes = {
      "paper": paper_numbers.CLAIMS["bias"],
      "bias": "||E[g'] - (p - e_t)||_2 of the logit gradient, mean over queries; noise_floor = sqrt(sum Var/R)",
      "bias_first_order": "delta-method prediction (Sec. 3), valid when chi2/m is small",
      "sampling": "MC draws by inverse CDF from q~ = the dense q each sampler implies (its tree path probabilities) "
                  "restricted to the negatives and renormalized; KL/TV compare p with q over all n",
      "synthetic": f"c ~ U(S^(d-1)), h = normalize(c_t + {config.synthetic_noise} g/sqrt(d)); unigram = Zipf over a random order",
  }
  return registry.Output(rows=rows, notes=notes)


def plot(rows, notes):
  import matplotlib.pyplot as plt

  ok = [r for r in rows if r.get("status") == "ok"]
  figs = {}
  if not ok:
    return figs
  settings = sorted({r["setting"] for r in ok})
  # Bias vs D (RF-softmax per nu), with the other samplers as horizontal lines, at the largest m.
  for s in settings:
    rs = [r for r in ok if r["setting"] == s]
    taus = sorted({r["tau"] for r in rs})
    mmax = max(r["m"] for r in rs)
    fig, axes = plt.subplots(1, len(taus), figsize=(4 * len(taus), 3.5), squeeze=False)
    for ax, tau in zip(axes[0], taus):
      rt = [r for r in rs if r["tau"] == tau and r["m"] == mmax]
      for nu in sorted({r["nu"] for r in rt if r["sampler"] == "rff"}):
        pts = sorted((r["D"], r["bias"]) for r in rt if r["sampler"] == "rff" and r["nu"] == nu)
        ax.loglog(*zip(*pts), "o-", label=f"rff nu={nu:g}")
      for r in rt:
        if r["sampler"] != "rff":
          ax.axhline(r["bias"], ls="--", lw=1, color={"uniform": "k", "unigram": "gray", "quadratic": "g",
                                                      "exact": "r"}.get(r["sampler"], "b"), label=r["sampler"])
      floor = np.mean([r["noise_floor"] for r in rt])
      ax.axhline(floor, ls=":", color="r", label="noise floor")
      ax.set_title(f"tau={tau:g} (top-1 {rt[0]['top1']:.2f}), m={mmax}")
      ax.set_xlabel("D")
      ax.set_ylabel("gradient bias")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(s)
    fig.tight_layout()
    figs[f"bias_vs_D_{s.replace(' ', '_').replace('=', '')}"] = fig
  # Bias vs m per sampler (largest D, best nu for rff) at the largest tau.
  for s in settings:
    rs = [r for r in ok if r["setting"] == s]
    tau = max(r["tau"] for r in rs)
    rt = [r for r in rs if r["tau"] == tau]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    Dmax = max([r["D"] for r in rt if r["sampler"] == "rff"] or [0])
    labels = {}
    for r in rt:
      if r["sampler"] == "rff" and r["D"] != Dmax:
        continue
      lab = r["sampler"] if r["sampler"] != "rff" else f"rff D={r['D']} nu={r['nu']:g}"
      labels.setdefault(lab, []).append((r["m"], r["bias"]))
    for lab, pts in labels.items():
      ax.loglog(*zip(*sorted(pts)), "o-", label=lab)
    ax.set_xlabel("m")
    ax.set_ylabel("gradient bias")
    ax.set_title(f"{s}, tau={tau:g}")
    ax.legend(fontsize=6)
    fig.tight_layout()
    figs[f"bias_vs_m_{s.replace(' ', '_').replace('=', '')}"] = fig
  return figs


# The README headline setting: a peaked softmax (tau = 8) sampled with a moderate kernel width (nu = 4).
README_TAU, README_NU = 8.0, 4.0


def readme(res: dict) -> list[tables.ReadmeRow]:
  """README row: RF-softmax gradient bias at the smallest and largest D (first setting, largest m, README_TAU/NU)."""
  ok = [r for r in res["rows"] if r.get("status") == "ok" and r.get("sampler") == "rff"]
  if not ok:
    return []
  s = ok[0]["setting"]
  rs = [r for r in ok if r["setting"] == s]
  m = max(r["m"] for r in rs)
  tau = min({r["tau"] for r in rs}, key=lambda t: abs(t - README_TAU))
  rs = [r for r in rs if r["m"] == m and r["tau"] == tau]
  nu = min({r["nu"] for r in rs}, key=lambda v: abs(v - README_NU))
  rs = sorted((r for r in rs if r["nu"] == nu), key=lambda r: r["D"])
  lo, hi = rs[0], rs[-1]
  return [tables.ReadmeRow(
      f"RF-softmax, gradient bias vs D ({s}, m = {m}, τ = {tau:g}, ν = {nu:g})",
      f"bias **{hi['bias']:.2g}** at D = {hi['D']} (from {lo['bias']:.2g} at D = {lo['D']}; noise floor {hi['noise_floor']:.1g})",
      paper_numbers.CLAIMS["bias"].split(" [")[0] + " (qualitative)")]


EXPERIMENT = registry.Experiment(
    name="rf_bias",
    run=run,
    tables=(TABLE,),
    readme=readme,
    plot=plot,
    title="RF-softmax: proposal closeness to softmax and sampled-softmax gradient bias (Rawat et al. 2019)",
)
