r"""RF-softmax where it pays: held-out accuracy against **wall-clock** at 10^5-10^6 classes (issue 27).

Every table before this one compared samplers at equal steps and n <= 49,152. Here each method trains the same
student on the same teacher stream and we record, at checkpoints, the cumulative training wall-clock (evaluation
excluded) and held-out P@1, P@5 and perplexity (full softmax at evaluation). Per sampler and seed: the time to
reach 90 % and 95 % of the full softmax's final P@1 (same seed), or "not reached in budget".

* teacher (generative, so a label costs O(log n + d), not the O(n d) of sampling a softmax): unit class vectors
  $c^*_i \in S^{d-1}$, a flat or Zipf prior $\pi$ (ranks shuffled), $y \sim \pi$, $x = c^*_y + \sigma\varepsilon$,
  $\varepsilon \sim N(0, I_d)$. Its posterior is exactly the peaked softmax
  $p(y \mid x) \propto \pi_y e^{x^\top c^*_y / \sigma^2}$ (the Bayes row of the table);
* student (the paper's normalized form): $h = \mathrm{normalize}(W [x, 1])$, logits $\tau h^\top \hat c_i$,
  $\tau = \sqrt{1 + \sigma^2 d}/\sigma^2$ (the teacher's temperature at the typical $\|x\|$), student dimension
  d + 4 (room for the log prior); W trained with Adam, the class table with row-wise Adagrad (a zero gradient leaves
  a row and its accumulator unchanged, so the sparse update of the sampled steps equals the dense one of the full
  step: only the cost differs);
* sampled steps gather the label and negative rows only (batch-shared: m rows for the batch; per query: B m),
  corrected sampled loss (log q, accidental hits masked), scatter the row updates, refresh the sampler's tree
  for the touched rows; all donated, so no step copies the [n, d] table;
* samplers: full softmax, exact (softmax oracle, the unbiased ceiling; O(n d) per step), unigram (label counts of
  the first `unigram_count_samples` labels of the stream), uniform, RF-softmax with a bucketed tree
  (`rff.rff_bucket_sampler`: leaves of `rff_bucket` classes, exact kernel inside a drawn bucket) at several D.

Each run stops at its step cap or time budget (whichever first); the budgets are in the config and the notes.
Reference: Rawat et al., "Sampled Softmax with Random Fourier Features", NeurIPS 2019 (the claim that RF-softmax
trains large-output models faster; no numbers verified offline, see `experiments/rff/paper.py`).
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

from asoftmax import rff
from experiments import registry, tables


# --------------------------------------------------------------------------------------------- teacher
class Teacher(NamedTuple):
  C: jax.Array  # [n, d] unit class vectors
  log_prior: jax.Array  # [n]
  cdf: jax.Array  # [n] prior CDF (label sampling by search)
  sigma: float


def make_teacher(key, n, d, prior, zipf_a, sigma):
  kc, kp = jax.random.split(key)
  C = rff.normalize(jax.random.normal(kc, (n, d)))
  if prior == "flat":
    lp = jnp.zeros((n,))
  elif prior == "zipf":
    lp = -zipf_a * jnp.log(jnp.arange(1, n + 1, dtype=jnp.float32))[jax.random.permutation(kp, n)]
  else:
    raise ValueError(f"prior must be 'flat' or 'zipf', got {prior!r}")
  lp = jax.nn.log_softmax(lp)
  return Teacher(C, lp, jnp.cumsum(jnp.exp(lp)), float(sigma))


@functools.partial(jax.jit, static_argnames=("size",))
def draw(key, C, cdf, sigma, size):
  """(x [size, d], y [size]) from the generative teacher."""
  ky, kx = jax.random.split(key)
  y = jnp.minimum(jnp.searchsorted(cdf, jax.random.uniform(ky, (size,)) * cdf[-1], side="right"),
                  cdf.shape[0] - 1).astype(jnp.int32)
  return C[y] + sigma * jax.random.normal(kx, (size, C.shape[1])), y


def student_tau(sigma, d):
  return float(np.sqrt(1.0 + sigma**2 * d) / sigma**2)


def _inputs(x):
  return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], -1)


# --------------------------------------------------------------------------------------------- evaluation
@functools.partial(jax.jit, static_argnames=("block",))
def _eval_logits_stats(Q, Cn, y, tau, lp_extra, block):
  """NLL, P@1, P@5 of logits tau Q Cn^T + lp_extra over blocks of queries (never all [T, n] at once)."""
  T = Q.shape[0]

  def one(a):
    q, t = a
    logits = tau * q @ Cn.T + lp_extra
    true = jnp.take_along_axis(logits, t[:, None], 1)[:, 0]
    rank = jnp.sum(logits > true[:, None], -1)
    return jax.nn.logsumexp(logits, -1) - true, rank
  nll, rank = jax.lax.map(one, (Q.reshape(T // block, block, -1), y.reshape(T // block, block)))
  nll, rank = nll.reshape(-1), rank.reshape(-1)
  return nll.mean(), (rank == 0).mean(), (rank < 5).mean() / 5.0


def evaluate(params, X, y, tau, block):
  Q = rff.normalize(_inputs(X) @ params["W"].T)
  nll, p1, p5 = _eval_logits_stats(Q, rff.normalize(params["C"]), y, tau, 0.0, block)
  return {"perplexity": float(np.exp(float(nll))), "p_at_1": float(p1), "p_at_5": float(p5)}


def bayes_metrics(teacher, X, y, block):
  """The teacher's own posterior on the test set: the best any student can do."""
  nll, p1, p5 = _eval_logits_stats(X, teacher.C, y, 1.0 / teacher.sigma**2, teacher.log_prior, block)
  return {"perplexity": float(np.exp(float(nll))), "p_at_1": float(p1), "p_at_5": float(p5)}


# --------------------------------------------------------------------------------------------- training steps
def _rowwise_adagrad(C, acc, rows, g, lr):
  """Row-wise Adagrad on the rows `rows` [K] (unique; index n = padding, dropped) with summed gradients g [K, d]."""
  acc = acc.at[rows].add(jnp.mean(g * g, -1), mode="drop")
  scale = lr / jnp.sqrt(acc[jnp.minimum(rows, C.shape[0] - 1)] + 1e-10)
  return C.at[rows].add(-scale[:, None] * g, mode="drop"), acc


@functools.lru_cache(maxsize=None)
def make_full_step(tau, lr_w, lr_c):
  opt = optax.adam(lr_w)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(params, x, y):
    def f(W, C):
      return rff.full_softmax_loss(_inputs(x) @ W.T, C, y, tau).mean()
    loss, (gW, gC) = jax.value_and_grad(f, argnums=(0, 1))(params["W"], params["C"])
    upd, opt_state = opt.update(gW, params["opt"], params["W"])
    acc = params["acc"] + jnp.mean(gC * gC, -1)
    C = params["C"] - (lr_c / jnp.sqrt(acc + 1e-10))[:, None] * gC
    return {"W": optax.apply_updates(params["W"], upd), "C": C, "acc": acc, "opt": opt_state}, loss

  return opt, step


def make_sampled_step(sampler, m, shared, tau, lr_w, lr_c):
  """A donated sampled-softmax step: gather label + negative rows, corrected loss, sparse updates, tree refresh."""
  opt = optax.adam(lr_w)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, sstate, x, y, key):
    B = x.shape[0]
    n = params["C"].shape[0]
    xin = _inputs(x)
    h = jax.lax.stop_gradient(rff.normalize(xin @ params["W"].T))
    ids, lq = sampler.sample(sstate, key, h, m, shared=shared)  # [m] or [B, m]
    flat = ids.reshape(-1)
    local_t = jnp.arange(B)
    local_s = B + jnp.arange(flat.shape[0]).reshape(ids.shape)
    hit = (ids[None, :] == y[:, None]) if shared else (ids == y[:, None])
    log_e = jnp.where(hit, jnp.inf, jnp.broadcast_to(lq + jnp.log(float(m)), hit.shape))  # hit: logit -> -inf
    rows = jnp.concatenate([y, flat])

    def f(W, Cl):
      return rff.corrected_sampled_loss(xin @ W.T, Cl, local_t, local_s, log_e, tau).mean()
    loss, (gW, gl) = jax.value_and_grad(f, argnums=(0, 1))(params["W"], params["C"][rows])
    uid, inv = jnp.unique(rows, return_inverse=True, size=rows.shape[0], fill_value=n)
    g = jnp.zeros((rows.shape[0], gl.shape[1]), gl.dtype).at[inv.reshape(-1)].add(gl)
    C, acc = _rowwise_adagrad(params["C"], params["acc"], uid, g, lr_c)
    upd, opt_state = opt.update(gW, params["opt"], params["W"])
    sstate = sampler.update(sstate, uid, C)  # padding id n is dropped
    return {"W": optax.apply_updates(params["W"], upd), "C": C, "acc": acc, "opt": opt_state}, sstate, loss

  return opt, step


# --------------------------------------------------------------------------------------------- protocol
def _specs(config):
  specs = []
  for neg in config.negatives:
    if neg not in ("shared", "per_query"):
      raise ValueError(f"negatives must hold 'shared' and/or 'per_query', got {neg!r}")
  known = ("full", "exact", "unigram", "uniform", "rff_bucket")
  bad = [s for s in config.samplers if s not in known]
  if bad:
    raise ValueError(f"unknown samplers {bad}; known: {known}")
  if "full" in config.samplers:
    specs.append({"sampler": "full", "negatives": ""})
  for neg in config.negatives:
    for s in config.samplers:
      if s == "full" or (neg == "per_query" and s not in config.per_query_samplers):
        continue
      if s == "rff_bucket":
        Ds = config.rff_D if neg == "shared" else config.per_query_D
        specs += [{"sampler": s, "negatives": neg, "D": int(D)} for D in Ds]
      else:
        specs.append({"sampler": s, "negatives": neg})
  return specs


def _label(spec):
  if spec["sampler"] == "full":
    return "full softmax"
  lab = spec["sampler"] if spec["sampler"] != "rff_bucket" else f"RF D={spec['D']}"
  return f"{lab} ({spec['negatives'].replace('_', '-')})"


def _make_sampler(config, spec, key, counts, tau):
  s = spec["sampler"]
  if s == "exact":
    return rff.exact_sampler(tau)
  if s == "unigram":
    return rff.unigram_sampler(counts)
  if s == "uniform":
    return rff.uniform_sampler(config.num_classes)
  return rff.rff_bucket_sampler(key, spec["D"], config.rff_nu, bucket=config.rff_bucket, kappa=config.rff_kappa,
                                precompute=False)


_STEPS: dict = {}


def _cached_step(config, spec, tau):
  """One sampler and compiled step per spec, shared by the seeds (a new sampler has new closures: a recompile).

  RF-softmax's W is therefore drawn once per D (key: config.seed, D); unigram's counts travel in the state."""
  key = (tuple(sorted(spec.items())), config.num_classes, config.m, tau, config.lr_w, config.lr_c, config.rff_bucket,
         config.rff_nu, config.rff_kappa, config.seed)
  if key not in _STEPS:
    w_key = jax.random.fold_in(jax.random.key(config.seed), int(spec.get("D") or 0))
    sampler = _make_sampler(config, spec, w_key, np.ones(config.num_classes), tau)
    opt, step = make_sampled_step(sampler, config.m, spec["negatives"] == "shared", tau, config.lr_w, config.lr_c)
    _STEPS.clear() if len(_STEPS) > 32 else None
    _STEPS[key] = (sampler, opt, step)
  return _STEPS[key]


def checkpoints(max_steps, count, first):
  """Geometric checkpoint steps from `first` to `max_steps` (unique ints)."""
  return sorted({int(round(s)) for s in np.geomspace(first, max_steps, count)} | {max_steps})


def train_one(config, spec, teacher, seed_key, test, counts, tau):
  """One run; returns the curve [{step, time_s, perplexity, p_at_1, p_at_5}] and the median ms per step."""
  n, d = config.num_classes, config.dim
  ds = d + config.extra_student_dims
  k_init, k_samp, k_data = jax.random.split(seed_key, 3)
  kw, kc = jax.random.split(k_init)
  params = {"W": jax.random.normal(kw, (ds, d + 1)) / np.sqrt(d + 1), "C": jax.random.normal(kc, (n, ds)),
            "acc": jnp.zeros((n,), jnp.float32)}
  full = spec["sampler"] == "full"
  if full:
    opt, step = make_full_step(tau, config.lr_w, config.lr_c)
    max_steps, budget = config.full_steps, config.full_budget_s
  else:
    sampler, opt, step = _cached_step(config, spec, tau)
    if spec["sampler"] == "unigram":  # the cached step reads the counts from the state: this seed's counts
      sstate = rff.unigram_sampler(counts).init()
    else:
      sstate = sampler.init(params["C"])
    max_steps, budget = config.sampled_steps, config.sampled_budget_s
  params["opt"] = opt.init(params["W"])
  marks = set(checkpoints(max_steps, config.checkpoints, config.first_checkpoint))
  curve, times, elapsed = [], [], 0.0
  Xt, yt = test
  for s in range(max_steps):
    x, y = draw(jax.random.fold_in(k_data, s), teacher.C, teacher.cdf, teacher.sigma, config.batch)  # not timed
    jax.block_until_ready(x)
    t0 = time.perf_counter()
    if full:
      params, loss = step(params, x, y)
    else:
      params, sstate, loss = step(params, sstate, x, y, jax.random.fold_in(k_samp, s))
    jax.block_until_ready(loss)
    dt = time.perf_counter() - t0
    times.append(dt)
    elapsed += dt if s > 0 else 0.0  # the first step holds the compilation: not counted
    last = elapsed >= budget or s + 1 == max_steps
    if s + 1 in marks or last:
      curve.append({"step": s + 1, "time_s": elapsed, **evaluate(params, Xt, yt, tau, config.eval_block)})
    if last:
      break
  ms = 1e3 * float(np.median(times[1:])) if len(times) > 1 else 1e3 * times[0]
  stop = "time budget" if elapsed >= budget else "step cap"
  return {"curve": curve, "ms_per_step": ms, "steps": len(times), "stopped_by": stop,
          "loss_finite": bool(np.isfinite(float(loss)))}


def time_to(curve, target):
  """(time_s, step) of the first checkpoint with P@1 >= target; None if never."""
  for c in curve:
    if c["p_at_1"] >= target:
      return c["time_s"], c["step"]
  return None


def _interval(vals):
  v = np.asarray(vals, np.float64)
  if len(v) < 2:
    return float(v.mean()), float("nan")
  return float(v.mean()), float(scipy.stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def _fmt(vals, digits):
  mean, half = _interval(vals)
  return f"{mean:.{digits}f} ± {half:.{digits}f}" if np.isfinite(half) else f"{mean:.{digits}f}"


class TimeRow(NamedTuple):
  prior: str | None = None
  sampler: str | None = None
  steps: int | None = None
  ms_per_step: float | None = None
  final_p_at_1: str | None = None
  final_p_at_5: str | None = None
  final_perplexity: str | None = None
  time_to_90_s: str | None = None
  time_to_95_s: str | None = None
  full_time_to_95_over_this: str | None = None
  status: str | None = None


class TeacherRow(NamedTuple):
  prior: str | None = None
  bayes_p_at_1: str | None = None
  bayes_p_at_5: str | None = None
  bayes_perplexity: str | None = None
  full_final_p_at_1: str | None = None
  full_plateau: str | None = None


TIME = tables.Table("time_to_accuracy", TimeRow,
                    title="Time to 90 % / 95 % of the full softmax's final P@1 (training wall-clock, seconds)",
                    hidden=("curves", "p_at_1_seeds", "time_to_95_seeds", "time_to_90_seeds", "stopped_by",
                            "negatives", "D", "num_classes"))
TEACHER = tables.Table("teacher", TeacherRow, title="Teacher (Bayes posterior) and the full softmax's end point")


def _reached(vals, digits=1):
  got = [v for v in vals if v is not None]
  if len(got) == len(vals):
    return _fmt(got, digits)
  if not got:
    return "not reached in budget"
  return f"{np.mean(got):.{digits}f} ({len(got)}/{len(vals)} seeds; others not reached in budget)"


def run(config, workdir, rng) -> registry.Output:
  del workdir
  n, d = config.num_classes, config.dim
  tau = student_tau(config.sigma, d)
  specs = _specs(config)
  runs, bayes = {}, {}
  t_start = time.perf_counter()
  for prior in config.priors:
    for s in range(config.seeds):
      key = jax.random.fold_in(jax.random.fold_in(rng, s), ("flat", "zipf").index(prior))
      kt, ke, ks, ku = jax.random.split(key, 4)
      teacher = make_teacher(kt, n, d, prior, config.zipf_a, config.sigma)
      Xt, yt = draw(ke, teacher.C, teacher.cdf, teacher.sigma, config.test_size)
      bayes.setdefault(prior, []).append(bayes_metrics(teacher, Xt, yt, config.eval_block))
      _, ylab = draw(ku, teacher.C, teacher.cdf, teacher.sigma, config.unigram_count_samples)
      counts = np.bincount(np.asarray(ylab), minlength=n).astype(np.float64)
      for spec in specs:
        r = train_one(config, spec, teacher, ks, (Xt, yt), counts, tau)  # same init and stream for every sampler
        runs.setdefault((prior, _label(spec)), []).append(r)
        c = r["curve"][-1]
        print(f"{prior} seed {s} {_label(spec)}: {r['steps']} steps {c['time_s']:.1f} s, P@1 {c['p_at_1']:.3f} "
              f"ppl {c['perplexity']:.1f}, {r['ms_per_step']:.1f} ms/step ({time.perf_counter() - t_start:.0f} s)",
              flush=True)

  rows = []
  for prior in config.priors:
    fulls = runs.get((prior, "full softmax"))
    finals = [f["curve"][-1]["p_at_1"] for f in fulls] if fulls else None
    plateau = None
    if fulls:
      gains = [f["curve"][-1]["p_at_1"] - f["curve"][-2]["p_at_1"] if len(f["curve"]) > 1 else float("nan")
               for f in fulls]
      plateau = (f"last checkpoint gain {_fmt(gains, 4)} P@1 (steps {fulls[0]['curve'][-2]['step']} -> "
                 f"{fulls[0]['curve'][-1]['step']}), stopped by {fulls[0]['stopped_by']}")
    bs = bayes[prior]
    rows.append(TEACHER.row(prior=prior, bayes_p_at_1=_fmt([b["p_at_1"] for b in bs], 3),
                            bayes_p_at_5=_fmt([b["p_at_5"] for b in bs], 4),
                            bayes_perplexity=_fmt([b["perplexity"] for b in bs], 1),
                            full_final_p_at_1=_fmt(finals, 3) if finals else None, full_plateau=plateau))
    full95 = [time_to(f["curve"], 0.95 * fp) for f, fp in zip(fulls, finals)] if fulls else None
    for spec in specs:
      rs = runs[(prior, _label(spec))]
      t90 = t95 = None
      ratio = None
      if fulls:
        t90 = [time_to(r["curve"], 0.90 * fp) for r, fp in zip(rs, finals)]
        t95 = [time_to(r["curve"], 0.95 * fp) for r, fp in zip(rs, finals)]
        pairs = [f[0] / t[0] for f, t in zip(full95, t95) if f is not None and t is not None and t[0] > 0]
        ratio = (_fmt(pairs, 1) if len(pairs) == len(rs) else
                 (f"{np.mean(pairs):.1f} ({len(pairs)}/{len(rs)} seeds)" if pairs else "–"))
      status = "ok" if all(r["loss_finite"] for r in rs) else "non-finite loss in some seed"
      rows.append(TIME.row(
          prior=prior, sampler=_label(spec), steps=int(np.median([r["steps"] for r in rs])),
          ms_per_step=float(np.median([r["ms_per_step"] for r in rs])),
          final_p_at_1=_fmt([r["curve"][-1]["p_at_1"] for r in rs], 3),
          final_p_at_5=_fmt([r["curve"][-1]["p_at_5"] for r in rs], 4),
          final_perplexity=_fmt([r["curve"][-1]["perplexity"] for r in rs], 1),
          time_to_90_s=_reached([None if t is None else t[0] for t in t90]) if t90 else None,
          time_to_95_s=_reached([None if t is None else t[0] for t in t95]) if t95 else None,
          full_time_to_95_over_this=ratio, status=status,
          curves=[r["curve"] for r in rs], p_at_1_seeds=[r["curve"][-1]["p_at_1"] for r in rs],
          time_to_95_seeds=[None if t is None else t[0] for t in t95] if t95 else None,
          time_to_90_seeds=[None if t is None else t[0] for t in t90] if t90 else None,
          stopped_by=[r["stopped_by"] for r in rs], negatives=spec["negatives"], D=spec.get("D"), num_classes=n))
  notes = {
      "teacher": (f"n = {n} classes on S^{d - 1}, y ~ prior ({', '.join(config.priors)}; Zipf exponent {config.zipf_a}, "
                  f"ranks shuffled), x = c*_y + {config.sigma} N(0, I_{d}); posterior softmax(x.c*/sigma^2 + log prior)"),
      "student": (f"h = normalize(W [x, 1]), dim {d + config.extra_student_dims}, tau = {tau:.2f}; W: Adam "
                  f"{config.lr_w}; class table: row-wise Adagrad {config.lr_c}; batch {config.batch} fresh samples"),
      "budgets": (f"full softmax: <= {config.full_steps} steps or {config.full_budget_s} s of training; sampled: <= "
                  f"{config.sampled_steps} steps or {config.sampled_budget_s} s (first step, with compilation, not "
                  f"counted; data generation and evaluation not timed)"),
      "negatives": (f"m = {config.m} with replacement, modes {tuple(config.negatives)} (per query only for "
                    f"{tuple(config.per_query_samplers)}); RF: bucketed tree, bucket {config.rff_bucket}, nu "
                    f"{config.rff_nu}, kappa {config.rff_kappa}, tree refreshed for the touched rows every step"),
      "evaluation": f"{config.test_size} held-out teacher samples, full softmax; P@5 = P(label in top 5) / 5",
      "intervals": (f"mean ± 95 % t-interval over {config.seeds} seeds (teacher, stream, init and sampling keys; the "
                    "RFF matrix W is drawn once per D and shared by the seeds)"),
      "time to x %": ("training wall-clock at the first checkpoint whose P@1 >= x % of the same seed's full-softmax "
                      "final P@1; checkpoints are geometric in steps, so times are upper bounds at checkpoint "
                      "resolution; 'full_time_to_95_over_this' = full softmax's own time to 95 % / this sampler's"),
      "device": f"{jax.devices()[0].platform}, jax {jax.__version__}",
      "wall_clock_s": round(time.perf_counter() - t_start, 1),
  }
  return registry.Output(rows=rows, notes=notes)


def plot(rows, notes):
  del notes
  import matplotlib.pyplot as plt

  out = {}
  trs = [r for r in rows if r.get("table") == "time_to_accuracy"]
  for prior in sorted({r["prior"] for r in trs}):
    rs = [r for r in trs if r["prior"] == prior]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for r in rs:
      curves = r["curves"]
      for col, metric in enumerate(("p_at_1", "p_at_5", "perplexity")):
        for row, xkey in enumerate(("time_s", "step")):
          ax = axes[row, col]
          # checkpoints every seed reached (a run cut by its time budget adds a last point at its own step)
          common = sorted(set.intersection(*[{p["step"] for p in c} for c in curves]))
          pts = [[next(p for p in c if p["step"] == st) for st in common] for c in curves]
          xs = np.mean([[p[xkey] for p in c] for c in pts], 0)
          ys = np.asarray([[p[metric] for p in c] for c in pts])
          mean = ys.mean(0)
          half = (scipy.stats.t.ppf(0.975, len(ys) - 1) * ys.std(0, ddof=1) / np.sqrt(len(ys))
                  if len(ys) > 1 else np.zeros_like(mean))
          half = np.minimum(half, 0.9 * np.abs(mean)) if metric == "perplexity" else half  # log axis
          ls = "-" if "per-query" not in r["sampler"] else "--"
          line, = ax.plot(np.maximum(xs, 1e-2), mean, ls, marker=".", label=r["sampler"])
          ax.fill_between(np.maximum(xs, 1e-2), mean - half, mean + half, color=line.get_color(), alpha=0.2)
          ax.set_xscale("log")
          if metric == "perplexity":
            ax.set_yscale("log")
          ax.set_xlabel("training wall-clock (s)" if xkey == "time_s" else "steps")
          ax.set_ylabel(metric.replace("p_at_", "P@"))
    full = [r for r in rs if r["sampler"] == "full softmax"]
    if full:
      fp = np.mean(full[0]["p_at_1_seeds"])
      for row in range(2):
        axes[row, 0].axhline(0.95 * fp, color="k", lw=0.7, ls=":", label="95 % of full's final P@1")
    axes[0, 0].legend(fontsize=6)
    n = rs[0].get("num_classes")
    fig.suptitle(f"{prior} prior, n = {n}: held-out metrics vs training wall-clock (top) and steps (bottom); mean "
                 "and 95 % t-band over seeds at the checkpoints every seed reached")
    fig.tight_layout()
    out[f"curves_{prior}"] = fig
  return out


def readme(res: dict):
  """README row: Zipf prior; the full softmax's time to 95 % of its final P@1 and the fastest sampled method's."""
  rows = [r for r in res["rows"] if r.get("table") == "time_to_accuracy" and r.get("prior") == "zipf"]
  if not rows:
    return []
  n = rows[0].get("num_classes")

  def secs(r):
    v = [t for t in (r.get("time_to_95_seeds") or []) if t is not None]
    return float(np.mean(v)) if v and len(v) == len(r["time_to_95_seeds"]) else None

  full = [r for r in rows if r["sampler"] == "full softmax"]
  reached = sorted((secs(r), r["sampler"]) for r in rows if r["sampler"] != "full softmax" and secs(r) is not None)
  rf = [r for r in rows if r["sampler"].startswith("RF")]

  def rf_cell(r):
    v = [t for t in (r.get("time_to_95_seeds") or []) if t is not None]
    if not v:
      return "not reached in budget"
    k = len(r["time_to_95_seeds"])
    return f"{np.mean(v):.1f} s" + ("" if len(v) == k else f" ({len(v)}/{k} seeds; others not reached)")
  parts = []
  if full:
    parts.append(f"full softmax {secs(full[0]):.1f} s (final P@1 {full[0]['final_p_at_1'].split(' ±')[0]})")
  if reached:
    parts.append(f"fastest: {reached[0][1]} **{reached[0][0]:.2f} s**")
  for r in rf:
    parts.append(f"{r['sampler']} {rf_cell(r)}")
  return [tables.ReadmeRow(
      f"RF-softmax, time to 95 % of the full softmax's final P@1 (generative teacher, Zipf prior, n = {n:,}, CPU)",
      "; ".join(parts), "RF-softmax trains large-output models faster than full softmax (qualitative)")]


EXPERIMENT = registry.Experiment(
    name="rf_time_to_accuracy", run=run, tables=(TEACHER, TIME), plot=plot, readme=readme,
    title="RF-softmax: held-out P@1 / P@5 / perplexity against training wall-clock at 10^5-10^6 classes")
